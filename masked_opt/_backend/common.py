"""The `keras.ops` implementation of the backend interface.

JAX and torch use most of it as is; TensorFlow replaces more. See
`masked_opt/_backend/__init__.py` for the interface.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


class RowSnapshot(NamedTuple):
    """Rows `indices` of a variable, saved before a sparse update (a nest
    structure, so `tf.distribute` can pass it through `merge_call`)."""

    indices: Any
    rows: Any


# ------------------------------------------------------------- gradients


def is_sparse(grad: Any) -> bool:
    """Whether `grad` is a sparse (`tf.IndexedSlices`) gradient."""
    return False


def densify(grad: Any) -> Any:
    return grad


def zero(dtype: Any) -> Any:
    return ops.convert_to_tensor(0, dtype=dtype)


def frozen_guard(masks: list, grads: list, variables: list) -> Any:
    """A tensor saying whether any of `masks` freezes an element, where a
    runtime conditional around the masking pays (TensorFlow's graph mode);
    None here: the masking always runs."""
    return None


def if_frozen(guard: Any, fn: Callable, otherwise: Callable) -> Any:
    return fn()


def no_snapshot(variable: keras.Variable) -> Any:
    return None


def step_mask(mask: Any, variable: keras.Variable) -> Any:
    """The mask in the form this step's `mask_gradient` and `restore_frozen`
    read (here: the bool mask itself)."""
    return mask


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    """Zeroes `grad` where the bool `mask` (broadcastable to `variable_shape`)
    is False, NaN and inf there included."""
    return ops.where(mask, grad, zero(grad.dtype))


# ----------------------------------------------------------- compilation


def traced_into_xla(x: Any) -> bool:
    """Whether `x` is being traced into an XLA program."""
    return False


def is_compiling(x: Any) -> bool:
    """Whether the update reading `x` is being compiled (XLA, or torch.compile)."""
    return traced_into_xla(x)


def counts_in_trace(x: Any) -> bool:
    """Whether the update may bump a Python counter while tracing `x`."""
    return True


def can_inspect_frames(x: Any) -> bool:
    """Whether the step reading `x` may walk Python's call stack."""
    return True


def state_scope() -> Any:
    """Where a step may create optimizer state (eagerly): here, where it is."""
    return contextlib.nullcontext()


def in_traced_function() -> bool:
    """Whether a TensorFlow function is being traced."""
    return False


def can_jit(grads: list) -> bool:
    """Whether `MaskedOptimizer(jit_compile=...)` can compile the update here."""
    return False


def jit_function(fn: Callable, variables: list) -> Callable:
    raise NotImplementedError(f"jit_function is TensorFlow-only (backend: {BACKEND})")


def no_autograph(fn: Callable) -> Callable:
    return fn


def skip_in_backward(model: Any, frozen: Callable[[], list]) -> None:
    """Lets `model`'s trainer skip the gradients of the variables `frozen()`
    returns in its backward pass: nothing to do where the trainer's step is
    traced (XLA and TensorFlow's graph pruning drop a gradient nobody reads)."""


def check_jit_compile(jit_compile: Any, hint: str = "Drop the argument.") -> None:
    """Refuses `jit_compile=True` off TensorFlow; `hint` says how to compile there."""
    if jit_compile is True:
        raise ValueError(
            "`MaskedOptimizer(jit_compile=True)` compiles the masked update "
            "with XLA on the TensorFlow backend only; the active backend is "
            f"'{BACKEND}'. {hint}"
        )


def jit_compile_from_config(jit_compile: Any, name: str) -> Any:
    """`jit_compile` from a saved config, made valid for this backend."""
    if jit_compile is True:
        warnings.warn(
            f"MaskedOptimizer '{name}' was saved with `jit_compile=True`, which "
            f"applies to the TensorFlow backend only; loading it on '{BACKEND}' "
            "with jit_compile=False (the trainer compiles the masked update with "
            "the train step here).",
            stacklevel=3,
        )
        return False
    return jit_compile


# ------------------------------------------------------ bit-packed masks

# Float dtype -> the integer dtype of its width, for the bitwise gradient
# mask that XLA-compiled steps use (TensorFlow, JAX).
SAME_WIDTH_INT = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}

# Masks this large (elements) also get a bit-packed copy that compiled steps
# read instead of the bool mask: Adam's update under XLA is three loops, each
# reading the mask; at 1 byte per element that costs ~15 % of an out-of-cache
# step, at 1 bit ~4 % (hand-written JAX Adam, 4096 x 2048, buffers donated:
# bool 1.15x, packed 1.04x the unmasked step).
PACK_MIN_SIZE = 1 << 16


def full_shape_size(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> int:
    """The element count of a full-shape mask (of a non-scalar variable); 0 otherwise."""
    if tuple(mask_shape) != tuple(variable_shape) or not variable_shape:
        return 0
    return int(np.prod(variable_shape, dtype=np.int64))


def packable(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """A full-shape mask of at least `PACK_MIN_SIZE` elements whose last axis is
    a multiple of 8, without a keras.distribution."""
    size = full_shape_size(variable_shape, mask_shape)
    return size >= PACK_MIN_SIZE and variable_shape[-1] % 8 == 0 and no_distribution()



def pack_bits(mask: np.ndarray) -> np.ndarray:
    """A bool mask packed along its last axis, 8 elements per uint8 (bit i of
    byte j is element 8j + i)."""
    return np.packbits(np.asarray(mask, bool), axis=-1, bitorder="little")


def packs_mask(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """Whether a mask gets a bit-packed copy that XLA-compiled steps read."""
    return False


def unpack_bits(packed: Any, shape: tuple[int, ...]) -> Any:
    raise NotImplementedError(f"bit-packed masks are not read on {BACKEND}")


def no_distribution() -> bool:
    try:
        return keras.distribution.distribution() is None
    except (AttributeError, NotImplementedError):
        return True


# ------------------------------------------------------ snapshot/restore


def select(condition: Any, x: Any, y: Any) -> Any:
    """`where(condition, x, y)`, bit for bit (the blends of multiplied updates)."""
    return ops.where(condition, x, y)


def blend(old: Any, current: Any, m: Any, moving: Any) -> Any:
    """A multiplied update: `old + m * (current - old)` where `moving`, else `old`."""
    return select(moving, ops.add(old, ops.multiply(m, ops.subtract(current, old))), old)


def snapshot(variable: keras.Variable, grad: Any = None, opt: Any = None, mask: Any = None) -> Any:
    """A copy of the variable's value that later writes cannot alias."""
    return ops.copy(variable.value)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """For each `(variable, mask, old)`: `variable[~mask] = old[~mask]`."""
    for variable, mask, old in items:
        variable.assign(ops.where(mask, variable.value, old))


def scatter_flat(variable: Any, indices: Any, values: Any) -> None:
    """`variable.flat[indices] = values` (duplicate indices carry equal values)."""
    flat = ops.reshape(variable.value, (-1,))
    updated = ops.scatter_update(flat, ops.expand_dims(indices, -1), values)
    variable.assign(ops.reshape(updated, variable.shape))


def moves_only_gradient_rows(opt: Any, variable: Any) -> bool:
    """Whether `opt`, the optimizer that updates `variable`, provably moves
    only the rows a sparse gradient names (only TensorFlow has sparse gradients)."""
    return False


def distributed(optimizer: Any) -> bool:
    """Whether the optimizer's state is placed by a distribution (keras.distribution here)."""
    return not no_distribution()


def check_strategy_support(inner_optimizer: Any, leaves: Any) -> None:
    """Refuses options of `leaves` (the optimizers that update variables) that
    fail under a tf.distribute strategy."""


# ------------------------------------------------- trainer state (JAX)


def is_purged(variable: Any) -> bool:
    """Whether JAX's trainer has detached the variable's value during `fit`."""
    return False


def sync_model(model: Any) -> None:
    """Writes a trainer's detached state back into the model's variables."""


def unsynced_model(callback: keras.callbacks.Callback) -> Any:
    """The callback's model, without a state sync where the backend has one."""
    return callback.model


def step_while_detached(model: Any, optimizer: Any, variables: list) -> int | None:
    """`optimizer.iterations` read from a trainer that holds the state, or
    None where the variables hold it."""
    return None


# ---------------------------------------------- per-example gradients


def to_numpy(x: Any) -> np.ndarray:
    """A variable's (or tensor's) value as a NumPy array on the host."""
    return np.asarray(keras.ops.convert_to_numpy(getattr(x, "value", x)))


def one_example(tree: Any) -> Any:
    """One example as a batch of one."""
    return keras.tree.map_structure(lambda t: t[None], tree)


def as_tensors(tree: Any) -> Any:
    return keras.tree.map_structure(keras.ops.convert_to_tensor, tree)


def stateless_call(model: keras.Model, variables: list) -> Callable:
    """`call(chosen, trainable, non_trainable, x)`: the model's output in
    inference mode as a pure function of the values of `variables` (`chosen`),
    in a `keras.StatelessScope` (as `model.stateless_call` does, but through
    `model(...)`, which drops `training` for a `call` without it)."""
    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)
    positions = [next(i for i, t in enumerate(trainable) if t is v) for v in variables]

    def call(chosen, trainable_values, non_trainable_values, x):
        values = list(trainable_values)
        for i, value in zip(positions, chosen):
            values[i] = value
        mapping = list(zip(trainable, values)) + list(zip(non_trainable, non_trainable_values))
        with keras.StatelessScope(state_mapping=mapping):
            return model(x, training=False)

    return call


def stateless_loss(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`loss(chosen, trainable, non_trainable, xi, yi)`: one example's loss
    (see `stateless_call`)."""
    call = stateless_call(model, variables)

    def loss(chosen, trainable_values, non_trainable_values, xi, yi):
        y_pred = call(chosen, trainable_values, non_trainable_values, one_example(xi))
        return keras.ops.mean(loss_fn(one_example(yi), y_pred))

    return loss


def batch_loss(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`loss(chosen, trainable, non_trainable, x, y)`: the mean loss of a batch
    (see `stateless_call`)."""
    call = stateless_call(model, variables)

    def loss(chosen, trainable_values, non_trainable_values, x, y):
        return keras.ops.mean(loss_fn(y, call(chosen, trainable_values, non_trainable_values, x)))

    return loss


def state_values(model: keras.Model, variables: list) -> tuple[list, list, list]:
    """(values of `variables`, of the trainable, of the non-trainable variables):
    the first three arguments of a `stateless_loss` or `batch_loss`."""
    return ([v.value for v in variables], [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def loss_gradients(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`step(x, y) -> [gradient of the batch's mean loss]`, one dense tensor
    per variable in `variables` (the model in inference mode: no dropout, no
    BatchNorm statistics update)."""
    raise NotImplementedError(
        "Gradient-based mask updates (RigL, SpIEL) compute gradients on the TensorFlow, JAX and torch "
        f"backends; the active backend is '{BACKEND}'. Set KERAS_BACKEND to one of those, or use SET."
    )


def squared_grad_sums(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`step(x, y) -> [sum over the batch of squared per-example gradients]`,
    one tensor per variable in `variables`."""
    raise NotImplementedError(
        "`fisher_scores` computes per-example gradients on the TensorFlow, JAX "
        f"and torch backends; the active backend is '{BACKEND}'. Set "
        "KERAS_BACKEND to one of those."
    )


def requires_grad(x: Any) -> bool:
    """Whether a backward pass wants `x`'s gradient (torch: `requires_grad`;
    a compiled graph drops an unused gradient by itself)."""
    return True


def release_grad(variable: Any) -> None:
    """Drops a gradient the backend keeps on the variable (torch's `.grad`),
    for variables the trainer's `zero_grad` does not reach."""
