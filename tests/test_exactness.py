"""The central promise, tested across every optimizer in the table.

1. Frozen elements are bit-identical after every step, for every inner optimizer
   crossed with every training feature that can move an element whose gradient
   is zero (weight decay, EMA + overwrite + finalize, clipping, accumulation,
   constraints, momentum or an EMA built before a mask change, NaN/inf gradients).
2. Trainable elements (and the inner optimizer's state) are exactly what a bare
   inner optimizer computes from the masked gradient, with the frozen elements
   copied back after each step in plain NumPy (the oracle).
3. A positive control: naive gradient-only masking does move frozen elements,
   so these tests can see the failure the library prevents.

The matrix runs eagerly on three small variables with fixed random gradients
(fast), on every backend; a subset runs compiled as each backend's trainer
compiles the update (`tf.function` on TensorFlow, `jax.jit` over
`stateless_apply` on JAX, eager on torch), through a custom gradient loop and
through `model.fit`.

Bit-identity is asserted where one program computes both sides: frozen
elements before and after a step, and the masked run against the oracle, both
eager (the same ops, dispatched one by one). A compiled run is compared with
the eager oracle within a stated ulp bound (a separately compiled program may
round differently in the last bit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

import keras
from backends import IS_JAX, IS_TF, IS_TORCH, CompiledStep, assert_ulp_close, gradients, tensor, to_numpy, ema_of
from models import mlp
from masked_opt import MaskedOptimizer
from optimizer_table import OPTIMIZERS

OPT_IDS = list(OPTIMIZERS)

# --------------------------------------------------------------------- setup
# Three variables, one per kind of mask: a/kernel (element-wise), a/bias (scalar
# False: the whole variable frozen), b/kernel (columns, stored as (1, units)).
# Variables without a mask are covered by the model.fit cases below.
PATHS = ["a/kernel", "a/bias", "b/kernel"]
SHAPES = [(5, 4), (4,), (3, 4)]
ELEM = np.random.default_rng(7).random((5, 4)) < 0.5
COL = np.array([[True, False, True, False]])

MASKS = {"a/kernel": ELEM, "a/bias": False, "b/kernel": COL}
# Mask-change cases start from all-True masks of the same storage shapes.
ALL_TRUE = {"a/kernel": np.ones((5, 4), bool), "a/bias": True, "b/kernel": np.ones((1, 4), bool)}
FULL = [ELEM, np.zeros((4,), bool), np.broadcast_to(COL, (3, 4))]
FULL_TRUE = [np.ones(s, bool) for s in SHAPES]

STEPS = 2  # enough for every leak of an element frozen from the start
CHANGE_AT = 2  # mask-change cases: 2 steps with all-True masks, then freeze, 2 more


@dataclass(frozen=True)
class Feature:
    kwargs: dict  # base-optimizer arguments of the inner optimizer
    steps: int = STEPS
    constraint: bool = False  # MaxNorm on a/kernel, NonNeg on b/kernel
    nan: bool = False  # NaN/+inf/-inf gradients at frozen positions
    change: bool = False  # start all-True, switch to MASKS before step CHANGE_AT
    finalize: bool = False  # call finalize_variable_values at the end (as fit does)


FEATURES = {
    "plain": Feature({}),
    "weight_decay": Feature({"weight_decay": 0.1}),
    "ema_overwrite": Feature({"use_ema": True, "ema_overwrite_frequency": 2}, finalize=True),
    "clipnorm": Feature({"clipnorm": 0.5}),
    "global_clipnorm": Feature({"global_clipnorm": 0.5}),
    "clipvalue": Feature({"clipvalue": 0.05}),
    "accumulation": Feature({"gradient_accumulation_steps": 2}, steps=4),
    "constraint": Feature({}, constraint=True),
    "mask_change": Feature({}, steps=4, change=True),
    "nan": Feature({}, nan=True),
}
# Further cases, not in the matrix above. "everything" runs for every optimizer
# in the oracle test (whose masked run also asserts frozen exactness each step),
# so the EMA with a mask change is covered there.
COMBINED = {
    # Overwrite at the first step after the freeze, when the average lags.
    "ema_mask_change": Feature(
        {"use_ema": True, "ema_overwrite_frequency": 3}, steps=4, change=True, finalize=True
    ),
    "everything": Feature(
        {
            "weight_decay": 0.05,
            "clipnorm": 1.0,
            "use_ema": True,
            "ema_overwrite_frequency": 3,
            "gradient_accumulation_steps": 2,
        },
        steps=6,
        constraint=True,
        nan=True,
        change=True,
        finalize=True,
    ),
}
CASES = {**FEATURES, **COMBINED}


def _variables(constraint: bool = False) -> list[keras.Variable]:
    """The three variables at fixed random values; with `constraint`, the Dense
    kernel constraints MaxNorm(0.3) on a/kernel and NonNeg on b/kernel (the
    model.fit cases below put them on real Dense layers)."""
    variables = _scoped_variables(PATHS, SHAPES, seed=3)
    if constraint:
        variables[0].constraint = keras.constraints.MaxNorm(0.3)
        variables[2].constraint = keras.constraints.NonNeg()
    return variables


def _scoped_variables(paths: list[str], shapes: list[tuple], seed: int) -> list[keras.Variable]:
    """float32 variables at `paths` ("scope/name"), normal random values from `seed`."""
    init = np.random.default_rng(seed)
    variables = []
    for path, shape in zip(paths, shapes):
        scope, name = path.split("/")
        with keras.name_scope(scope):
            variables.append(keras.Variable(init.normal(size=shape).astype("float32"), name=name))
    assert [v.path for v in variables] == list(paths)
    return variables


def _schedule(f: Feature) -> list[list]:
    """The full-shape masks in force at each step (None: no mask)."""
    if f.change:
        return [FULL_TRUE] * CHANGE_AT + [FULL] * (f.steps - CHANGE_AT)
    return [FULL] * f.steps


def _grads(schedule: list[list], nan: bool, seed: int = 11) -> list[list[np.ndarray]]:
    """Fixed random gradients, one list per step; NaN/+inf/-inf at frozen positions if `nan`."""
    rng = np.random.default_rng(seed)
    out = []
    for masks in schedule:
        step = []
        for shape, mask in zip(SHAPES, masks):
            g = rng.normal(size=shape).astype("float32")
            if nan and mask is not None:
                poison = np.resize(np.array([np.nan, np.inf, -np.inf], "float32"), g.size)
                g = np.where(mask, g, poison.reshape(shape))
            step.append(g)
        out.append(step)
    return out


def _change_masks(opt: MaskedOptimizer) -> None:
    """From ALL_TRUE to MASKS after build, through the three mask-editing calls."""
    opt.set_mask("a/kernel", ELEM)
    opt.freeze("b/kernel", where=np.s_[:, 1::2])  # columns 1 and 3, as COL
    opt.freeze("a/bias")


def _masked_grads(grads: list[np.ndarray], masks: list) -> list[np.ndarray]:
    return [g if m is None else np.where(m, g, np.zeros_like(g)) for g, m in zip(grads, masks)]


def _values(variables) -> list[np.ndarray]:
    return [to_numpy(v) for v in variables]


def _frozen_moves(before, after, masks, paths=PATHS) -> list[str]:
    """One line per variable whose frozen elements are not bit-identical."""
    bad = []
    for path, b, a, m in zip(paths, before, after, masks):
        if m is None:
            continue
        b, a = b[~m], a[~m]
        same = np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))
        if not same:
            bad.append(f"{path}: {int(np.sum(a != b))} frozen elements moved")
    return bad


def _ema_variables(optimizer, variables) -> list:
    """The optimizer's EMA (`use_ema`) of each variable, or None; sub-optimizers
    of a MultiOptimizer included. The attributes keras.callbacks.SwapEMAWeights reads."""
    out = []
    for v in variables:
        ema = None
        for opt in getattr(optimizer, "optimizers", None) or [optimizer]:
            ema = ema_of(opt, v) if ema_of(opt, v) is not None else ema
        out.append(ema)
    return out


def _assert_trainable_moved(first, last, masks, label: str, paths=PATHS) -> None:
    """Non-vacuity: some trainable element of every variable that has one moved."""
    for path, b, a, m in zip(paths, first, last, masks):
        trainable = np.ones(b.shape, bool) if m is None else m
        if trainable.any():
            assert np.any(a[trainable] != b[trainable]), (
                f"{label}: no trainable element of {path} moved"
            )


# ------------------------------------------------------------------- runners
@dataclass
class Run:
    history: list[list[np.ndarray]]  # weights before the first step, after each step (+ finalize)
    inner_state: list[np.ndarray]  # inner optimizer variables at the end
    inner_paths: list[str]


def run_masked(opt_id: str, feature: str, *, mode: str = "eager") -> tuple[Run, object]:
    """Trains under MaskedOptimizer, asserting after each step (and after
    finalize) that the elements frozen during that step did not move.
    `mode="function"` compiles the step as the backend's trainer does
    (`CompiledStep`). Returns the run and the step function."""
    f = CASES[feature]
    variables = _variables(f.constraint)
    schedule = _schedule(f)
    grads = _grads(schedule, f.nan)
    opt = MaskedOptimizer(OPTIMIZERS[opt_id](**f.kwargs), ALL_TRUE if f.change else MASKS)

    if mode == "function":
        step = CompiledStep(opt, variables)
    else:

        def step(g):
            opt.apply_gradients(zip(g, variables))

    history = [_values(variables)]
    traces = None
    for k, (g, masks_now) in enumerate(zip(grads, schedule)):
        if mode == "function" and k == 1:
            traces = step.traces()  # the first call builds
        if f.change and k == CHANGE_AT:
            _change_masks(opt)
            for v, m in zip(variables, FULL):
                if m is not None:
                    assert np.array_equal(opt.get_mask(v), m), v.path
        step([tensor(x) for x in g])
        history.append(_values(variables))
        bad = _frozen_moves(history[-2], history[-1], masks_now)
        assert not bad, f"{opt_id}/{feature} ({mode}), step {k}: {bad}"
        if f.kwargs.get("use_ema"):
            # The EMA of a frozen element is the element (what SwapEMAWeights swaps in).
            emas = _ema_variables(opt.inner_optimizer, variables)
            assert all(e is not None for e in emas)
            bad = _frozen_moves(history[-1], _values(emas), masks_now)
            assert not bad, f"{opt_id}/{feature} ({mode}), EMA after step {k}: {bad}"
    if f.finalize:
        opt.finalize_variable_values(variables)
        history.append(_values(variables))
        bad = _frozen_moves(history[-2], history[-1], schedule[-1])
        assert not bad, f"{opt_id}/{feature} ({mode}), finalize_variable_values: {bad}"
    if mode == "function" and not IS_TORCH:  # torch's CompiledStep runs eagerly
        # Mask edits assign the stored bool variables (read from the optimizer
        # variables, not baked in as constants): no retracing after the first call.
        assert step.traces() == traces, "retraced"
    inner = opt.inner_optimizer.variables
    return Run(history, [to_numpy(s) for s in inner], [s.path for s in inner]), step


@functools.cache
def masked_run(opt_id: str, feature: str) -> Run:
    """The eager run, shared by the frozen-exactness and the oracle tests."""
    return run_masked(opt_id, feature)[0]


def run_oracle(opt_id: str, feature: str, *, restore: bool = True, mode: str = "eager") -> Run:
    """The bare inner optimizer fed `np.where(mask, g, 0)`; with `restore`, frozen
    elements are copied back from the pre-step NumPy snapshot after each step
    (and after `finalize_variable_values`). Without it: naive gradient masking.
    `mode="function"` compiles the bare step as `run_masked` does; `mode="xla"`
    (TensorFlow) runs its update as one XLA function inside that traced step,
    as a masked update with elements frozen at trace time runs by default
    (`jit_compile="auto"`)."""
    f = CASES[feature]
    variables = _variables(f.constraint)
    schedule = _schedule(f)
    grads = _grads(schedule, f.nan)
    opt = OPTIMIZERS[opt_id](**f.kwargs)
    # Built as the masked optimizer builds its inner one: eagerly, even when
    # its first call is traced (TF: under tf.init_scope). Stock
    # ScheduleFreeAdamW assigns its `z` slot in `build`, an assign that is
    # lost when built inside a tf.function.
    opt.build(variables)
    if mode == "function":
        step = CompiledStep(opt, variables)
    elif mode == "xla":
        import tensorflow as tf

        xla_apply = tf.function(
            lambda g: opt.apply(g, variables), jit_compile=True, autograph=False
        )
        step = tf.function(xla_apply, autograph=False)
    else:

        def step(g):
            opt.apply_gradients(zip(g, variables))

    def restore_frozen(before, masks):
        # Frozen elements back to their pre-step values, in the variable and
        # in its EMA (the EMA of a frozen element is the element).
        if restore:
            emas = _ema_variables(opt, variables)
            for v, e, b, m in zip(variables, emas, before, masks):
                if m is not None:
                    v.assign(np.where(m, to_numpy(v), b))
                    if e is not None:
                        e.assign(np.where(m, to_numpy(e), b))

    history = [_values(variables)]
    for g, masks_now in zip(grads, schedule):
        step([tensor(x) for x in _masked_grads(g, masks_now)])
        restore_frozen(history[-1], masks_now)
        history.append(_values(variables))
    if f.finalize:
        opt.finalize_variable_values(variables)
        restore_frozen(history[-1], schedule[-1])
        history.append(_values(variables))
    return Run(
        history, [to_numpy(s) for s in opt.variables], [s.path for s in opt.variables]
    )


# ----------------------------------------------------- 1. frozen never move
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_frozen_elements_are_bit_identical(opt_id, feature):
    f = CASES[feature]
    run = masked_run(opt_id, feature)  # asserts every step; then the whole run:
    schedule = _schedule(f)
    frozen_at = run.history[CHANGE_AT] if f.change else run.history[0]
    assert not _frozen_moves(frozen_at, run.history[-1], schedule[-1])
    _assert_trainable_moved(run.history[0], run.history[-1], schedule[-1], f"{opt_id}/{feature}")
    if f.nan:
        for path, value, m in zip(PATHS, run.history[-1], FULL):
            trainable = np.ones(value.shape, bool) if m is None else m
            assert np.all(np.isfinite(value[trainable])), f"{opt_id}: non-finite {path}"
        for path, state in zip(run.inner_paths, run.inner_state):
            assert np.all(np.isfinite(state.astype(np.float64))), (
                f"{opt_id}: non-finite inner optimizer state {path}"
            )


def test_nan_case_really_feeds_non_finite_gradients():
    # Guards the test above: the NaN case's gradients are non-finite exactly at
    # frozen positions, and a bare optimizer fed them raw is poisoned.
    f = FEATURES["nan"]
    grads = _grads(_schedule(f), f.nan)[0]
    for g, m in zip(grads, FULL):
        if m is not None:
            assert not np.isfinite(g[~m]).any() and np.isfinite(g[m]).all()
    variables = _variables()
    bare = OPTIMIZERS["adam"]()
    bare.apply_gradients(zip([tensor(g) for g in grads], variables))
    assert not np.isfinite(to_numpy(variables[0])).all()


# ----------------------------- 2. trainable elements get the inner update
# On JAX, Keras's optimizer runs gradient accumulation through `lax.cond`,
# which eager JAX compiles afresh at every call (~2 s for a run of
# "everything", ten times a whole "plain" run); jit is what JAX's trainer runs.
# There "everything" runs eagerly for a representative subset, and compiled
# for every optimizer (section 4).
JAX_EAGER_EVERYTHING = ["sgd_momentum", "adam", "ftrl", "muon", "schedule_free_adamw", "multi_optimizer"]
ORACLE_CASES = [(o, "plain") for o in OPT_IDS] + [
    (o, "everything") for o in (JAX_EAGER_EVERYTHING if IS_JAX else OPT_IDS)
]


@pytest.mark.parametrize("opt_id,feature", ORACLE_CASES)
def test_matches_bare_inner_optimizer_on_masked_gradient(opt_id, feature):
    run = masked_run(opt_id, feature)
    ref = run_oracle(opt_id, feature)
    assert len(run.history) == len(ref.history)
    for k, (got, want) in enumerate(zip(run.history, ref.history)):
        for path, g, w in zip(PATHS, got, want):
            assert np.array_equal(g, w), f"{opt_id}/{feature}: {path} differs after step {k}"
    assert len(run.inner_state) == len(ref.inner_state), (run.inner_paths, ref.inner_paths)
    for path, s, r in zip(run.inner_paths, run.inner_state, ref.inner_state):
        assert s.shape == r.shape and np.array_equal(s, r), (
            f"{opt_id}/{feature}: inner optimizer state {path} differs"
        )


# --------------------------------- 3. positive control: naive masking leaks
LEAKY = [
    ("adamw", "plain"),  # AdamW's default weight_decay=0.004
    ("muon", "plain"),  # default weight decay; Newton-Schulz mixes elements
    ("ftrl", "plain"),  # not incremental: a zero gradient still moves the weight
    ("schedule_free_adamw", "plain"),  # y/z interpolation drifts
    ("sgd", "weight_decay"),
    ("adafactor", "weight_decay"),
    ("sgd_momentum", "mask_change"),  # velocity built before the freeze
    ("rmsprop_momentum", "mask_change"),
    ("adam", "mask_change"),
    ("lion", "mask_change"),
    ("multi_optimizer", "mask_change"),
    ("sgd", "ema_mask_change"),  # EMA overwrite with an average that lags
    ("sgd", "constraint"),  # MaxNorm / NonNeg rewrite whole columns
    ("adam", "constraint"),
]


@pytest.mark.parametrize("opt_id,feature", LEAKY)
def test_naive_gradient_masking_moves_frozen_elements(opt_id, feature):
    f = CASES[feature]
    run = run_oracle(opt_id, feature, restore=False)
    frozen_at = run.history[CHANGE_AT] if f.change else run.history[0]
    assert _frozen_moves(frozen_at, run.history[-1], FULL), (
        f"naive masking kept {opt_id}/{feature} exact; this control shows nothing"
    )


# ------------------------ 4. compiled as the backend's trainer compiles it
# `CompiledStep`: tf.function on TensorFlow, jax.jit over `stateless_apply` on
# JAX (what the JAX trainer runs), eager on torch (the torch trainer's default).
# A representative subset; the matrix above runs every case eagerly.
FUNCTION_CASES = [
    ("sgd_momentum", "everything"),
    ("ftrl", "everything"),  # accumulation (a lax.cond under jit), EMA, constraints
    ("muon", "nan"),
    ("multi_optimizer", "ema_mask_change"),
    ("schedule_free_adamw", "mask_change"),
    ("adafactor", "weight_decay"),
]
if IS_JAX:  # "everything" for every optimizer (eagerly only for a subset there)
    FUNCTION_CASES += [(o, "everything") for o in OPT_IDS if (o, "everything") not in FUNCTION_CASES]
# The masked step and the oracle's bare step are two separately compiled
# programs, which may round differently in the last bit: on JAX two XLA
# programs; on TensorFlow two graph-mode steps, or, where elements are frozen
# when the step is traced (the masked update then runs under XLA, by default
# jit_compile="auto"), two XLA updates (graph mode vs XLA would differ by up
# to ~1500 ulp elementwise near 0, XLA contracting multiply-adds). Measured
# on an AMD EPYC (AVX-512), every optimizer: 0 ulp on JAX ("plain",
# "everything", "nan", "weight_decay", the mask-change cases); 0 on TF, in
# graph mode (mask-change cases) and under XLA (every frozen-from-start case
# of the matrix), though test_jit saw 1 ulp for an XLA Ftrl update. Allowed:
# 2. On torch both run eagerly, the same kernels one by one: bitwise.
COMPILED_MAX_ULP = 0 if IS_TORCH else 2


@pytest.mark.parametrize("opt_id,feature", FUNCTION_CASES)
def test_compiled_step_keeps_frozen_exact_and_mask_edits_need_no_retrace(opt_id, feature):
    f = CASES[feature]
    # Asserts frozen exactness after every step, and that the mask edits of the
    # mask-change cases took effect without a retrace (masks are read from the
    # optimizer's variables, not baked into the compiled step as constants).
    run, step = run_masked(opt_id, feature, mode="function")
    _assert_trainable_moved(run.history[0], run.history[-1], _schedule(f)[-1], opt_id)
    # Trainable elements and inner state: the bare optimizer's update,
    # compiled as the masked one was.
    xla = IS_TF and step.optimizer.inspect().xla_functions > 0
    ref = run_oracle(opt_id, feature, mode="xla" if xla else "function")
    assert len(run.history) == len(ref.history)

    def same(got, want, label):
        if COMPILED_MAX_ULP:
            assert_ulp_close(got, want, COMPILED_MAX_ULP, label)
        else:
            assert got.shape == want.shape and np.array_equal(got, want), f"{label} differs"

    for k, (got, want) in enumerate(zip(run.history, ref.history)):
        for path, g, w in zip(PATHS, got, want):
            same(g, w, f"{opt_id}/{feature}: {path} after step {k}")
    assert len(run.inner_state) == len(ref.inner_state), (run.inner_paths, ref.inner_paths)
    for path, s, r in zip(run.inner_paths, run.inner_state, ref.inner_state):
        same(s, r, f"{opt_id}/{feature}: inner state {path}")


# --------------------------------------------------------- through model.fit
FIT_PATHS = ["d1/kernel", "d1/bias", "d2/kernel", "d2/bias"]
FIT_ELEM = np.random.default_rng(8).random((5, 6)) < 0.5
FIT_COL = np.array([[False, True, True, False]])
FIT_MASKS = {"d1/kernel": FIT_ELEM, "d1/bias": False, "d2/kernel": FIT_COL}
FIT_FULL = [FIT_ELEM, np.zeros((6,), bool), np.broadcast_to(FIT_COL, (6, 4)), None]
FIT_ALL_TRUE = {
    "d1/kernel": np.ones((5, 6), bool),
    "d1/bias": True,
    "d2/kernel": np.ones((1, 4), bool),
}


def _model(constraint: bool = False) -> keras.Model:
    """Dense(6) -> Dense(4) on 5 inputs, weights set to random values."""
    return mlp(
        5,
        ("d1", 6, {"kernel_constraint": keras.constraints.MaxNorm(0.3) if constraint else None}),
        ("d2", 4, {"kernel_constraint": keras.constraints.NonNeg() if constraint else None}),
        init_seed=5,
    )


def _data(n: int = 24):
    rng = np.random.default_rng(9)
    return rng.normal(size=(n, 5)).astype("float32"), rng.normal(size=(n, 4)).astype("float32")


class _FrozenWatch(keras.callbacks.Callback):
    """Checks around every batch that frozen elements did not move; with
    `change_at`, switches from all-True masks to FIT_MASKS before that batch."""

    def __init__(self, opt: MaskedOptimizer, change_at: int | None = None):
        super().__init__()
        self.opt, self.change_at = opt, change_at
        self.masks = [None] * 4 if change_at is not None else FIT_FULL
        self.failures: list[str] = []
        self.frozen_at: list[np.ndarray] | None = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.change_at:
            self.opt.set_mask("d1/kernel", FIT_ELEM)
            self.opt.freeze("d1/bias")
            self.opt.freeze("d2/kernel", where=np.s_[:, [0, 3]])
            self.masks = FIT_FULL
            self.frozen_at = _values(self.model.trainable_variables)
        self.before = _values(self.model.trainable_variables)

    def on_train_batch_end(self, batch, logs=None):
        after = _values(self.model.trainable_variables)
        moved = _frozen_moves(self.before, after, self.masks, FIT_PATHS)
        self.failures += [f"batch {batch}: {m}" for m in moved]


FIT_CASES = [
    ("adamw", "weight_decay"),
    ("sgd_momentum", "mask_change"),
    ("adam", "ema_mask_change"),
    ("lamb", "constraint"),
    ("ftrl", "accumulation"),
]


@pytest.mark.parametrize("opt_id,feature", FIT_CASES)
def test_frozen_exact_through_model_fit(opt_id, feature):
    f = CASES[feature]
    model = _model(f.constraint)
    start = _values(model.trainable_variables)
    change_at = 3 if f.change else None
    opt = MaskedOptimizer(OPTIMIZERS[opt_id](**f.kwargs), FIT_ALL_TRUE if f.change else FIT_MASKS)
    model.compile(optimizer=opt, loss="mse")
    watch = _FrozenWatch(opt, change_at)
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    assert not watch.failures, watch.failures
    # After fit, which ends with finalize_variable_values (the EMA swap-in).
    end = _values(model.trainable_variables)
    assert not _frozen_moves(watch.frozen_at or start, end, FIT_FULL, FIT_PATHS)
    _assert_trainable_moved(start, end, FIT_FULL, f"{opt_id}/{feature}", FIT_PATHS)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_frozen_exact_in_custom_gradient_loop(compiled):
    # The backend's own autodiff (GradientTape, jax.grad, torch.autograd), then
    # `apply_gradients`, eagerly or as `CompiledStep` compiles it.
    model = _model()
    variables = model.trainable_variables
    start = _values(variables)
    opt = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), FIT_MASKS)
    x, y = (tensor(a) for a in _data(8))

    def loss_fn():
        return keras.ops.mean(keras.ops.square(model(x) - y))

    if compiled:
        step = CompiledStep(opt, variables)
    else:

        def step(grads):
            opt.apply_gradients(zip(grads, variables))

    for _ in range(3):
        before = _values(variables)
        step(gradients(loss_fn, variables))
        assert not _frozen_moves(before, _values(variables), FIT_FULL, FIT_PATHS)
    end = _values(variables)
    assert not _frozen_moves(start, end, FIT_FULL, FIT_PATHS)
    _assert_trainable_moved(start, end, FIT_FULL, "custom loop", FIT_PATHS)


# ------------------------------------------------- scalar-stored mask edits
# Regression: np.ascontiguousarray once turned a 0-d stored mask into shape (1,).
@pytest.mark.parametrize("edit", ["freeze", "set_mask", "unfreeze_where"])
def test_edit_scalar_stored_mask_after_build(edit):
    variables = _variables()
    opt = MaskedOptimizer(OPTIMIZERS["sgd"](), {"a/bias": True})
    opt.build(variables)
    if edit == "freeze":
        opt.freeze("a/bias")
        expected = np.zeros((4,), bool)
    elif edit == "set_mask":
        opt.set_mask("a/bias", False)
        expected = np.zeros((4,), bool)
    else:  # a full-shape edit that is constant, so it fits the scalar storage
        opt.freeze("a/bias")
        opt.unfreeze("a/bias", where=np.s_[:])
        expected = np.ones((4,), bool)
    assert np.array_equal(opt.get_mask("a/bias"), expected)
    before = to_numpy(variables[1])
    opt.apply_gradients(zip([tensor(np.ones(s, "float32")) for s in SHAPES], variables))
    assert np.array_equal(to_numpy(variables[1]) == before, ~expected)


# ------------------------------------------------- stock Adafactor caveat
def test_adafactor_zero_row_and_column_matches_bare_and_workaround():
    # Stock Keras Adafactor squares epsilon_1=1e-30 into its factored second
    # moment: where a gradient's row AND column are all zero (what a mask can
    # produce), r * c underflows to 0 in float32, u = 0 / sqrt(0) = NaN, and the
    # RMS clipping spreads the NaN over the whole variable. MaskedOptimizer still
    # gives the bare update on the masked gradient (NaN or not) and keeps frozen
    # elements exact; epsilon_1=1e-15 avoids the underflow.
    mask = np.array([[True, False], [False, False]])
    g = np.array([[0.5, 9.0], [9.0, 9.0]], "float32")
    for eps, must_be_finite in [(1e-30, False), (1e-15, True)]:
        w = keras.Variable(np.ones((2, 2), "float32"), name="w")
        MaskedOptimizer(
            keras.optimizers.Adafactor(0.1, epsilon_1=eps), {"w": mask}
        ).apply_gradients([(tensor(g), w)])
        ref = keras.Variable(np.ones((2, 2), "float32"), name="ref")
        keras.optimizers.Adafactor(0.1, epsilon_1=eps).apply_gradients(
            [(tensor(np.where(mask, g, np.float32(0.0))), ref)]
        )
        got = to_numpy(w)
        assert np.array_equal(got[mask], to_numpy(ref)[mask], equal_nan=True)
        assert np.array_equal(got[~mask], np.ones(3, "float32"))
        if must_be_finite:
            assert np.isfinite(got).all() and got[0, 0] != 1.0


# ------------------------------------------- 5. hand-checkable SGD oracle
def test_sgd_by_hand():
    # w = [1, 2, 3], grad = [10, 20, 30], lr = 0.1, mask = [T, F, T]
    #   masked grad = [10, 0, 30];  w - lr * g = [1 - 1, 2 - 0, 3 - 3] = [0, 2, 0]
    w = keras.Variable(np.array([1.0, 2.0, 3.0], "float32"), name="w")
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), {"w": [True, False, True]})
    opt.apply_gradients([(tensor([10.0, 20.0, 30.0], "float32"), w)])
    np.testing.assert_allclose(to_numpy(w), [0.0, 2.0, 0.0], atol=1e-6)
    assert to_numpy(w)[1] == 2.0

    # weight_decay = 0.5: Keras first does w -= w * wd * lr, i.e. w *= 0.95:
    #   [1, 2, 3] * 0.95 = [0.95, 1.9, 2.85]; minus lr * [10, 0, 30] = [1, 0, 3]
    #   -> [-0.05, 1.9, -0.15] for the bare optimizer; the frozen 1.9 goes back to 2.
    w = keras.Variable(np.array([1.0, 2.0, 3.0], "float32"), name="w")
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1, weight_decay=0.5), {"w": [True, False, True]})
    opt.apply_gradients([(tensor([10.0, 20.0, 30.0], "float32"), w)])
    np.testing.assert_allclose(to_numpy(w), [-0.05, 2.0, -0.15], atol=1e-6)
    assert to_numpy(w)[1] == 2.0


# ------------------------------------------------------- realistic sizes
# The matrix above runs on small variables; SIMD kernels treat a vector body
# and its tail differently, so the central promise is also checked at >= 4,096
# elements per variable: element masks with 1 % and 50 % and a column mask
# with 5 % of the elements trainable.
BIG_PATHS = ["a/kernel", "a/bias", "b/kernel"]
BIG_SHAPES = [(64, 96), (4096,), (96, 64)]


def _big_setup():
    rng = np.random.default_rng(9)
    cols = rng.random((1, 64)) < 0.05
    cols[0, :2] = True
    masks = [rng.random((64, 96)) < 0.01, rng.random((4096,)) < 0.5, cols]
    grads = [[rng.normal(size=s).astype("float32") for s in BIG_SHAPES] for _ in range(2)]
    return masks, [np.broadcast_to(m, s) for m, s in zip(masks, BIG_SHAPES)], grads


def _big_variables() -> list[keras.Variable]:
    return _scoped_variables(BIG_PATHS, BIG_SHAPES, seed=10)


def _big_masked(opt_id: str, masks: list) -> tuple[list[keras.Variable], MaskedOptimizer]:
    """The realistic-size variables and their MaskedOptimizer (weight decay moves every element)."""
    variables = _big_variables()
    return variables, MaskedOptimizer(OPTIMIZERS[opt_id](weight_decay=0.05), list(zip(variables, masks)))


@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_frozen_exact_and_the_oracle_at_realistic_sizes(opt_id):
    masks, full, grads = _big_setup()
    variables, opt = _big_masked(opt_id, masks)
    oracle_vars = _big_variables()
    oracle = OPTIMIZERS[opt_id](weight_decay=0.05)
    oracle.build(oracle_vars)
    start = [to_numpy(v) for v in variables]
    for g in grads:
        opt.apply([tensor(x) for x in g], variables)
        before = [to_numpy(v) for v in oracle_vars]
        oracle.apply([tensor(np.where(m, x, np.float32(0))) for m, x in zip(full, g)], oracle_vars)
        for v, b, m in zip(oracle_vars, before, full):
            v.assign(np.where(m, to_numpy(v), b))
    for path, v, s, m in zip(BIG_PATHS, variables, start, full):
        assert np.array_equal(to_numpy(v)[~m], s[~m]), f"{opt_id}: frozen elements of {path} moved"
    # Eager, the same kernels one by one on both sides: to the bit (NaN where
    # stock Adafactor makes them, at a row and a column of zero gradients).
    for path, v, o in zip(BIG_PATHS, variables, oracle_vars):
        assert_ulp_close(to_numpy(v), to_numpy(o), 0, f"{opt_id}: {path} vs the oracle")
    for s, o in zip(opt.inner_optimizer.variables, oracle.variables):
        assert_ulp_close(to_numpy(s), to_numpy(o), 0, f"{opt_id}: inner state {s.path}")


@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_frozen_exact_in_a_compiled_step_at_realistic_sizes(opt_id):
    masks, full, grads = _big_setup()
    variables, opt = _big_masked(opt_id, masks)
    step = CompiledStep(opt, variables)
    start = [to_numpy(v) for v in variables]
    for g in grads:
        step([tensor(x) for x in g])
    for path, v, s, m in zip(BIG_PATHS, variables, start, full):
        now = to_numpy(v)
        assert np.array_equal(now[~m], s[~m]), f"{opt_id}: frozen elements of {path} moved"
        assert np.any(now[m] != s[m]), f"{opt_id}: {path} did not train"


# Masks edited between steps through every frozen fraction: one element, a
# few (<= 1/8: eager torch restores them by position), exactly 1/8, half
# (whole-tensor restore), none (the bare update for this variable), and back.
# An eager step that kept a stale form of an edited mask fails here.
EDIT_SHAPE = (64, 96)
EDIT_FRACTIONS = [1 / EDIT_SHAPE[0] / EDIT_SHAPE[1], 0.05, 1 / 8, 0.5, 0.0, 0.02]


def _edit_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(21)
    out = []
    for fraction in EDIT_FRACTIONS:
        mask = np.ones(EDIT_SHAPE[0] * EDIT_SHAPE[1], bool)
        mask[rng.permutation(mask.size)[: round(fraction * mask.size)]] = False
        out.append(mask.reshape(EDIT_SHAPE))
    return out


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_frozen_exact_through_edits_of_the_frozen_fraction(opt_id, ema):
    rng = np.random.default_rng(22)
    masks = _edit_masks()
    kwargs = {"weight_decay": 0.05, **({"use_ema": True, "ema_momentum": 0.9} if ema else {})}

    def variable():
        with keras.name_scope("e"):
            return keras.Variable(np.random.default_rng(23).normal(size=EDIT_SHAPE).astype("float32"), name="kernel")

    var, oracle_var = variable(), variable()
    opt = MaskedOptimizer(OPTIMIZERS[opt_id](**kwargs), [(var, masks[0])])
    oracle = OPTIMIZERS[opt_id](**kwargs)
    oracle.build([oracle_var])
    for k, mask in enumerate(masks):
        if k:
            opt.set_mask("e/kernel", mask)
        for _ in range(2):
            g = rng.normal(size=EDIT_SHAPE).astype("float32")
            g[~mask] = np.nan  # must not reach anything
            before = to_numpy(var)
            opt.apply([tensor(g)], [var])
            after = to_numpy(var)
            frozen = ~mask
            assert np.array_equal(after[frozen], before[frozen]), f"{opt_id}: frozen moved at {EDIT_FRACTIONS[k]:.3g}"
            assert np.all(np.isfinite(after)), f"{opt_id}: a NaN gradient leaked at {EDIT_FRACTIONS[k]:.3g}"
            old = to_numpy(oracle_var)
            oracle.apply([tensor(np.where(mask, g, np.float32(0)))], [oracle_var])
            oracle_var.assign(np.where(mask, to_numpy(oracle_var), old))
            (average,) = _ema_variables(oracle, [oracle_var])
            if average is not None:  # the EMA of a frozen element is the element
                average.assign(np.where(mask, to_numpy(average), old))
        assert_ulp_close(to_numpy(var), to_numpy(oracle_var), 0, f"{opt_id}: vs the oracle at {EDIT_FRACTIONS[k]:.3g}")
        if ema:
            (average,) = _ema_variables(opt.inner_optimizer, [var])
            assert average is not None and np.array_equal(to_numpy(average)[~mask], to_numpy(var)[~mask])
    for s, o in zip(opt.inner_optimizer.variables, oracle.variables):
        assert_ulp_close(to_numpy(s), to_numpy(o), 0, f"{opt_id}: inner state {s.path}")
