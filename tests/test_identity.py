"""Masks that freeze nothing are invisible.

With no masks, and with all-True masks (a scalar True, a full-shape all-True
array, an all-True column mask), MaskedOptimizer leaves weights *and* the inner
optimizer's state bit-identical to the bare inner optimizer, for every optimizer
in the table, through `model.fit` and through a custom loop, on every backend.
And no inner state goes missing from the wrapper's `variables` (what Keras
saves and restores).

Bit-identity holds where both sides run as one kind of program: eagerly (the
custom loop, torch's `fit`) or in TensorFlow graph mode (TF's `fit`). JAX's
`fit` compiles the masked and the bare train step as two separate XLA
programs, which may round differently in the last bit: there the comparison
allows a stated ulp bound (`JAX_FIT_MAX_ULP`).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

import keras
from backends import IS_JAX, assert_ulp_close, tensor, to_numpy
from models import mlp
from masked_opt import MaskedOptimizer
from optimizer_table import OPTIMIZERS

OPT_IDS = list(OPTIMIZERS)

# The model's variables: d1/kernel (5, 6), d1/bias (6,), d2/kernel (6, 4).
PATHS = ["d1/kernel", "d1/bias", "d2/kernel"]
SHAPES = [(5, 6), (6,), (6, 4)]
# All-True masks of the three storage kinds: full shape, scalar, column (1, units).
ALL_TRUE = {"d1/kernel": np.ones((5, 6), bool), "d1/bias": True, "d2/kernel": np.ones((1, 4), bool)}
MASKINGS = {"no_masks": None, "all_true": ALL_TRUE}


def _model() -> keras.Model:
    """Dense(6) -> Dense(4, no bias) on 5 inputs, weights set to fixed random values."""
    return mlp(5, ("d1", 6), ("d2", 4, {"use_bias": False}), init_seed=5)


def _state(optimizer) -> list[np.ndarray]:
    return [to_numpy(v) for v in optimizer.variables]


def _assert_identical(
    got_weights, got_state, want_weights, want_state, label: str, maxulp: int = 0
) -> None:
    """Bit-identical weights and inner state (`maxulp=0`), or within `maxulp`
    ulp (two separately compiled programs)."""
    for path, g, w in zip(PATHS, got_weights, want_weights):
        if maxulp:
            assert_ulp_close(g, w, maxulp, f"{label}: weights {path}")
        else:
            assert np.array_equal(g, w), f"{label}: weights {path} differ from the bare optimizer's"
    assert len(got_state) == len(want_state), (
        f"{label}: {len(got_state)} vs {len(want_state)} inner variables"
    )
    for i, (g, w) in enumerate(zip(got_state, want_state)):
        assert g.shape == w.shape, f"{label}: inner variable {i}: {g.shape} vs {w.shape}"
        if maxulp:
            assert_ulp_close(g, w, maxulp, f"{label}: inner variable {i}")
        else:
            assert np.array_equal(g, w), f"{label}: inner variable {i} differs"


# ------------------------------------------------------------------ model.fit
def _fit(opt_id: str, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Weights and inner optimizer state after a short fit (bare if masks == 'bare')."""
    model = _model()
    inner = OPTIMIZERS[opt_id]()
    opt = inner if isinstance(masks, str) else MaskedOptimizer(inner, masks)
    model.compile(optimizer=opt, loss="mse")
    if opt is inner:  # built eagerly, as the wrapper builds it (TF's fit would build it in its first trace,
        inner.build(model.trainable_variables)  # where ScheduleFreeAdamW's build-time assign is lost)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(to_numpy(inner.iterations)) == 4
    return [to_numpy(v) for v in model.trainable_variables], _state(inner)


@functools.cache
def _bare_fit(opt_id: str):
    return _fit(opt_id, "bare")


# All-True masks through fit for every optimizer; no masks at all through fit
# for a few (the custom loop below covers every optimizer without masks).
FIT_CASES = [(o, "all_true") for o in OPT_IDS] + [
    (o, "no_masks") for o in ["nadam", "adafactor", "multi_optimizer"]
]


# JAX's `fit` runs the masked and the bare step as two separately compiled XLA
# programs (TF's runs both in graph mode, torch's eagerly: bitwise there).
# Measured on an AMD EPYC CPU (AVX-512): Adam's and Adam-amsgrad's inner state
# 1 ulp (XLA fuses the all-True masking into the update differently), every
# other optimizer and all weights 0. Allowed: 2.
JAX_FIT_MAX_ULP = 2


@pytest.mark.parametrize("opt_id,masking", FIT_CASES)
def test_fit_without_frozen_elements_equals_bare_optimizer(opt_id, masking):
    want = _bare_fit(opt_id)
    keras.backend.clear_session(free_memory=False)
    got = _fit(opt_id, MASKINGS[masking])
    maxulp = JAX_FIT_MAX_ULP if IS_JAX else 0
    _assert_identical(*got, *want, f"{opt_id}/{masking} fit", maxulp=maxulp)


# ---------------------------------------------------------------- custom loop
# Features that touch every element, and accumulator/EMA state (table defaults
# are covered by the fit test above).
FEATURES = {
    "weight_decay": 0.05,
    "clipnorm": 1.0,
    "use_ema": True,
    "ema_overwrite_frequency": 2,
    "gradient_accumulation_steps": 2,
}
LOOP_STEPS = 4
# On JAX, Keras's optimizer runs gradient accumulation through `lax.cond`,
# which eager JAX compiles afresh at every call (most of this file's time
# there). That code is the base optimizer's, the same for every optimizer:
# on JAX it runs for these, the others run the other features.
JAX_ACCUMULATION = ["sgd_momentum", "adam", "muon", "multi_optimizer"]


def _features(opt_id: str) -> dict:
    if IS_JAX and opt_id not in JAX_ACCUMULATION:
        return {k: v for k, v in FEATURES.items() if k != "gradient_accumulation_steps"}
    return FEATURES


def _grads(seed: int = 11) -> list[list]:
    rng = np.random.default_rng(seed)
    return [
        [tensor(rng.normal(size=s).astype("float32")) for s in SHAPES]
        for _ in range(LOOP_STEPS)
    ]


def _loop(opt_id: str, masks, *, features: bool = True):
    """Weights and inner state after LOOP_STEPS `apply_gradients` + finalize."""
    variables = _model().trainable_variables
    inner = OPTIMIZERS[opt_id](**(_features(opt_id) if features else {}))
    opt = inner if isinstance(masks, str) else MaskedOptimizer(inner, masks)

    for g in _grads():
        opt.apply_gradients(zip(g, variables))
    opt.finalize_variable_values(variables)
    return [to_numpy(v) for v in variables], _state(inner)


@functools.cache
def _bare_loop(opt_id: str):
    return _loop(opt_id, "bare")


@pytest.mark.parametrize("masking", list(MASKINGS))
@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_custom_loop_without_frozen_elements_equals_bare_optimizer(opt_id, masking):
    want = _bare_loop(opt_id)
    keras.backend.clear_session(free_memory=False)
    got = _loop(opt_id, MASKINGS[masking])
    _assert_identical(*got, *want, f"{opt_id}/{masking} loop")


def test_all_true_masked_variables_match_bare_while_another_variable_is_frozen():
    # The masking branch runs (d1/bias has a frozen element); the all-True
    # variables must still get exactly the bare update (Adam is per-variable).
    masks = dict(ALL_TRUE, **{"d1/bias": [True, False, True, True, True, True]})
    want = _loop("adam", "bare", features=False)
    keras.backend.clear_session(free_memory=False)
    got = _loop("adam", masks, features=False)
    for i in (0, 2):
        assert np.array_equal(got[0][i], want[0][i]), PATHS[i]
    assert not np.array_equal(got[0][1], want[0][1])  # the frozen element made a difference
    assert got[0][1][1] == to_numpy(_model().trainable_variables[1])[1]


# ------------------------------------------------------- no state goes missing
# EMA and accumulators add inner variables of their own.
STATE_KWARGS = {"use_ema": True, "gradient_accumulation_steps": 2}


def _signature(optimizer) -> list[tuple]:
    # Auto-named variables (Nadam's `_u_product`) get a "_1" suffix the second time.
    return [
        (re.sub(r"_\d+$", "", v.name), tuple(v.shape), str(v.dtype)) for v in optimizer.variables
    ]


# Built on the first apply (a custom loop); model.fit builds explicitly, and the
# fit test above compares the inner variables with a bare optimizer's too.
@pytest.mark.parametrize("opt_id", OPT_IDS)
def test_wrapper_variables_hold_all_inner_state(opt_id):
    variables = _model().trainable_variables
    bare = OPTIMIZERS[opt_id](**STATE_KWARGS)
    bare.build(variables)
    masked = MaskedOptimizer(OPTIMIZERS[opt_id](**STATE_KWARGS), ALL_TRUE)
    masked.apply_gradients(zip([tensor(np.zeros(s, "float32")) for s in SHAPES], variables))
    inner = masked.inner_optimizer
    # Same inner variables as a bare optimizer of the same config (Nadam's
    # `_u_product`, Adafactor's placeholders, EMA, accumulators included).
    assert _signature(inner) == _signature(bare)
    # All of them reachable from the wrapper (what Keras saves), plus one bool
    # mask per masked variable.
    wrapper_ids = {id(v) for v in masked.variables}
    assert {id(v) for v in inner.variables} <= wrapper_ids
    masks = [v for v in masked.variables if str(v.dtype) == "bool"]
    assert len(masks) == len(ALL_TRUE)
    assert len(masked.variables) == len(inner.variables) + len(ALL_TRUE) + 2  # iterations, lr
