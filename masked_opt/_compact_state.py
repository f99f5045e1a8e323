"""Compact state (`CompactLayout`, `compact_state=True`): state for the trainable elements only.

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
move. Trainable elements see the arithmetic of the dense layout on shorter
arrays: equal up to the rounding of the backend's vectorised kernels (a
fused multiply-add in the SIMD body, two roundings in the tail), bounded
per optimizer in docs/compact-state.md. Optimizers that couple elements are
refused.

Padding: an index variable has `capacity` entries and `count` of them are
valid. Padding entries point at one frozen element (one always exists while
count < capacity <= size) and write its own value back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from masked_opt import _backend, _inner_optimizer, _restore
from masked_opt._state_layout import ELEMENTWISE, StateLayout, mask_sharding, reset_slots, scoped_variable
from masked_opt._variable_table import CompactState, Entry, VariableTable

O = keras.optimizers

# Known to couple the elements of a variable.
_COUPLED = {
    "Lamb": "its trust ratio is the norm of the whole variable over the norm of its update",
    "Adafactor": "its second moment is factored into row and column statistics",
    "Muon": "it orthogonalises the whole 2-D update (Newton-Schulz)",
    "ScheduleFreeAdamW": "its schedule-free state is not element-local in Keras's implementation",
}


def check_inner(leaves: list[Any]) -> None:
    """Raises a clear error for inner optimizers that compact state cannot serve."""
    allowed = tuple(getattr(O, n) for n in ELEMENTWISE if hasattr(O, n))
    for opt in leaves:
        name = type(opt).__name__
        coupled = _COUPLED.get(name)
        if coupled is not None or not isinstance(opt, allowed):
            why = coupled or "it is not one of the element-wise built-in optimizers"
            raise ValueError(
                f"`compact_state=True` cannot serve the inner optimizer '{opt.name}' "
                f"({name}): {why}, so its update of a trainable element depends on "
                "elements that compact state does not keep. Use the default "
                "`compact_state=False` with this optimizer, or one of: "
                f"{', '.join(ELEMENTWISE)}."
            )


def check_variable(variable: Any) -> None:
    if getattr(variable, "constraint", None) is not None:
        raise ValueError(
            f"`compact_state=True`: variable '{variable.path}' has a constraint "
            f"({type(variable.constraint).__name__}), which acts on the whole "
            "variable; compact state updates only its trainable elements. Remove "
            "the constraint from the layer, or use `compact_state=False`."
        )


def check_arguments(compact_state: Any, capacity: Any) -> None:
    """`MaskedOptimizer(compact_state=..., compact_capacity=...)`."""
    if not isinstance(compact_state, bool):
        raise TypeError(f"`compact_state` must be True or False. Received: {compact_state!r}.")
    if capacity is None:
        return
    ok = (isinstance(capacity, float) and 0.0 < capacity <= 1.0) or (
        isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 0
    )
    if not ok:
        raise ValueError(
            "`compact_capacity` must be None (the trainable count at build), "
            "an int >= 0 (elements per masked variable) or a float in (0, 1] "
            f"(a fraction of each masked variable). Received: {capacity!r}."
        )
    if not compact_state:
        raise ValueError(
            "`compact_capacity` is only used with `compact_state=True`. "
            f"Received: compact_capacity={capacity!r}, compact_state=False."
        )


def capacity_for(capacity: Any, count: int, size: int) -> int:
    """The number of elements the compact state of a variable can hold."""
    if capacity is None:
        cap = count
    elif isinstance(capacity, float):
        cap = max(count, int(np.ceil(capacity * size)))
    else:
        cap = max(count, int(capacity))
    return min(max(cap, 0), size)


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


class CompactLayout(StateLayout):
    bare_at_identity = False  # the inner optimizer updates proxies, not the variables

    def __init__(self, inner, add_variable, owner, capacity: Any):
        super().__init__(inner, add_variable, owner)
        self.capacity = capacity  # the `compact_capacity` argument
        self.trainable_proxies = False  # `side_path=True`: proxies may become model variables
        self._proxies = 0

    # ------------------------------------------------------------- build

    def add_mask(self, entry: Entry, mask: np.ndarray, capacity: int | None) -> None:
        variable = entry.variable
        check_variable(variable)
        full = np.broadcast_to(mask, tuple(variable.shape))
        if capacity is None:  # not given by a saved config
            capacity = capacity_for(self.capacity, int(np.count_nonzero(full)), entry.size)
        indices, count = padded_indices(full, capacity, variable.path, "masks")
        entry.mask_shape = tuple(mask.shape)
        index_var = self.add_state(variable, np.asarray(indices, np.int32), "_compact_indices")
        count_var = self.add_state(variable, np.array(count, np.int32), "_compact_count", sharded=False)
        # The proxy: what the inner optimizer sees and builds its slots from.
        # Its path ends with the variable's own path, so MultiOptimizer maps and
        # `exclude_from_weight_decay(var_names=...)` select it as they would the
        # variable. It is scratch space (re-gathered every step), not state.
        proxy = scoped_variable(
            [f"masked_compact_{self._proxies}", *variable.path.split("/")[:-1]],
            variable.path.split("/")[-1],
            (capacity,),
            variable.dtype,
            mask_sharding(variable, (capacity,)),
            trainable=self.trainable_proxies,
        )
        entry.compact = CompactState(proxy, index_var, count_var, capacity)
        self._proxies += 1

    def inner_variables(self, variables: list, table: VariableTable) -> list:
        check_inner(_inner_optimizer.leaf_optimizers(self.inner, variables))
        pairs = [(e.variable, e.compact.proxy) for e in table.masked()]
        _inner_optimizer.share_weight_decay_exclusions(self.inner, pairs)
        out = []
        for v in variables:
            entry = table.get(v)
            out.append(v if entry is None or entry.compact is None else entry.compact.proxy)
        return out

    # ------------------------------------------------------------- train

    @staticmethod
    def gather(c: CompactState, variable: keras.Variable, grad: Any, compact: bool = False) -> tuple[Any, Any, Any]:
        """(compact gradient, the gathered weights, the validity mask) for a
        step; `compact`: `grad` is the compact gradient already (the side path's)."""
        indices = c.indices.value
        valid = ops.less(ops.arange(c.capacity, dtype="int32"), c.count.value)
        old = ops.take(ops.reshape(variable.value, (-1,)), indices, axis=0)
        c.proxy.assign(old)
        g = grad if compact else ops.take(ops.reshape(_backend.densify(grad), (-1,)), indices, axis=0)
        return ops.where(valid, g, ops.zeros((), g.dtype)), old, valid

    @staticmethod
    def scatter(c: CompactState, variable: keras.Variable, old: Any, valid: Any) -> None:
        """Writes the proxy back into the variable (padding writes back `old`)."""
        if c.capacity:
            _backend.scatter_flat(variable, c.indices.value, ops.where(valid, c.proxy.value, old))

    def step(self, grads: list, variables: list, handled: list[tuple[int, Entry]], identity: bool = False) -> None:
        grads, inner_vars = list(grads), list(variables)
        dense, pending = [], []
        for i, entry in handled:
            if entry.compact is None:  # a multiplier only: the variable keeps dense state
                dense.append(_restore.multiplied_only(self.inner, variables[i], entry.multiplier))
                continue
            c = entry.compact
            grads[i], old, valid = self.gather(c, variables[i], grads[i], compact=entry.side is not None and len(grads[i].shape) == 1)
            inner_vars[i] = c.proxy
            m = None if entry.multiplier is None else self._gathered_multiplier(entry)
            ema = _restore.ema_before(self.inner, c.proxy) if m is not None else None
            pending.append((entry, old, valid, m, ema))
        self.inner.apply(grads, inner_vars)
        restore = [item for items in dense for item in items()]
        for entry, old, valid, m, ema in pending:
            if m is not None:  # blend on the proxy, then write it back
                restore.extend(_restore.multiplied_items(entry.compact.proxy, valid, m, old, *ema))
        _backend.restore_frozen(restore)
        for entry, old, valid, _, _ in pending:
            self.scatter(entry.compact, entry.variable, old, valid)

    @staticmethod
    def _gathered_multiplier(entry: Entry) -> Any:
        """The multiplier at the proxy's elements (a scalar stays a scalar)."""
        multiplier = entry.multiplier.value
        if len(multiplier.shape) == 0:
            return multiplier
        full = ops.broadcast_to(multiplier, tuple(entry.variable.shape))
        return ops.take(ops.reshape(full, (-1,)), entry.compact.indices.value, axis=0)

    def finalize(self, var_list: list, table: VariableTable) -> None:
        # The EMA of the trainable elements lives on the proxies: swap it in
        # there, then write the trainable elements back.
        pending, inner_vars = [], []
        for variable in var_list:
            entry = table.get(variable)
            if entry is None or entry.compact is None:
                inner_vars.append(variable)
                continue
            zeros = ops.zeros(variable.shape, variable.dtype)
            _, old, valid = self.gather(entry.compact, variable, zeros)
            pending.append((entry, old, valid))
            inner_vars.append(entry.compact.proxy)
        self.inner.finalize_variable_values(inner_vars)
        for entry, old, valid in pending:
            self.scatter(entry.compact, entry.variable, old, valid)

    # ------------------------------------------------------- masks (host)

    def read_mask(self, entry: Entry) -> np.ndarray:
        c = entry.compact
        indices = self.read(c.indices, entry.path)
        count = int(self.read(c.count, entry.path))
        flat = np.zeros(entry.size, bool)
        flat[indices[:count]] = True
        return flat.reshape(tuple(entry.variable.shape))

    def plan_mask(self, entry: Entry, new: np.ndarray, what: str) -> Callable[[], None]:
        """A mask edit: elements that stay trainable keep their state; newly
        trainable ones get a fresh optimizer's state (the EMA starts at the
        weight); dropped ones lose theirs."""
        c = entry.compact
        full = np.broadcast_to(new, tuple(entry.variable.shape))
        new_idx, new_count = padded_indices(full, c.capacity, entry.path, what)
        if entry.side is not None and not np.array_equal(full, self.read_mask(entry)):
            raise ValueError(
                f"`{what}`: variable '{entry.path}' trains through the side path (`side_path=True`), whose "
                f"{entry.side.fixed} are fixed at build (its layer's forward pass has them). "
                "To train others, build a new MaskedOptimizer with the new masks (its state starts "
                "fresh), or use `side_path=False`, whose masks can change at any step.")

        def commit() -> None:
            old_idx = np.asarray(self.read(c.indices, entry.path))[: int(self.read(c.count, entry.path))]
            valid = new_idx[:new_count]
            loc = np.searchsorted(old_idx, valid)  # both sorted (np.flatnonzero)
            kept = loc < len(old_idx)
            kept[kept] = old_idx[loc[kept]] == valid[kept]
            flat_w = _backend.to_numpy(entry.variable).reshape(-1)
            fresh = _inner_optimizer.fresh_state(self.inner, c.proxy, flat_w[new_idx])
            for suffix, var in _inner_optimizer.slot_variables(self.inner.variables, c.proxy).items():
                values = np.array(fresh[suffix])
                values[:new_count][kept] = _backend.to_numpy(var)[loc[kept]]
                var.assign(values)
            c.indices.assign(new_idx)
            c.count.assign(np.array(new_count, np.int32))

        return commit

    def fresh_state(self, entry: Entry) -> None:
        if entry.compact is None:
            super().fresh_state(entry)  # newly trainable elements of compact state get it from `plan_mask`

    def reset_state(self, entry: Entry | None, variable: keras.Variable, positions: np.ndarray) -> None:
        if entry is None or entry.compact is None:  # state of the variable's own shape
            return super().reset_state(entry, variable, positions)
        c = entry.compact
        active = np.asarray(self.read(c.indices, entry.path))[: int(self.read(c.count, entry.path))]
        loc = np.searchsorted(active, positions)  # frozen positions have no state to reset
        loc = loc[(loc < len(active)) & (active[np.minimum(loc, len(active) - 1)] == positions)] if len(active) else loc[:0]
        weights = np.asarray(self.read(variable, variable.path)).reshape(-1)
        reset_slots(self.inner, c.proxy, variable, loc, weights[active[loc]], self.read)

    def detached(self, table: VariableTable) -> bool:
        return any(_backend.is_purged(e.compact.indices) for e in table.masked())
