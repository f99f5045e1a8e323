"""The default layout: the inner optimizer keeps full-size state; each mask is
a bool optimizer variable at its storage shape (plus a bit-packed copy for
large full-shape masks, read by XLA-compiled steps).

Each step, for every handled variable: (1) zero the gradient where the mask
is False (NaN/inf there included), (2) snapshot the variable, (3) let the
inner optimizer apply every gradient as usual, (4) write the frozen elements
back from the snapshot, and blend multiplied updates. There are no
conditionals: with an all-True mask (a multiplier of 1) every step is exact
(`where` with a True condition returns its input), so the result is the bare
optimizer's. A `cond` shortcut would trace the inner update twice on
TensorFlow, leak tracers on JAX and sync the host on torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from masked_opt import _backend, _blend, _inner
from masked_opt._layout import StateLayout, multiplied_only
from masked_opt._table import Entry, VariableTable
from masked_opt.registry import MASKS


class DenseLayout(StateLayout):
    def add_mask(self, entry: Entry, mask: np.ndarray, capacity: int | None) -> None:
        entry.mask_shape = tuple(mask.shape)
        entry.mask = self.add_state(entry.variable, np.array(mask, dtype=bool), "_mask")
        if _backend.packs_mask(tuple(entry.variable.shape), entry.mask_shape):
            packed = _backend.pack_bits(mask)
            entry.bits = self.add_state(entry.variable, packed, "_mask_bits", sharded=False)

    def after_inner_build(self, table: VariableTable) -> None:
        for entry in table.masked():
            entry.ema = _inner.ema_owner(self.inner, entry.variable)[1]

    def after_load(self, table: VariableTable) -> None:
        for entry in table.masked():  # the packed copies follow the loaded masks
            if entry.bits is not None:
                entry.bits.assign(_backend.pack_bits(_backend.to_numpy(entry.mask)))

    def _mask_tensor(self, entry: Entry, grad) -> object:
        if entry.bits is not None and _backend.traced_into_xla(grad):
            return _backend.unpack_bits(entry.bits.value, entry.mask_shape)  # 1 bit per element read
        return entry.mask.value

    def step(self, grads: list, variables: list, handled: list[tuple[int, Entry]]) -> None:
        masked_grads = list(grads)
        pending = []
        for i, entry in handled:
            variable = variables[i]
            if entry.mask is None:
                pending.append(multiplied_only(self.inner, variable, entry.multiplier))
                continue
            mask = self._mask_tensor(entry, grads[i])
            if entry.multiplier is None:
                mask = _backend.step_mask(mask, variable)
            masked_grads[i] = _backend.mask_gradient(grads[i], mask, tuple(variable.shape))
            if entry.multiplier is None:
                # A sparse gradient lets the snapshot keep only the rows it names.
                old = _backend.snapshot(variable, masked_grads[i], self.inner, mask)
                pending.append(lambda e=entry, m=mask, o=old: _blend.frozen_items(e.variable, e.ema, m, o))
            else:  # a multiplier blends the whole value: no row-only snapshot
                old = _backend.snapshot(variable)
                ema = _blend.ema_before(self.inner, variable)
                pending.append(
                    lambda v=variable, m=mask, x=entry.multiplier, o=old, a=ema:
                    _blend.multiplied_items(v, m, x.value, o, *a)
                )
        self.inner.apply(masked_grads, variables)
        _backend.restore_frozen([item for items in pending for item in items()])

    def finalize(self, var_list: list, table: VariableTable) -> None:
        restore = []
        for variable in var_list:
            entry = table.get(variable)
            if entry is not None and entry.mask is not None:
                old = _backend.snapshot(variable)
                restore.extend(_blend.frozen_items(variable, entry.ema, entry.mask.value, old))
        self.inner.finalize_variable_values(var_list)
        _backend.restore_frozen(restore)

    def read_mask(self, entry: Entry) -> np.ndarray:
        return np.array(self.read(entry.mask, entry.path), dtype=bool)

    def plan_mask(self, entry: Entry, new: np.ndarray, what: str) -> Callable[[], None]:
        stored = MASKS.to_storage(new, entry.mask_shape, entry.variable, what=what)

        def commit() -> None:
            entry.mask.assign(stored)
            if entry.bits is not None:
                entry.bits.assign(_backend.pack_bits(stored))

        return commit

    def detached(self, table: VariableTable) -> bool:
        return any(_backend.is_purged(e.mask) for e in table.masked())
