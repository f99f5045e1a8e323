"""`MaskedOptimizer(..., jit_compile=True)`: the whole masked update as one XLA function.

TensorFlow only; on JAX and torch the constructor refuses it (their trainers
compile the masked update with the train step).

Its promise: frozen elements bit-identical (asserted with `np.array_equal`),
and everything else as the bare inner optimizer compiled with XLA computes it
(not graph mode: XLA rounds differently). The masked update and the bare one
are two separately compiled XLA programs, which XLA may fuse and round
differently in the last bit, depending on the CPU: they are compared within
`JIT_MAX_ULP`.
"""

import warnings

import numpy as np
import pytest

import keras
from backends import BACKEND, IS_TF, assert_ulp_close, tf_only
from models import mlp, regression_data
from masked_opt import MaskedOptimizer
from optimizer_table import OPTIMIZERS

if IS_TF:
    import tensorflow as tf

# Small shapes, and realistic ones (>= 4,096 elements per variable, where
# SIMD bodies and tails round differently): element masks with 1 % and 50 %
# and a column mask with 5 % of the elements trainable.
SIZES = ["small", "realistic"]
# Max ulps between the masked XLA update and a separately compiled bare XLA
# update, for every optimizer. Measured on an AMD EPYC with AVX-512, 3 steps:
# Ftrl 1 ulp (weight decay, frozen elements present), every other optimizer 0
# (ScheduleFreeAdamW differed by 1 ulp on another CPU). Allowed: 2. Frozen
# elements are exact regardless.
JIT_MAX_ULP = 2


def _shapes(size):
    return [(5, 4), (4,), (4, 3)] if size == "small" else [(64, 96), (4096,), (96, 64)]


def _setup(seed=0, steps=3, size="small"):
    rng = np.random.default_rng(seed)
    shapes = _shapes(size)
    init = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads = [
        [tf.constant(rng.standard_normal(s).astype("float32")) for s in shapes]
        for _ in range(steps)
    ]
    # kernel: element-wise, bias: frozen whole, kernel: a column mask
    if size == "small":
        masks = [rng.random((5, 4)) < 0.5, np.array(False), np.array([[True, False, True]])]
    else:
        columns = rng.random((1, 64)) < 0.05
        columns[0, :2] = True
        masks = [rng.random((64, 96)) < 0.01, rng.random((4096,)) < 0.5, columns]
    return init, grads, masks


def _bare_under_xla(optimizer, init):
    """Variables, the bare optimizer built on them, and its update compiled with XLA."""
    variables = [keras.Variable(a) for a in init]
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def step(grads):
        optimizer.apply(grads, variables)

    return variables, optimizer, step


@tf_only
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_all_true_jit_matches_the_bare_optimizer_under_xla(name, size):
    init, grads, _ = _setup(size=size)
    bare_vars, bare, bare_step = _bare_under_xla(OPTIMIZERS[name](weight_decay=0.01), init)

    vs = [keras.Variable(a) for a in init]
    opt = MaskedOptimizer(
        OPTIMIZERS[name](weight_decay=0.01),
        masks=[(v, np.ones(v.shape, bool)) for v in vs],
        jit_compile=True,
    )
    opt.build(vs)
    for gs in grads:
        bare_step(gs)
        opt.apply(gs, vs)
    for a, b in zip(bare_vars, vs):
        assert_ulp_close(b.numpy(), a.numpy(), JIT_MAX_ULP, f"{name}: {a.path}")
    inner = opt.inner_optimizer.variables
    assert len(inner) == len(bare.variables)
    for a, b in zip(bare.variables, inner):
        assert_ulp_close(b.numpy(), a.numpy(), JIT_MAX_ULP, f"{name}: {a.path}")


@tf_only
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jit_keeps_frozen_exact_and_matches_an_xla_oracle(name, size):
    # Oracle: the bare optimizer under XLA fed np.where(mask, g, 0), frozen elements
    # copied back with NumPy after each step. Weight decay moves every element.
    init, grads, masks = _setup(seed=1, size=size)
    full = [np.broadcast_to(m, s) for m, s in zip(masks, _shapes(size))]
    ref_vars, ref, ref_step = _bare_under_xla(OPTIMIZERS[name](weight_decay=0.05), init)

    vs = [keras.Variable(a) for a in init]
    opt = MaskedOptimizer(
        OPTIMIZERS[name](weight_decay=0.05), masks=list(zip(vs, masks)), jit_compile=True
    )
    for step, gs in enumerate(grads):
        before = [v.numpy() for v in ref_vars]
        ref_step([tf.where(m, g, 0.0) for m, g in zip(full, gs)])
        for v, b, m in zip(ref_vars, before, full):
            v.assign(np.where(m, v.numpy(), b))
        opt.apply(gs, vs)
        for v, a, m in zip(vs, init, full):
            assert np.array_equal(v.numpy()[~m], a[~m]), (name, step, v.path)
        for a, b in zip(ref_vars, vs):
            # Two XLA programs (the masked update fuses the restore in): within
            # JIT_MAX_ULP. The oracle's frozen elements are NumPy copies, exact.
            assert_ulp_close(b.numpy(), a.numpy(), JIT_MAX_ULP, f"{name}: step {step} {a.path}")
    moved = [np.any(v.numpy()[m] != a[m]) for v, a, m in zip(vs, init, full) if m.any()]
    assert all(moved), name


@tf_only
def test_jit_fit_keeps_frozen_exact_with_adamw():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")]
    )
    mask = np.random.default_rng(0).random((6, 5)) < 0.5
    opt = MaskedOptimizer(
        keras.optimizers.AdamW(0.05, weight_decay=0.1),
        masks={"d1/kernel": mask, "d1/bias": False},
        jit_compile=True,
    )
    model.compile(optimizer=opt, loss="mse")
    k0, b0 = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
    x = np.random.default_rng(1).random((32, 6)).astype("float32")
    y = np.random.default_rng(2).random((32, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    k1, b1 = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
    assert np.array_equal(k1[~mask], k0[~mask]) and np.array_equal(b1, b0)
    assert np.all(k1[mask] != k0[mask])
    assert opt.inspect().xla_functions == 1  # one compiled update, reused


@tf_only
def test_jit_with_sparse_gradients_falls_back_and_keeps_rows_exact():
    # IndexedSlices (Embedding) take the default path; frozen rows stay exact.
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(20, 4, name="emb"),
         keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2, name="out")]
    )
    rows = np.zeros((20, 1), bool)
    rows[15:] = True
    opt = MaskedOptimizer(
        keras.optimizers.Adam(0.05), masks={"emb/embeddings": rows}, jit_compile=True
    )
    model.compile(optimizer=opt, loss="mse")
    e0 = model.layers[0].embeddings.numpy()
    x = np.random.default_rng(0).integers(0, 20, (16, 3))
    model.fit(x, np.ones((16, 2), "float32"), batch_size=4, epochs=1, verbose=0)
    e1 = model.layers[0].embeddings.numpy()
    assert np.array_equal(e1[:15], e0[:15])
    assert np.any(e1[15:] != e0[15:])


@pytest.mark.skipif(IS_TF, reason="jit_compile=True is supported on TensorFlow")
def test_jit_compile_is_refused_off_tensorflow_naming_the_backend():
    with pytest.raises(ValueError, match=f"TensorFlow backend only; the active backend is '{BACKEND}'"):
        MaskedOptimizer(keras.optimizers.SGD(0.1), jit_compile=True)
    assert MaskedOptimizer(keras.optimizers.SGD(0.1), jit_compile=False).jit_compile is False


def test_default_config_round_trips_without_a_warning():
    # jit_compile="auto" (the default) is valid on every backend: a model
    # saved with it loads anywhere without a warning, and keeps "auto".
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1))
    config = opt.get_config()
    assert config["jit_compile"] == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MaskedOptimizer.from_config(config)
    assert loaded.jit_compile == "auto"


@pytest.mark.skipif(IS_TF, reason="jit_compile=True is supported on TensorFlow")
def test_config_saved_with_jit_compile_loads_without_it_off_tensorflow():
    # A model saved on TensorFlow with jit_compile=True still loads here.
    config = MaskedOptimizer(keras.optimizers.SGD(0.1)).get_config()
    config["jit_compile"] = True
    with pytest.warns(UserWarning, match=f"loading it on '{BACKEND}' with jit_compile=False"):
        opt = MaskedOptimizer.from_config(config)
    assert opt.jit_compile is False


# ------------------------------------------- jit_compile="auto" (the default)
def _auto_fit(masks, jit_compile="auto", n_in=6, units=5):
    model = mlp(n_in, ("d1", units), ("d2", 3), init_seed=4)
    opt = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), masks, jit_compile=jit_compile)
    model.compile(optimizer=opt, loss="mse")
    start = [v.numpy() for v in model.trainable_variables]
    x, y = regression_data(24, n_in, 3, seed=5)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return opt, start, [v.numpy() for v in model.trainable_variables]


@tf_only
@pytest.mark.parametrize("density", [None, 0.01, 0.05, 0.5], ids=["small", "4k_1%", "4k_5%", "4k_50%"])
def test_auto_compiles_the_masked_update_with_xla_when_an_element_is_frozen(density):
    n_in, units = (6, 5) if density is None else (64, 96)  # d1/kernel: 30 or 6,144 elements
    elem = np.random.default_rng(6).random((n_in, units)) < (density or 0.5)
    elem[0, 0] = True
    opt, start, end = _auto_fit({"d1/kernel": elem, "d1/bias": False}, n_in=n_in, units=units)
    assert opt.inspect().xla_functions == 1  # the XLA path was traced
    assert np.array_equal(end[0][~elem], start[0][~elem]) and np.array_equal(end[1], start[1])
    # Graph mode (jit_compile=False) computes the same update, rounded op by op.
    ref, _, graph_end = _auto_fit({"d1/kernel": elem, "d1/bias": False}, jit_compile=False, n_in=n_in, units=units)
    assert ref.inspect().xla_functions == 0
    for a, b in zip(end, graph_end):
        # Graph mode vs XLA: measured 2 ulp here (elementwise it can be more
        # near 0, where XLA's fused multiply-adds round once); allowed: 4.
        assert_ulp_close(a, b, 4)


@tf_only
def test_auto_keeps_graph_mode_while_no_element_is_frozen():
    # The identity law: all-True masks at trace time run the graph-mode path,
    # bit-identical to the bare optimizer (tests/test_identity.py).
    opt, _, end = _auto_fit({"d1/kernel": np.ones((6, 5), bool)})
    assert opt.inspect().xla_functions == 0


@tf_only
def test_graph_step_traced_with_nothing_frozen_masks_only_while_something_is():
    # Traced with all-True masks, the graph-mode step keeps the masking behind
    # a runtime `cond` (the inner update is outside it, traced once): while
    # nothing is frozen it runs the bare update (weights bit-identical to the
    # bare optimizer's graph step); after an edit it masks, without a retrace.
    def variables():
        with keras.name_scope("g"):
            return [keras.Variable(np.random.default_rng(4).normal(size=(64, 96)).astype("float32"), name="k"),
                    keras.Variable(np.zeros((96,), "float32"), name="b")]

    masked_vars, bare_vars = variables(), variables()
    opt = MaskedOptimizer(keras.optimizers.AdamW(0.01, weight_decay=0.1), [(masked_vars[0], np.ones((64, 96), bool)), (masked_vars[1], True)])
    bare = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    masked_step = tf.function(lambda g: opt.apply(g, masked_vars))
    bare_step = tf.function(lambda g: bare.apply(g, bare_vars))
    rng = np.random.default_rng(5)
    for _ in range(2):
        g = [tf.constant(rng.normal(size=(64, 96)).astype("float32")), tf.constant(rng.normal(size=(96,)).astype("float32"))]
        masked_step(g)
        bare_step(g)
    for m, b in zip(masked_vars, bare_vars):
        assert np.array_equal(m.numpy(), b.numpy())
    graph = masked_step.get_concrete_function(g).graph
    assert any(op.type in ("If", "StatelessIf") for op in graph.get_operations())
    traces = masked_step.experimental_get_tracing_count()
    frozen = rng.random((64, 96)) < 0.3
    opt.set_mask("g/k", ~frozen)
    opt.freeze("g/b")
    before = [v.numpy() for v in masked_vars]
    masked_step(g)
    assert np.array_equal(masked_vars[0].numpy()[frozen], before[0][frozen])
    assert np.array_equal(masked_vars[1].numpy(), before[1])
    assert np.all(masked_vars[0].numpy()[~frozen] != before[0][~frozen])
    assert masked_step.experimental_get_tracing_count() == traces
    assert opt.inspect().xla_functions == 0


def test_xla_pays_for_few_variables_or_large_ones_not_many_small_ones():
    from masked_opt import _xla_update

    small, large = np.zeros((8, 8)), np.zeros((512, 128))
    assert _xla_update.xla_pays([small] * _xla_update.FEW_VARIABLES)
    assert not _xla_update.xla_pays([small] * (_xla_update.FEW_VARIABLES + 1))
    assert _xla_update.xla_pays([large] * 100 + [small] * 20)  # mean over 32 k elements
    assert _xla_update.xla_pays([None] * 40 + [small])  # None gradients do not count


@tf_only
def test_auto_keeps_graph_mode_for_many_small_variables():
    # A CNN's many small kernels: the XLA compile would cost more than it saves
    # (bench_first_step.py); graph mode keeps frozen elements exact all the same.
    model = keras.Sequential(
        [keras.Input((6,))] + [keras.layers.Dense(6, name=f"d{i}") for i in range(9)]
    )
    elem = np.random.default_rng(6).random((6, 6)) < 0.5
    opt = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), {"d0/kernel": elem})
    model.compile(optimizer=opt, loss="mse")
    start = model.trainable_variables[0].numpy()
    rng = np.random.default_rng(5)
    model.fit(rng.normal(size=(16, 6)), rng.normal(size=(16, 6)), batch_size=8, verbose=0)
    assert opt.inspect().xla_functions == 0  # 18 variables of at most 36 elements: graph mode
    end = model.trainable_variables[0].numpy()
    assert np.array_equal(end[~elem], start[~elem]) and np.any(end[elem] != start[elem])


# ------------------------------------- the gradient mask under XLA (bitwise AND)
@pytest.mark.skipif(BACKEND == "torch", reason="XLA-traced masking: TensorFlow and JAX")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("mask_shape", [(3, 6), (1, 6), ()])
def test_gradient_mask_under_xla_is_bit_identical_to_where(dtype, mask_shape):
    # Under XLA `mask_gradient` masks by a bitwise AND (a `select` compiles to
    # slow masked loads on CPU); it must give where(mask, grad, +0) bit for
    # bit: NaN/inf/-0 zeroed where frozen, every bit kept where trainable.
    from masked_opt import _backend

    if dtype == "float64" and not IS_TF:
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("float64 needs jax_enable_x64")
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 6)) * 1e3
    g.flat[:6] = [np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-30]
    mask = rng.random(mask_shape) < 0.5 if mask_shape else np.array(False)
    if mask_shape == (3, 6):
        mask.flat[:6] = [False, True, False, True, True, False]
    grad = keras.ops.convert_to_tensor(g, dtype=dtype)
    mask_t = keras.ops.convert_to_tensor(mask)
    seen = []

    def masked(grad, mask_t):
        seen.append(_backend.traced_into_xla(grad))
        return _backend.mask_gradient(grad, mask_t, (3, 6))

    if IS_TF:
        out = tf.function(masked, jit_compile=True, autograph=False)(grad, mask_t)
    else:
        import jax

        out = jax.jit(masked)(grad, mask_t)
    assert seen == [True]  # the bitwise path was taken
    expected = keras.ops.where(mask_t, grad, keras.ops.convert_to_tensor(0, dtype=dtype))
    width = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32, "float64": np.uint64}
    def as_bits(t):
        return np.asarray(keras.ops.convert_to_numpy(t)).view(width[dtype])

    np.testing.assert_array_equal(as_bits(out), as_bits(expected))


# ------------------------------------- bit-packed masks in compiled steps


def _packed_oracle(mask):
    """The packed copy's expected value, from NumPy alone: per byte along the
    last axis (TensorFlow, JAX); on torch the elements in C order, 32 per int32
    word (little-endian: the same bytes as `packbits` of the flattened mask)."""
    if BACKEND == "torch":
        return np.packbits(mask.reshape(-1), bitorder="little").view("<i4")
    return np.packbits(mask, axis=-1, bitorder="little")


def _packed_run(pack: bool, monkeypatch):
    """3 compiled AdamW steps (XLA; torch.compile on torch) on a (256, 512)
    kernel with a random element mask (large enough for a bit-packed copy), a
    freeze between steps 2 and 3, which compiles nothing new."""
    from backends import IS_TORCH, CompiledStep, pack_masks_from, tensor, to_numpy

    pack_masks_from(monkeypatch, 1 << 12 if pack else 1 << 40)
    rng = np.random.default_rng(0)
    kernel = keras.Variable(rng.standard_normal((256, 512)).astype("float32"), name="k")
    mask = rng.random((256, 512)) < 0.5
    extra = {"jit_compile": True} if IS_TF else {}
    opt = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), [(kernel, mask)], **extra)
    opt.build([kernel])
    assert opt.inspect().variable("k").packed_mask == pack
    bits = next((v for v in opt.variables if v.name == "k_mask_bits"), None)
    assert (bits is not None) == pack
    start = to_numpy(kernel)
    step = CompiledStep(opt, [kernel], torch_compile=True)
    grads = [tensor(rng.standard_normal((256, 512)).astype("float32")) for _ in range(3)]
    step([grads[0]])
    step([grads[1]])
    compiled = step.traces()
    opt.freeze(kernel, np.s_[:, :16])  # the packed copy follows the edit
    before_last = to_numpy(kernel)
    step([grads[2]])
    end = to_numpy(kernel)
    assert step.traces() == compiled and (IS_TORCH or compiled == 1)
    assert np.array_equal(end[~mask], start[~mask])
    assert np.array_equal(end[:, :16], before_last[:, :16])
    assert np.all(end[:, 16:][mask[:, 16:]] != start[:, 16:][mask[:, 16:]])
    if pack:
        assert np.array_equal(to_numpy(bits), _packed_oracle(opt.get_mask(kernel)))
    return opt, kernel, end


def test_bit_packed_masks_give_the_bool_masks_result(monkeypatch):
    from backends import IS_TORCH, XLA_MAX_ULP, assert_equal_across_programs, to_numpy

    opt, kernel, packed = _packed_run(True, monkeypatch)
    _, _, unpacked = _packed_run(False, monkeypatch)
    if IS_TORCH:  # two torch.compile programs (the unpacking is fused differently)
        assert_ulp_close(packed, unpacked, XLA_MAX_ULP)
    else:
        assert_equal_across_programs(packed, unpacked)

    # The packed copy is derived state: not in the file (which moves between
    # backends), rebuilt from the loaded masks.
    bits = next(v for v in opt.variables if v.name == "k_mask_bits")
    store = {}
    opt.save_own_variables(store)
    assert len([k for k in store if k.isdigit()]) == len(opt.variables) - 1
    opt.set_mask(kernel, True)
    assert np.array_equal(to_numpy(bits), _packed_oracle(np.ones((256, 512), bool)))
    opt.load_own_variables(store)
    assert np.array_equal(to_numpy(bits), _packed_oracle(opt.get_mask(kernel)))
    assert not opt.get_mask(kernel).all()
