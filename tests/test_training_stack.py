"""The rest of the training stack: custom loops, Keras callbacks, checkpoints,
on every backend.

Oracles: frozen elements are compared with their values before training
(`np.array_equal`); trainable ones with an independent gradient-masked run of
a fresh inner optimizer without weight decay (exact there: an element whose
gradient is always zero never moves), or with an uninterrupted run of the same
training. Masked and oracle runs are compared to the bit, except where each
is its own XLA program (JAX's jitted steps): there within
`backends.XLA_MAX_ULP` ulp.
"""

import glob
import os

import numpy as np
import pytest

import keras
from backends import (
    IS_TF, IS_TORCH, CompiledStep, assert_equal_across_programs, gradients, grad_masked, needs_multi_optimizer, ema_of,
)
from masked_opt import MaskedOptimizer

O = keras.optimizers


X = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
Y = np.random.default_rng(2).normal(size=(32, 3)).astype("float32")


def _masks(seed=3):
    rng = np.random.default_rng(seed)
    return {
        "hidden/kernel": rng.random((6, 5)) < 0.5,
        "out/bias": np.array([True, False, True]),
    }


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="out"),
        ],
        name="net",
    )


def _frozen_values(model, masks):
    """Frozen elements per mask key (keys, not paths: a reloaded Sequential
    drops its name from the paths)."""
    out = {}
    for v in model.trainable_variables:
        for key, mask in masks.items():
            if v.path.endswith(key):
                out[key] = v.numpy()[~np.broadcast_to(mask, v.shape)]
    assert set(out) == set(masks)
    return out


def _assert_frozen_unchanged(model, masks, before, where=""):
    now = _frozen_values(model, masks)
    for key, values in before.items():
        assert np.array_equal(now[key], values), f"frozen elements of {key} moved {where}"


def _assert_same_state(a_model, a_opt, b_model, b_opt):
    for x, y in zip(a_model.get_weights(), b_model.get_weights()):
        assert np.array_equal(x, y)
    assert len(a_opt.variables) == len(b_opt.variables)
    for x, y in zip(a_opt.variables, b_opt.variables):
        assert np.array_equal(x.numpy(), y.numpy()), x.path


# -------------------------------------------------------------- custom loops


def _custom_step(model, opt, mode):
    """A custom training step: the backend's gradients, then `apply_gradients`.

    "eager": op by op. "compiled": the whole step in `tf.function` on
    TensorFlow; on JAX the update is `jax.jit` over `stateless_apply` (what the
    JAX trainer runs), the gradients eager."""
    variables = model.trainable_variables

    def grads_of(x, y):
        def loss():
            return keras.ops.mean(keras.ops.square(keras.ops.subtract(model(x, training=True), y)))

        return gradients(loss, variables)

    if mode == "eager":

        def step(x, y):
            opt.apply_gradients(zip(grads_of(x, y), variables))

        return step
    if IS_TF:
        import tensorflow as tf

        return tf.function(lambda x, y: opt.apply_gradients(zip(grads_of(x, y), variables)))
    compiled = CompiledStep(opt, variables)
    return lambda x, y: compiled(grads_of(x, y))


CUSTOM_MODES = [
    "eager",
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            IS_TORCH, reason="torch's trainer runs `apply` eagerly (the eager case); torch.compile is not covered"
        ),
    ),
]


@pytest.mark.parametrize("mode", CUSTOM_MODES)
def test_custom_loop_apply_gradients_matches_gradient_masked_adam(mode):
    masks = _masks()
    results = []
    for opt in (MaskedOptimizer(O.Adam(0.05), masks=masks), grad_masked(O.Adam(learning_rate=0.05), masks)):
        model = _model()
        start = _frozen_values(model, masks)
        step = _custom_step(model, opt, mode)
        for i in range(0, 32, 8):
            step(X[i : i + 8], Y[i : i + 8])
        _assert_frozen_unchanged(model, masks, start, f"({mode})")
        results.append(model.get_weights())
    for a, b in zip(*results):
        if mode == "compiled":  # two separately compiled steps on JAX
            assert_equal_across_programs(a, b)
        else:
            assert np.array_equal(a, b)
    assert int(opt.iterations.numpy()) == 4


@pytest.mark.parametrize("mode", CUSTOM_MODES)
def test_custom_loop_keeps_frozen_exact_under_weight_decay_and_momentum(mode):
    masks = _masks()
    model = _model()
    start = _frozen_values(model, masks)
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), masks=masks)
    step = _custom_step(model, opt, mode)
    trainable_before = model.layers[0].kernel.numpy()[masks["hidden/kernel"]]
    for i in range(0, 32, 8):
        step(X[i : i + 8], Y[i : i + 8])
    _assert_frozen_unchanged(model, masks, start, f"({mode})")
    assert np.all(model.layers[0].kernel.numpy()[masks["hidden/kernel"]] != trainable_before)


# ------------------------------------------------------- learning-rate callbacks


def _fit_with(opt, callbacks, epochs=3, **fit_kwargs):
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    history = model.fit(
        X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **fit_kwargs
    )
    return model, history


def test_learning_rate_scheduler_drives_the_inner_optimizer():
    masks = _masks()
    schedule = lambda epoch: 0.1 * 0.5**epoch  # noqa: E731
    opt = MaskedOptimizer(O.Adam(1.0), masks=masks)
    start = _frozen_values(_model(), masks)
    model, history = _fit_with(opt, [keras.callbacks.LearningRateScheduler(schedule)])
    oracle, _ = _fit_with(
        grad_masked(O.Adam(learning_rate=1.0), masks), [keras.callbacks.LearningRateScheduler(schedule)]
    )
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.05, 0.025])
    assert float(opt.inner_optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    _assert_frozen_unchanged(model, masks, start)
    for a, b in zip(model.get_weights(), oracle.get_weights()):
        assert_equal_across_programs(a, b)


def test_reduce_lr_on_plateau_lowers_the_inner_learning_rate():
    masks = _masks()
    # min_delta huge: no epoch after the first counts as an improvement, so
    # with patience 0 the rate halves at the end of epochs 1 and 2.
    def callback():
        return keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)

    opt = MaskedOptimizer(O.Adam(0.1), masks=masks)
    start = _frozen_values(_model(), masks)
    model, history = _fit_with(opt, [callback()])
    oracle, _ = _fit_with(grad_masked(O.Adam(learning_rate=0.1), masks), [callback()])
    assert float(opt.inner_optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    # logged: the rate in force during each epoch, before that epoch's reduction
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.1, 0.05])
    _assert_frozen_unchanged(model, masks, start)
    for a, b in zip(model.get_weights(), oracle.get_weights()):
        assert_equal_across_programs(a, b)


def _multi():
    return O.MultiOptimizer(
        O.OptimizerMap(default_optimizer=O.SGD(0.1), optimizer_map={".*kernel": O.Adam(0.1)})
    )


@pytest.mark.parametrize(
    "callback",
    [
        lambda: keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 * 0.5**epoch),
        lambda: keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
    ],
    ids=["LearningRateScheduler", "ReduceLROnPlateau"],
)
@needs_multi_optimizer
def test_learning_rate_callbacks_reach_multi_optimizer_sub_optimizers(callback):
    opt = MaskedOptimizer(_multi(), masks=_masks())
    _fit_with(opt, [callback()])
    for sub in opt.inner_optimizer.optimizers:
        assert float(sub.learning_rate.numpy()) == pytest.approx(0.025)


def _scalars(log_dir, tag):
    tf = pytest.importorskip("tensorflow")  # reads the event files on any backend
    values = {}
    for path in glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[k] for k in sorted(values)]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_tensorboard_logs_the_inner_learning_rate(tmp_path, policy):
    pytest.importorskip("tensorboard")
    keras.config.set_dtype_policy(policy)
    opt = MaskedOptimizer(O.Adam(1.0), masks=_masks())
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 * 0.5**epoch),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path)),
    ]
    model, _ = _fit_with(opt, callbacks)
    if policy == "mixed_float16":  # logged through LossScaleOptimizer(MaskedOptimizer(Adam))
        assert isinstance(model.optimizer, O.LossScaleOptimizer)
    np.testing.assert_allclose(_scalars(str(tmp_path), "epoch_learning_rate"), [0.1, 0.05, 0.025])


# ---------------------------------------------------------- model checkpoints


def test_model_checkpoint_weights_only_restores_masks_and_state(tmp_path):
    masks = _masks()
    opt = MaskedOptimizer(O.AdamW(0.05), masks=masks)
    path = str(tmp_path / "ckpt.weights.h5")
    model, _ = _fit_with(opt, [keras.callbacks.ModelCheckpoint(path, save_weights_only=True)], epochs=2)
    assert os.path.exists(path)

    fresh = _model(seed=7)  # other initial weights, other masks, same mask shapes
    fresh_opt = MaskedOptimizer(O.AdamW(0.05), masks={k: ~v for k, v in masks.items()})
    fresh.compile(optimizer=fresh_opt, loss="mse")
    fresh_opt.build(fresh.trainable_variables)
    fresh.load_weights(path)
    for v, w in zip(model.trainable_variables, fresh.trainable_variables):
        assert np.array_equal(opt.get_mask(v), fresh_opt.get_mask(w))
    _assert_same_state(model, opt, fresh, fresh_opt)
    # and training goes on identically
    for m in (model, fresh):
        m.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    _assert_same_state(model, opt, fresh, fresh_opt)


def test_model_checkpoint_full_model_reloads_a_masked_optimizer(tmp_path):
    masks = _masks()
    opt = MaskedOptimizer(O.AdamW(0.05), masks=masks)
    path = str(tmp_path / "model.keras")
    start = _frozen_values(_model(), masks)
    model, _ = _fit_with(opt, [keras.callbacks.ModelCheckpoint(path)], epochs=2)
    loaded = keras.models.load_model(path)
    loaded_opt = loaded.optimizer
    assert isinstance(loaded_opt, MaskedOptimizer)
    assert isinstance(loaded_opt.inner_optimizer, O.AdamW)
    for v, w in zip(model.trainable_variables, loaded.trainable_variables):
        assert np.array_equal(opt.get_mask(v), loaded_opt.get_mask(w))
    _assert_same_state(model, opt, loaded, loaded_opt)
    for m in (model, loaded):
        m.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    _assert_same_state(model, opt, loaded, loaded_opt)
    _assert_frozen_unchanged(loaded, masks, start)


# ---------------------------------------------------------- BackupAndRestore


class _ChangeMaskAfterFirstEpoch(keras.callbacks.Callback):
    """Unfreezes the first row of hidden/kernel at the end of epoch 0."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.model.optimizer.unfreeze("hidden/kernel", np.s_[0])


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("simulated preemption")


def test_backup_and_restore_resumes_exactly_as_if_uninterrupted(tmp_path):
    masks = _masks()
    backup = str(tmp_path / "backup")

    def run(callbacks, seed=0, mask_values=masks):
        model = _model(seed)
        opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), masks=mask_values)
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, Y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model, opt

    reference, ref_opt = run([_ChangeMaskAfterFirstEpoch()])

    with pytest.raises(RuntimeError, match="simulated preemption"):
        run([_ChangeMaskAfterFirstEpoch(), keras.callbacks.BackupAndRestore(backup), _Interrupt(1, 2)])
    assert os.path.exists(os.path.join(backup, "latest.weights.h5"))

    # A new process would start from scratch: other weights, masks built all-True.
    all_true = {k: np.ones_like(v) for k, v in masks.items()}
    resumed, res_opt = run(
        [_ChangeMaskAfterFirstEpoch(), keras.callbacks.BackupAndRestore(backup)], seed=5, mask_values=all_true
    )
    expected_mask = masks["hidden/kernel"].copy()
    expected_mask[0] = True  # the change made at the end of epoch 0 came back
    assert np.array_equal(res_opt.get_mask(resumed.layers[0].kernel), expected_mask)
    assert np.array_equal(res_opt.get_mask(resumed.layers[1].bias), masks["out/bias"])
    assert int(res_opt.iterations.numpy()) == 12
    _assert_same_state(reference, ref_opt, resumed, res_opt)


# ----------------------------------------------------------- EMA swapping


class _RecordFrozen(keras.callbacks.Callback):
    """Checks frozen elements whenever SwapEMAWeights may have swapped."""

    def __init__(self, masks, start):
        super().__init__()
        self.masks, self.start, self.checks = masks, start, 0

    def _check(self, where):
        _assert_frozen_unchanged(self.model, self.masks, self.start, where)
        self.checks += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._check(f"at the start of epoch {epoch}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(f"at the end of epoch {epoch} (EMA weights swapped in)")

    def on_test_begin(self, logs=None):
        self._check("during evaluation (EMA weights swapped in)")


def _ema_run(inner):
    masks = _masks()
    model = _model()
    start = _frozen_values(model, masks)
    opt = MaskedOptimizer(inner, masks=masks)
    model.compile(optimizer=opt, loss="mse")
    recorder = _RecordFrozen(masks, start)
    model.fit(
        X,
        Y,
        batch_size=4,
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(X, Y),
        callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True), recorder],
    )
    assert recorder.checks >= 9
    _assert_frozen_unchanged(model, masks, start, "after fit")
    return model, opt, masks


def test_swap_ema_weights_keeps_frozen_exact_with_adam():
    _ema_run(O.Adam(0.05, use_ema=True, ema_momentum=0.9))


def test_swap_ema_weights_keeps_frozen_exact_with_weight_decay():
    # Weight decay moves frozen elements inside the inner update, before the
    # restore, and the EMA is taken in between: unless the EMA's frozen
    # elements are restored too, SwapEMAWeights swaps a drifted value in (and
    # its add/subtract swap leaves an ulp behind after swapping back).
    model, opt, masks = _ema_run(O.AdamW(0.05, weight_decay=0.1, use_ema=True, ema_momentum=0.9))
    # the EMA of a frozen element is the element itself
    inner = opt.inner_optimizer
    for v, avg in ((v, ema_of(inner, v)) for v in model.trainable_variables):
        mask = opt.get_mask(v)
        assert np.array_equal(avg.numpy()[~mask], v.numpy()[~mask])


def test_swap_ema_weights_under_mixed_float16_keeps_frozen_exact():
    # SwapEMAWeights unwraps one `inner_optimizer` level: under mixed_float16 it
    # finds the MaskedOptimizer, which forwards the inner optimizer's EMA.
    keras.config.set_dtype_policy("mixed_float16")
    model, opt, masks = _ema_run(O.AdamW(0.05, weight_decay=0.1, use_ema=True, ema_momentum=0.9))
    assert isinstance(model.optimizer, O.LossScaleOptimizer)


# --------------------------------------------------- tf.train.Checkpoint, h5


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "tf_train_checkpoint",
            marks=pytest.mark.skipif(not IS_TF, reason="tf.train.Checkpoint is TensorFlow's format"),
        ),
        "save_weights",
    ],
)
def test_checkpoint_round_trip_restores_masks_into_a_fresh_optimizer(tmp_path, kind):
    masks = _masks()
    model = _model()
    opt = MaskedOptimizer(O.Adam(0.05), masks=masks)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    opt.freeze("hidden/kernel", np.s_[:, 0])  # a mask changed after build
    saved_mask = opt.get_mask(model.layers[0].kernel)

    fresh = _model(seed=9)
    fresh_opt = MaskedOptimizer(O.Adam(0.05), masks={k: np.ones_like(v) for k, v in masks.items()})
    fresh.compile(optimizer=fresh_opt, loss="mse")
    fresh_opt.build(fresh.trainable_variables)
    assert not np.array_equal(fresh_opt.get_mask(fresh.layers[0].kernel), saved_mask)

    if kind == "tf_train_checkpoint":
        import tensorflow as tf

        path = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
        status = tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).read(path)
        status.assert_consumed()
    else:
        path = str(tmp_path / "w.weights.h5")
        model.save_weights(path)
        fresh.load_weights(path)
    assert np.array_equal(fresh_opt.get_mask(fresh.layers[0].kernel), saved_mask)
    assert np.array_equal(fresh_opt.get_mask(fresh.layers[1].bias), np.broadcast_to(masks["out/bias"], (3,)))
    _assert_same_state(model, opt, fresh, fresh_opt)
