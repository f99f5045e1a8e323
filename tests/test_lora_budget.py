"""`masks.lora_count` and `masks.lora_budget`: masks at LoRA's parameter count
(issue 25, item 3). Oracles: the parameters Keras's own `enable_lora` adds,
and a few lines of NumPy for which elements or slices are chosen."""

import keras
import numpy as np
import pytest

from masked_opt import MaskedOptimizer
from masked_opt.masks import lora_budget, lora_count
from backends import to_numpy


def _lora_params_keras_adds(layer, rank):
    before = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
    layer.enable_lora(rank)
    lora = [v for v in layer.trainable_variables if "lora" in v.path]
    return sum(int(np.prod(v.shape)) for v in lora), before


@pytest.mark.parametrize("kind", ["Dense", "EinsumDense", "Embedding", "Conv2D"])
def test_lora_count_is_what_keras_enable_lora_adds(kind):
    layer, call = {
        "Dense": (keras.layers.Dense(24), (7, 16)),
        "EinsumDense": (keras.layers.EinsumDense("btd,dnh->btnh", output_shape=(None, 4, 8)), (2, 5, 32)),
        "Embedding": (keras.layers.Embedding(100, 12), None),
        "Conv2D": (keras.layers.Conv2D(6, 3), (1, 9, 9, 5)),
    }[kind]
    if call is None:
        layer.build((3, 4))
    else:
        layer.build(call)
    kernel = layer.embeddings if kind == "Embedding" else layer.kernel
    shape = tuple(kernel.shape)
    added, _ = _lora_params_keras_adds(layer, 3)
    assert lora_count(shape, 3) == added


def test_elements_match_the_count_and_follow_the_scores():
    w = keras.Variable(np.random.default_rng(0).normal(size=(32, 16)).astype("float32"), name="k")
    k = 2 * (32 + 16)
    mask = lora_budget(2)(w)
    assert mask.shape == (32, 16) and mask.sum() == k
    big = lora_budget(2, scores="magnitude")(w)
    values = np.abs(to_numpy(w)).ravel()
    assert np.array_equal(np.flatnonzero(big.ravel()), np.sort(np.argsort(-values, kind="stable")[:k]))
    scores = np.arange(32 * 16, dtype=float).reshape(32, 16)
    by_dict = lora_budget(2, scores={w.path: scores})(w)
    assert np.array_equal(by_dict.ravel(), np.arange(32 * 16) >= 32 * 16 - k)


def test_seeded_random_masks_repeat_and_differ_by_path():
    a = keras.Variable(np.zeros((20, 10), "float32"), name="a")
    b = keras.Variable(np.zeros((20, 10), "float32"), name="b")
    assert np.array_equal(lora_budget(1, seed=3)(a), lora_budget(1, seed=3)(a))
    assert not np.array_equal(lora_budget(1, seed=3)(a), lora_budget(1, seed=3)(b))


@pytest.mark.parametrize("axis", [0, -1, 1])
def test_slices_along_an_axis_match_the_count_by_summed_score(axis):
    shape = (64, 4, 16)  # a query kernel (hidden, heads, head_dim)
    w = keras.Variable(np.zeros(shape, "float32"), name="query")
    scores = np.random.default_rng(1).random(shape)
    mask = lora_budget(8, axis=axis, scores={w.path: scores})(w)
    a = axis % 3
    expected_shape = [1, 1, 1]
    expected_shape[a] = shape[a]
    assert mask.shape == tuple(expected_shape)
    slice_size = np.prod(shape) // shape[a]
    n = min(shape[a], max(1, int(np.floor(8 * (64 * 4 + 16) / slice_size + 0.5))))
    summed = np.moveaxis(scores, a, 0).reshape(shape[a], -1).sum(axis=1)
    assert np.array_equal(np.flatnonzero(mask.ravel()), np.sort(np.argsort(-summed, kind="stable")[:n]))


def test_bad_input_names_the_variable_and_the_fix():
    bias = keras.Variable(np.zeros((8,), "float32"), name="bias")
    kernel = keras.Variable(np.zeros((8, 4), "float32"), name="kernel")
    with pytest.raises(ValueError, match="bias.*LoRA adapts kernels"):
        lora_budget(2)(bias)
    with pytest.raises(ValueError, match="rank"):
        lora_budget(0)
    with pytest.raises(TypeError, match="axis"):
        lora_budget(2, axis=1.0)
    with pytest.raises(TypeError, match="scores"):
        lora_budget(2, scores="fisher")
    with pytest.raises(ValueError, match="axis=2.*kernel"):
        lora_budget(2, axis=2)(kernel)
    with pytest.raises(ValueError, match="no entry for variable 'kernel'"):
        lora_budget(2, scores={"other": np.zeros((8, 4))})(kernel)
    with pytest.raises(ValueError, match=r"scores\['kernel'\].*\(3,\)"):
        lora_budget(2, scores={"kernel": np.zeros(3)})(kernel)


def test_a_model_trains_exactly_the_budget_and_nothing_else():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, name="a"), keras.layers.Dense(8, name="b")])
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2),
                                masks={r".*kernel": lora_budget(2, seed=0), r".*bias": False})
    model.compile(optimizer=optimizer, loss="mse")
    before = [to_numpy(v) for v in model.trainable_variables]
    x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    model.fit(x, np.ones((32, 8), "float32"), batch_size=8, epochs=1, verbose=0)
    moved = sum(int(np.sum(to_numpy(v) != b)) for v, b in zip(model.trainable_variables, before))
    trainable = sum(int(optimizer.get_mask(v).sum()) for v in model.trainable_variables)
    assert trainable == lora_count((16, 32), 2) + lora_count((32, 8), 2)
    assert moved == trainable


def _int8_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(4, name="b")(keras.layers.Dense(32, name="a")(inputs))
    model = keras.Model(inputs, outputs)
    model.quantize("int8")
    return model


def test_an_int8_kernel_cannot_be_masked_and_the_error_says_what_to_do_instead():
    # `model.quantize("int8")` turns each kernel into a non-trainable int8
    # variable (plus a float scale): no gradient reaches it.
    model = _int8_model()
    model.compile(optimizer=MaskedOptimizer(keras.optimizers.Adam(), masks={"a/kernel": np.ones((16, 32), bool)}),
                  loss="mse")
    with pytest.raises(ValueError, match=r"integer \(quantized\).*'a/kernel'.*enable_lora"):
        model.fit(np.ones((8, 16), "float32"), np.ones((8, 4), "float32"), verbose=0)


def test_masks_select_elements_of_the_lora_adapters_of_an_int8_model_exactly():
    # QLoRA with masked_opt: the int8 base is frozen by Keras, the adapters train
    # where their masks are True; frozen adapter elements keep their bits.
    model = _int8_model()
    model.get_layer("a").enable_lora(4)
    a_mask = np.zeros((16, 4), bool)
    a_mask[:3] = True
    b_mask = np.zeros((4, 32), bool)
    b_mask[:, :5] = True
    masks = {"a/lora_kernel_a": a_mask, "a/lora_kernel_b": b_mask, "a/bias": False, "b/bias": False}
    model.compile(optimizer=MaskedOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.1), masks=masks), loss="mse")
    layer = model.get_layer("a")
    before = {name: to_numpy(getattr(layer, name)) for name in ("lora_kernel_a", "lora_kernel_b")}
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 16), dtype=np.float32), rng.random((16, 4), dtype=np.float32), epochs=2, verbose=0)
    for name, mask in (("lora_kernel_a", a_mask), ("lora_kernel_b", b_mask)):
        after = to_numpy(getattr(layer, name))
        assert np.array_equal(after[~mask], before[name][~mask]), name
        assert np.all(after[mask] != before[name][mask]), name
    base = next(v for v in model.weights if v.path == "a/kernel")
    assert base.dtype == "int8" and not base.trainable
