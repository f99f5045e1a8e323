"""The side path (`side_path=True`, issue 25 items 1 and 2): whole-slice
masks of stock `Dense`, `EinsumDense`, `Conv` and `Embedding` kernels train
through their layer's forward pass, never forming the kernel's weight
gradient; element masks of `Dense`/`EinsumDense` kernels gather their
layer's weight gradient inside its backward step (no dense gradient reaches
the optimizer).

Oracles: the slice gradients against a few lines of NumPy backpropagation
(float64; float32 tolerance `rtol=1e-5, atol=1e-6`); frozen elements and
the forward pass bit for bit against the stock layer; the trained weights
against compact state's gather path (`side_path=False`, the kernel's full
gradient gathered), equal up to the summation order of two different
matmuls (`rtol=1e-5, atol=1e-6`); the compiled step's cost (JAX) and the
kernel's gradient (TensorFlow's tape, torch's autograd) for "never formed".
"""

import warnings

import keras
import numpy as np
import pytest

from backends import IS_JAX, IS_TF, IS_TORCH, gradients, jax_only, to_numpy
from masked_opt import MaskedOptimizer, masks

B, T = 8, 5


def _einsum_out(x, w):  # "abc,cde->abde": a contracted axis (c) and produced ones (d, e)
    return np.einsum("abc,cde->abde", x, w)


# kind -> (layer, input, mask given, kernel axis of the slices, trained indices)
CASES = {
    "dense rows": lambda: (keras.layers.Dense(12, name="k"), (B, 10), masks.rows([1, 4, 7]), 0, [1, 4, 7]),
    "dense columns": lambda: (keras.layers.Dense(12, name="k"), (B, 10), masks.columns([0, 11]), 1, [0, 11]),
    "einsum heads": lambda: (keras.layers.EinsumDense("abc,cde->abde", (T, 4, 3), name="k"), (B, T, 6),
                             np.array([False, True, False, True]).reshape(1, 4, 1), 1, [1, 3]),
    "einsum contracted": lambda: (keras.layers.EinsumDense("abc,cde->abde", (T, 4, 3), name="k"), (B, T, 6),
                                  masks.rows([2, 5]), 0, [2, 5]),
    "conv output channels": lambda: (keras.layers.Conv2D(5, 3, padding="same", name="k"), (B, 6, 6, 3),
                                     masks.columns([1, 3]), 3, [1, 3]),
    "conv input channels": lambda: (keras.layers.Conv2D(5, 3, strides=2, name="k"), (B, 7, 7, 3),
                                    np.array([True, False, True]).reshape(1, 1, 3, 1), 2, [0, 2]),
    "embedding rows": lambda: (keras.layers.Embedding(20, 6, name="k"), (B, T), masks.rows([0, 3, 9]), 0,
                               [0, 3, 9]),
}


def _model(kind, seed=0):
    layer, shape, mask, axis, idx = CASES[kind]()
    keras.utils.set_random_seed(seed)
    dtype = "int32" if kind.startswith("embedding") else "float32"
    inputs = keras.Input(shape[1:], dtype=dtype)
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        x = rng.integers(0, 20, size=shape).astype("int32")
        x[0, :3] = [0, 3, 9]  # every trained row is looked up
    else:
        x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=to_numpy(model(x)).shape).astype("float32")
    return model, layer, x, y, mask, axis, np.array(idx)


def _oracle_kernel_gradient(kind, layer, x, y):
    """d mean((f(x) - y)^2) / d kernel, in float64."""
    w = to_numpy(layer.kernel if hasattr(layer, "kernel") else layer.embeddings).astype(np.float64)
    x64 = x.astype(np.float64)
    if kind.startswith("dense"):
        out = x64 @ w + to_numpy(layer.bias)
        g = 2 * (out - y) / out.size
        return x64.T @ g
    if kind.startswith("einsum"):
        out = _einsum_out(x64, w)
        g = 2 * (out - y) / out.size
        return np.einsum("abc,abde->cde", x64, g)
    if kind.startswith("conv"):
        patches, out_shape = _patches(x64, layer)
        out = np.einsum("bhwijc,ijcf->bhwf", patches, w) + to_numpy(layer.bias)
        g = 2 * (out - y) / out.size
        return np.einsum("bhwijc,bhwf->ijcf", patches, g)
    out = w[x]
    g = 2 * (out - y) / out.size
    grad = np.zeros_like(w)
    np.add.at(grad, x.reshape(-1), g.reshape(-1, w.shape[1]))
    return grad


def _patches(x, layer):
    """(batch, out_h, out_w, kh, kw, channels) windows of a channels-last 2-D convolution."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    if layer.padding == "same":
        ph, pw = kh // 2, kw // 2
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = np.empty((x.shape[0], oh, ow, kh, kw, x.shape[3]))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :]
    return out, (oh, ow)


class _Spy(keras.optimizers.SGD):
    """SGD that records the gradients it is given (eager steps only)."""

    seen: list = []

    def apply(self, grads, trainable_variables=None):
        self.seen.append([None if g is None else to_numpy(g) for g in grads])
        return super().apply(grads, trainable_variables)


@pytest.mark.parametrize("kind", list(CASES))
def test_slice_gradients_are_the_slices_of_the_numpy_gradient_and_the_kernel_has_none(kind):
    model, layer, x, y, mask, axis, idx = _model(kind)
    name = "embeddings" if kind.startswith("embedding") else "kernel"
    spy = _Spy(1e-3)
    spy.seen = []
    given = {f"k/{name}": mask, **({"k/bias": False} if getattr(layer, "bias", None) is not None else {})}
    optimizer = MaskedOptimizer(spy, masks=given, compact_state=True, side_path=True)
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
    optimizer.build(model.trainable_variables)  # before the first step: its forward pass has the side term
    kernel = getattr(layer, name)
    proxies = [v for v in model.trainable_variables if "masked_compact_" in v.path]
    assert [tuple(v.shape) for v in proxies] == [(len(idx) * int(np.prod(kernel.shape)) // kernel.shape[axis],)]
    expected = np.take(_oracle_kernel_gradient(kind, layer, x, y), idx, axis=axis)
    model.train_on_batch(x, y)
    (grads,) = spy.seen
    compact = [g for g in grads if g is not None and g.shape == proxies[0].shape]
    assert len(compact) == 1
    np.testing.assert_allclose(compact[0].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    # The kernel's own gradient is never computed: the layer stops it.
    loss = lambda: keras.ops.mean(keras.ops.square(keras.ops.subtract(model(x), y)))
    if IS_TORCH:
        import torch

        kernel_grad = torch.autograd.grad(loss(), [kernel.value], allow_unused=True)[0]
    else:
        kernel_grad = gradients(loss, [kernel])[0]
    if IS_JAX:
        assert not np.any(to_numpy(kernel_grad))  # jax.grad gives zeros for a stopped input
    else:
        assert kernel_grad is None
    (proxy_grad,) = gradients(loss, proxies)
    np.testing.assert_allclose(to_numpy(proxy_grad).reshape(expected.shape),
                               np.take(_oracle_kernel_gradient(kind, layer, x, y), idx, axis=axis),
                               rtol=1e-5, atol=1e-6)


def _fit(kind, side_path, epochs=3, inner=None, seed=0):
    model, layer, x, y, mask, axis, idx = _model(kind, seed)
    name = "embeddings" if kind.startswith("embedding") else "kernel"
    xs, ys = np.concatenate([x] * 4), np.concatenate([y] * 4)
    optimizer = MaskedOptimizer(inner or keras.optimizers.AdamW(1e-2, weight_decay=0.05), masks={f"k/{name}": mask},
                                compact_state=True, side_path=side_path)
    model.compile(optimizer=optimizer, loss="mse")
    kernel = getattr(layer, name)
    before = to_numpy(kernel)
    model.fit(xs, ys, batch_size=B, epochs=epochs, shuffle=False, verbose=0)
    return model, optimizer, kernel, before, to_numpy(kernel), idx, axis


@pytest.mark.parametrize("kind", list(CASES))
def test_frozen_elements_stay_bit_identical_and_the_slices_train_as_compact_state_does(kind):
    # SGD with momentum and weight decay: Adam's normalisation would magnify the
    # last-bit differences of two summation orders where a gradient is near zero.
    sgd = lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01)
    model, optimizer, kernel, before, after, idx, axis = _fit(kind, side_path=True, inner=sgd())
    frozen = ~optimizer.get_mask(kernel)
    assert np.array_equal(after[frozen], before[frozen])
    assert np.all(np.take(after, idx, axis=axis) != np.take(before, idx, axis=axis))
    _, reference, _, _, gathered, _, _ = _fit(kind, side_path=False, inner=sgd())
    np.testing.assert_allclose(after, gathered, rtol=1e-5, atol=1e-6)
    ours = [v for v in optimizer.variables]
    theirs = [v for v in reference.variables]
    assert [tuple(v.shape) for v in ours] == [tuple(v.shape) for v in theirs]  # the saved layout is compact state's


@pytest.mark.parametrize("trained", ["columns", "elements"])
def test_a_large_kernel_keeps_its_frozen_elements_and_its_forward_pass_is_the_stock_layers_bit_for_bit(trained):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((64,))
    layer = keras.layers.Dense(64, activation="gelu", name="k")
    model = keras.Model(inputs, layer(inputs))  # a 64 x 64 kernel: 4,096 elements
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 64)).astype("float32"), rng.normal(size=(32, 64)).astype("float32")
    mask = np.broadcast_to(masks.columns(range(0, 64, 7))(layer.kernel), (64, 64))
    if trained == "elements":  # random elements over every row and column: the whole kernel's block
        mask = rng.random((64, 64)) < 0.15
    optimizer = MaskedOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.1),
                                masks={"k/kernel": mask}, compact_state=True, side_path=True)
    model.compile(optimizer=optimizer, loss="mse")
    before = to_numpy(layer.kernel)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    assert any("masked_compact_" in v.path for v in model.trainable_variables)
    after = to_numpy(layer.kernel)
    frozen = ~optimizer.get_mask(layer.kernel)
    assert frozen.sum() == 4096 - mask.sum() > 3000 and np.array_equal(after[frozen], before[frozen])
    assert np.all(after[~frozen] != before[~frozen])
    stock = to_numpy(type(layer).call(layer, keras.ops.convert_to_tensor(x)))
    assert np.array_equal(to_numpy(layer(x)), stock)  # the side term adds an exact zero


@jax_only
def test_the_compiled_step_never_forms_the_kernels_weight_gradient():
    # XLA's cost analysis of the trainer's step. Layer "a" (256 x 256, 8
    # trained columns, or random elements in them) sits on a frozen layer
    # "b", so nothing but its own weights needs a gradient: the side path
    # costs what `trainable=False` costs plus the slices' small matmuls; the
    # gather path adds the full 128 x 256 x 256 weight gradient.
    import jax

    def flops(kind):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((256,))
        below = keras.layers.Dense(256, name="b", trainable=False)
        model = keras.Model(inputs, keras.layers.Dense(256, name="a")(below(inputs)))
        if kind == "trainable=False":
            model.get_layer("a").trainable = False
            model.get_layer("a").bias.trainable = True  # something to train
            optimizer = keras.optimizers.Adam(1e-3)
        else:
            mask = np.broadcast_to(masks.columns(range(8))(model.get_layer("a").kernel), (256, 256))
            if kind == "side path, elements":
                mask = mask & (np.random.default_rng(0).random((256, 256)) < 0.5)
            optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks={"a/kernel": mask},
                                        compact_state=True, side_path=kind != "gather path")
        model.compile(optimizer=optimizer, loss="mse")
        x = np.ones((128, 256), "float32")
        model.train_on_batch(x, x)
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        analysis = jax.jit(model.train_step).lower(state, (x, x)).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    side, gathered, frozen = flops("side path"), flops("gather path"), flops("trainable=False")
    elements = flops("side path, elements")
    matmul = 2 * 128 * 256 * 256
    assert gathered - side > 0.8 * matmul, (side, gathered)
    assert side - frozen < 0.2 * matmul, (side, frozen)
    assert elements - frozen < 0.2 * matmul, (elements, frozen)  # the 8 columns' block, then the elements


def test_torch_autograd_never_reaches_the_kernel_in_fit():
    if not IS_TORCH:
        pytest.skip("torch: a gradient hook on the kernel's parameter")
    model, layer, x, y, mask, _, _ = _model("dense columns")
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={"k/kernel": mask, "k/bias": False},
                                compact_state=True, side_path=True)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    reached = []
    layer.kernel.value.register_hook(lambda g: reached.append(g.shape))
    before = to_numpy(layer.kernel)
    model.fit(np.concatenate([x] * 3), np.concatenate([y] * 3), batch_size=B, epochs=1, verbose=0)
    assert reached == [] and not np.array_equal(to_numpy(layer.kernel), before)
    proxy = next(v for v in model.trainable_variables if "masked_compact_" in v.path)
    assert proxy.value.grad is None  # released after each step: no accumulation across steps


def test_a_saved_model_has_stock_layers_and_weights_and_resumes_exactly(tmp_path):
    model, optimizer, kernel, _, _, _, _ = _fit("einsum heads", side_path=True, epochs=1)
    path = str(tmp_path / "side.keras")
    model.save(path)
    config = model.get_config()
    assert [layer["class_name"] for layer in config["layers"]] == ["InputLayer", "EinsumDense"]
    stock, _, x, y, _, _, _ = _model("einsum heads", seed=5)
    stock.load_weights(path)  # a stock model of the same architecture takes the weights
    assert np.array_equal(to_numpy(stock.get_layer("k").kernel), to_numpy(kernel))
    restored = keras.models.load_model(path)
    assert restored.optimizer.side_path
    xs, ys = np.concatenate([x] * 4), np.concatenate([y] * 4)
    for m in (model, restored):
        m.fit(xs, ys, batch_size=B, epochs=2, shuffle=False, verbose=0)
    assert np.array_equal(to_numpy(restored.get_layer("k").kernel), to_numpy(kernel))
    for a, b in zip(restored.optimizer.variables, optimizer.variables):
        assert np.array_equal(to_numpy(a), to_numpy(b)), a.path


def test_a_saved_model_with_element_masks_resumes_exactly_through_the_side_path(tmp_path):
    model, layer, x, y, mask = _element_model("einsum elements in heads")
    optimizer = MaskedOptimizer(keras.optimizers.AdamW(1e-2), masks={"k/kernel": mask}, compact_state=True,
                                side_path=True)
    model.compile(optimizer=optimizer, loss="mse")
    xs, ys = np.concatenate([x] * 4), np.concatenate([y] * 4)
    before = to_numpy(layer.kernel)
    model.fit(xs, ys, batch_size=B, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "elements.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    held = lambda m: [v.path.split("masked_compact_")[1] for v in m.trainable_variables if "masked_compact_" in v.path]
    assert held(restored) == held(model) == ["0/k/kernel"]  # the loaded model trains through the side path too
    for m in (model, restored):
        m.fit(xs, ys, batch_size=B, epochs=2, shuffle=False, verbose=0)
    after = to_numpy(restored.get_layer("k").kernel)
    assert np.array_equal(after, to_numpy(layer.kernel))
    assert np.array_equal(after[~mask], before[~mask]) and np.all(after[mask] != before[mask])


def test_a_model_recompiled_with_another_optimizer_trains_its_layers_as_stock_layers():
    model, _, kernel, _, _, _, _ = _fit("dense rows", side_path=True, epochs=1)
    _, _, x, y, _, _, _ = _model("dense rows")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert [v.path for v in model.trainable_variables] == ["k/kernel", "k/bias"]  # the side path's is gone
    before = to_numpy(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Keras's "Gradients do not exist for variables"
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert np.all(to_numpy(kernel) != before)  # every element moves: the stock layer's gradient


ELEMENT_CASES = {  # kind -> (a CASES model, the slices along an axis its random elements are in: all if None)
    "dense elements": ("dense rows", None),
    "einsum elements": ("einsum heads", None),
    "dense elements in rows": ("dense rows", (0, [1, 4, 7])),  # the block x[:, rows]^T dy, then the elements
    "einsum elements in heads": ("einsum heads", (1, [2])),
}


def _element_model(kind, seed=0):
    case, within = ELEMENT_CASES[kind]
    model, layer, x, y, _, _, _ = _model(case, seed)
    shape = tuple(layer.kernel.shape)
    mask = np.random.default_rng(seed + 7).random(shape) < 0.3
    if within is not None:
        axis, idx = within
        keep = np.zeros(shape[axis], bool)
        keep[idx] = True
        mask &= np.expand_dims(keep, [a for a in range(len(shape)) if a != axis])
    return model, layer, x, y, mask


@pytest.mark.parametrize("kind", list(ELEMENT_CASES))
def test_element_gradients_are_the_numpy_gradient_at_the_elements_and_the_kernel_has_none(kind):
    # An element mask of a Dense/EinsumDense kernel: the layer's backward step
    # forms its weight gradient and gathers the trainable elements at once.
    model, layer, x, y, mask = _element_model(kind)
    spy = _Spy(1e-3)
    spy.seen = []
    given = {"k/kernel": mask, **({"k/bias": False} if getattr(layer, "bias", None) is not None else {})}
    optimizer = MaskedOptimizer(spy, masks=given, compact_state=True, side_path=True)
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
    optimizer.build(model.trainable_variables)
    proxies = [v for v in model.trainable_variables if "masked_compact_" in v.path]
    assert [tuple(v.shape) for v in proxies] == [(int(mask.sum()),)]
    oracle = _oracle_kernel_gradient(ELEMENT_CASES[kind][0], layer, x, y)[mask]  # row-major, as the proxy
    model.train_on_batch(x, y)
    (grads,) = spy.seen
    compact = [g for g in grads if g is not None and g.shape == proxies[0].shape]
    assert len(compact) == 1
    np.testing.assert_allclose(compact[0], oracle, rtol=1e-5, atol=1e-6)
    loss = lambda: keras.ops.mean(keras.ops.square(keras.ops.subtract(model(x), y)))
    if IS_TORCH:
        import torch

        kernel_grad = torch.autograd.grad(loss(), [layer.kernel.value], allow_unused=True)[0]
    else:
        kernel_grad = gradients(loss, [layer.kernel])[0]
    if IS_JAX:
        assert not np.any(to_numpy(kernel_grad))
    else:
        assert kernel_grad is None  # no dense weight gradient reaches the optimizer


@pytest.mark.parametrize("kind", list(ELEMENT_CASES))
def test_element_masks_keep_frozen_elements_and_train_as_compact_states_gather_path(kind):
    def fit(side_path):
        model, layer, x, y, mask = _element_model(kind)
        optimizer = MaskedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01),
                                    masks={"k/kernel": mask}, compact_state=True, side_path=side_path)
        model.compile(optimizer=optimizer, loss="mse")
        before = to_numpy(layer.kernel)
        model.fit(np.concatenate([x] * 4), np.concatenate([y] * 4), batch_size=B, epochs=3, shuffle=False, verbose=0)
        return model, optimizer, mask, before, to_numpy(layer.kernel)

    model, optimizer, mask, before, after = fit(True)
    assert any("masked_compact_" in v.path for v in model.trainable_variables)  # trained through the layer
    assert np.array_equal(after[~mask], before[~mask]) and np.all(after[mask] != before[mask])
    _, reference, _, _, gathered = fit(False)
    np.testing.assert_allclose(after, gathered, rtol=1e-5, atol=1e-6)
    assert [tuple(v.shape) for v in optimizer.variables] == [tuple(v.shape) for v in reference.variables]
    with pytest.raises(ValueError, match=r"k/kernel' trains through the side path.*trainable elements are fixed at "
                                         r"build.*new MaskedOptimizer"):
        optimizer.set_mask("k/kernel", _moved(mask))
    optimizer.set_mask("k/kernel", mask)  # the same elements: nothing changes


def _moved(mask):
    """As many trainable elements as `mask`, elsewhere."""
    return np.roll(mask.reshape(-1), 1).reshape(mask.shape)


def test_element_masks_of_other_layers_keep_compact_states_gather_path():
    keras.utils.set_random_seed(0)
    conv = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv")])
    mask = np.random.default_rng(0).random((3, 3, 2, 4)) < 0.3
    optimizer = _build(conv, masks={"conv/kernel": mask}, compact_state=True, side_path=True)
    assert len(conv.trainable_variables) == 2  # no proxy: the kernel's full gradient, gathered
    x = np.random.default_rng(1).normal(size=(B, 6, 6, 2)).astype("float32")
    y = np.random.default_rng(2).normal(size=(B, 4, 4, 4)).astype("float32")
    before = to_numpy(conv.get_layer("conv").kernel)
    conv.fit(x, y, batch_size=B, epochs=2, verbose=0)
    after = to_numpy(conv.get_layer("conv").kernel)
    assert np.array_equal(after[~mask], before[~mask]) and np.all(after[mask] != before[mask])
    optimizer.set_mask("conv/kernel", _moved(mask))  # the gather path's masks change at any step
    assert np.array_equal(optimizer.get_mask("conv/kernel"), _moved(mask))


def _build(model, **kwargs):
    optimizer = MaskedOptimizer("adam", **kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    return optimizer


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="`side_path` must be True or False. Received: 'yes'"):
        MaskedOptimizer("adam", compact_state=True, side_path="yes")
    with pytest.raises(ValueError, match="pass `compact_state=True`"):
        MaskedOptimizer("adam", side_path=True)
    with pytest.raises(ValueError, match="leave `compact_capacity` at None. Received: 0.5"):
        MaskedOptimizer("adam", compact_state=True, compact_capacity=0.5, side_path=True)
    conv = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2DTranspose(4, 3, name="conv")])
    with pytest.raises(ValueError, match=r"conv/kernel' of layer 'conv' \(Conv2DTranspose\) trains whole slices "
                                         r"along axis 3.*side_path=False"):
        _build(conv, masks={"conv/kernel": masks.columns([0])}, compact_state=True, side_path=True)
    conv = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv")])
    with pytest.raises(ValueError, match=r"conv/kernel' \(layer 'conv'\) trains slices along axis 0.*input or output "
                                         r"channels"):
        _build(conv, masks={"conv/kernel": masks.rows([0])}, compact_state=True, side_path=True)
    table = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4, name="emb")])
    with pytest.raises(ValueError, match=r"emb/embeddings' trains columns \(feature axis\).*Use `masks.rows`"):
        _build(table, masks={"emb/embeddings": masks.columns([1])}, compact_state=True, side_path=True)
    both = keras.Sequential([keras.Input((4, 6)), keras.layers.EinsumDense("abc,bc->ac", (6,), name="e")])
    with pytest.raises(ValueError, match=r"axis 1 of '[\w/]*e/kernel' is 'c' in the equation 'abc,bc->ac'"):
        _build(both, masks={"e/kernel": masks.columns([1])}, compact_state=True, side_path=True)


def test_an_edit_that_leaves_the_slices_is_refused_and_one_that_keeps_them_is_not():
    model, layer, x, y, mask, _, _ = _model("dense rows")
    optimizer = _build(model, masks={"k/kernel": mask}, compact_state=True, side_path=True)
    with pytest.raises(ValueError, match=r"k/kernel' trains through the side path.*fixed at build.*new MaskedOptimizer"):
        optimizer.set_mask("k/kernel", masks.rows([1, 4]))
    optimizer.set_mask("k/kernel", masks.rows([1, 4, 7]))  # the same slices: nothing changes
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert np.array_equal(optimizer.get_mask("k/kernel"), np.broadcast_to(mask(layer.kernel), (10, 12)))
    assert [v.path for v in optimizer.built_variables] == ["k/kernel", "k/bias"]


def test_a_tensorflow_fit_that_builds_in_its_first_trace_switches_to_the_side_path_from_the_second_step():
    if not IS_TF:
        pytest.skip("TensorFlow builds the optimizer inside the first trace, after the forward pass")
    model, _, kernel, before, after, idx, axis = _fit("dense columns", side_path=True, epochs=1)
    assert any("masked_compact_" in v.path for v in model.trainable_variables)
    assert np.all(np.take(after, idx, axis=axis) != np.take(before, idx, axis=axis))


def _two_layer(policy=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, name="a")(inputs)
    hidden = keras.layers.EinsumDense("ab,bc->ac", 8, name="e")(hidden)
    model = keras.Model(inputs, keras.layers.Activation("linear", dtype="float32")(hidden))
    rng = np.random.default_rng(0)
    return model, rng.random((64, 16)).astype("float32"), rng.random((64, 8)).astype("float32")


@pytest.mark.parametrize("trained", ["slices", "elements"])
@pytest.mark.parametrize("feature", ["mixed_float16", "ema"])
def test_mixed_precision_and_ema_train_the_slices_as_compact_state_does(feature, trained):
    results = {}
    rng = np.random.default_rng(3)
    given = {"a/kernel": masks.columns([1, 5, 9]), "e/kernel": masks.rows([0, 3]), "a/bias": False}
    if trained == "elements":  # the layers' backward steps gather their own elements
        given.update({"a/kernel": rng.random((16, 32)) < 0.2, "e/kernel": rng.random((32, 8)) < 0.2})
    for side_path in (False, True):
        if feature == "mixed_float16":
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            model, x, y = _two_layer()
            inner = keras.optimizers.AdamW(1e-2, use_ema=feature == "ema")
            optimizer = MaskedOptimizer(inner, masks=given, compact_state=True, side_path=side_path)
            model.compile(optimizer=optimizer, loss="mse")  # mixed_float16: a LossScaleOptimizer around it
            own = [v for v in model.weights]
            before = [to_numpy(v) for v in own]
            model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
            assert side_path == any("masked_compact_" in v.path for v in model.trainable_variables)
            for v, b in zip(own, before):
                mask = optimizer.get_mask(v)
                after = to_numpy(v)
                assert np.array_equal(after[~mask], b[~mask]) and np.all(after[mask] != b[mask]), v.path
            results[side_path] = [to_numpy(v) for v in own]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    for a, b in zip(results[False], results[True]):
        # float16 steps, or Adam's normalisation of near-zero gradients, magnify last-bit differences
        np.testing.assert_allclose(b, a, rtol=1e-2 if feature == "mixed_float16" else 1e-3,
                                   atol=1e-3 if feature == "mixed_float16" else 1e-4)


def test_a_mixed_precision_model_loaded_from_a_file_trains_through_the_side_path(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, x, y = _two_layer()
        optimizer = MaskedOptimizer("adam", masks={"e/kernel": masks.rows([0, 3]), "a": False}, compact_state=True,
                                    side_path=True)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        model.save(tmp_path / "mixed.keras")
        restored = keras.models.load_model(tmp_path / "mixed.keras")
        assert isinstance(restored.optimizer, keras.optimizers.LossScaleOptimizer)
        kernel = restored.get_layer("e").kernel
        before = to_numpy(kernel)
        restored.fit(x, y, batch_size=16, epochs=1, verbose=0)
        after = to_numpy(kernel)
        assert np.all(after[[0, 3]] != before[[0, 3]]) and np.array_equal(np.delete(after, [0, 3], 0),
                                                                           np.delete(before, [0, 3], 0))
        assert any("masked_compact_" in v.path for v in restored.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_backup_and_restore_resumes_bit_for_bit_and_the_trained_slices_export_as_a_sparse_delta(tmp_path):
    from masked_opt import SparseDelta

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    def run(callbacks):
        model, layer, x, y, mask, _, _ = _model("einsum heads")
        optimizer = MaskedOptimizer(keras.optimizers.AdamW(1e-2), masks={"k/kernel": mask}, compact_state=True,
                                    side_path=True)
        model.compile(optimizer=optimizer, loss="mse")
        fit = dict(batch_size=B, epochs=4, shuffle=False, verbose=0)
        xs, ys = np.concatenate([x] * 4), np.concatenate([y] * 4)
        if callbacks:
            with pytest.raises(RuntimeError, match="crash"):
                model.fit(xs, ys, callbacks=callbacks + [Crash()], **fit)
        model.fit(xs, ys, callbacks=callbacks, **fit)
        return model, layer

    backup = str(tmp_path / "backup")
    resumed, layer = run([keras.callbacks.BackupAndRestore(backup)])
    straight, reference = run([])
    assert np.array_equal(to_numpy(layer.kernel), to_numpy(reference.kernel))
    base, _, _, _, _, _, _ = _model("einsum heads")
    delta = SparseDelta.from_models(base, straight)  # the model's own weights: the proxy is left out
    changed = np.zeros((6, 4, 3), bool)
    changed[:, [1, 3], :] = True
    (path,) = delta.paths
    assert path.endswith("k/kernel") and np.array_equal(delta.positions(path), np.flatnonzero(changed))


def _reversible():
    layers = getattr(keras.layers, "ReversibleEmbedding", None)
    if layers is None:
        layers = pytest.importorskip("keras_hub").layers.ReversibleEmbedding
    return layers


def test_a_tied_reversible_embedding_trains_its_rows_through_both_uses():
    # KerasHub's LMs tie the token table to the output projection: logits = h @ E^T.
    # The rows' gradient is the lookup's plus the projection's, against NumPy.
    reversible = _reversible()
    keras.utils.set_random_seed(0)
    ids = keras.Input((T,), dtype="int32")
    table = reversible(20, 6, name="emb")
    mix = keras.layers.Dense(6, name="mix")
    model = keras.Model(ids, table(mix(table(ids)), reverse=True))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(B, T)).astype("int32")
    y = rng.normal(size=(B, T, 20)).astype("float32")
    optimizer = MaskedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), masks={"emb/embeddings": masks.rows([1, 4, 7]),
                                "mix": False}, compact_state=True, side_path=True)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    (proxy,) = [v for v in model.trainable_variables if "masked_compact_" in v.path]
    e, w, bias = (to_numpy(v).astype(np.float64) for v in (table.embeddings, mix.kernel, mix.bias))
    h = e[x] @ w + bias
    logits = h @ e.T
    g = 2 * (logits - y) / logits.size
    expected = np.einsum("btv,btd->vd", g, h)
    np.add.at(expected, x.reshape(-1), ((g @ e) @ w.T).reshape(-1, 6))
    loss = lambda: keras.ops.mean(keras.ops.square(keras.ops.subtract(model(x), y)))
    (grad,) = gradients(loss, [proxy])
    np.testing.assert_allclose(to_numpy(grad).reshape(3, 6), expected[[1, 4, 7]], rtol=1e-5, atol=1e-6)
    stock = to_numpy(type(table).call(table, keras.ops.convert_to_tensor(np.ones((2, 6), "float32")), reverse=True))
    assert np.array_equal(to_numpy(table(np.ones((2, 6), "float32"), reverse=True)), stock)
    before = to_numpy(table.embeddings)
    model.fit(np.concatenate([x] * 3), np.concatenate([y] * 3), batch_size=B, epochs=2, shuffle=False, verbose=0)
    after = to_numpy(table.embeddings)
    assert np.array_equal(np.delete(after, [1, 4, 7], 0), np.delete(before, [1, 4, 7], 0))
    assert np.all(after[[1, 4, 7]] != before[[1, 4, 7]])
