"""Masks that change while training: DynamicMask, GradualUnfreezing, plain callbacks."""

import keras
import numpy as np
import pytest

from backends import IS_TORCH, TraceCounter, jax_only, synced
import models
from masked_opt import MaskedOptimizer
from masked_opt.callbacks import DynamicMask, GradualUnfreezing, current_step, masked_optimizer


def data(n=32, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, k, size=(n,))
    return x, y


def mlp(units=(5, 4), d=6, k=3, counter=None):
    hidden = [(f"hidden_{i}", u, {"activation": "relu"}) for i, u in enumerate(units)]
    return models.mlp(d, *hidden, ("out", k), name="net", counter=counter)


def compile_(model, inner, masks):
    model.compile(
        optimizer=MaskedOptimizer(inner, masks=masks),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.trainable_variables}


# ------------------------------------------------------------------ DynamicMask


def test_dynamic_mask_freezes_low_activation_units_of_stock_dense_layer():
    x, y = data()
    model = mlp(units=(6,))
    hidden = model.get_layer("hidden_0")
    kernel = hidden.kernel.numpy()
    kernel[:, [1, 4]] *= 1e-3  # units 1 and 4 are nearly silent on any input
    hidden.kernel.assign(kernel)
    hidden.bias.assign(np.zeros(6, "float32"))
    compile_(model, keras.optimizers.AdamW(0.05, weight_decay=0.1), {
        "hidden_0/kernel": np.ones((1, 6), bool),
        "hidden_0/bias": np.ones((6,), bool),
    })
    probe = keras.Model(model.inputs[0], hidden.output)
    calls = []

    def active_units(model, optimizer, step):
        act = np.abs(keras.ops.convert_to_numpy(probe(x[:16]))).mean(axis=0)
        alive = act >= 0.01
        calls.append((step, alive))
        return {"hidden_0/kernel": alive[None, :], "hidden_0/bias": alive}

    before = snapshot(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[DynamicMask(active_units, every_n_steps=4)])
    after = snapshot(model)

    assert [s for s, _ in calls] == [0, 4]
    expected = np.array([True, False, True, True, False, True])
    np.testing.assert_array_equal(calls[0][1], expected)
    opt = masked_optimizer(model)
    np.testing.assert_array_equal(opt.get_mask(hidden.bias), expected)
    k0, k1 = before["net/hidden_0/kernel"], after["net/hidden_0/kernel"]
    b0, b1 = before["net/hidden_0/bias"], after["net/hidden_0/bias"]
    assert np.array_equal(k1[:, ~expected], k0[:, ~expected])  # bit-identical despite AdamW
    assert np.array_equal(b1[~expected], b0[~expected])
    assert np.all(k1[:, expected] != k0[:, expected])


def test_dynamic_mask_every_n_steps_calls_at_multiples_across_fits():
    x, y = data(n=40)
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": True})
    steps = []

    def record(model, optimizer, step):
        steps.append(step)
        return None  # no change

    cb = DynamicMask(record, every_n_steps=3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])  # steps 0..9
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])  # steps 10..19
    assert steps == [0, 3, 6, 9, 12, 15, 18]


def test_dynamic_mask_every_n_epochs_calls_at_epoch_starts():
    x, y = data(n=16)
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": True})
    steps = []
    cb = DynamicMask(lambda m, o, step: steps.append(step), every_n_epochs=2)
    model.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=[cb])
    assert steps == [0, 8, 16]  # epochs 0, 2, 4 at 4 steps per epoch


def test_current_step_is_the_optimizer_iterations_at_every_batch():
    # With gradient accumulation `iterations` is the raw step count // 2;
    # on JAX `current_step` reads it from the trainer's state, unsynced.
    x, y = data(n=40)
    model = compile_(mlp(), keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
                     {"hidden_0/kernel": True})
    seen = []

    def begin(batch, logs):
        cheap = current_step(model)
        seen.append((cheap, int(keras.ops.convert_to_numpy(synced(model).optimizer.iterations))))

    cb = keras.callbacks.LambdaCallback(on_train_batch_begin=begin)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    assert [cheap for cheap, _ in seen] == [full for _, full in seen]
    assert [cheap for cheap, _ in seen] == [i // 2 for i in range(20)]


@jax_only
def test_dynamic_mask_on_jax_syncs_the_trainer_state_only_when_fn_runs(monkeypatch):
    x, y = data(n=32)
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": np.ones((6, 5), bool)})
    real_syncs = []
    sync = model.jax_state_sync

    def counting_sync():
        if not model._jax_state_synced:
            real_syncs.append(1)
        sync()

    monkeypatch.setattr(model, "jax_state_sync", counting_sync)
    frozen = np.ones((6, 5), bool)
    frozen[0] = False
    steps = []

    def fn(model, optimizer, step):
        steps.append(step)
        return {"hidden_0/kernel": frozen}

    kernel = model.get_layer("hidden_0").kernel
    before = kernel.numpy().copy()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[DynamicMask(fn, every_n_steps=3)])  # 16 steps
    assert steps == [0, 3, 6, 9, 12, 15]
    # One sync per call of `fn` (none at step 0: nothing detached yet) plus
    # the trainer's own at each epoch end; not one per batch.
    assert len(real_syncs) <= len(steps) + 2 < 16
    assert np.array_equal(kernel.numpy()[0], before[0])


def test_dynamic_mask_wrong_shape_names_variable_path_and_shape():
    x, y = data()
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": np.ones((6, 5), bool)})
    cb = DynamicMask(lambda m, o, s: {"hidden_0/kernel": np.ones((3, 3), bool)}, every_n_steps=1)
    with pytest.raises(ValueError, match=r"(?s)hidden_0/kernel.*\(3, 3\).*\(6, 5\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


def test_dynamic_mask_rejects_non_dict_return():
    x, y = data()
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": True})
    cb = DynamicMask(lambda m, o, s: [True], every_n_steps=1)
    with pytest.raises(TypeError, match="must return a dict"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


def test_dynamic_mask_requires_a_masked_optimizer():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    cb = DynamicMask(lambda m, o, s: None, every_n_steps=1)
    with pytest.raises(TypeError, match="must be compiled with a MaskedOptimizer.*Adam"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


@pytest.mark.parametrize(
    "kwargs", [{}, {"every_n_steps": 1, "every_n_epochs": 1}, {"every_n_steps": 0}]
)
def test_dynamic_mask_schedule_arguments_are_validated(kwargs):
    with pytest.raises(ValueError, match="every_n"):
        DynamicMask(lambda m, o, s: None, **kwargs)


def test_dynamic_mask_counts_steps_under_mixed_float16():
    # model.optimizer is a LossScaleOptimizer, whose own `iterations` never
    # moves before Keras 3.9: the step is read from the optimizer it wraps.
    keras.config.set_dtype_policy("mixed_float16")
    x, y = data(n=40)
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": True})
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    steps = []
    cb = DynamicMask(lambda m, o, step: steps.append(step), every_n_steps=3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert steps == [0, 3, 6, 9]
    assert current_step(model) == 10


def test_masked_optimizer_unwraps_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = data()
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"hidden_0/kernel": np.ones((6, 5), bool)})
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert masked_optimizer(model) is model.optimizer.inner_optimizer
    before = model.get_layer("hidden_0").kernel.numpy()
    frozen_rows = np.ones((6, 5), bool)
    frozen_rows[:3] = False
    cb = DynamicMask(lambda m, o, s: {"hidden_0/kernel": frozen_rows}, every_n_steps=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    after = model.get_layer("hidden_0").kernel.numpy()
    assert np.array_equal(after[:3], before[:3])
    assert not np.array_equal(after[3:], before[3:])


def test_unbuilt_model_gives_clear_error():
    model = keras.Sequential([keras.layers.Dense(2)])
    model.compile(optimizer=MaskedOptimizer("sgd"), loss="mse")
    with pytest.raises(ValueError, match="Build the model first"):
        masked_optimizer(model)


# ------------------------------------------------- externally driven masks


def test_masks_set_from_on_train_batch_begin_act_at_that_step_without_retracing():
    """The "mask as an extra input" pattern: a new mask every batch, model inputs unchanged."""
    x, y = data(n=48)
    counter = TraceCounter()
    model = compile_(mlp(counter=counter), keras.optimizers.Adam(0.05, weight_decay=0.05),
                     {"hidden_0/kernel": np.ones((6, 5), bool), "out/bias": np.ones((3,), bool)})
    rng = np.random.default_rng(1)
    schedule = [
        {"hidden_0/kernel": rng.random((6, 5)) < 0.5, "out/bias": rng.random(3) < 0.5}
        for _ in range(12)
    ]
    log = []

    def begin(batch, logs):
        opt = masked_optimizer(synced(model))  # the closure's model: sync on JAX
        step = int(opt.iterations.numpy())
        for key, mask in schedule[step].items():
            opt.set_mask(key, mask)
        log.append([step, snapshot(model), None, counter.count])

    def end(batch, logs):
        log[-1][2] = snapshot(synced(model))

    cb = keras.callbacks.LambdaCallback(on_train_batch_begin=begin, on_train_batch_end=end)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])

    assert len(log) == 12
    if not IS_TORCH:  # eager torch runs `call` every step: nothing is traced
        traces = {entry[3] for entry in log[1:]}
        assert traces == {counter.count}, "mask changes must not retrace the train function"
    for step, before, after, _ in log:
        for key, mask in schedule[step].items():
            path = "net/" + key
            assert np.array_equal(after[path][~mask], before[path][~mask]), (step, key)
            assert np.all(after[path][mask] != before[path][mask]), (step, key)


def test_element_frozen_mid_training_keeps_its_value_from_freeze_time_until_unfrozen():
    x, y = data(n=64)
    model = compile_(mlp(), keras.optimizers.AdamW(0.05, weight_decay=0.2),
                     {"hidden_0/kernel": np.ones((6, 5), bool)})
    kernel = model.get_layer("hidden_0").kernel
    where = np.zeros((6, 5), bool)
    where[[0, 2, 5], [1, 3, 4]] = True
    seen = {}

    def begin(batch, logs):
        opt = masked_optimizer(synced(model))
        step = int(opt.iterations.numpy())
        if step == 2:
            opt.freeze("hidden_0/kernel", where)
            seen["at_freeze"] = kernel.numpy()[where].copy()
        if 2 < step <= 6:
            seen.setdefault("during", []).append(kernel.numpy()[where].copy())
        if step == 6:
            opt.unfreeze("hidden_0/kernel", where)

    cb = keras.callbacks.LambdaCallback(on_train_batch_begin=begin)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    assert len(seen["during"]) == 4
    for value in seen["during"]:
        assert np.array_equal(value, seen["at_freeze"])
    assert np.all(kernel.numpy()[where] != seen["at_freeze"])  # moved again after step 6


# ------------------------------------------------------------ GradualUnfreezing


def test_gradual_unfreezing_unfreezes_groups_last_to_first_per_stage():
    x, y = data(n=16)
    model = mlp()
    groups = [model.get_layer("hidden_0"), ".*/hidden_1/.*", [model.get_layer("out")]]
    unfreeze = GradualUnfreezing(groups, epochs_per_stage=2)
    compile_(model, keras.optimizers.AdamW(0.05, weight_decay=0.1), unfreeze.masks())
    snaps = []
    cb = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: snaps.append(snapshot(synced(model))))
    model.fit(x, y, batch_size=8, epochs=6, verbose=0, callbacks=[unfreeze, cb])
    snaps.append(snapshot(model))

    layer_of = {"hidden_0": 0, "hidden_1": 1, "out": 2}
    for epoch in range(6):
        n_trainable = 1 + epoch // 2
        for path, before in snaps[epoch].items():
            moved = not np.array_equal(snaps[epoch + 1][path], before)
            trainable = layer_of[path.split("/")[1]] >= 3 - n_trainable
            assert moved == trainable, (epoch, path)
    assert [unfreeze.num_trainable_groups(e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]


def test_gradual_unfreezing_without_registered_masks_raises_with_fix():
    x, y = data()
    model = compile_(mlp(), keras.optimizers.SGD(0.1), {"out/kernel": True, "out/bias": True})
    cb = GradualUnfreezing([model.get_layer("hidden_0"), model.get_layer("out")])
    with pytest.raises(ValueError, match=r"hidden_0/kernel.*no mask slot.*callback\.masks\(\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


def test_gradual_unfreezing_rejects_a_bare_layer_or_key():
    with pytest.raises(TypeError, match="non-empty list"):
        GradualUnfreezing("dense/kernel")


def test_freeze_after_build_works_for_a_scalar_registered_mask():
    # GradualUnfreezing relies on this (its masks are one bool per variable).
    model = mlp()
    opt = MaskedOptimizer("sgd", masks={"hidden_0/kernel": True})
    opt.build(model.trainable_variables)
    opt.freeze("hidden_0/kernel")
    assert not opt.get_mask("hidden_0/kernel").any()
