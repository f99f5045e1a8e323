"""Compact optimizer state (`MaskedOptimizer(..., compact_state=True)`).

For each masked variable the inner optimizer is built on a *proxy*: a 1-D
scratch variable of `capacity` elements holding the variable's trainable
elements, gathered by an int32 index variable. Every slot the inner optimizer
makes (momentum, velocity, EMA average, gradient accumulator, ...) is made
from the proxy, so optimizer memory is proportional to the trainable count,
and the inner update touches only those elements. Each step:

1. gather the trainable elements of the weight and of the gradient into
   the proxy and a compact gradient (padding positions get a zero gradient);
2. let the inner optimizer update the proxy as it would any variable;
3. scatter the proxy back (padding positions write back the value they read).

Frozen elements are never handed to the inner optimizer, so they cannot
move. For element-wise optimizers the trainable elements see exactly the
arithmetic of the dense mode; optimizers that couple elements are refused.

Padding: an index variable has `capacity` entries and `count` of them are
valid. Padding entries point at one frozen element (one always exists while
count < capacity <= size) and write its own value back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import keras
from keras import ops

from masked_opt import _backend

O = keras.optimizers

# Built-in optimizers whose update of an element depends on that element's
# gradient, weight and slots only (and on scalars: step count, learning rate).
_ELEMENTWISE = ("SGD", "RMSprop", "Adam", "AdamW", "Adamax", "Nadam", "Adagrad",
                "Adadelta", "Ftrl", "Lion")
# Known to couple the elements of a variable.
_COUPLED = {
    "Lamb": "its trust ratio is the norm of the whole variable over the norm of its update",
    "Adafactor": "its second moment is factored into row and column statistics",
    "Muon": "it orthogonalises the whole 2-D update (Newton-Schulz)",
    "ScheduleFreeAdamW": "its schedule-free state is not element-local in Keras's implementation",
}


def _elementwise_classes() -> tuple[type, ...]:
    return tuple(getattr(O, n) for n in _ELEMENTWISE if hasattr(O, n))


def check_inner(inner: Any, leaves: list[Any]) -> None:
    """Raises a clear error for inner optimizers that compact state cannot serve."""
    allowed = _elementwise_classes()
    for opt in leaves:
        name = type(opt).__name__
        coupled = next((why for n, why in _COUPLED.items() if type(opt).__name__ == n), None)
        if coupled is not None or not isinstance(opt, allowed):
            why = coupled or "it is not one of the element-wise built-in optimizers"
            raise ValueError(
                f"`compact_state=True` cannot serve the inner optimizer '{opt.name}' "
                f"({name}): {why}, so its update of a trainable element depends on "
                "elements that compact state does not keep. Use the default "
                "`compact_state=False` with this optimizer, or one of: "
                f"{', '.join(_ELEMENTWISE)}."
            )


def check_variable(variable: Any) -> None:
    if getattr(variable, "constraint", None) is not None:
        raise ValueError(
            f"`compact_state=True`: variable '{variable.path}' has a constraint "
            f"({type(variable.constraint).__name__}), which acts on the whole "
            "variable; compact state updates only its trainable elements. Remove "
            "the constraint from the layer, or use `compact_state=False`."
        )


def capacity_for(capacity: Any, count: int, size: int, path: str) -> int:
    """The number of elements the compact state of a variable can hold."""
    if capacity is None:
        cap = count
    elif isinstance(capacity, float):
        cap = max(count, int(np.ceil(capacity * size)))
    else:
        cap = max(count, int(capacity))
    return min(max(cap, 0), size)


@dataclass
class CompactSlot:
    """The compact state of one masked model variable."""

    variable: keras.Variable
    proxy: keras.Variable  # (capacity,) the trainable elements, what the inner updates
    indices: keras.Variable  # int32 (capacity,) flat positions; `count` valid
    count: keras.Variable  # int32 scalar
    capacity: int

    @property
    def size(self) -> int:
        return int(np.prod(self.variable.shape, dtype=np.int64))


def padded_indices(full_mask: np.ndarray, capacity: int, path: str, what: str) -> tuple[np.ndarray, int]:
    flat = np.asarray(full_mask, bool).reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int32)
    if len(idx) > capacity:
        raise ValueError(
            f"`{what}`: variable '{path}' would have {len(idx):,} trainable "
            f"elements, but its compact state holds {capacity:,} (fixed when the "
            "optimizer was built). Reserve more with `MaskedOptimizer(..., "
            "compact_state=True, compact_capacity=N)` (an element count, or a "
            "fraction of each variable such as 0.1), or use `compact_state=False`."
        )
    if len(idx) < capacity:
        fill = int(np.flatnonzero(~flat)[0])  # exists: len(idx) < capacity <= size
        idx = np.concatenate([idx, np.full(capacity - len(idx), fill, np.int32)])
    return idx, int(np.count_nonzero(flat))


def full_mask(slot: CompactSlot, indices: np.ndarray, count: int) -> np.ndarray:
    flat = np.zeros(slot.size, bool)
    flat[indices[:count]] = True
    return flat.reshape(tuple(slot.variable.shape))


def gather(slot: CompactSlot, grad: Any) -> tuple[Any, Any, Any]:
    """(compact gradient, the gathered weights, the validity mask) for a step."""
    indices = slot.indices.value
    valid = ops.less(ops.arange(slot.capacity, dtype="int32"), slot.count.value)
    old = ops.take(ops.reshape(slot.variable.value, (-1,)), indices, axis=0)
    slot.proxy.assign(old)
    if _backend.is_sparse(grad):
        grad = ops.convert_to_tensor(grad)
    g = ops.take(ops.reshape(grad, (-1,)), indices, axis=0)
    g = ops.where(valid, g, ops.zeros((), g.dtype))
    return g, old, valid


def gather_multiplier(slot: CompactSlot, multiplier: Any) -> Any:
    """A variable's update multiplier at the proxy's elements (a scalar stays
    a scalar; a row/column/element multiplier is gathered by the indices)."""
    if len(multiplier.shape) == 0:
        return multiplier
    full = ops.broadcast_to(multiplier, tuple(slot.variable.shape))
    return ops.take(ops.reshape(full, (-1,)), slot.indices.value, axis=0)


def scatter(slot: CompactSlot, old: Any, valid: Any) -> None:
    """Writes the proxy back into the variable (padding writes back `old`)."""
    if slot.capacity == 0:
        return
    new = ops.where(valid, slot.proxy.value, old)
    _backend.scatter_flat(slot.variable, slot.indices.value, new)


def state_variables(inner_variables: list, proxy: keras.Variable) -> dict[str, keras.Variable]:
    """The inner optimizer's variables made from `proxy`, by their name suffix
    ("momentum", "velocity", "average", ...): Keras names a slot
    `{reference.path with '/' -> '_'}_{name}`."""
    prefix = proxy.path.replace("/", "_") + "_"
    return {v.name[len(prefix):]: v for v in inner_variables if v.name.startswith(prefix)}
