"""`compact_state=True`: optimizer state for the trainable elements only.

1. Frozen elements stay exact, and trainable ones match the default
   (dense-state) mode within the bound documented per optimizer
   (docs/compact-state.md), for every element-wise optimizer with weight
   decay, clipvalue, clipnorm, global_clipnorm, EMA + overwrite + finalize
   and gradient accumulation, eager and compiled, at small and at realistic
   sizes (>= 4,096 elements per variable; densities 1 %, 5 %, 50 %).
2. Optimizer memory is proportional to the trainable count (asserted on the
   bytes of every optimizer variable; timings live in benchmarks/).
3. Mask edits: kept elements keep their state, newly trainable ones start
   from a fresh optimizer's state, dropped ones lose theirs; capacity limits.
4. Refusals: optimizers that couple elements, constraints.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import keras
from backends import IS_TF, IS_TORCH, CompiledStep, assert_ulp_close, optimizer_class, tensor, to_numpy, slot
from masked_opt import MaskedOptimizer
from optimizer_table import OPTIMIZERS

O = keras.optimizers

# The element-wise entries of the shared optimizer table.
ELEMENTWISE = {
    k: OPTIMIZERS[k]
    for k in (
        "sgd", "sgd_momentum", "sgd_nesterov", "rmsprop_momentum", "rmsprop_centered", "adam",
        "adam_amsgrad", "adamw", "adamax", "nadam", "adagrad", "adadelta", "ftrl", "lion",
    )
}
FEATURES = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "clipvalue": {"clipvalue": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 2},
    "accumulation": {"gradient_accumulation_steps": 2},
    "clipnorm": {"clipnorm": 0.5},
}
# The documented bound of compact vs dense state (docs/compact-state.md, whose
# table `test_the_documented_bounds_are_the_tested_ones` checks), in ulp at the
# variable's scale. The same element sees the same arithmetic on a shorter
# array; what can differ is the rounding of vectorised kernels (a fused
# multiply-add or an approximate reciprocal square root in a SIMD body, exact
# operations in its tail; XLA's `rsqrt` for RMSprop/Adagrad/Adadelta), Ftrl's
# vectorised `pow`, and the order in which `clipnorm`/`global_clipnorm` sum a
# norm. Measured at realistic sizes on an AVX-512 CPU: 0 in eager steps on
# every backend except Ftrl (1.4) and norm clipping (2); under XLA up to 1
# (RMSprop, Adagrad, Adadelta) and 2 (norm clipping).
COMPACT_ULPS = {
    "sgd": 2, "sgd_momentum": 2, "sgd_nesterov": 2, "adam": 2, "adam_amsgrad": 2, "adamw": 2,
    "adamax": 2, "nadam": 2, "lion": 2, "rmsprop_momentum": 2, "rmsprop_centered": 2, "adagrad": 2,
    "adadelta": 2, "ftrl": 4,
}
NORM_CLIPPING_ULPS = 4  # clipnorm, global_clipnorm


def _bound(opt_id: str, feature: str) -> int:
    clipping = feature in ("clipnorm", "global_clipnorm")
    return max(COMPACT_ULPS[opt_id], NORM_CLIPPING_ULPS if clipping else 0)


# Small variables, and realistic ones: >= 4,096 elements each (SIMD bodies
# and tails), element masks with 1 %, 5 % and 50 % of the elements trainable,
# a column mask, and an unmasked variable, all in one optimizer.
SIZES = ["small", "realistic"]


def _setup(size: str):
    """(shapes, masks as given, masks at full shape)."""
    if size == "small":  # an element mask, a frozen variable, a column mask, an unmasked variable
        elem = np.random.default_rng(0).random((6, 5)) < 0.3
        col = np.array([[True, False, True, True, False]])
        shapes = [(6, 5), (5,), (4, 5), (3,)]
        given = [elem, False, col]
    else:
        rng = np.random.default_rng(1)
        shapes = [(64, 96), (4096,), (96, 64), (64, 64), (4096,)]
        col = rng.random((1, 64)) < 0.5
        given = [rng.random((64, 96)) < 0.01, rng.random((4096,)) < 0.05, rng.random((96, 64)) < 0.5, col]
    full = [np.broadcast_to(m, s) for m, s in zip(given, shapes)] + [np.ones(shapes[-1], bool)]
    return shapes, given, full


def _variables(shapes):
    init = np.random.default_rng(3)
    out = []
    for j, shape in enumerate(shapes):
        with keras.name_scope(f"l{j}"):
            out.append(keras.Variable(init.normal(size=shape).astype("float32"), name="w"))
    return out


def _train(opt_id, feature, compact, steps=3, jit=False, size="small"):
    shapes, given, _ = _setup(size)
    variables = _variables(shapes)
    opt = MaskedOptimizer(
        ELEMENTWISE[opt_id](**FEATURES[feature]), list(zip(variables, given)), compact_state=compact
    )
    step = CompiledStep(opt, variables) if jit else (lambda g: opt.apply(g, variables))
    history = [[to_numpy(v) for v in variables]]
    rng = np.random.default_rng(11)
    for _ in range(steps):
        step([tensor(rng.normal(size=s).astype("float32")) for s in shapes])
        history.append([to_numpy(v) for v in variables])
    if FEATURES[feature].get("use_ema"):
        opt.finalize_variable_values(variables)
        history.append([to_numpy(v) for v in variables])
    return history, opt


def _assert_compact_matches_dense(dense, compact, full, bound, label):
    start = compact[0]
    for k, (d_step, c_step) in enumerate(zip(dense, compact)):
        for j, (d, c, m) in enumerate(zip(d_step, c_step, full)):
            assert np.array_equal(c[~m], start[j][~m]), (label, k, j)  # frozen: exact
            assert_ulp_close(c, d, bound, f"{label}: step {k}, variable {j}")
    moved = [np.any(compact[-1][j][m] != start[j][m]) for j, m in enumerate(full) if m.any()]
    assert all(moved), label


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("opt_id", list(ELEMENTWISE))
def test_compact_matches_dense_state(opt_id, feature, size):
    dense, _ = _train(opt_id, feature, compact=False, size=size)
    compact, _ = _train(opt_id, feature, compact=True, size=size)
    _assert_compact_matches_dense(dense, compact, _setup(size)[2], _bound(opt_id, feature), f"{opt_id}/{feature}")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opt_id", list(ELEMENTWISE))
def test_compact_under_the_trainers_compilation_matches_dense_within_its_bound(opt_id, size):
    # tf.function (XLA under jit_compile="auto") / jax.jit over stateless_apply
    # (what the JAX trainer runs) / torch eager: two compiled programs.
    dense, _ = _train(opt_id, "weight_decay", compact=False, jit=True, size=size)
    compact, _ = _train(opt_id, "weight_decay", compact=True, jit=True, size=size)
    _assert_compact_matches_dense(dense, compact, _setup(size)[2], _bound(opt_id, "weight_decay"), opt_id)


def test_the_documented_bounds_are_the_tested_ones():
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "compact-state.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", doc, re.M))
    assert {k: int(v) for k, v in rows.items()} == {**COMPACT_ULPS, "norm_clipping": NORM_CLIPPING_ULPS}


def _optimizer_bytes(opt) -> int:
    return sum(
        int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in opt.variables
    )


def test_optimizer_memory_is_proportional_to_the_trainable_count():
    size = 2048
    mask = np.random.default_rng(0).random((size, size)) < 0.01
    k1 = keras.Variable(np.zeros((size, size), "float32"), name="k")
    bare = O.Adam()
    bare.build([k1])
    k2 = keras.Variable(np.zeros((size, size), "float32"), name="k")
    compact = MaskedOptimizer(O.Adam(), [(k2, mask)], compact_state=True)
    compact.build([k2])
    ratio = _optimizer_bytes(compact) / _optimizer_bytes(bare)
    assert ratio <= 0.03, ratio
    # Two slots + one int32 index per trainable element, plus a few scalars.
    assert _optimizer_bytes(compact) < 3 * 4 * mask.sum() + 1024
    assert ratio > 0.01  # non-vacuous: the state is there


def test_mask_edits_keep_reset_and_drop_state():
    w0 = np.random.default_rng(5).normal(size=(4, 3)).astype("float32")
    w = keras.Variable(w0, name="w")
    mask = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    opt = MaskedOptimizer(O.Adam(0.1), [(w, mask)], compact_state=True, compact_capacity=6)
    g = tensor(np.ones((4, 3), "float32"))
    for _ in range(3):
        opt.apply([g], [w])
    inner = opt.inner_optimizer
    m_var, v_var = slot(inner, 0, "momentum"), slot(inner, 0, "velocity")
    before_m, before_v = to_numpy(m_var), to_numpy(v_var)
    old_positions = {int(e): p for p, e in enumerate(np.flatnonzero(mask))}
    # keep (0,0) (0,1) (1,1); drop (2,0); add (3,2) (2,2)
    new = mask.copy()
    new[2, 0] = False
    new[3, 2] = new[2, 2] = True
    opt.set_mask(w, new)
    assert np.array_equal(opt.get_mask(w), new)
    after_m, after_v = to_numpy(m_var), to_numpy(v_var)
    for p, e in enumerate(np.flatnonzero(new)):
        if e in old_positions:  # kept: the same state, at its new position
            assert after_m[p] == before_m[old_positions[e]] and after_v[p] == before_v[old_positions[e]]
        else:  # new: a fresh Adam's zeros
            assert after_m[p] == 0.0 and after_v[p] == 0.0
    # A new element's first step is a fresh Adam's first step on it:
    # m = 0.1 g, v = 0.001 g^2, w -= lr * m_hat / (sqrt(v_hat) + eps) with the
    # bias correction of the optimizer's 4th step (iterations are shared).
    before = to_numpy(w)
    opt.apply([g], [w])
    after = to_numpy(w)
    t, lr, eps = 4, 0.1, 1e-7
    m_hat = 0.1 / (1 - 0.9**t)
    v_hat = 0.001 / (1 - 0.999**t)
    expected = before[3, 2] - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(after[3, 2], expected, rtol=1e-5)
    assert after[2, 0] == before[2, 0]  # dropped: frozen now
    assert np.array_equal(after[~new], before[~new])


def test_capacity_is_fixed_at_build_with_a_clear_error():
    w = keras.Variable(np.zeros((4, 3), "float32"), name="w")
    mask = np.zeros((4, 3), bool)
    mask[0] = True
    opt = MaskedOptimizer(O.Adam(0.1), [(w, mask)], compact_state=True)
    opt.build([w])
    opt.set_mask(w, np.eye(4, 3, dtype=bool))  # 3 elements: fits
    with pytest.raises(ValueError, match=r"'w'.*6 trainable.*holds 3.*compact_capacity"):
        opt.unfreeze(w, np.s_[3])
    assert np.array_equal(opt.get_mask(w), np.eye(4, 3, dtype=bool))  # unchanged
    roomy = MaskedOptimizer(O.Adam(0.1), [(w, mask)], compact_state=True, compact_capacity=0.5)
    roomy.build([w])
    roomy.unfreeze(w, np.s_[:2])  # 6 of 12 = 0.5
    assert roomy.get_mask(w).sum() == 6


@pytest.mark.parametrize(
    "factory,name",
    [
        (lambda: O.Lamb(0.1), "Lamb"),
        (lambda: O.Adafactor(0.1), "Adafactor"),
        (lambda: optimizer_class("Muon")(0.1), "Muon"),
        (lambda: optimizer_class("ScheduleFreeAdamW")(0.1), "ScheduleFreeAdamW"),
    ],
)
def test_optimizers_that_couple_elements_are_refused(factory, name):
    w = keras.Variable(np.zeros((4, 3), "float32"), name="w")
    opt = MaskedOptimizer(factory(), [(w, np.eye(4, 3, dtype=bool))], compact_state=True)
    with pytest.raises(ValueError, match=rf"compact_state=True.*\({name}\).*compact_state=False"):
        opt.build([w])


def test_constraints_on_masked_variables_are_refused():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d", kernel_constraint="non_neg")]
    )
    opt = MaskedOptimizer(O.Adam(), {"d/kernel": np.eye(3, 2, dtype=bool)}, compact_state=True)
    with pytest.raises(ValueError, match=r"'sequential/d/kernel'.*constraint.*NonNeg"):
        opt.build(model.trainable_variables)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"compact_state": 1}, "compact_state"),
        ({"compact_state": True, "compact_capacity": -1}, "compact_capacity"),
        ({"compact_state": True, "compact_capacity": 1.5}, "compact_capacity"),
        ({"compact_capacity": 10}, "only used with `compact_state=True`"),
    ],
)
def test_bad_compact_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MaskedOptimizer(O.Adam(), **kwargs)


def test_fit_keeps_frozen_exact_and_edits_from_a_callback_without_retracing():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")]
    )
    elem = np.random.default_rng(1).random((6, 5)) < 0.4
    opt = MaskedOptimizer(
        O.AdamW(0.05, weight_decay=0.1),
        {"d1/kernel": elem, "d1/bias": False},
        compact_state=True,
        compact_capacity=1.0,
    )
    model.compile(optimizer=opt, loss="mse")
    start = [to_numpy(v) for v in model.trainable_variables]

    class Grow(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                # Python runs the update once per trace (TF, JAX); every step on torch.
                self.traces_before = opt.inspect().update_traces
                opt.unfreeze("d1/kernel", np.s_[0])

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    grow = Grow()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[grow])
    end = [to_numpy(v) for v in model.trainable_variables]
    final = elem.copy()
    final[0] = True
    assert np.array_equal(opt.get_mask(model.trainable_variables[0]), final)
    assert np.array_equal(end[0][~final], start[0][~final])
    assert np.array_equal(end[1], start[1])
    assert np.any(end[0][0] != start[0][0]) and np.any(end[2] != start[2])
    if not IS_TORCH:  # the mask edit needed no retrace
        assert opt.inspect().update_traces == grow.traces_before > 0


def test_save_load_round_trip_continues_bit_identically(tmp_path):
    def model_fn():
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")],
            name="net",
        )

    elem = np.random.default_rng(1).random((6, 5)) < 0.4
    model = model_fn()
    opt = MaskedOptimizer(
        O.Adam(0.05, use_ema=True),
        {"d1/kernel": elem, "d2/bias": False},
        compact_state=True,
        compact_capacity=0.8,
    )
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    opt.unfreeze("d1/kernel", np.s_[0])  # an edit after training, saved too
    path = str(tmp_path / "compact.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    lopt = loaded.optimizer
    assert lopt.compact_state and lopt.compact_capacity == 0.8
    for v, w in zip(model.trainable_variables, loaded.trainable_variables):
        assert np.array_equal(to_numpy(v), to_numpy(w))
        assert np.array_equal(opt.get_mask(v), lopt.get_mask(w))
    assert len(opt.variables) == len(lopt.variables)
    for a, b in zip(opt.variables, lopt.variables):
        assert np.array_equal(to_numpy(a), to_numpy(b)), a.path
    # Continue both with the same eager steps: bit-identical.
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    g_rng = np.random.default_rng(6)
    for _ in range(2):
        g = [tensor(g_rng.normal(size=s).astype("float32")) for s in shapes]
        opt.apply(g, model.trainable_variables)
        lopt.apply(g, loaded.trainable_variables)
    for v, w in zip(model.trainable_variables, loaded.trainable_variables):
        assert np.array_equal(to_numpy(v), to_numpy(w)), v.path


def test_loading_into_other_capacities_is_refused(tmp_path):
    w = keras.Variable(np.zeros((4, 3), "float32"), name="w")
    mask = np.eye(4, 3, dtype=bool)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    a = MaskedOptimizer(O.Adam(), {"d/kernel": mask}, compact_state=True)
    model.compile(optimizer=a, loss="mse")
    a.build(model.trainable_variables)
    path = str(tmp_path / "a.weights.h5")
    model.save_weights(path)
    b = MaskedOptimizer(O.Adam(), {"d/kernel": mask}, compact_state=True, compact_capacity=6)
    model.compile(optimizer=b, loss="mse")
    b.build(model.trainable_variables)
    with pytest.raises(ValueError, match="capacities saved"):
        model.load_weights(path)
    del w


@pytest.mark.parametrize("policy", ["mixed_float16", "xla"])
def test_fit_under_mixed_precision_and_xla_keeps_frozen_exact(policy):
    if policy == "xla" and not IS_TF:
        pytest.skip("MaskedOptimizer(jit_compile=True) is TensorFlow's")
    if policy == "mixed_float16":
        keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")]
    )
    elem = np.random.default_rng(1).random((6, 5)) < 0.4
    opt = MaskedOptimizer(
        O.AdamW(0.05, weight_decay=0.1),
        {"d1/kernel": elem, "d1/bias": False},
        compact_state=True,
        jit_compile=policy == "xla",
    )
    model.compile(optimizer=opt, loss="mse")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, O.LossScaleOptimizer)
    start = [to_numpy(v) for v in model.trainable_variables]
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    end = [to_numpy(v) for v in model.trainable_variables]
    assert np.array_equal(end[0][~elem], start[0][~elem]) and np.array_equal(end[1], start[1])
    assert np.any(end[0][elem] != start[0][elem]) and np.any(end[2] != start[2])
    if policy == "xla":
        assert opt.inspect().xla_functions == 1
