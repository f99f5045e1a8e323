"""JAX: the trainer's detached state, bitwise masking and bit-packed masks
inside XLA programs, per-example gradients with `jax.vmap`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax import lax

from masked_opt import _compat
from masked_opt._backend import common

from masked_opt._backend.common import SAME_WIDTH_INT


def check_jit_compile(jit_compile: Any) -> None:
    common.check_jit_compile(
        jit_compile,
        "On JAX the trainer already compiles the whole train step, the masked "
        "update included, with XLA (`model.compile(jit_compile=True)`, the "
        "default): drop the argument.",
    )


def traced_into_xla(x: Any) -> bool:
    """A JAX tracer: the trainer's `jax.jit` (or any jit) is tracing the step."""
    return isinstance(x, jax.core.Tracer)


is_compiling = traced_into_xla


def and_mask(grad: Any, mask: Any) -> Any:
    """`where(mask, grad, +0)`, bit for bit, as an AND with the mask widened to
    the gradient's bits (True -> all ones, False -> 0). On CPU a `select`
    between a loaded array and 0 compiles to an AVX-512 masked load, which
    runs the whole loop at about half speed out of cache; the AND is a plain
    `vpand` (benchmarks/profile_masked_step.py)."""
    itype = SAME_WIDTH_INT[keras.backend.standardize_dtype(grad.dtype)]
    keep = -(mask.astype(itype))  # True -> -1 (all ones), False -> 0
    return lax.bitcast_convert_type(lax.bitcast_convert_type(grad, itype) & keep, grad.dtype)


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    """Zeroes `grad` where `mask` is False (NaN/inf there included); inside a
    jitted step by a bitwise AND (the same bits, faster on CPU)."""
    if keras.backend.standardize_dtype(grad.dtype) in SAME_WIDTH_INT and traced_into_xla(grad):
        return and_mask(grad, mask)
    return common.mask_gradient(grad, mask, variable_shape)


packs_mask = common.packable


def unpack_bits(packed: Any, shape: tuple[int, ...]) -> Any:
    """The bool mask of `shape` that `pack_bits` packed (inside a compiled step)."""
    bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(shape).astype(bool)


# ------------------------------------------------- trainer state


def to_numpy(x: Any) -> np.ndarray:
    """Also for an array sharded over the devices of several processes
    (`keras.distribution.initialize`): gathered from all of them, which is a
    collective: every process must read the same variables in the same order."""
    value = getattr(x, "value", x)
    if isinstance(value, jax.Array) and not value.is_fully_addressable and not value.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return common.to_numpy(value)


def is_purged(variable: Any) -> bool:
    """During `fit` JAX's trainer holds the state and detaches the variables'
    values until `jax_state_sync()`."""
    return _compat.is_detached(variable)


def sync_model(model: Any) -> None:
    model.jax_state_sync()


def unsynced_model(callback: keras.callbacks.Callback) -> Any:
    """`callback.model` syncs JAX's trainer state on every access; this does not."""
    return _compat.callback_model(callback)


def step_while_detached(model: Any, optimizer: Any, variables: list) -> int | None:
    """`optimizer.iterations` read from the trainer's optimizer state without
    reattaching the model (syncing on every batch would cost a pass over every
    variable per step). `variables` are `model.optimizer.variables`; the step
    may be computed from several scalars (gradient accumulation divides it)."""
    scalars = [i for i, v in enumerate(variables) if len(v.shape) == 0]
    if not any(is_purged(variables[i]) for i in scalars):
        return None
    values = _compat.jax_trainer_state(model).get("optimizer_variables")
    if values is not None and len(values) == len(variables):
        mapping = [(variables[i], values[i]) for i in scalars]
        try:
            with keras.StatelessScope(state_mapping=mapping):
                return int(keras.ops.convert_to_numpy(optimizer.iterations))
        except (TypeError, ValueError, AttributeError):
            pass
    model.jax_state_sync()
    return None


# ---------------------------------------- gradients (RigL, Fisher)


def loss_gradients(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`jax.grad` of the batch loss under `jax.jit` (compiled once per batch shape)."""
    grad = jax.jit(jax.grad(common.batch_loss(model, loss_fn, variables)))

    def step(x, y):
        return grad(*common.state_values(model, variables), common.as_tensors(x), common.as_tensors(y))

    return step


def squared_grad_sums(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`jax.vmap(jax.grad(loss))` over the examples of a batch, under `jax.jit`
    (compiled once per batch shape)."""
    loss = common.stateless_loss(model, loss_fn, variables)
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0))

    @jax.jit
    def sums(chosen, trainable_values, non_trainable_values, x, y):
        grads = per_example(chosen, trainable_values, non_trainable_values, x, y)
        return [jnp.sum(jnp.square(g), axis=0) for g in grads]

    def step(x, y):
        return sums(*common.state_values(model, variables), common.as_tensors(x), common.as_tensors(y))

    return step
