"""Update multipliers: `w_new = w_old + m * (w_inner - w_old)`.

Checked against a NumPy AdamW written out by hand (per-column multipliers,
several steps), on every backend; m = 1 is the identity law for every
optimizer in the table (weights and inner state bit-identical, next to a
frozen mask elsewhere); m = 0 and masks hold weights exactly; the EMA
averages the stored weights; compact state agrees with dense state bit for
bit; set from callbacks without retracing; saved and loaded; bad values
refused with the key and the value named.
"""

from __future__ import annotations

import numpy as np
import pytest

import keras
from backends import (
    IS_TORCH, TraceCounter, assert_equal_across_programs, assert_ulp_close, built_on, ema_of, synced, tensor, to_numpy,
)
from models import mlp
from masked_opt import MaskedOptimizer
from optimizer_table import AVAILABLE

O = keras.optimizers
SHAPES = {"k": (5, 4), "b": (4,), "o": (4, 3)}


# Realistic sizes (>= 4,096 elements per variable) for the compact = dense comparison.
BIG_SHAPES = {"k": (64, 96), "b": (4096,), "o": (96, 64)}


def _variables(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {
        name: keras.Variable(rng.normal(size=shape).astype("float32"), name=name)
        for name, shape in shapes.items()
    }


def _grads(steps, seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [
        {name: rng.normal(size=shape).astype("float32") for name, shape in shapes.items()}
        for _ in range(steps)
    ]


def _run(optimizer, variables, grads):
    names = list(variables)
    for g in grads:
        optimizer.apply([tensor(g[n]) for n in names], [variables[n] for n in names])
    return {n: to_numpy(v) for n, v in variables.items()}


def _adamw_oracle(w, grads, mult, lr=0.05, wd=0.1, b1=0.9, b2=0.999, eps=1e-7):
    """Keras's AdamW written out in float64; the stored weight moves by
    `mult` times the inner update (weight decay included)."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        inner = w - w * wd * lr
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        inner = inner - m * alpha / (np.sqrt(v) + eps)
        w = w + mult * (inner - w)
    return w


def test_adamw_with_per_column_multipliers_matches_numpy_oracle():
    variables = _variables()
    w0 = to_numpy(variables["k"])
    grads = _grads(4)
    mult = np.array([[0.0, 0.25, 1.0, 3.0]], np.float32)  # per column of k (5, 4)
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), multipliers={"k": mult})
    got = _run(opt, variables, grads)

    want = _adamw_oracle(w0, [g["k"] for g in grads], mult)
    np.testing.assert_allclose(got["k"], want, rtol=1e-5, atol=1e-6)  # float32 vs float64
    # The columns at 0 and 1 are exact: held, and the bare optimizer's own update.
    assert np.array_equal(got["k"][:, 0], w0[:, 0])
    bare = _variables()
    ref = _run(O.AdamW(0.05, weight_decay=0.1), bare, grads)
    assert np.array_equal(got["k"][:, 2], ref["k"][:, 2])
    # The moves really are scaled: a column at 3x moved about 3x as far as at 1x.
    assert not np.allclose(got["k"][:, 3], ref["k"][:, 3], atol=1e-3)
    # Variables without a multiplier are trained as by the inner optimizer alone.
    assert np.array_equal(got["o"], ref["o"]) and np.array_equal(got["b"], ref["b"])


FEATURES = {"plain": {}, "ema_weight_decay": {"use_ema": True, "weight_decay": 0.05}}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("opt_id", list(AVAILABLE))
def test_multiplier_one_is_bit_identical_to_the_inner_optimizer(opt_id, feature):
    factory = AVAILABLE[opt_id]
    grads = _grads(3)
    bare = _variables()
    bare_opt = factory(**FEATURES[feature])
    ref = _run(bare_opt, bare, grads)

    wrapped = _variables()
    opt = MaskedOptimizer(
        factory(**FEATURES[feature]),
        masks={"b": np.array([True, False, True, False])},  # frozen elements elsewhere
        multipliers={"k": 1.0, "o": np.ones((1, 3), np.float32)},
    )
    got = _run(opt, wrapped, grads)
    for name in ("k", "o"):
        assert np.array_equal(got[name], ref[name]), name
    # ... and so is the inner optimizer's state of those variables.
    def state(o):  # in creation order, all but the state of "b" (the only (4,) variable)
        return [(v.name, to_numpy(v)) for v in o.variables if tuple(v.shape) != SHAPES["b"]]

    mine, theirs = state(opt.inner_optimizer), state(bare_opt)
    assert len(mine) == len(theirs) and len(mine) > 1
    for (name, a), (_, b) in zip(mine, theirs):
        assert np.array_equal(a, b), name


def test_multiplier_zero_holds_the_weight_and_its_ema_exactly():
    variables = _variables()
    start = {n: to_numpy(v) for n, v in variables.items()}
    opt = MaskedOptimizer(
        O.AdamW(0.05, weight_decay=0.2, use_ema=True),
        multipliers={"k": 0.0, "o": np.array([[0.0, 1.0, 0.0]], np.float32)},
    )
    got = _run(opt, variables, _grads(3))
    assert np.array_equal(got["k"], start["k"])
    assert np.array_equal(got["o"][:, [0, 2]], start["o"][:, [0, 2]])
    assert np.all(got["o"][:, 1] != start["o"][:, 1])
    inner = opt.inner_optimizer
    average = {v.path: to_numpy(ema_of(inner, v)) for v in built_on(inner)}
    assert np.array_equal(average["k"], start["k"])
    # The inner optimizer's state still follows the gradient (a warm start).
    momentum = [to_numpy(v) for v in inner.variables if v.name == "k_momentum"]
    assert momentum and np.all(momentum[0] != 0)


def test_masks_and_multipliers_compose_and_frozen_wins():
    grads = _grads(3)
    mask = np.ones((5, 4), bool)
    mask[[0, 3], [1, 2]] = False
    both = _variables()
    start = to_numpy(both["k"])
    got = _run(MaskedOptimizer(O.Adam(0.05), masks={"k": mask}, multipliers={"k": 2.0}), both, grads)
    only = _run(MaskedOptimizer(O.Adam(0.05), multipliers={"k": 2.0}), _variables(), grads)
    assert np.array_equal(got["k"][~mask], start[~mask])
    # Adam is element-wise: the other elements are those of the unmasked run.
    assert np.array_equal(got["k"][mask], only["k"][mask])


def test_ema_averages_the_weights_actually_stored():
    variables = _variables()
    opt = MaskedOptimizer(
        O.Adam(0.05, use_ema=True, ema_momentum=0.9),
        multipliers={"k": np.array([[0.5, 1.0, 2.0, 0.1]], np.float32)},
    )
    names = list(variables)
    stored, ema = [], None
    for g in _grads(4):
        opt.apply([tensor(g[n]) for n in names], [variables[n] for n in names])
        w = to_numpy(variables["k"]).astype(np.float64)
        ema = w if ema is None else 0.9 * ema + 0.1 * w
        stored.append(w)
    inner = opt.inner_optimizer
    average = to_numpy(ema_of(inner, variables["k"]))
    np.testing.assert_allclose(average, ema, rtol=0, atol=1e-6)
    # Not the average of what the inner optimizer produced: the weights moved.
    assert not np.allclose(stored[0], stored[-1], atol=1e-3)


@pytest.mark.parametrize("density", [None, 0.01, 0.05, 0.5], ids=["small", "4k_1%", "4k_5%", "4k_50%"])
def test_compact_state_with_multipliers_matches_dense_state(density):
    # Within compact state's documented bound for AdamW (docs/compact-state.md:
    # 2 ulp at the variable's scale; measured 0), weights and their EMA.
    shapes = SHAPES if density is None else BIG_SHAPES
    rng = np.random.default_rng(3)
    mask = rng.random(shapes["k"]) < (density or 0.5)
    cols = shapes["k"][1]
    mults = {"k": np.linspace(0.0, 2.0, cols, dtype=np.float32)[None, :], "o": 0.3}
    runs = {}
    for compact in (False, True):
        variables = _variables(shapes=shapes)
        opt = MaskedOptimizer(
            O.AdamW(0.05, weight_decay=0.1, use_ema=True),
            masks={"k": mask},
            multipliers=mults,
            compact_state=compact,
        )
        _run(opt, variables, _grads(4, shapes=shapes))
        names = list(variables)
        weights = {n: to_numpy(variables[n]) for n in names}
        opt.finalize_variable_values([variables[n] for n in names])  # EMA swapped in
        runs[compact] = weights, {n: to_numpy(variables[n]) for n in names}
    for n in shapes:
        assert_ulp_close(runs[True][0][n], runs[False][0][n], 2, n)
        assert_ulp_close(runs[True][1][n], runs[False][1][n], 2, f"EMA of {n}")
    frozen = ~mask
    start = to_numpy(_variables(shapes=shapes)["k"])
    assert np.array_equal(runs[True][0]["k"][frozen], start[frozen])


# ------------------------------------------------------------------ API


def test_set_and_get_multiplier_before_and_after_build():
    variables = _variables()
    opt = MaskedOptimizer("adam", multipliers={"k": np.array([[1.0, 0.5, 0.5, 1.0]])})
    opt.set_multiplier(variables["o"], 0.5)  # recorded, replayed at build
    assert opt.get_multiplier(variables["o"]).tolist() == np.full((4, 3), 0.5).tolist()
    opt.build(list(variables.values()))
    assert opt.multiplied_variables == [variables["k"], variables["o"]]
    assert opt.get_multiplier("k").shape == (5, 4) and opt.get_multiplier("k").dtype == np.float32
    assert np.array_equal(opt.get_multiplier("b"), np.ones(4, np.float32))
    opt.set_multiplier("k", np.array([0.0, 1.0, 2.0, 3.0]))  # fits the (1, 4) storage
    assert np.array_equal(opt.get_multiplier("k")[2], [0.0, 1.0, 2.0, 3.0])
    opt.set_multiplier("o", lambda v: np.full(v.shape, 0.25))  # constant: fits a scalar
    assert np.all(opt.get_multiplier("o") == 0.25)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (-0.5, ValueError, r"(?s)multipliers\['k'\].*negative value -0\.5"),
        (np.array([[1.0, np.nan, 1.0, 1.0]]), ValueError, r"non-finite value nan at index \(0, 1\)"),
        (float("inf"), ValueError, "non-finite value inf"),
        (True, TypeError, "To freeze or unfreeze, use `masks="),
        ("0.5", TypeError, "must be a float >= 0"),
    ],
)
def test_bad_multiplier_values_are_refused_with_the_value_named(value, error, match):
    with pytest.raises(error, match=match):
        MaskedOptimizer("adam", multipliers={"k": value})


def test_multiplier_errors_name_the_variable_and_the_fix():
    variables = _variables()
    with pytest.raises(ValueError, match=r"(?s)shape \(3,\).*'k'.*\(5, 4\)"):
        MaskedOptimizer("adam", multipliers={"k": np.ones(3)}).build(list(variables.values()))
    with pytest.raises(ValueError, match="two `multipliers` keys"):
        MaskedOptimizer("adam", multipliers={"k": 0.5, "[ko]": 0.1}).build(list(variables.values()))
    with pytest.raises(ValueError, match="ema_overwrite_frequency"):
        MaskedOptimizer(
            O.Adam(use_ema=True, ema_overwrite_frequency=2), multipliers={"k": 0.5}
        ).build(list(variables.values()))

    opt = MaskedOptimizer("adam", multipliers={"k": 0.5})
    opt.build(list(variables.values()))
    with pytest.raises(ValueError, match=r"(?s)'o' has no multiplier.*multipliers=\{'o': 1\.0\}"):
        opt.set_multiplier("o", 0.1)
    with pytest.raises(ValueError, match=r"(?s)stored with shape \(\).*varies along axis 1"):
        opt.set_multiplier("k", np.array([1.0, 2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="negative"):
        opt.set_multiplier("k", -1.0)
    assert np.all(opt.get_multiplier("k") == 0.5)  # nothing changed by the failed calls


# ------------------------------------------------------------- fit, saving


def _model(counter=None):
    return mlp(6, ("hidden", 5, {"activation": "relu"}), ("out", 3), name="net", counter=counter)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=(n,))


def test_warm_unfreezing_ramp_from_a_callback_needs_no_retrace():
    x, y = _data()
    counter = TraceCounter()
    model = _model(counter)
    opt = MaskedOptimizer(O.Adam(0.05), multipliers={"hidden": 0.0})
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ramp = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: opt.set_multiplier("hidden", min(1.0, epoch / 2))
    )
    kernel = model.get_layer("hidden").kernel
    seen, traces = [to_numpy(kernel)], []

    def end(epoch, logs):
        seen.append(to_numpy(synced(model).get_layer("hidden").kernel))
        traces.append(counter.count)

    record = keras.callbacks.LambdaCallback(on_epoch_end=end)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[ramp, record])
    assert np.array_equal(seen[1], seen[0])  # epoch 0: multiplier 0, held exactly
    assert np.all(seen[2] != seen[1]) and np.all(seen[3] != seen[2])
    assert np.all(opt.get_multiplier("hidden/kernel") == 1.0)
    if not IS_TORCH:  # eager torch runs `call` every step: nothing is traced
        assert traces[1:] == traces[:1] * 2, "set_multiplier must not retrace the train function"


def test_multipliers_are_saved_and_loaded_with_the_model(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(
        optimizer=MaskedOptimizer(
            O.Adam(0.05),
            masks={"out/bias": False},
            multipliers={"hidden/kernel": np.array([[0.0, 0.5, 1.0, 2.0, 0.1]], np.float32)},
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.optimizer.set_multiplier("hidden/kernel", np.array([0.0, 0.7, 1.0, 2.0, 0.2]))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    opt = loaded.optimizer
    assert [v.path.split("/", 1)[-1] for v in opt.multiplied_variables] == ["hidden/kernel"] or [
        v.path for v in opt.multiplied_variables
    ] == ["hidden/kernel"]
    assert np.array_equal(
        opt.get_multiplier("hidden/kernel"), model.optimizer.get_multiplier("hidden/kernel")
    )
    start = to_numpy(loaded.get_layer("hidden").kernel)
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    a, b = (to_numpy(m.get_layer("hidden").kernel) for m in (model, loaded))
    assert_equal_across_programs(b, a)
    assert np.array_equal(b[:, 0], start[:, 0])

    # A model compiled with other multipliers refuses the saved state.
    other = _model()
    other.compile(optimizer=MaskedOptimizer(O.Adam(0.05), masks={"out/bias": False}), loss="mse")
    other.fit(x, y.reshape(-1, 1) * np.ones((1, 3)), batch_size=32, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="multipliers saved"):
        other.load_weights(path)


@pytest.mark.skipif(IS_TORCH, reason="checks the XLA path of TensorFlow and JAX's jit")
def test_compiled_step_holds_zero_multipliers_exactly():
    from backends import CompiledStep

    variables = _variables()
    start = to_numpy(variables["k"])
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), multipliers={"k": np.array([[0.0, 1.0, 0.5, 0.0]])})
    names = list(variables)
    opt.build([variables[n] for n in names])
    step = CompiledStep(opt, [variables[n] for n in names])
    for g in _grads(3):
        step([tensor(g[n]) for n in names])
    got = to_numpy(variables["k"])
    assert np.array_equal(got[:, [0, 3]], start[:, [0, 3]])
    assert np.all(got[:, [1, 2]] != start[:, [1, 2]])
    assert step.traces() == 1


def test_multipliers_scale_the_accumulated_update_of_gradient_accumulation():
    grads = _grads(2)
    bare_vars = _variables()
    w0 = to_numpy(bare_vars["k"])
    bare = _run(O.Adam(0.05, gradient_accumulation_steps=2), bare_vars, grads)
    variables = _variables()
    opt = MaskedOptimizer(O.Adam(0.05, gradient_accumulation_steps=2), multipliers={"k": 0.5})
    names = list(variables)
    opt.apply([tensor(grads[0][n]) for n in names], [variables[n] for n in names])
    assert np.array_equal(to_numpy(variables["k"]), w0)  # accumulating: nothing moves
    opt.apply([tensor(grads[1][n]) for n in names], [variables[n] for n in names])
    got = to_numpy(variables["k"])
    np.testing.assert_allclose(got, w0 + np.float32(0.5) * (bare["k"] - w0), rtol=0, atol=1e-7)
    assert np.array_equal(to_numpy(variables["o"]), bare["o"])


def test_multipliers_under_mixed_float16_loss_scaling():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()
    model = _model()
    opt = MaskedOptimizer(O.Adam(0.05), multipliers={"hidden": 0.0, "out/kernel": 0.5})
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert isinstance(model.optimizer, O.LossScaleOptimizer)  # LossScaleOptimizer(MaskedOptimizer)
    hidden = [to_numpy(v) for v in model.get_layer("hidden").trainable_variables]
    out = to_numpy(model.get_layer("out").kernel)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for before, v in zip(hidden, model.get_layer("hidden").trainable_variables):
        assert np.array_equal(to_numpy(v), before)
    assert np.all(to_numpy(model.get_layer("out").kernel) != out)
    assert np.all(opt.get_multiplier("out/kernel") == 0.5)


def _special_values(dtype, n, seed=7):
    """NaN with a payload, both infinities, both zeros, subnormals, normals."""
    bits = {"float16": np.uint16, "float32": np.uint32}[dtype]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(dtype)
    info = np.finfo(dtype)
    x[:7] = [np.inf, -np.inf, 0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.max]
    payload_nan = np.array([np.nan], dtype).view(bits) | bits(1)
    x[7] = payload_nan.view(dtype)[0]
    x[-8:] = x[:8]  # and in the last, partial SIMD vector
    return x, bits


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backend_select_is_where_bit_for_bit(dtype):
    """The blend's `where` (a vectorised integer form on eager torch) keeps
    every bit, NaN payloads and signed zeros included, for 0-d, full-shape
    and broadcast conditions."""
    from masked_opt import _backend

    shape = (64, 67)  # >= 4,096 elements, not a multiple of the SIMD width: body and tail
    x, bits = _special_values(dtype, 64 * 67, seed=7)
    y, _ = _special_values(dtype, 64 * 67, seed=8)
    x, y = x.reshape(shape), y[::-1].reshape(shape)
    rng = np.random.default_rng(9)
    conditions = [np.array(True), np.array(False), rng.random(shape) < 0.5, rng.random((1, 67)) < 0.5]
    for cond in conditions:
        got = to_numpy(_backend.select(tensor(cond), tensor(x), tensor(y)))
        expected = np.where(cond, x, y)
        assert got.dtype == np.dtype(dtype)
        assert np.array_equal(got.view(bits), expected.view(bits)), cond.shape


def _subnormal(x: np.ndarray) -> np.ndarray:
    return (x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backend_blend_is_the_numpy_formula_bit_for_bit(dtype):
    """`old + m * (current - old)` where moving, else `old` (one new tensor on
    eager torch): each operation rounded once, as NumPy does, for 0-d and
    per-column multipliers, 0-d and full-shape `moving`; infinities, signed
    zeros, subnormals and a NaN in either operand (NaNs compared as NaN: one
    made by inf - inf is the implementation's default NaN; arithmetic on
    subnormals is the backend's: TensorFlow and XLA flush them)."""
    from masked_opt import _backend

    shape = (64, 67)  # >= 4,096 elements, not a multiple of the SIMD width: body and tail
    old, bits = _special_values(dtype, 64 * 67, seed=7)
    current, _ = _special_values(dtype, 64 * 67, seed=8)
    old, current = old.reshape(shape), current[::-1].reshape(shape)
    rng = np.random.default_rng(10)
    multipliers = [np.array(0.5, dtype), np.array(0.3, dtype), rng.uniform(0, 1, (1, 67)).astype(dtype)]
    movings = [np.array(True), np.array(False), rng.random(shape) < 0.5]
    for m in multipliers:
        for moving in movings:
            got = to_numpy(_backend.blend(tensor(old), tensor(current), tensor(m), tensor(moving)))
            with np.errstate(invalid="ignore", over="ignore"):
                expected = np.where(moving, old + m * (current - old), old)
            assert got.dtype == np.dtype(dtype)
            # Bit for bit, except where the backend's arithmetic is its own: the
            # sign/payload of a NaN an invalid operation makes (inf - inf: the
            # default NaN) and subnormal operands or results, which TensorFlow
            # and XLA flush to zero (FTZ/DAZ) and torch and NumPy do not.
            nan = np.isnan(expected)
            moved = np.broadcast_to(moving, shape)
            own = nan | (moved & (_subnormal(old) | _subnormal(current) | _subnormal(expected)))
            assert np.array_equal(np.isnan(got), nan), (m.shape, moving.shape)
            assert np.array_equal(got.view(bits)[~own], expected.view(bits)[~own]), (m.shape, moving.shape)
            assert own.mean() < 0.01  # nearly every element is compared bit for bit
