"""Backend-specific pieces, kept in one place.

Everything TensorFlow-specific in masked_opt lives here: `tf.IndexedSlices`
gradients (masked without densifying), XLA compilation of the masked update,
the `tf.distribute`-aware restore of frozen elements, in-place scatters for
compact state. JAX and torch take the `keras.ops` paths. No backend uses a
stateful conditional: JAX's trainer runs `stateless_apply` inside `jax.jit`,
where a `cond` whose branches assign variables leaks tracers; on torch a
`cond` is a Python `if` (a host sync each step, a graph break under
torch.compile); on TensorFlow it traces the update twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()
IS_TF = BACKEND == "tensorflow"
IS_JAX = BACKEND == "jax"

if IS_TF:
    import tensorflow as tf

# keras.optimizers.MultiOptimizer arrived in Keras 3.15; older Keras has none.
_MULTI_OPTIMIZER = getattr(keras.optimizers, "MultiOptimizer", None)


def is_multi_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` is a `keras.optimizers.MultiOptimizer` (never on a
    Keras without one)."""
    return _MULTI_OPTIMIZER is not None and isinstance(optimizer, _MULTI_OPTIMIZER)


def _zero(dtype: Any) -> Any:
    return ops.convert_to_tensor(0, dtype=dtype)


def is_sparse(grad: Any) -> bool:
    return IS_TF and isinstance(grad, tf.IndexedSlices)


def _rows_of(mask: Any, indices: Any, rank: int) -> Any:
    """The mask for the rows `indices` of a rank-`rank` variable, broadcastable
    to those rows: a per-row mask is gathered (only those rows are read), a
    mask that broadcasts over rows is reshaped to rank."""
    if len(mask.shape) == rank and mask.shape[0] != 1:
        return tf.gather(mask, indices)
    return tf.reshape(mask, (1,) * (rank - len(mask.shape)) + tuple(mask.shape))


# While > 0, `jit_function` is tracing an XLA function (TensorFlow).
_XLA_TRACING = [0]

# Float dtype -> the integer dtype of its width, for the bitwise gradient mask.
_SAME_WIDTH_INT = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


def _compiled_by_xla(x: Any) -> bool:
    """Whether `x` is being traced into an XLA program: a JAX tracer (the
    trainer's `jax.jit`), or a tensor in a TensorFlow function compiled with
    XLA (`jit_function`, or a train step under `model.compile(jit_compile=True)`)."""
    if IS_JAX:
        import jax

        return isinstance(x, jax.core.Tracer)
    if not IS_TF or not tf.inside_function():
        return False
    if _XLA_TRACING[0] > 0:
        return True
    try:  # a private module: if it moves, only the speed-up is lost
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


def _and_mask(grad: Any, mask: Any) -> Any:
    """`where(mask, grad, +0)`, bit for bit, as an AND with the mask widened
    to the gradient's bits (True -> all ones, False -> 0).

    For XLA on CPU: a `select` between a loaded array and 0 compiles to an
    AVX-512 masked load (`vmovups (mem), %ymm{%k}{z}`), which runs the whole
    loop at about half speed once the arrays are out of cache (measured: an
    Adam step over 16 M elements 1.7x the bare step with `select`, 1.17x with
    this AND; benchmarks/profile_masked_step.py). The AND is a plain `vpand`
    with a memory operand.
    """
    itype = _SAME_WIDTH_INT[keras.backend.standardize_dtype(grad.dtype)]
    if IS_JAX:
        from jax import lax

        keep = -(mask.astype(itype))  # True -> -1 (all ones), False -> 0
        return lax.bitcast_convert_type(lax.bitcast_convert_type(grad, itype) & keep, grad.dtype)
    itype = tf.as_dtype(itype)
    keep = tf.broadcast_to(-tf.cast(mask, itype), tf.shape(grad))
    return tf.bitcast(tf.bitwise.bitwise_and(tf.bitcast(grad, itype), keep), grad.dtype)


# Masks this large (elements) also get a bit-packed copy that compiled steps
# read instead of the bool mask: Adam's update under XLA is three loops, each
# reading the mask; at 1 byte per element that costs ~15 % of an out-of-cache
# step, at 1 bit ~4 % (hand-written JAX Adam, 4096 x 2048, buffers donated:
# bool 1.15x, packed 1.04x the unmasked step).
PACK_MIN_SIZE = 1 << 16


def packs_mask(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """Whether a mask gets a bit-packed copy for XLA-compiled steps: TF or JAX,
    no `tf.distribute` strategy or `keras.distribution`, a full-shape mask of
    at least `PACK_MIN_SIZE` elements whose last axis is a multiple of 8."""
    if not (IS_TF or IS_JAX) or tuple(mask_shape) != tuple(variable_shape) or not variable_shape:
        return False
    if IS_TF and tf.distribute.has_strategy():
        return False
    try:
        if keras.distribution.distribution() is not None:
            return False
    except (AttributeError, NotImplementedError):
        pass
    size = int(np.prod(variable_shape, dtype=np.int64))
    return size >= PACK_MIN_SIZE and variable_shape[-1] % 8 == 0


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """A bool mask packed along its last axis, 8 elements per uint8 (bit i of
    byte j is element 8j + i)."""
    return np.packbits(np.asarray(mask, bool), axis=-1, bitorder="little")


def unpack_bits(packed: Any, shape: tuple[int, ...]) -> Any:
    """The bool mask of `shape` that `pack_bits` packed (inside a compiled step)."""
    if IS_JAX:
        import jax.numpy as jnp

        bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
        return bits.reshape(shape).astype(bool)
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(packed[..., None], tf.constant(np.arange(8, dtype=np.uint8))),
        tf.constant(1, tf.uint8),
    )
    return tf.cast(tf.reshape(bits, shape), tf.bool)


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    """Zeroes `grad` where `mask` is False (NaN/inf there included).

    `mask` is a bool tensor broadcastable to `variable_shape`. A
    `tf.IndexedSlices` gradient stays sparse: the mask rows are gathered by
    the slice indices, so no dense gradient is ever allocated. Traced into an
    XLA program (JAX's jit, TensorFlow's `jit_function`), a float gradient is
    masked by a bitwise AND (`_and_mask`: the same bits, faster on CPU).
    """
    if is_sparse(grad):
        values = grad.values
        mask = _rows_of(mask, grad.indices, len(variable_shape))
        values = tf.where(mask, values, _zero(values.dtype))
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    if (
        keras.backend.standardize_dtype(grad.dtype) in _SAME_WIDTH_INT
        and _compiled_by_xla(grad)
    ):
        return _and_mask(grad, mask)
    return ops.where(mask, grad, _zero(grad.dtype))


def can_jit(grads: list) -> bool:
    """Whether the XLA-compiled masked update can run here: TensorFlow, the
    default strategy (merge_call cannot be compiled), no sparse gradients."""
    return no_strategy() and not any(is_sparse(g) for g in grads)


# jit_compile="auto" compiles the masked update with XLA when that pays back
# soon. XLA's compile time grows with the number of variables in the update
# (about 15 ms of CPU time each, measured on 2 AVX-512 cores: 128 variables
# cost +1.8-2.4 s at the first step), its gain per step with their elements
# (about 2.5 ns each against graph mode): the compile pays back after about
# 6e6 / (mean elements per variable) steps. Many small variables (a CNN such
# as MobileNetV2: 158 variables of 14 k elements on average) would wait ~400
# steps; large ones (an MLP, 300 k+) a few dozen. A small update (few
# variables) compiles quickly whatever their size.
_XLA_FEW_VARIABLES = 16
_XLA_MIN_MEAN_SIZE = 1 << 15  # elements per variable: pays back within ~200 steps


def xla_pays(grads: Sequence[Any]) -> bool:
    """Whether compiling an update of these (dense) gradients with XLA pays
    back soon enough for `jit_compile="auto"`: few variables, or variables of
    `_XLA_MIN_MEAN_SIZE` elements or more on average (static shapes)."""
    sizes = []
    for g in grads:
        if g is None:
            continue
        shape = tuple(g.shape)
        if any(d is None for d in shape):
            return True  # unknown size: as before
        size = 1
        for d in shape:
            size *= int(d)
        sizes.append(size)
    return len(sizes) <= _XLA_FEW_VARIABLES or sum(sizes) >= _XLA_MIN_MEAN_SIZE * len(sizes)


def no_autograph(fn: Any) -> Any:
    """Keeps AutoGraph from rewriting `fn` when a train step is traced: its
    Python control flow is over Python values only."""
    if IS_TF:
        return tf.autograph.experimental.do_not_convert(fn)
    return fn


def in_traced_function() -> bool:
    """Whether a TensorFlow function (`fit`'s train step, a `tf.function`) is
    being traced."""
    return IS_TF and tf.inside_function()


def is_purged(variable: Any) -> bool:
    """Whether JAX's trainer has detached the variable's value (during `fit`
    it holds the state itself until `jax_state_sync()`)."""
    return IS_JAX and getattr(variable, "_value", True) is None


# `Optimizer.add_variable(layout=...)` arrived in Keras 3.10.
_ADD_VARIABLE_TAKES_LAYOUT = "layout" in inspect.signature(keras.optimizers.Optimizer.add_variable).parameters


def mask_layout(variable: Any, mask_shape: tuple[int, ...]) -> Any:
    """The keras.distribution layout for a mask of `variable` stored at
    `mask_shape`: the variable's own layout for a full-shape mask (sharded as
    its weight is), replicated for a broadcast mask, None without a
    distribution (or where the backend has none). None on Keras < 3.10, whose
    optimizer variables take no layout: the distribution places the mask by
    its own path, as it places Keras's own optimizer slots there."""
    if not _ADD_VARIABLE_TAKES_LAYOUT:
        return None
    try:
        distribution = keras.distribution.distribution()
    except (AttributeError, NotImplementedError):
        return None
    if distribution is None:
        return None
    layout = getattr(variable, "_layout", None)
    if layout is not None and tuple(mask_shape) == tuple(variable.shape):
        return layout
    return keras.distribution.TensorLayout([None] * len(mask_shape), distribution.device_mesh)


def no_strategy() -> bool:
    """TensorFlow without a `tf.distribute` strategy in a replica context
    (where the inner update calls `merge_call`, which XLA cannot compile)."""
    return IS_TF and not tf.distribute.has_strategy()


def jit_function(fn: Any, variables: list) -> Any:
    """`grads -> fn(grads, variables)` compiled with XLA (TensorFlow); the
    variables are captured, not traced as inputs."""

    def call(grads):
        _XLA_TRACING[0] += 1
        try:
            return fn(grads, variables)
        finally:
            _XLA_TRACING[0] -= 1

    return tf.function(call, jit_compile=True, autograph=False)


# ------------------------------------------------------------ strategies

# Inner-optimizer options whose stock Keras update calls `merge_call` inside a
# `cond` in the replica context, which the MirroredStrategy family rejects
# ("merge_call called while defining a new graph", keras-team/keras#20582).
_MERGE_CALL_IN_COND_OPTIONS = ("ema_overwrite_frequency", "gradient_accumulation_steps")


def _leaf_optimizers(inner_optimizer: Any, var_list: Sequence[Any] | None = None) -> list[Any]:
    """The optimizers that update variables: a MultiOptimizer's sub-optimizers
    (those it knows, plus those its map gives `var_list`), else the optimizer."""
    subs = getattr(inner_optimizer, "optimizers", None)
    if not is_multi_optimizer(inner_optimizer) or subs is None:
        return [inner_optimizer]
    found = list(subs)
    mapping = getattr(inner_optimizer, "_optimizer_map", None)
    if var_list is not None and callable(mapping):
        for variable in var_list:
            opt = mapping(variable)
            if isinstance(opt, keras.optimizers.Optimizer) and all(opt is not o for o in found):
                found.append(opt)
    return found


def _optimizer_for(inner_optimizer: Any, variable: Any) -> Any | None:
    """The (sub-)optimizer that updates `variable` once built, or None."""
    if not is_multi_optimizer(inner_optimizer):
        return inner_optimizer
    if not inner_optimizer.built:
        return None
    index = inner_optimizer._var_to_optimizer_idx.get(inner_optimizer._var_key(variable))
    return None if index is None else inner_optimizer.optimizers[index]


def _non_default_strategy(optimizer: Any) -> Any | None:
    if not IS_TF:
        return None
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = getattr(optimizer, "_distribution_strategy", None)
    if strategy is not None and strategy is not tf.distribute.get_strategy():
        return strategy  # created under a strategy scope, built outside it
    return None


def _is_mirrored_family(strategy: Any) -> bool:
    """MirroredStrategy, MultiWorkerMirroredStrategy (and their variants)."""
    try:
        from tensorflow.python.distribute import mirrored_strategy

        return isinstance(strategy.extended, mirrored_strategy.MirroredExtended)
    except (ImportError, AttributeError):  # private module moved
        return isinstance(
            strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
        )


def check_strategy_support(
    inner_optimizer: Any, var_list: Sequence[Any] | None = None
) -> None:
    """Raises a clear error for inner-optimizer options that fail under the
    current `tf.distribute` strategy (stock Keras fails there too).

    Under `MirroredStrategy` and `MultiWorkerMirroredStrategy`, stock Keras
    optimizers with `use_ema=True, ema_overwrite_frequency=...` or
    `gradient_accumulation_steps=...` fail at the first step with
    "merge_call called while defining a new graph" (keras-team/keras#20582).
    A MultiOptimizer's sub-optimizers are checked one by one.
    """
    for opt in _leaf_optimizers(inner_optimizer, var_list):
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


class RowSnapshot(NamedTuple):
    """Rows `indices` of a variable, saved before a sparse update (a nest
    structure, so `tf.distribute` can pass it through `merge_call`)."""

    indices: Any
    rows: Any


def moves_only_gradient_rows(inner_optimizer: Any, variable: Any) -> bool:
    """Whether the inner optimizer provably changes no row of `variable` other
    than those a sparse (`IndexedSlices`) gradient names.

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
    if not IS_TF or tf.distribute.has_strategy():
        return False
    opt = _optimizer_for(inner_optimizer, variable)
    if opt is None or type(opt) is not keras.optimizers.SGD:
        return False
    if opt.momentum != 0 or opt.use_ema or opt.gradient_accumulation_steps:
        return False
    if opt.global_clipnorm:
        return False
    if opt.weight_decay and opt._use_weight_decay(variable):
        return False
    if getattr(variable, "constraint", None) is not None:
        return False
    if _non_default_strategy(opt) is not None:
        return False
    return True


def snapshot(
    variable: keras.Variable, grad: Any = None, inner_optimizer: Any = None
) -> Any:
    """What `restore_frozen` needs to put frozen elements back after the step.

    The variable's whole current value (a copy that later writes cannot
    alias), or, when `grad` is a `tf.IndexedSlices` and the inner optimizer
    provably moves only the rows it names (`moves_only_gradient_rows`), a
    `RowSnapshot` of just those rows: no dense copy of a large embedding.
    """
    if (
        grad is not None
        and inner_optimizer is not None
        and is_sparse(grad)
        and moves_only_gradient_rows(inner_optimizer, variable)
    ):
        indices = grad.indices
        return RowSnapshot(indices, tf.gather(variable.value, indices))
    return ops.copy(variable.value)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """For each `(variable, mask, old)`: `variable[~mask] = old[~mask]`.

    `old` is what `snapshot` returned: a dense value, or a `RowSnapshot` (only
    those rows are read and written back).

    On TensorFlow this runs through `merge_call` + `extended.update`, so it is
    correct in a replica context of any `tf.distribute` strategy (with the
    default strategy it is a plain assign), in a cross-replica context, and
    for distributed variables outside their strategy's scope (where `fit`
    calls `finalize_variable_values`).
    """
    if not items:
        return
    targets = list(items)
    if not IS_TF:
        for variable, mask, old in targets:
            variable.assign(ops.where(mask, variable.value, old))
        return

    def _restore(var, mask, old):
        if isinstance(old, RowSnapshot):
            mask = _rows_of(mask, old.indices, len(var.shape))
            new = tf.where(mask, tf.gather(var, old.indices), old.rows)
            return var.scatter_update(tf.IndexedSlices(new, old.indices))
        return var.assign(tf.where(mask, var, old))

    def _merged(distribution, targets):
        for variable, mask, old in targets:
            distribution.extended.update(
                variable.value, _restore, args=(mask, old), group=False
            )

    if not tf.distribute.has_strategy():
        # Distributed variables outside their strategy's scope: `fit` calls
        # `finalize_variable_values` there. Update every replica's copy.
        owner = getattr(targets[0][0].value, "distribute_strategy", None)
        if owner is not None and owner is not tf.distribute.get_strategy():
            with owner.scope():
                _merged(owner, targets)
            return
    strategy = tf.distribute.get_strategy()
    if tf.distribute.in_cross_replica_context():
        _merged(strategy, targets)
    else:
        tf.__internal__.distribute.interim.maybe_merge_call(_merged, strategy, targets)


# ------------------------------------------------------------ compact state


def scatter_flat(variable: Any, indices: Any, values: Any) -> None:
    """`variable.flat[indices] = values`, touching only those elements where the
    backend allows (duplicate indices must carry equal values)."""
    if IS_TF and not tf.distribute.has_strategy():
        # Flat positions -> coordinates (tf.unravel_index has no XLA kernel).
        coords, rest = [], indices
        for dim in reversed(tuple(variable.shape)[1:]):
            coords.append(rest % dim)
            rest = rest // dim
        coords.append(rest)
        variable.value.scatter_nd_update(tf.stack(coords[::-1], axis=1), values)
        return
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            flat = variable.value.view(-1)
            flat.index_copy_(0, indices.long(), values.to(flat.dtype))
        return
    flat = ops.reshape(variable.value, (-1,))
    variable.assign(ops.reshape(ops.scatter_update(flat, ops.expand_dims(indices, -1), values), variable.shape))
