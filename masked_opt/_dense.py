"""The default layout: the inner optimizer keeps full-size state; each mask is
a bool optimizer variable at its storage shape (plus a bit-packed copy for
large full-shape masks, read by compiled steps: XLA, torch.compile).

Each step, for every handled variable: (1) zero the gradient where the mask
is False (NaN/inf there included), (2) snapshot the variable, (3) let the
inner optimizer apply every gradient as usual, (4) write the frozen elements
back from the snapshot, and blend multiplied updates. The inner update is
never behind a conditional (a `cond` around it would trace it twice on
TensorFlow, leak tracers on JAX and sync the host on torch): with an all-True
mask (a multiplier of 1) every step is exact (`where` with a True condition
returns its input), so the result is the bare optimizer's. Only the masking
itself may be skipped while nothing is frozen: eagerly by a host-side flag
(`VariableTable.handled`, and per variable on torch), in TensorFlow's graph
mode by a `cond` around the masking of frozen-only variables
(`_backend.frozen_guard`); under XLA it fuses into the update and always runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from masked_opt import _backend, _blend, _inner
from masked_opt._layout import StateLayout
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
        if entry.bits is not None and _backend.is_compiling(grad):
            return _backend.unpack_bits(entry.bits.value, entry.mask_shape)  # 1 bit per element read
        return entry.mask.value

    def step(self, grads: list, variables: list, handled: list[tuple[int, Entry]], identity: bool = False) -> None:
        masked_grads = list(grads)
        pending, frozen = [], []
        for i, entry in handled:
            variable = variables[i]
            if entry.mask is None:
                pending.append(_blend.multiplied_only(self.inner, variable, entry.multiplier))
                continue
            mask = self._mask_tensor(entry, grads[i])
            if entry.multiplier is None:
                frozen.append((i, entry, _backend.step_mask(mask, variable)))
                continue
            # A multiplier blends the whole value: no row-only snapshot.
            masked_grads[i] = _backend.mask_gradient(grads[i], mask, tuple(variable.shape))
            old = _backend.snapshot(variable)
            ema = _blend.ema_before(self.inner, variable)
            pending.append(
                lambda v=variable, m=mask, x=entry.multiplier, o=old, a=ema:
                _blend.multiplied_items(v, m, x.value, o, *a)
            )
        # A TF graph-mode step traced while nothing is frozen (all-True masks
        # registered for later edits) masks frozen-only variables only while
        # some element is frozen: a runtime `cond` around the masking, not
        # around the inner update, so all-True masks cost what the bare step
        # costs. A step traced with frozen elements has no `cond` (it would
        # slow the first step of a many-variable model by ~10 %).
        guard = None if not identity else _backend.frozen_guard(
            [m for _, _, m in frozen], [grads[i] for i, _, _ in frozen], [variables[i] for i, _, _ in frozen]
        )
        olds = self._mask_frozen(frozen, grads, variables, masked_grads, guard)
        self.inner.apply(masked_grads, variables)
        _restore(frozen, olds, [item for items in pending for item in items()], guard)

    def _mask_frozen(self, frozen: list, grads: list, variables: list, masked_grads: list, guard) -> list:
        """Masks the gradients of the frozen-only variables `(i, entry, mask)`
        into `masked_grads` and returns their snapshots (behind `guard`, if any)."""

        def mask_and_snapshot() -> list:
            out = []
            for i, _, mask in frozen:  # a sparse gradient lets the snapshot keep only its rows
                g = _backend.mask_gradient(grads[i], mask, tuple(variables[i].shape))
                out.append((g, _backend.snapshot(variables[i], g, self.inner, mask)))
            return out

        def untouched() -> list:
            return [(grads[i], _backend.no_snapshot(variables[i])) for i, _, _ in frozen]

        taken = mask_and_snapshot() if guard is None else _backend.if_frozen(guard, mask_and_snapshot, untouched)
        olds = []
        for (i, _, _), (g, old) in zip(frozen, taken):
            masked_grads[i] = g
            olds.append(old)
        return olds

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


def _restore(frozen: list, olds: list, multiplied: list, guard) -> None:
    """Writes back the frozen elements of `frozen` from `olds` (behind `guard`,
    if any) and the blended `multiplied` items."""

    def frozen_items() -> list:
        items = []
        for (_, entry, mask), old in zip(frozen, olds):
            items.extend(_blend.frozen_items(entry.variable, entry.ema, mask, old))
        return items

    if guard is None:  # one restore (one merge_call under tf.distribute)
        _backend.restore_frozen(multiplied + frozen_items())
    else:
        _backend.restore_frozen(multiplied)
        _backend.if_frozen(guard, lambda: _backend.restore_frozen(frozen_items()), lambda: None)
