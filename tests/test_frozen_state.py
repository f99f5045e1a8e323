"""A variable wholly frozen at build holds no inner-optimizer state in the
dense layout either (issue 24, item 1): the inner optimizer is built on a
zero-size stand-in for it, whose slots hold nothing, at the same positions
(saved files keep their layout). An edit that lets it train grows full-size
slots with a fresh state, in place. The oracle for every result is the same
run with full-size state (the stand-ins turned off). The two runs' steps
are separately traced programs (their state shapes differ), so results
compare within the suite's ulp bound on TensorFlow and JAX (XLA may fuse
them differently) and bit for bit on torch (eager: the same kernels); the
model's first layer has a 64 x 64 kernel (4,096 elements, past the SIMD
tails where vectorised kernels round differently)."""

import keras
import numpy as np
import pytest

from backends import IS_JAX, IS_TF, assert_equal_across_programs, synced, to_numpy
from masked_opt import MaskedOptimizer, _dense_state
from models import jax_step, mlp, mse_step, regression_data


def sizes(optimizer):
    """Elements of the inner optimizer's state per layer of the test MLP."""
    out = {"a": 0, "b": 0}
    for v in optimizer.inner_optimizer.variables:
        for layer in out:
            if f"{layer}_kernel_" in v.path or f"{layer}_bias_" in v.path:
                out[layer] += int(np.prod(v.shape))
    return out


def train(masks, *, stand_ins=True, edit_at=None, driver="fit", inner=None, steps=6):
    """Weights and inner state after `steps` batches; `edit_at`: unfreeze layer
    "a" before that batch."""
    original = _dense_state.DenseLayout.holds_nothing_for_frozen
    if not stand_ins:
        _dense_state.DenseLayout.holds_nothing_for_frozen = lambda self, variables: False
    try:
        model = mlp(64, ("a", 64), ("b", 8), init_seed=0)
        optimizer = MaskedOptimizer(inner or keras.optimizers.AdamW(1e-2, weight_decay=0.1), masks=masks)
        model.compile(optimizer=optimizer, loss="mse")
        x, y = regression_data(8 * steps, 64, 8)
        history = []
        for i in range(steps):
            if i == edit_at:
                optimizer.set_mask("a", True)
            batch = slice(8 * i, 8 * (i + 1))
            if driver == "fit":
                model.train_on_batch(x[batch], y[batch])
            else:
                mse_step(model, optimizer, x[batch], y[batch])
            history.append(sizes(optimizer))
        synced(model)
        return [to_numpy(w) for w in model.weights], [to_numpy(v) for v in optimizer.variables], history, model
    finally:
        _dense_state.DenseLayout.holds_nothing_for_frozen = original


def assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and np.array_equal(a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8))


def assert_across(actual, expected):
    """Two separately traced programs: bit for bit on torch, within the ulp bound elsewhere."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_equal_across_programs(a, e)


FULL_A = 2 * (64 * 64 + 64)  # Adam's two moments of layer a


def test_a_variable_wholly_frozen_at_build_holds_no_state_and_trains_as_with_full_state():
    masks = {"a": False, "b/kernel": np.eye(64, 8, dtype=bool)}
    weights, _, history, _ = train(masks)
    ref_weights, _, ref_history, _ = train(masks, stand_ins=False)
    assert all(h == {"a": 0, "b": 2 * (64 * 8 + 8)} for h in history)  # Adam's two moments of b only
    assert all(h["a"] == FULL_A for h in ref_history)
    assert_across(weights, ref_weights)


def test_unfreezing_grows_full_size_slots_with_a_fresh_state_exactly_as_full_state_resets_it():
    masks = {"a": False, "b/kernel": True}
    weights, state, history, _ = train(masks, edit_at=3)
    ref_weights, ref_state, _, _ = train(masks, stand_ins=False, edit_at=3)
    assert [h["a"] for h in history] == [0, 0, 0] + [FULL_A] * 3
    assert_across(weights, ref_weights)
    assert_across(state, ref_state)  # the same variables at the same positions: what a file holds


def test_an_optimizer_a_custom_loop_builds_keeps_full_size_state_and_edits_without_retrace():
    # A custom loop's own compiled step would not see state created by an edit:
    # there the masked path keeps every edit retrace-free, with full-size state.
    weights, _, history, _ = train({"a": False}, driver="custom loop", edit_at=3)
    ref_weights, _, _, _ = train({"a": False}, driver="custom loop", edit_at=3, stand_ins=False)
    assert all(h["a"] == FULL_A for h in history)
    assert_across(weights, ref_weights)


def test_a_step_with_every_variable_wholly_frozen_still_counts():
    model = mlp(64, ("a", 64), ("b", 8), init_seed=0)
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={"a": False, "b": False})
    model.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data(16, 64, 8)
    before = [to_numpy(w) for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert sizes(optimizer) == {"a": 0, "b": 0}
    assert int(to_numpy(optimizer.iterations)) == 2
    assert_bitwise([to_numpy(w) for w in synced(model).weights], before)


def test_an_ema_inner_keeps_full_size_state_for_wholly_frozen_variables():
    # The EMA's bookkeeping covers every variable it was built on (documented).
    _, _, history, _ = train({"a": False}, inner=keras.optimizers.Adam(1e-2, use_ema=True), steps=2)
    assert history[-1]["a"] == 3 * (64 * 64 + 64)


@pytest.mark.parametrize("unfrozen_when_saved", [False, True], ids=["frozen", "unfrozen"])
@pytest.mark.parametrize("saved_with_stand_ins", [True, False], ids=["new file", "full-state file"])
def test_load_weights_resumes_from_files_with_and_without_stand_ins(
        tmp_path, saved_with_stand_ins, unfrozen_when_saved):
    # A file saved by a version that kept full-size state for wholly frozen
    # variables loads into stand-ins (and the reverse): a stand-in whose
    # variable trains in the file grows with the file's values; the values of a
    # variable wholly frozen when saved are not needed (fresh when it trains).
    masks = {"a": False, "b/kernel": np.eye(64, 8, dtype=bool)}
    _, _, _, model = train(masks, stand_ins=saved_with_stand_ins, edit_at=2 if unfrozen_when_saved else None, steps=3)
    model.save_weights(tmp_path / "m.weights.h5")
    other = mlp(64, ("a", 64), ("b", 8), init_seed=1)
    other.compile(optimizer=MaskedOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.1), masks=masks), loss="mse")
    x, y = regression_data(16, 64, 8, seed=3)
    other.train_on_batch(x[:8], y[:8])  # built by the trainer: stand-ins; then overwritten by the file
    assert sizes(other.optimizer)["a"] == 0
    other.load_weights(tmp_path / "m.weights.h5")
    assert sizes(other.optimizer)["a"] == (FULL_A if unfrozen_when_saved else 0)
    for m in (model, other):
        m.optimizer.set_mask("a", True)  # trains from here: saved or fresh state, the same on both sides
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_across([to_numpy(w) for w in synced(other).weights], [to_numpy(w) for w in synced(model).weights])


def test_load_model_builds_full_size_state_and_loads_a_file_saved_with_stand_ins(tmp_path):
    _, _, _, model = train({"a": False, "b/kernel": True}, steps=2)
    assert sizes(model.optimizer)["a"] == 0
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # a custom loop may follow: full-size state
    assert sizes(loaded.optimizer)["a"] == FULL_A
    x, y = regression_data(16, 64, 8, seed=3)
    for m in (model, loaded):
        m.optimizer.set_mask("a", True)
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_across([to_numpy(w) for w in synced(loaded).weights], [to_numpy(w) for w in synced(model).weights])


def loop_step(model, optimizer):
    """A custom loop's step over every trainable variable, compiled as each
    backend's guide compiles it (TF: `tf.function`; JAX: `jax.jit` around
    `stateless_apply`; torch: eager)."""
    variables = model.trainable_variables
    if IS_TF:
        import tensorflow as tf

        @tf.function
        def traced(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            optimizer.apply(tape.gradient(loss, variables), variables)

        return lambda x, y: traced(tf.constant(x), tf.constant(y))
    if IS_JAX:  # `stateless_apply` under `jax.jit`, every variable's gradient given
        return jax_step(model, optimizer, variables)
    return lambda x, y: mse_step(model, optimizer, x, y)


@pytest.mark.parametrize("build_again", [True, False], ids=["build called", "no build"])
def test_a_custom_loop_after_fit_gets_full_size_state_and_trains_through_an_unfreeze(build_again):
    # `fit` builds with stand-ins; a loop that then drives the optimizer gets
    # full-size (fresh) state before its first step (from `optimizer.build`, as
    # the guides call it, or, where the step can create state, from the step),
    # so an unfreeze later needs no state its compiled step would not see.
    def run(stand_ins):
        original = _dense_state.DenseLayout.holds_nothing_for_frozen
        if not stand_ins:
            _dense_state.DenseLayout.holds_nothing_for_frozen = lambda self, variables: False
        try:
            model = mlp(64, ("a", 64), ("b", 8), init_seed=0)
            optimizer = MaskedOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.1), masks={"a": False})
            model.compile(optimizer=optimizer, loss="mse")
            x, y = regression_data(40, 64, 8)
            model.train_on_batch(x[:8], y[:8])
            assert sizes(optimizer)["a"] == (0 if stand_ins else FULL_A)
            if build_again:
                optimizer.build(model.trainable_variables)
                assert sizes(optimizer)["a"] == FULL_A
            step, kernel = loop_step(model, optimizer), model.get_layer("a").kernel
            before = to_numpy(kernel)
            for i in range(1, 5):
                if i == 3:
                    optimizer.set_mask("a", True)
                step(x[8 * i: 8 * (i + 1)], y[8 * i: 8 * (i + 1)])
                assert sizes(optimizer)["a"] == FULL_A
                assert np.array_equal(to_numpy(kernel), before) == (i < 3)
            return [to_numpy(w) for w in model.weights], [to_numpy(v) for v in optimizer.variables]
        finally:
            _dense_state.DenseLayout.holds_nothing_for_frozen = original

    if IS_JAX and not build_again:  # `stateless_apply` cannot create state: a clear error says what to call
        with pytest.raises(ValueError, match=r"wholly frozen variables \['sequential/a/bias', 'sequential/a/kernel'\].*optimizer\.build"):
            run(stand_ins=True)
        return
    weights, state = run(stand_ins=True)
    ref_weights, ref_state = run(stand_ins=False)
    assert_across(weights, ref_weights)
    assert_across(state, ref_state)


@pytest.mark.skipif(not IS_TF, reason="TensorFlow builds the optimizer inside the first trace of train_on_batch")
def test_tensorflow_builds_the_state_outside_the_first_trace(monkeypatch):
    # A variable made inside a `tf.function` trace gets a lifted initializer
    # (one `tf.cond` each, ~11 ms on a large model's first step); the wrapper
    # makes its masks, stand-ins and the inner optimizer's slots under
    # `tf.init_scope`, so its first trace makes no such `cond` (the bare
    # optimizer's own build there makes one per slot).
    from tensorflow.python.ops import cond_v2

    original, calls = cond_v2.cond_v2, []
    monkeypatch.setattr(cond_v2, "cond_v2", lambda *a, **k: calls.append(1) or original(*a, **k))

    def conds(optimizer):
        calls.clear()
        model = mlp(64, ("a", 64), ("b", 8), init_seed=0)
        model.compile(optimizer=optimizer, loss="mse")
        x, y = regression_data(8, 64, 8)
        model.train_on_batch(x, y)
        return len(calls)

    bare = conds(keras.optimizers.Adam(1e-2))
    masks = {"a": False, "b/kernel": np.eye(64, 8, dtype=bool)}
    masked = conds(MaskedOptimizer(keras.optimizers.Adam(1e-2), masks=masks))
    assert bare >= 8  # the bare Adam's 8 slots, made in the trace
    assert masked == 0
