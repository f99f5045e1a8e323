"""Magnitude pruning through the MaskedOptimizer: schedules, exact zeros, save/load."""

import math

import keras
import numpy as np
import pytest

from backends import synced
import models
from masked_opt import MaskedOptimizer
from masked_opt.callbacks import masked_optimizer
from masked_opt.pruning import (
    ConstantSparsity,
    MagnitudePruning,
    PolynomialSparsity,
    prunable_masks,
    prune_variable,
)
from optimizer_table import OPTIMIZERS


def data(n=64, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, k, size=(n,))
    return x, y


def mlp():
    return models.mlp(8, ("hidden", 12, {"activation": "relu"}), ("out", 3), name="net")


def compiled(inner, masks=None):
    model = mlp()
    model.compile(
        optimizer=MaskedOptimizer(inner, masks=prunable_masks() if masks is None else masks),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def expected_zeros(sparsity, size):
    """Oracle: the number of pruned elements, size - round_half_up(size * (1 - s)), keep >= 1."""
    return size - max(1, math.floor(size * (1 - sparsity) + 0.5))


def kernels(model):
    return [model.get_layer("hidden").kernel, model.get_layer("out").kernel]


# ------------------------------------------------------------------- schedules


def test_polynomial_schedule_matches_tfmot_formula():
    s = PolynomialSparsity(initial_sparsity=0.1, final_sparsity=0.9, begin_step=5, end_step=45,
                           frequency=10, power=3)
    steps = np.arange(0, 60)
    p = np.clip((steps - 5) / 40, 0.0, 1.0)
    oracle = 0.9 + (0.1 - 0.9) * (1 - p) ** 3
    np.testing.assert_allclose([s.sparsity(int(t)) for t in steps], oracle, rtol=0, atol=1e-12)
    assert [int(t) for t in steps if s.should_prune(int(t))] == [5, 15, 25, 35, 45]


def test_constant_schedule_prunes_every_frequency_steps_without_end():
    s = ConstantSparsity(0.5, begin_step=2, frequency=3)
    assert [t for t in range(15) if s.should_prune(t)] == [2, 5, 8, 11, 14]
    assert s.sparsity(100) == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"final_sparsity": 1.0, "end_step": 10}, "final_sparsity"),
        ({"final_sparsity": 0.5, "end_step": 0}, "end_step"),
        ({"final_sparsity": 0.5, "end_step": 10, "frequency": 0}, "frequency"),
        ({"final_sparsity": 0.5, "end_step": 10, "initial_sparsity": -0.1}, "initial_sparsity"),
    ],
)
def test_schedule_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolynomialSparsity(**kwargs)


# ------------------------------------------------------------- pruning itself


def test_prune_variable_zeroes_exactly_the_smallest_magnitudes():
    model = compiled(keras.optimizers.SGD(0.1))
    opt = masked_optimizer(model)
    kernel = model.get_layer("hidden").kernel
    w = kernel.numpy()
    pruned = prune_variable(opt, kernel, 0.7)
    n = expected_zeros(0.7, w.size)  # 96 elements, keep round(28.8) = 29, prune 67
    assert n == 67
    oracle = np.zeros(w.size, bool)
    oracle[np.argsort(np.abs(w).ravel())[:n]] = True
    np.testing.assert_array_equal(pruned.ravel(), oracle)
    after = kernel.numpy()
    assert np.count_nonzero(after == 0) == n
    assert np.array_equal(after[~pruned], w[~pruned])
    np.testing.assert_array_equal(opt.get_mask(kernel), ~pruned)


def test_schedule_drives_sparsity_at_each_pruning_step_during_fit():
    x, y = data()
    model = compiled(keras.optimizers.Adam(0.05))
    schedule = PolynomialSparsity(final_sparsity=0.8, begin_step=1, end_step=9, frequency=2)
    zeros = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: zeros.append(
            [int(np.count_nonzero(k.numpy() == 0)) for k in kernels(synced(model))]))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[MagnitudePruning(schedule, keys=".*kernel"), record])  # 16 steps

    sizes = [k.numpy().size for k in kernels(model)]
    last = None
    for step, counts in enumerate(zeros):
        if schedule.should_prune(step):
            last = schedule.sparsity(step)
        want = [0 if last is None else expected_zeros(last, n) for n in sizes]
        assert counts == want, step
    assert zeros[-1] == [expected_zeros(0.8, n) for n in sizes]  # target reached exactly


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum"])
def test_pruned_weights_stay_exactly_zero_through_further_training(name):
    x, y = data()
    inner = OPTIMIZERS[name](weight_decay=0.1)  # decay and momentum would move them
    model = compiled(inner)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # momentum built up first
    start = int(masked_optimizer(model).iterations.numpy())
    prune = MagnitudePruning(ConstantSparsity(0.6, begin_step=start, end_step=start), ".*kernel")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[prune])
    zero_sets = [k.numpy() == 0 for k in kernels(model)]
    snapshot = [k.numpy().copy() for k in kernels(model)]
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    for k, zero, before in zip(kernels(model), zero_sets, snapshot):
        after = k.numpy()
        assert np.count_nonzero(zero) == expected_zeros(0.6, after.size)
        assert np.array_equal(after[zero], np.zeros(np.count_nonzero(zero), "float32"))
        assert np.signbit(after[zero]).sum() == 0  # +0.0, not -0.0
        assert np.all(after[~zero] != before[~zero])  # the rest keeps training


def test_prune_variable_from_a_callback_holding_only_the_optimizer():
    # On JAX the weights are detached during `fit`: `prune_variable` reads the
    # mask first, which syncs the trainer's state, so the closure needs no sync.
    x, y = data()
    model = compiled(keras.optimizers.Adam(0.05))
    opt = masked_optimizer(model)
    kernel = model.get_layer("hidden").kernel
    initial = kernel.numpy().copy()
    seen = {}

    def begin(batch, logs):
        if batch == 3:
            seen["pruned"] = prune_variable(opt, kernel, 0.5)
            seen["at_prune"] = kernel.numpy().copy()

    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=begin)])
    pruned, after = seen["pruned"], kernel.numpy()
    survivors = seen["at_prune"][~pruned]
    assert np.all(survivors != initial[~pruned])  # the trained weights, not stale ones
    assert np.count_nonzero(pruned) == expected_zeros(0.5, after.size)
    assert np.array_equal(after[pruned], np.zeros(np.count_nonzero(pruned), "float32"))
    assert np.count_nonzero(after == 0) == np.count_nonzero(pruned)
    np.testing.assert_array_equal(opt.get_mask(kernel), ~pruned)


def test_pruning_never_regrows_when_sparsity_target_drops():
    model = compiled(keras.optimizers.SGD(0.1))
    opt = masked_optimizer(model)
    kernel = model.get_layer("hidden").kernel
    first = prune_variable(opt, kernel, 0.5)
    second = prune_variable(opt, kernel, 0.2, pruned=first)
    np.testing.assert_array_equal(second, first)


def test_only_selected_variables_are_pruned():
    x, y = data()
    model = compiled(keras.optimizers.SGD(0.1), masks=prunable_masks("hidden/kernel"))
    out_before = model.get_layer("out").kernel.numpy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[MagnitudePruning(ConstantSparsity(0.5, end_step=0), keys="hidden/kernel")])
    assert np.count_nonzero(model.get_layer("hidden").kernel.numpy() == 0) == 48
    assert np.count_nonzero(model.get_layer("out").kernel.numpy() == 0) == 0
    assert not np.array_equal(model.get_layer("out").kernel.numpy(), out_before)


def test_pruned_model_saves_and_loads_as_stock_keras_and_stays_sparse(tmp_path):
    x, y = data()
    model = compiled(keras.optimizers.AdamW(0.05, weight_decay=0.1))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[MagnitudePruning(ConstantSparsity(0.75, end_step=0))])
    assert all(type(layer) is keras.layers.Dense for layer in model.layers)  # no wrappers
    zero_sets = [k.numpy() == 0 for k in kernels(model)]
    path = tmp_path / "pruned.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    for k, zero in zip(kernels(loaded), zero_sets):
        np.testing.assert_array_equal(k.numpy() == 0, zero)
        np.testing.assert_array_equal(masked_optimizer(loaded).get_mask(k), ~zero)
    loaded.fit(x, y, batch_size=8, epochs=2, verbose=0)  # no pruning callback: masks alone
    for k, zero in zip(kernels(loaded), zero_sets):
        np.testing.assert_array_equal(k.numpy() == 0, zero)
        assert np.array_equal(k.numpy()[zero], np.zeros(np.count_nonzero(zero), "float32"))


def test_new_callback_after_reload_continues_from_existing_zeros(tmp_path):
    x, y = data()
    model = compiled(keras.optimizers.Adam(0.05))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[MagnitudePruning(ConstantSparsity(0.5, end_step=0))])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    first = [k.numpy() == 0 for k in kernels(loaded)]
    step = int(masked_optimizer(loaded).iterations.numpy())
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[MagnitudePruning(ConstantSparsity(0.8, begin_step=step, end_step=step))])
    for k, before in zip(kernels(loaded), first):
        zero = k.numpy() == 0
        assert np.all(zero[before])  # earlier pruning kept
        assert np.count_nonzero(zero) == expected_zeros(0.8, zero.size)


# -------------------------------------------------------------------- errors


def test_target_without_full_shape_mask_slot_raises_with_fix():
    x, y = data()
    model = compiled(keras.optimizers.SGD(0.1), masks={"hidden/kernel": np.ones((1, 12), bool)})
    prune = MagnitudePruning(ConstantSparsity(0.5), keys="hidden/kernel")
    with pytest.raises(ValueError, match=r"hidden/kernel.*\(1, 12\).*\(8, 12\).*prunable_masks"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[prune])


def test_target_without_any_mask_raises_with_fix():
    x, y = data()
    model = compiled(keras.optimizers.SGD(0.1), masks=prunable_masks("hidden/kernel"))
    prune = MagnitudePruning(ConstantSparsity(0.5), keys=".*kernel")
    with pytest.raises(ValueError, match=r"out/kernel' has no mask.*prunable_masks\('\.\*kernel'\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[prune])


def test_schedule_must_be_a_pruning_schedule():
    with pytest.raises(TypeError, match="PruningSchedule"):
        MagnitudePruning(0.5)
