"""TensorFlow: `tf.IndexedSlices` gradients masked without densifying, XLA
compilation of the masked update, the `tf.distribute`-aware restore of frozen
elements, in-place scatters for compact state, per-example gradients with
`tf.vectorized_map`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from masked_opt import _compat
from masked_opt._backend import common
from masked_opt._backend.common import SAME_WIDTH_INT, RowSnapshot


def check_jit_compile(jit_compile: Any) -> None:
    """Every value is valid on TensorFlow."""


def jit_compile_from_config(jit_compile: Any, name: str) -> Any:
    return jit_compile


# ------------------------------------------------------------- gradients


def is_sparse(grad: Any) -> bool:
    return isinstance(grad, tf.IndexedSlices)


def densify(grad: Any) -> Any:
    return tf.convert_to_tensor(grad) if is_sparse(grad) else grad


def rows_of(mask: Any, indices: Any, rank: int) -> Any:
    """The mask for the rows `indices` of a rank-`rank` variable, broadcastable
    to those rows: a per-row mask is gathered (only those rows are read), a
    mask that broadcasts over rows is reshaped to rank."""
    if len(mask.shape) == rank and mask.shape[0] != 1:
        return tf.gather(mask, indices)
    return tf.reshape(mask, (1,) * (rank - len(mask.shape)) + tuple(mask.shape))


def and_mask(grad: Any, mask: Any) -> Any:
    """`where(mask, grad, +0)`, bit for bit, as an AND with the mask widened
    to the gradient's bits (see `masked_opt/_backend/jax.py`: XLA compiles a
    `select` to AVX-512 masked loads, half speed out of cache)."""
    itype = tf.as_dtype(SAME_WIDTH_INT[keras.backend.standardize_dtype(grad.dtype)])
    keep = tf.broadcast_to(-tf.cast(mask, itype), tf.shape(grad))
    return tf.bitcast(tf.bitwise.bitwise_and(tf.bitcast(grad, itype), keep), grad.dtype)


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    """Zeroes `grad` where `mask` is False (NaN/inf there included). A
    `tf.IndexedSlices` gradient stays sparse: the mask rows are gathered by
    the slice indices, so no dense gradient is ever allocated. Traced into an
    XLA program, a float gradient is masked by a bitwise AND."""
    if is_sparse(grad):
        mask = rows_of(mask, grad.indices, len(variable_shape))
        values = tf.where(mask, grad.values, common.zero(grad.values.dtype))
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    if keras.backend.standardize_dtype(grad.dtype) in SAME_WIDTH_INT and traced_into_xla(grad):
        return and_mask(grad, mask)
    return common.mask_gradient(grad, mask, variable_shape)


# ----------------------------------------------------------- compilation

# While > 0, `jit_function` is tracing an XLA function.
_XLA_TRACING = [0]


def traced_into_xla(x: Any) -> bool:
    """Whether `x` is a tensor in a TensorFlow function compiled with XLA
    (`jit_function`, or a train step under `model.compile(jit_compile=True)`)."""
    if not tf.inside_function():
        return False
    if _XLA_TRACING[0] > 0:
        return True
    try:  # a private module (masked_opt/_compat.py): if it moves, only a speed-up is lost
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


is_compiling = traced_into_xla


def state_scope() -> Any:
    """Lifts a trace out to eager, as Keras's optimizers do to build in one."""
    return tf.init_scope()


def in_traced_function() -> bool:
    return tf.inside_function()


def frozen_guard(masks: list, grads: list, variables: list) -> Any:
    """In a graph-mode step (a `tf.function` without XLA, the default
    strategy, dense gradients): a scalar bool tensor, whether any of `masks`
    freezes an element now, for `if_frozen`. None elsewhere: the masking
    always runs (under XLA it fuses into the update; a conditional would
    split it)."""
    if not masks or not tf.inside_function() or traced_into_xla(masks[0]) or tf.distribute.has_strategy():
        return None
    if any(is_sparse(g) for g in grads) or any(
        isinstance(v.value, tf.distribute.DistributedValues) for v in variables
    ):
        return None
    return tf.reduce_any(tf.stack([tf.reduce_any(tf.logical_not(m)) for m in masks]))


def if_frozen(guard: Any, fn: Callable, otherwise: Callable) -> Any:
    """`fn()` if `guard` (from `frozen_guard`) is True, else `otherwise()`."""
    return tf.cond(guard, fn, otherwise)


def no_snapshot(variable: keras.Variable) -> Any:
    """What stands for a snapshot in the branch that takes none."""
    return tf.zeros((0,), variable.dtype)


def can_jit(grads: list) -> bool:
    """The default strategy (merge_call cannot be compiled), no sparse gradients."""
    return not tf.distribute.has_strategy() and not any(is_sparse(g) for g in grads)


def jit_function(fn: Callable, variables: list) -> Callable:
    """`grads -> fn(grads, variables)` compiled with XLA; the variables are
    captured, not traced as inputs."""

    def call(grads):
        _XLA_TRACING[0] += 1
        try:
            return fn(grads, variables)
        finally:
            _XLA_TRACING[0] -= 1

    return tf.function(call, jit_compile=True, autograph=False)


def no_autograph(fn: Callable) -> Callable:
    """Keeps AutoGraph from rewriting `fn` when a train step is traced: its
    Python control flow is over Python values only."""
    return tf.autograph.experimental.do_not_convert(fn)


# ------------------------------------------------------ bit-packed masks


def packs_mask(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """`common.packable`, and no `tf.distribute` strategy."""
    return not tf.distribute.has_strategy() and common.packable(variable_shape, mask_shape)


def unpack_bits(packed: Any, shape: tuple[int, ...]) -> Any:
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(packed[..., None], tf.constant(np.arange(8, dtype=np.uint8))),
        tf.constant(1, tf.uint8),
    )
    return tf.cast(tf.reshape(bits, shape), tf.bool)


# ------------------------------------------------------------ strategies

# Inner-optimizer options whose stock Keras update calls `merge_call` inside a
# `cond` in the replica context, which the MirroredStrategy family rejects
# ("merge_call called while defining a new graph", keras-team/keras#20582).
_MERGE_CALL_IN_COND_OPTIONS = ("ema_overwrite_frequency", "gradient_accumulation_steps")


def _non_default_strategy(optimizer: Any) -> Any | None:
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = _compat.creation_strategy(optimizer)
    if strategy is not None and strategy is not tf.distribute.get_strategy():
        return strategy  # created under a strategy scope, built outside it
    return None


def distributed(optimizer: Any) -> bool:
    """Whether the optimizer's state is placed by a distribution: a
    `tf.distribute` strategy (active, or the one it was created under) or
    keras.distribution."""
    return _non_default_strategy(optimizer) is not None or common.distributed(optimizer)


def _is_mirrored_family(strategy: Any) -> bool:
    """MirroredStrategy, MultiWorkerMirroredStrategy (and their variants)."""
    try:  # a private module (masked_opt/_compat.py)
        from tensorflow.python.distribute import mirrored_strategy

        return isinstance(strategy.extended, mirrored_strategy.MirroredExtended)
    except (ImportError, AttributeError):
        return isinstance(
            strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
        )


def check_strategy_support(inner_optimizer: Any, leaves: Sequence[Any]) -> None:
    """Raises a clear error for inner-optimizer options that fail under the
    current `tf.distribute` strategy (stock Keras fails there too): under
    the MirroredStrategy family, `use_ema=True, ema_overwrite_frequency=...`
    and `gradient_accumulation_steps=...` fail at the first step with
    "merge_call called while defining a new graph" (keras-team/keras#20582).
    `leaves`: the optimizers that update variables (a MultiOptimizer's
    sub-optimizers, else `[inner_optimizer]`), checked one by one."""
    for opt in leaves:
        strategy = _non_default_strategy(opt) or _non_default_strategy(inner_optimizer)
        if strategy is None or not _is_mirrored_family(strategy):
            continue
        for option in _MERGE_CALL_IN_COND_OPTIONS:
            value = getattr(opt, option, None)
            if option == "ema_overwrite_frequency" and not getattr(opt, "use_ema", False):
                continue  # only used with use_ema=True
            if value:
                raise ValueError(
                    f"`{option}={value!r}` on the inner optimizer '{opt.name}' "
                    f"({type(opt).__name__}) is not supported under "
                    f"{type(strategy).__name__}: stock Keras fails there too, with "
                    "\"merge_call called while defining a new graph\" "
                    "(keras-team/keras#20582). Remove `"
                    f"{option}` from the inner optimizer, or train without a "
                    "tf.distribute strategy (or under OneDeviceStrategy)."
                )


# ------------------------------------------------------- snapshot / restore


def moves_only_gradient_rows(opt: Any, variable: Any) -> bool:
    """Whether `opt`, the optimizer that updates `variable` (None: not known
    yet), provably changes no row of `variable` other than those a sparse
    (`IndexedSlices`) gradient names.

    True only for plain `keras.optimizers.SGD` without momentum (it applies an
    `IndexedSlices` gradient by scatter), no weight decay on the variable, no
    EMA, no gradient accumulation, no `global_clipnorm`, and a variable
    without constraint: weight decay, momentum, EMA, accumulators and
    constraints all move every row, `global_clipnorm` densifies the gradient
    (SGD then updates every row), and Keras's other optimizers densify sparse
    gradients. `clipnorm` and `clipvalue` keep the slices sparse. Under a
    `tf.distribute` strategy the gradient is all-reduced across replicas
    (other rows): False.
    """
    if tf.distribute.has_strategy():
        return False
    if opt is None or type(opt) is not keras.optimizers.SGD:
        return False
    if opt.momentum != 0 or opt.use_ema or opt.gradient_accumulation_steps or opt.global_clipnorm:
        return False
    if _compat.uses_weight_decay(opt, variable):
        return False
    if getattr(variable, "constraint", None) is not None:
        return False
    return _non_default_strategy(opt) is None


def snapshot(variable: keras.Variable, grad: Any = None, opt: Any = None, mask: Any = None) -> Any:
    """What `restore_frozen` needs to put frozen elements back after the step:
    the variable's whole current value (a copy), or, when `grad` is a
    `tf.IndexedSlices` and `opt` (the optimizer that updates the variable)
    provably moves only the rows it names, a `RowSnapshot` of just those
    rows (no dense copy of a large embedding)."""
    if (
        grad is not None
        and opt is not None
        and is_sparse(grad)
        and moves_only_gradient_rows(opt, variable)
    ):
        return RowSnapshot(grad.indices, tf.gather(variable.value, grad.indices))
    return common.snapshot(variable)


def _restore_one(var, mask, old):
    if isinstance(old, RowSnapshot):
        mask = rows_of(mask, old.indices, len(var.shape))
        new = tf.where(mask, tf.gather(var, old.indices), old.rows)
        return var.scatter_update(tf.IndexedSlices(new, old.indices))
    return var.assign(tf.where(mask, var, old))


def _restore_merged(distribution, targets):
    for variable, mask, old in targets:
        distribution.extended.update(variable.value, _restore_one, args=(mask, old), group=False)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """For each `(variable, mask, old)`: `variable[~mask] = old[~mask]`; `old` is
    what `snapshot` returned. Runs through `merge_call` + `extended.update`, so
    it is correct in a replica context of any `tf.distribute` strategy (with
    the default strategy it is a plain assign), in a cross-replica context,
    and for distributed variables outside their strategy's scope (where `fit`
    calls `finalize_variable_values`)."""
    if not items:
        return
    targets = list(items)
    if not tf.distribute.has_strategy():
        owner = getattr(targets[0][0].value, "distribute_strategy", None)
        if owner is not None and owner is not tf.distribute.get_strategy():
            with owner.scope():
                _restore_merged(owner, targets)
            return
    strategy = tf.distribute.get_strategy()
    if tf.distribute.in_cross_replica_context():
        _restore_merged(strategy, targets)
    else:  # a private API (masked_opt/_compat.py), as Keras's TF optimizer uses it
        tf.__internal__.distribute.interim.maybe_merge_call(_restore_merged, strategy, targets)


def scatter_flat(variable: Any, indices: Any, values: Any) -> None:
    """`variable.flat[indices] = values`, touching only those elements."""
    if tf.distribute.has_strategy():
        common.scatter_flat(variable, indices, values)
        return
    # Flat positions -> coordinates (tf.unravel_index has no XLA kernel).
    coords, rest = [], indices
    for dim in reversed(tuple(variable.shape)[1:]):
        coords.append(rest % dim)
        rest = rest // dim
    coords.append(rest)
    variable.value.scatter_nd_update(tf.stack(coords[::-1], axis=1), values)


# ---------------------------------------- gradients (RigL, Fisher)


def loss_gradients(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """A `tf.function` over one GradientTape."""

    @tf.function(autograph=False, reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            value = keras.ops.mean(loss_fn(y, model(x, training=False)))
        grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.convert_to_tensor(g) for g in grads]

    return step



def squared_grad_sums(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """A `tf.function`: `tf.vectorized_map` over one GradientTape per example."""

    def one_example(example):
        xi, yi = example
        with tf.GradientTape() as tape:
            y_pred = model(common.one_example(xi), training=False)
            value = keras.ops.mean(loss_fn(common.one_example(yi), y_pred))
        grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [keras.ops.square(tf.convert_to_tensor(g)) for g in grads]

    @tf.function(autograph=False, reduce_retracing=True)
    def step(x, y):
        per_example = tf.vectorized_map(one_example, (x, y))
        return [keras.ops.sum(g, axis=0) for g in per_example]

    return step
