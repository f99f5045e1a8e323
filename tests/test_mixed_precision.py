"""Mixed precision (mixed_float16 + loss scaling, mixed_bfloat16) and XLA,
on every backend.

The oracle of the `fit` tests is gradient-only masking on a *fresh* Adam
without weight decay: an element whose gradient is always zero keeps
m = v = 0, so Adam moves it by `lr * 0 / (0 + eps) = 0` and it stays
bit-identical, while every other element gets Adam's update on the same
gradients. On this configuration `MaskedOptimizer(Adam)` must match it. Where
weight decay, EMA, accumulation, clipping, constraints or a MultiOptimizer
move frozen elements, the oracle is the same inner optimizer fed the masked
gradients with the frozen elements (of the weights and of their EMA) copied
back by NumPy after every batch.

On TensorFlow (graph mode) and torch (eager) both models run the same kernels
op by op, so they are compared to the bit. On JAX each model's train step is
its own XLA program, and XLA may fuse the masked one differently: trainable
elements are compared within `backends.XLA_MAX_ULP` ulp there (frozen ones
always to the bit, against their values before training).
"""

import numpy as np
import pytest

import keras
from backends import (
    IS_JAX, IS_TF, CompiledStep, assert_equal_across_programs, grad_masked, optimizer_class, tensor, ema_of,
)
from models import mlp
from masked_opt import MaskedOptimizer

LSO = keras.optimizers.LossScaleOptimizer
O = keras.optimizers


def _data(n=32, d=6, k=3):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, d)).astype("float32"), rng.normal(size=(n, k)).astype("float32")


def _model(weights=None, kernel_constraint=None):
    model = mlp(6, ("hidden", 5, {"activation": "tanh", "kernel_constraint": kernel_constraint}), ("out", 3))
    if weights is not None:
        model.set_weights(weights)
    return model


def _masks():
    rng = np.random.default_rng(2)
    kernel = rng.random((6, 5)) < 0.5
    return {"hidden/kernel": kernel, "out/bias": np.array([True, False, True])}


def _fit_pair(optimizer_for, callbacks_for=lambda kind, masks: [], model_kwargs=None, **compile_kwargs):
    """Fits a masked model and the oracle from the same start; returns both and the start."""
    x, y = _data()
    start = _model().get_weights()
    masks = _masks()
    models = {}
    for kind in ("masked", "oracle"):
        keras.utils.set_random_seed(0)
        model = _model(start, **(model_kwargs or {}))
        model.compile(optimizer=optimizer_for(kind, masks), loss="mse", **compile_kwargs)
        model.fit(
            x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=callbacks_for(kind, masks)
        )
        models[kind] = model
    return models, start, masks


def _adam_pair(kind, masks, lr=0.05):
    if kind == "masked":
        return MaskedOptimizer(O.Adam(lr), masks=masks)
    return grad_masked(O.Adam(learning_rate=lr), masks)


def _assert_frozen_exact_and_equal(models, start, masks, all_trainable_move=True):
    masked, oracle = models["masked"], models["oracle"]
    paths = [v.path for v in masked.trainable_variables]
    for i, (a, b) in enumerate(zip(masked.get_weights(), oracle.get_weights())):
        assert_equal_across_programs(a, b, err_msg=f"{paths[i]} differs from the oracle")
    for i, path in enumerate(paths):
        for key, mask in masks.items():
            if path.endswith(key):
                now, then = masked.get_weights()[i], start[i]
                frozen = ~np.broadcast_to(mask, then.shape)
                assert np.array_equal(now[frozen], then[frozen]), f"{path} frozen moved"
                if all_trainable_move:
                    assert np.all(now[~frozen] != then[~frozen]), f"{path} trainable did not move"
                else:
                    assert np.any(now[~frozen] != then[~frozen]), f"{path} trainable did not move"


def _lso_step(opt, variables, grads):
    """One LossScaleOptimizer step as each backend's trainer takes it: eager
    `apply_gradients` on TensorFlow and torch; `jax.jit` over
    `stateless_apply` on JAX, where stock `LossScaleOptimizer.apply` cannot
    run eagerly (its stateful `ops.cond` leaks tracers, with any optimizer)."""
    grads = [tensor(g) for g in grads]
    if IS_JAX:
        CompiledStep(opt, variables)(grads)
    else:
        opt.apply_gradients(zip(grads, variables))


# ------------------------------------------------------------- mixed_float16


def test_mixed_float16_compile_wraps_masked_optimizer_in_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    inner = O.Adam(0.01)
    opt = MaskedOptimizer(inner, masks=_masks())
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    assert isinstance(model.optimizer, LSO)
    assert model.optimizer.inner_optimizer is opt
    assert opt.inner_optimizer is inner
    assert model.layers[0].compute_dtype == "float16"
    assert model.layers[0].kernel.dtype == "float32"


def test_mixed_float16_fit_with_overflowing_loss_scale_matches_oracle_bitwise():
    # initial_scale 2**24 overflows float16 gradients: the first steps are
    # skipped and the scale halved until the gradients are finite; the masked
    # and oracle runs must skip the same steps and end equal.
    keras.config.set_dtype_policy("mixed_float16")

    def make(kind, masks):
        return LSO(_adam_pair(kind, masks), initial_scale=2.0**24, dynamic_growth_steps=3)

    models, start, masks = _fit_pair(make)
    for model in models.values():
        assert isinstance(model.optimizer, LSO)
    m_lso, o_lso = models["masked"].optimizer, models["oracle"].optimizer
    scale = float(m_lso.dynamic_scale.numpy())
    assert scale < 2.0**24  # overflow happened and the scale came down
    assert scale == float(o_lso.dynamic_scale.numpy())
    # Steps taken, read on the inner optimizers: before Keras 3.9 a
    # LossScaleOptimizer's own `iterations` stays 0 (3.9 made it the inner's).
    steps = int(m_lso.inner_optimizer.iterations.numpy())
    assert 0 < steps < 12  # 12 batches, some skipped
    assert steps == int(o_lso.inner_optimizer.iterations.numpy())
    _assert_frozen_exact_and_equal(models, start, masks)


def _apply_handmade(non_finite_at):
    """One LSO(Masked(Adam)) step with a gradient that is inf at one kernel element."""
    keras.config.set_dtype_policy("mixed_float16")
    model = _model()
    mask = np.ones((6, 5), bool)
    mask[0, 0] = False  # frozen element
    opt = LSO(MaskedOptimizer(O.Adam(0.1), masks={"hidden/kernel": mask}))
    opt.build(model.trainable_variables)
    grads = [np.ones(v.shape, "float32") for v in model.trainable_variables]
    grads[0][non_finite_at] = np.inf
    before = [v.numpy().copy() for v in model.trainable_variables]
    state_before = [v.numpy().copy() for v in opt.variables]
    scale_before = float(opt.dynamic_scale.numpy())
    _lso_step(opt, model.trainable_variables, grads)
    after = [v.numpy() for v in model.trainable_variables]
    return opt, before, after, scale_before, state_before


def test_inf_only_at_frozen_positions_still_skips_the_step_and_halves_the_scale():
    # LossScaleOptimizer checks *all* gradients for inf/NaN before it calls
    # MaskedOptimizer, so a non-finite value that masking would discard still
    # makes it skip the whole step (documented in README.md, Compatibility).
    opt, before, after, scale_before, _ = _apply_handmade(non_finite_at=(0, 0))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert float(opt.dynamic_scale.numpy()) == scale_before / 2
    assert int(opt.inner_optimizer.iterations.numpy()) == 0


def test_inf_at_trainable_position_skips_the_step_and_halves_the_scale():
    opt, before, after, scale_before, state_before = _apply_handmade(non_finite_at=(1, 1))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert float(opt.dynamic_scale.numpy()) == scale_before / 2
    # inner optimizer state (Adam moments) untouched by the skipped step
    inner_vars = opt.inner_optimizer.inner_optimizer.variables
    moments = [v for v in inner_vars if "momentum" in v.path or "velocity" in v.path]
    assert len(moments) == 8 and all(np.all(v.numpy() == 0) for v in moments)
    assert int(opt.inner_optimizer.iterations.numpy()) == 0


def test_finite_handmade_step_under_loss_scaling_keeps_frozen_exact():
    keras.config.set_dtype_policy("mixed_float16")
    model = _model()
    mask = np.ones((6, 5), bool)
    mask[0, 0] = False
    opt = LSO(MaskedOptimizer(O.Adam(0.1), masks={"hidden/kernel": mask}))
    opt.build(model.trainable_variables)
    before = model.trainable_variables[0].numpy().copy()
    grads = [np.full(v.shape, 1000.0, "float32") for v in model.trainable_variables]
    _lso_step(opt, model.trainable_variables, grads)
    after = model.trainable_variables[0].numpy()
    assert after[0, 0] == before[0, 0]
    # unscaled gradient 1000 / 32768 > 0: Adam's first step is ~lr everywhere else
    np.testing.assert_allclose((before - after)[mask], 0.1, rtol=1e-3)
    assert int(opt.inner_optimizer.iterations.numpy()) == 1  # (LSO's own: 0 before Keras 3.9)


# ---------------------------------- mixed_float16 with the rest of the stack


def _numpy_restore(masks):
    """Oracle callback: after every batch, copies the frozen elements of the
    weights and of their EMA (if any) back from their values before training."""

    class Restore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = {}
            for v in self.model.trainable_variables:
                for key, mask in masks.items():
                    if v.path.endswith(key):
                        self.start[v.path] = (v, np.broadcast_to(mask, v.shape), v.numpy().copy())

        def on_train_batch_end(self, batch, logs=None):
            inner = self.model.optimizer.inner_optimizer  # LSO(oracle); `.model` syncs JAX's state
            for variable, full, start in self.start.values():
                targets = [variable]
                if ema_of(inner, variable) is not None:  # built by now
                    targets.append(ema_of(inner, variable))
                for target in targets:
                    target.assign(np.where(full, target.numpy(), start))

    return Restore()


def _multi(**kw):
    return optimizer_class("MultiOptimizer")(
        O.OptimizerMap(
            default_optimizer=O.SGD(0.05, momentum=0.9, **kw),
            optimizer_map={".*kernel": O.AdamW(0.05, weight_decay=0.1, **kw)},
        )
    )


STACK = {
    # The EMA overwrite and `fit`'s closing `finalize_variable_values` both
    # swap averages in; weight decay moves frozen elements inside the update.
    "ema_overwrite_finalize": lambda: O.AdamW(0.05, weight_decay=0.1, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3),
    "gradient_accumulation": lambda: O.AdamW(0.05, weight_decay=0.1, gradient_accumulation_steps=2),
    "clipnorm": lambda: O.AdamW(0.05, weight_decay=0.1, clipnorm=0.05),
    "global_clipnorm": lambda: O.AdamW(0.05, weight_decay=0.1, global_clipnorm=0.05),
    "clipvalue": lambda: O.Lion(0.01, weight_decay=0.1, clipvalue=0.01),
    "max_norm_constraint": lambda: O.AdamW(0.05, weight_decay=0.1),
    "multi_optimizer": _multi,
}


@pytest.mark.parametrize("option", sorted(STACK))
def test_mixed_float16_fit_with_training_stack_options_matches_numpy_restore_oracle(option):
    keras.config.set_dtype_policy("mixed_float16")
    constraint = keras.constraints.MaxNorm(0.3) if option == "max_norm_constraint" else None

    def make(kind, masks):
        inner = STACK[option]()
        if kind == "masked":
            return MaskedOptimizer(inner, masks=masks)
        return grad_masked(inner, masks)

    def callbacks(kind, masks):
        return [_numpy_restore(masks)] if kind == "oracle" else []

    models, start, masks = _fit_pair(make, callbacks, model_kwargs={"kernel_constraint": constraint})
    assert isinstance(models["masked"].optimizer, LSO)
    _assert_frozen_exact_and_equal(models, start, masks, all_trainable_move=False)
    # and the inner state: moments, accumulators, EMA averages (frozen ones held too)
    inner = models["masked"].optimizer.inner_optimizer.inner_optimizer  # LSO(Masked(inner))
    oracle = models["oracle"].optimizer.inner_optimizer  # LSO(oracle)
    assert len(inner.variables) == len(oracle.variables)
    for a, b in zip(inner.variables, oracle.variables):
        assert_equal_across_programs(a.numpy(), b.numpy(), err_msg=a.path)


# ------------------------------------------------------------ mixed_bfloat16


def test_mixed_bfloat16_fit_keeps_frozen_exact_and_matches_oracle():
    keras.config.set_dtype_policy("mixed_bfloat16")
    models, start, masks = _fit_pair(_adam_pair)
    # bfloat16 has float32's range: no loss scaling, no wrapper
    assert isinstance(models["masked"].optimizer, MaskedOptimizer)
    assert models["masked"].layers[0].compute_dtype == "bfloat16"
    _assert_frozen_exact_and_equal(models, start, masks)


# ------------------------------------------------------------------- XLA
# TensorFlow only: `model.compile(jit_compile=True)` is TF's XLA train step.
# JAX compiles every train step with XLA (all the `fit` tests above);
# torch.compile (torch's jit_compile=True) is not covered here.

XLA_REASON = "TensorFlow's XLA train step; on JAX every fit above is XLA-compiled"


@pytest.mark.skipif(not IS_TF, reason=XLA_REASON)
def test_jit_compiled_fit_keeps_frozen_exact_and_matches_oracle():
    models, start, masks = _fit_pair(_adam_pair, jit_compile=True)
    assert models["masked"].jit_compile is True
    _assert_frozen_exact_and_equal(models, start, masks)


@pytest.mark.skipif(not IS_TF, reason=XLA_REASON)
def test_jit_compiled_fit_under_mixed_float16_keeps_frozen_exact():
    keras.config.set_dtype_policy("mixed_float16")
    models, start, masks = _fit_pair(_adam_pair, jit_compile=True)
    assert isinstance(models["masked"].optimizer, LSO)
    assert models["masked"].jit_compile is True
    _assert_frozen_exact_and_equal(models, start, masks)


@pytest.mark.skipif(not IS_TF, reason="tf.IndexedSlices gradients under tf.function(jit_compile=True)")
def test_jit_compiled_custom_step_with_embedding_keeps_frozen_rows_exact():
    # Embedding gradients stay tf.IndexedSlices under XLA; the row mask is
    # gathered by index and frozen rows come back bit-identical.
    import tensorflow as tf

    vocab, dim = 50, 4
    emb = keras.layers.Embedding(vocab, dim, name="emb")
    emb.build((None,))
    row_mask = np.zeros((vocab, 1), bool)
    row_mask[40:] = True
    opt = MaskedOptimizer(O.AdamW(0.05), masks={"emb/embeddings": row_mask})
    opt.build(emb.trainable_variables)
    start = emb.embeddings.numpy().copy()
    ids = tf.constant([[1, 41, 2], [45, 1, 49]])

    @tf.function(jit_compile=True)
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(emb(ids) - 1.0))
        grads = tape.gradient(loss, emb.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, emb.trainable_variables))

    for _ in range(3):
        step(ids)
    now = emb.embeddings.numpy()
    assert np.array_equal(now[:40], start[:40])  # weight decay would move these
    assert np.all(now[[41, 45, 49]] != start[[41, 45, 49]])
