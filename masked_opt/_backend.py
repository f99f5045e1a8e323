"""Backend-specific pieces, kept in one place.

Everything TensorFlow-specific in masked_opt lives here: `tf.IndexedSlices`
gradients (masked without densifying) and the `tf.distribute`-aware
restore of frozen elements. The other backends take the `keras.ops` paths.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

IS_TF = keras.backend.backend() == "tensorflow"

if IS_TF:
    import tensorflow as tf


def _zero(dtype: Any) -> Any:
    return ops.convert_to_tensor(0, dtype=dtype)


def is_sparse(grad: Any) -> bool:
    return IS_TF and isinstance(grad, tf.IndexedSlices)


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    """Zeroes `grad` where `mask` is False (NaN/inf there included).

    `mask` is a bool tensor broadcastable to `variable_shape`. A
    `tf.IndexedSlices` gradient stays sparse: the mask rows are gathered by
    the slice indices, so no dense gradient is ever allocated.
    """
    if is_sparse(grad):
        values = grad.values
        rank = len(variable_shape)
        mask = tf.reshape(mask, (1,) * (rank - len(mask.shape)) + tuple(mask.shape))
        if mask.shape[0] != 1:
            mask = tf.gather(mask, grad.indices)
        values = tf.where(mask, values, _zero(values.dtype))
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return ops.where(mask, grad, _zero(grad.dtype))


def can_jit(grads: list) -> bool:
    """Whether the XLA-compiled masked update can run here: TensorFlow, the
    default strategy (merge_call cannot be compiled), no sparse gradients."""
    if not IS_TF or tf.distribute.has_strategy():
        return False
    return not any(is_sparse(g) for g in grads)


def no_autograph(fn: Any) -> Any:
    """Keeps AutoGraph from rewriting `fn` when a train step is traced: its
    Python control flow is over Python values only."""
    if IS_TF:
        return tf.autograph.experimental.do_not_convert(fn)
    return fn


def local_copies(grads: list) -> list:
    """The gradients as tensors of the graph being built (inside a `cond`
    branch, the replica all-reduce rejects tensors captured from outside)."""
    if not IS_TF:
        return list(grads)
    return [
        None if g is None else tf.nest.map_structure(tf.identity, g, expand_composites=True)
        for g in grads
    ]


def cond(pred: Any, true_fn: Any, false_fn: Any) -> None:
    """Runs one of two stateful branches that return nothing."""
    if IS_TF:

        def run(fn):
            def branch():
                fn()
                return tf.constant(True)

            return branch

        tf.cond(pred, run(true_fn), run(false_fn))
    else:
        ops.cond(pred, true_fn, false_fn)


def can_branch() -> bool:
    """Whether the update may sit inside a `cond`: not in a replica context of
    a `tf.distribute` strategy, where the inner update calls `merge_call`."""
    return not (IS_TF and tf.distribute.has_strategy())


def jit_function(fn: Any, variables: list) -> Any:
    """`grads -> fn(grads, variables)` compiled with XLA (TensorFlow); the
    variables are captured, not traced as inputs."""

    def call(grads):
        return fn(grads, variables)

    return tf.function(call, jit_compile=True, autograph=False)


def check_strategy_support(inner_optimizer: Any) -> None:
    """Raises a clear error for inner-optimizer options that fail under the
    current `tf.distribute` strategy (stock Keras fails there too)."""
    # TODO(issue 4): detect ema_overwrite_frequency / gradient_accumulation_steps
    # under a non-default strategy (keras #20582) and raise ValueError naming the option.
    return None


def snapshot(variable: keras.Variable) -> Any:
    """The variable's current value, as a tensor that later writes cannot alias."""
    return ops.copy(variable.value)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """For each `(variable, mask, old)`: `variable[~mask] = old[~mask]`.

    On TensorFlow this runs through `merge_call` + `extended.update`, so it is
    correct in a replica context of any `tf.distribute` strategy (with the
    default strategy it is a plain assign).
    """
    if not items:
        return
    if not IS_TF:
        for variable, mask, old in items:
            variable.assign(ops.where(mask, variable.value, old))
        return

    def _restore(var, mask, old):
        return var.assign(tf.where(mask, var, old))

    def _merged(distribution, items):
        for variable, mask, old in items:
            distribution.extended.update(
                variable.value, _restore, args=(mask, old), group=False
            )

    strategy = tf.distribute.get_strategy()
    tf.__internal__.distribute.interim.maybe_merge_call(_merged, strategy, items)
