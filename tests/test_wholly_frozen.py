"""Wholly frozen variables (a mask stored as a scalar False) are left out of
the steps Keras's trainer runs (issue 24).

In a step of the model's `train_step` (`fit`, `train_on_batch`) such a
variable gets no masking, update, snapshot or restore, and nothing reads the
trainer's gradient of it, so XLA (JAX, TF) or TensorFlow's graph pruning
drops its computation. Results are those of the masked path (the reference
run turns `_wholly_frozen.leave_out` off): bit for bit where something masked is left
in the step, within the suite's ulp bound where the step is left with the
bare update (graph mode there, the masked path's XLA update here), an edit that makes such a
variable trainable takes effect at the next step with one retrace and a
fresh optimizer state, a full-shape mask that is all False keeps the masked
path, and the user's `trainable` flags are never touched."""

import keras
import numpy as np
import pytest

from masked_opt import _dense_state, _wholly_frozen
from backends import IS_TF, IS_TORCH, assert_equal_across_programs, jax_only, synced
from masked_opt import MaskedOptimizer
from models import jax_step, mlp, mse_step, regression_data


def to_numpy(x):
    """A NumPy copy of a variable (torch: detached from autograd)."""
    value = x.value if isinstance(x, keras.Variable) else x
    if IS_TORCH:
        value = value.detach()
    return np.array(keras.ops.convert_to_numpy(value))


def model_and_optimizer(masks, inner=None):
    model = mlp(16, ("a", 32), ("b", 8), init_seed=0)
    optimizer = MaskedOptimizer(inner or keras.optimizers.AdamW(1e-2, weight_decay=0.1), masks=masks)
    model.compile(optimizer=optimizer, loss="mse")
    return model, optimizer


class EditAt(keras.callbacks.Callback):
    """Runs `edit` before training batch `at` of the first epoch; records the
    optimizer's trace count just before and two batches after."""

    def __init__(self, at, edit, optimizer):
        super().__init__()
        self.at, self.edit, self.optimizer, self.traces = at, edit, optimizer, []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.at:
            self.traces.append(self.optimizer.inspect().update_traces)
            self.edit()
        if batch == self.at + 2:
            self.traces.append(self.optimizer.inspect().update_traces)


def run(zeroing, masks, edit_at=None, edit=lambda opt: None, inner=None):
    """Trains with the substitution on or off; returns weights, optimizer
    variables, the frozen kernel after each batch, and the trace counts."""
    original, original_skip = _wholly_frozen.leave_out, _wholly_frozen.skip_in_backward
    if not zeroing:
        _wholly_frozen.leave_out = lambda table, owner, inner, grads, variables: (grads, variables)
        _wholly_frozen.skip_in_backward = lambda table, owner, inner, variables: None
    try:
        model, optimizer = model_and_optimizer(masks, inner)
        x, y = regression_data(64, 16, 8)
        kernels = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: kernels.append(to_numpy(synced(model).get_layer("a").kernel)))
        callbacks = [record]
        if edit_at is not None:
            callbacks.insert(0, EditAt(edit_at, lambda: edit(optimizer), optimizer))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return ([to_numpy(w) for w in model.weights], [to_numpy(v) for v in optimizer.variables], kernels,
                callbacks[0].traces if edit_at is not None else None, model)
    finally:
        _wholly_frozen.leave_out, _wholly_frozen.skip_in_backward = original, original_skip


def bits(x):
    x = np.asarray(x).reshape(-1)
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.kind == "f" else x


def assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.array_equal(bits(a), bits(e))


def assert_across_programs(actual, expected):
    """Where nothing masked is left in the step, it runs the bare update in
    graph mode while the masked path compiles its update with XLA (TF's
    `jit_compile="auto"`): two programs, equal within the suite's ulp bound."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_equal_across_programs(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("inner", ["adamw", "sgd_momentum"])
def test_a_wholly_frozen_layer_trains_bit_for_bit_as_the_masked_path(inner):
    opt = (lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1)) if inner == "adamw" else (
        lambda: keras.optimizers.SGD(1e-2, momentum=0.9))
    masks = {"a": False, "b/bias": np.array([True, False] * 4)}
    weights, state, kernels, _, model = run(True, masks, inner=opt())
    ref_weights, ref_state, _, _, _ = run(False, masks, inner=opt())
    assert_bitwise(weights, ref_weights)
    assert_bitwise(state, ref_state)
    initial = to_numpy(mlp(16, ("a", 32), ("b", 8), init_seed=0).get_layer("a").kernel)
    assert all(np.array_equal(k, initial) for k in kernels)  # frozen after every batch
    assert all(w.trainable for w in model.weights)  # the user's flags, untouched


def test_unfreezing_a_wholly_frozen_layer_in_fit_takes_effect_at_the_next_step_with_one_retrace():
    def unfreeze(optimizer):
        optimizer.set_mask("a", True)

    weights, state, kernels, traces, model = run(True, {"a": False}, edit_at=3, edit=unfreeze)
    ref_weights, ref_state, ref_kernels, _, _ = run(False, {"a": False}, edit_at=3, edit=unfreeze)
    assert_across_programs(weights, ref_weights)
    assert_across_programs(state, ref_state)
    assert np.array_equal(kernels[2], kernels[0])  # frozen through batch 2
    assert not np.array_equal(kernels[3], kernels[2])  # batch 3 trains it
    assert_across_programs(kernels, ref_kernels)
    if not IS_TORCH:  # torch steps run eagerly: one "trace" per step
        assert traces[1] - traces[0] == 1
    assert [layer.trainable for layer in model.layers] == [True, True]


def test_freezing_a_layer_wholly_mid_fit_keeps_it_exact_from_the_next_step():
    def freeze(optimizer):
        optimizer.set_mask("a", False)

    weights, _, kernels, traces, _ = run(True, {"a": True}, edit_at=3, edit=freeze)
    ref_weights, _, _, _, _ = run(False, {"a": True}, edit_at=3, edit=freeze)
    assert_across_programs(weights, ref_weights)
    assert all(np.array_equal(k, kernels[2]) for k in kernels[3:])


def test_a_custom_loop_is_not_changed_and_edits_need_no_retrace():
    # A step the user traces (not the model's train_step) keeps the masked
    # path: an edit takes effect without a retrace there.
    model, optimizer = model_and_optimizer({"a": False})
    optimizer.build(model.trainable_variables)
    x, y = regression_data(8, 16, 8)
    step = mse_step
    if IS_TF:  # a step the user traces: the edit must reach it without a retrace
        import tensorflow as tf

        traced = tf.function(lambda: optimizer.apply(
            tf.gradients(tf.reduce_mean((model(x) - y) ** 2), [v.value for v in model.trainable_variables]),
            model.trainable_variables))
        step = lambda *args: traced()  # noqa: E731
    kernel = model.get_layer("a").kernel
    before = to_numpy(kernel)
    step(model, optimizer, x, y)
    assert np.array_equal(to_numpy(kernel), before)
    traces = optimizer.inspect().update_traces
    optimizer.set_mask("a", True)
    step(model, optimizer, x, y)
    if IS_TF:
        assert optimizer.inspect().update_traces == traces
    assert not np.array_equal(to_numpy(kernel), before)


@jax_only
def test_the_compiled_step_computes_no_gradient_of_a_wholly_frozen_layer():
    # XLA's cost analysis of the trainer's step: with the first layer wholly
    # frozen by its mask, the step's flops are those of `trainable = False`
    # plus the optimizer's elementwise work, far below the masked path's
    # (which computes the frozen kernel's gradient, a 256 x 256 x 128 matmul).
    import jax

    def flops(kind):
        if kind == "masked path":  # full-size state for "a" (no stand-in), left in the step
            original = _dense_state.DenseLayout.holds_nothing_for_frozen
            _dense_state.DenseLayout.holds_nothing_for_frozen = lambda self, variables: False
            try:
                return flops_of(kind)
            finally:
                _dense_state.DenseLayout.holds_nothing_for_frozen = original
        return flops_of(kind)

    def flops_of(kind):
        model = mlp(256, ("a", 256), ("b", 256), init_seed=0)
        if kind == "trainable=False":
            model.get_layer("a").trainable = False
            optimizer = keras.optimizers.Adam(1e-3)
        else:
            optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks={"a": False})
        model.compile(optimizer=optimizer, loss="mse")
        x, y = regression_data(128, 256, 256)
        model.train_on_batch(x, y)  # builds everything
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        original = _wholly_frozen.leave_out
        if kind == "masked path":
            _wholly_frozen.leave_out = lambda table, owner, inner, grads, variables: (grads, variables)
        try:
            compiled = jax.jit(model.train_step).lower(state, (x, y)).compile()
        finally:
            _wholly_frozen.leave_out = original
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return analysis["flops"]

    frozen, masked_path, keras_frozen = flops("masks"), flops("masked path"), flops("trainable=False")
    matmul = 2 * 128 * 256 * 256
    assert masked_path - frozen > 0.9 * matmul, (frozen, masked_path)
    assert frozen - keras_frozen < 0.1 * matmul, (frozen, keras_frozen)


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
@pytest.mark.parametrize("driver", ["fit", "custom loop"])
def test_a_variable_that_stops_being_wholly_frozen_starts_from_a_fresh_optimizer_state(driver, ema):
    # Adam's fresh state is zeros; its EMA starts at the weight. The rule is the
    # same in every driver (fit leaves the variable out while it is wholly frozen,
    # a custom loop masks it), so training continues identically after the edit.
    inner = keras.optimizers.Adam(1e-2, use_ema=ema, ema_momentum=0.5)
    model, optimizer = model_and_optimizer({"a/kernel": True}, inner)
    x, y = regression_data(32, 16, 8)
    kernel = model.get_layer("a").kernel

    def train(steps):
        for i in range(steps):
            if driver == "fit":
                model.train_on_batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            else:
                mse_step(model, optimizer, x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])

    train(2)
    slots = {v.name.split("_")[-1]: v for v in optimizer.inner_optimizer.variables
             if v.name.startswith(kernel.path.replace("/", "_") + "_")}
    assert set(slots) >= {"momentum", "velocity"} | ({"average"} if ema else set())
    assert np.any(to_numpy(slots["momentum"]) != 0)
    optimizer.set_mask("a/kernel", False)
    train(2)
    optimizer.set_mask("a/kernel", True)  # leaves the wholly frozen set
    assert not np.any(to_numpy(slots["momentum"])) and not np.any(to_numpy(slots["velocity"]))
    assert not ema or np.array_equal(to_numpy(slots["average"]), to_numpy(kernel))
    before = to_numpy(kernel)
    train(1)
    assert (to_numpy(kernel) != before).all()


def test_freezing_every_variable_wholly_still_counts_the_step():
    model, optimizer = model_and_optimizer({"a": False, "b": False})
    x, y = regression_data(16, 16, 8)
    before = [to_numpy(w) for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(to_numpy(optimizer.iterations)) == 2
    assert_bitwise([to_numpy(w) for w in model.weights], before)


def test_an_all_false_element_mask_keeps_the_masked_path_and_its_edits_never_retrace():
    # Element masks are for element edits (a new random mask every batch, say):
    # all False or not, they stay runtime values, never baked into the step.
    def edit(optimizer):
        optimizer.set_mask("a/kernel", np.ones((16, 32), bool))

    masks = {"a/kernel": np.zeros((16, 32), bool)}
    weights, _, kernels, traces, _ = run(True, masks, edit_at=3, edit=edit)
    ref_weights, _, _, _, _ = run(False, masks, edit_at=3, edit=edit)
    assert_bitwise(weights, ref_weights)
    assert np.array_equal(kernels[2], kernels[0]) and not np.array_equal(kernels[3], kernels[2])
    if not IS_TORCH:
        assert traces[1] == traces[0]


# --------------------------------------------- custom loops: trained_variables
#
# One documented call gives a custom loop the saving: differentiate
# `optimizer.trained_variables(model.trainable_variables)` only. The wholly
# frozen variables then have no gradient (TF's tape, torch's autograd.grad) or
# a None one (JAX: the jitted step never reads theirs, so XLA drops it).


def custom_step(model, optimizer, x, y, only_trained, chosen=None):
    """One step of a custom loop written as each backend's docs write it,
    differentiating `chosen` (by default what `only_trained` says)."""
    variables = model.trainable_variables
    if chosen is None:
        chosen = optimizer.trained_variables(variables) if only_trained else variables
    if IS_TF:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x) - y) ** 2)
        optimizer.apply(tape.gradient(loss, chosen), chosen)
    elif IS_TORCH:
        import torch

        loss = keras.ops.mean((model(keras.ops.convert_to_tensor(x)) - keras.ops.convert_to_tensor(y)) ** 2)
        optimizer.apply(list(torch.autograd.grad(loss, [v.value for v in chosen])), chosen)
    else:
        jax_step(model, optimizer, chosen)(x, y)


@pytest.mark.skipif(not IS_TORCH, reason="torch's eager autograd; XLA and graph pruning: the tests above")
@pytest.mark.parametrize("train_step", ["keras", "custom"])
def test_torch_fit_computes_no_gradient_of_a_wholly_frozen_layer_from_the_first_step(train_step):
    # Keras's own train_step runs with the frozen kernel out of autograd (what
    # `trainable = False` gives): its gradient hook never fires, the trained
    # layer's does, and every `requires_grad` is back after each step. A custom
    # train_step may read every gradient: left as it is.
    class Custom(keras.Model):
        def train_step(self, data):
            return super().train_step(data)

    model = mlp(16, ("a", 32), ("b", 8), init_seed=0)
    if train_step == "custom":
        model = Custom(model.inputs, model.outputs)
    model.compile(optimizer=MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={"a": False}), loss="mse")
    calls = {"a": 0, "b": 0}
    for name in calls:
        model.get_layer(name).kernel.value.register_hook(lambda g, name=name: calls.__setitem__(name, calls[name] + 1))
    x, y = regression_data(24, 16, 8)
    before = to_numpy(model.get_layer("a").kernel)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert calls == ({"a": 0, "b": 3} if train_step == "keras" else {"a": 3, "b": 3})
    assert all(v.value.requires_grad for v in model.trainable_variables)
    assert np.array_equal(to_numpy(model.get_layer("a").kernel), before)
    model.optimizer.set_mask("a", True)  # the next step differentiates it again
    model.train_on_batch(x[:8], y[:8])
    assert calls["a"] == (1 if train_step == "keras" else 4)
    assert not np.array_equal(to_numpy(model.get_layer("a").kernel), before)


def test_trained_variables_leaves_out_the_wholly_frozen_variables_in_order():
    model, optimizer = model_and_optimizer(
        {"a/kernel": False, "b/kernel": True, "b/bias": np.array([True, False] * 4)})
    assert not optimizer.built
    trained = optimizer.trained_variables(model.trainable_variables)  # builds
    assert [v.path for v in trained] == [v.path for v in model.trainable_variables if v.path != "sequential/a/kernel"]
    optimizer.set_mask("b/kernel", False)
    optimizer.set_mask("a/kernel", True)
    assert [v.path for v in optimizer.trained_variables(model.trainable_variables)] == [
        "sequential/a/kernel", "sequential/a/bias", "sequential/b/bias"]


def test_a_custom_loop_over_trained_variables_trains_as_the_masked_path():
    # The frozen layer stays bit-identical; the rest trains as the full-gradient
    # masked path does (the same ops: to the bit; on JAX two XLA programs).
    masks = {"a": False, "b/bias": np.array([True, False] * 4)}
    x, y = regression_data(8, 16, 8)
    runs = []
    for only_trained in (True, False):
        model, optimizer = model_and_optimizer(masks)
        initial = [to_numpy(w) for w in model.weights]
        for _ in range(3):
            custom_step(model, optimizer, x, y, only_trained)
        runs.append([to_numpy(w) for w in model.weights])
        assert np.array_equal(runs[-1][0], initial[0]) and np.array_equal(runs[-1][1], initial[1])
        assert np.array_equal(runs[-1][3][1::2], initial[3][1::2])
        assert not np.array_equal(runs[-1][2], initial[2])
    for a, e in zip(*runs):
        if IS_TF or IS_TORCH:
            assert np.array_equal(bits(a), bits(e))
        else:
            np.testing.assert_array_max_ulp(a, e, maxulp=4)


def test_a_stale_trained_list_after_an_unfreeze_raises_and_a_fresh_one_trains():
    model, optimizer = model_and_optimizer({"a": False})
    x, y = regression_data(8, 16, 8)
    custom_step(model, optimizer, x, y, only_trained=True)
    stale = optimizer.trained_variables(model.trainable_variables)
    optimizer.set_mask("a", True)
    kernel = model.get_layer("a").kernel
    before = to_numpy(kernel)
    with pytest.raises(ValueError, match=r"a/kernel.*trained_variables"):
        custom_step(model, optimizer, x, y, only_trained=True, chosen=stale)
    assert np.array_equal(to_numpy(kernel), before)
    custom_step(model, optimizer, x, y, only_trained=True)  # asks again: trains it
    assert (to_numpy(kernel) != before).all()


def test_a_custom_loop_over_trained_variables_computes_no_gradient_of_the_frozen_layer():
    # The oracle is Keras's own `trainable = False`: the same gradient work.
    def work(kind):
        model = mlp(64, ("a", 64), ("b", 64), init_seed=0)
        if kind == "trainable=False":
            model.get_layer("a").trainable = False
            optimizer = keras.optimizers.Adam(1e-3)
            chosen = model.trainable_variables
        else:
            optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks={"a": False})
            chosen = optimizer.trained_variables(model.trainable_variables) if kind == "trained" else (
                model.trainable_variables)
        x, y = regression_data(32, 64, 64)
        if IS_TF:
            import tensorflow as tf

            @tf.function(jit_compile=True)
            def grads():
                with tf.GradientTape() as tape:
                    loss = keras.ops.mean((model(x) - y) ** 2)
                return tape.gradient(loss, chosen)

            # Matrix products XLA keeps after dead-code elimination.
            return grads.experimental_get_compiler_ir()(stage="optimized_hlo").count(" dot(")
        if IS_TORCH:
            import torch

            if kind == "trainable=False":
                return None
            calls = []
            handle = model.get_layer("a").kernel.value.register_hook(lambda g: calls.append(1))
            loss = keras.ops.mean((model(keras.ops.convert_to_tensor(x)) - keras.ops.convert_to_tensor(y)) ** 2)
            torch.autograd.grad(loss, [v.value for v in chosen])
            handle.remove()
            return len(calls)
        if kind == "trainable=False":
            return None
        step, state = jax_step(model, optimizer, chosen, run=False)
        analysis = step.lower(*state(), x, y).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    trained, everything, keras_frozen = work("trained"), work("all"), work("trainable=False")
    if IS_TF:
        assert trained == keras_frozen < everything, (trained, keras_frozen, everything)
    elif IS_TORCH:
        assert (trained, everything) == (0, 1)
    else:
        matmul = 2 * 32 * 64 * 64
        assert everything - trained > 0.9 * matmul, (trained, everything)


def test_compact_state_holds_nothing_for_a_wholly_frozen_variable():
    model = mlp(16, ("a", 32), ("b", 8), init_seed=0)
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={"a": False, "b/kernel": True}, compact_state=True)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data(16, 16, 8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    sizes = {}
    for v in optimizer.inner_optimizer.variables:
        for layer in ("a", "b"):
            if f"_{layer}_kernel_" in v.path or f"_{layer}_bias_" in v.path:
                sizes[layer] = sizes.get(layer, 0) + int(np.prod(v.shape))
    assert sizes["a"] == 0
    assert sizes["b"] == 2 * (32 * 8 + 8)  # Adam's two moments of layer b


@pytest.mark.parametrize("driver", ["GradualUnfreezing", "DynamicMask"])
def test_callbacks_that_unfreeze_whole_layers_take_effect_at_the_next_step(driver):
    # Layer "a" is wholly frozen for the first 4 batches (one epoch of 4), then
    # trainable; the step after the edit trains it, as the masked path does.
    from masked_opt.callbacks import DynamicMask, GradualUnfreezing

    def train(leave_out):
        original = _wholly_frozen.leave_out
        if not leave_out:
            _wholly_frozen.leave_out = lambda table, owner, inner, grads, variables: (grads, variables)
        try:
            model = mlp(16, ("a", 32), ("b", 8), init_seed=0)
            if driver == "GradualUnfreezing":
                callback = GradualUnfreezing([model.get_layer("a"), model.get_layer("b")])
                masks = callback.masks()
            else:
                callback = DynamicMask(lambda m, opt, step: {"a": step >= 4}, every_n_steps=1)
                masks = {"a": False, "b": True}
            optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks=masks)
            model.compile(optimizer=optimizer, loss="mse")
            x, y = regression_data(32, 16, 8)
            kernels = []
            record = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: kernels.append(to_numpy(synced(model).get_layer("a").kernel)))
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback, record])
            return [to_numpy(w) for w in model.weights], kernels
        finally:
            _wholly_frozen.leave_out = original

    (weights, kernels), (ref_weights, _) = train(True), train(False)
    initial = to_numpy(mlp(16, ("a", 32), ("b", 8), init_seed=0).get_layer("a").kernel)
    assert all(np.array_equal(k, initial) for k in kernels[:4])  # frozen through the first 4 steps
    assert (kernels[4] != initial).all()  # step 5 trains it
    assert_across_programs(weights, ref_weights)


def test_flags_and_saved_configs_are_the_users_after_fit_a_round_trip_and_a_recompile(tmp_path):
    model, optimizer = model_and_optimizer({"a": False})
    model.get_layer("b").trainable = True
    configs = [layer.get_config() for layer in model.layers]
    x, y = regression_data(16, 16, 8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert [layer.trainable for layer in model.layers] == [True, True]
    assert len(model.trainable_variables) == 4 and all(w.trainable for w in model.weights)
    assert [layer.get_config() for layer in model.layers] == configs
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.get_config() for layer in loaded.layers] == configs
    assert isinstance(loaded.optimizer, MaskedOptimizer) and not loaded.optimizer.get_mask("a/kernel").any()
    # Recompiled with a plain optimizer, every variable trains again.
    before = to_numpy(model.get_layer("a").kernel)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert (to_numpy(model.get_layer("a").kernel) != before).all()
