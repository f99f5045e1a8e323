"""The mask store (`MaskStore`): the masks and multipliers on the host.

Resolved into the variable table at build, read back, and edited after build.

An edit validates the new value of every variable it selects before it
changes any (a rejected `set_mask` or `set_multiplier` changes nothing, so
training goes on exactly as if it had not been called), then commits them,
and refreshes the table's flags: `identity` (no element frozen, every
multiplier 1), which the XLA decision reads, and `wholly_frozen` (masks
stored as a scalar False), which steps of Keras's trainer leave out (see
`_wholly_frozen`): when that set changes, the owner model's train function is
rebuilt (one retrace), and a variable an edit takes out of it gets a fresh
optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from masked_opt import _saving
from masked_opt._state_layout import StateLayout
from masked_opt._owner_model import Owner
from masked_opt._variable_table import Entry, VariableTable
from masked_opt.keys import Key, check_key, match_key
from masked_opt.registry import MASKS, MULTIPLIERS, Quantity, Registry, apply_where


class MaskStore:
    """The masks and multipliers of one optimizer: its registries, resolved into the
    table at build; reads and atomic edits after build."""

    def __init__(self, table: VariableTable, layout: StateLayout, owner: Owner, masks: Registry, multipliers: Registry):
        self.table, self.layout, self.owner = table, layout, owner
        self.registries = {MASKS.argument: masks, MULTIPLIERS.argument: multipliers}

    def registry(self, quantity: Quantity) -> Registry:
        return self.registries[quantity.argument]

    # ------------------------------------------------------------- build

    def build(self, var_list: list, maskable: list, key: Callable) -> None:
        """Resolves every registry against `maskable` (in `var_list`) and adds
        an entry per masked or multiplied variable, in this order: masks,
        then multipliers, each by position (the order of the optimizer's
        variables, which files are saved by)."""
        position = {key(v): i for i, v in enumerate(var_list)}
        identity, frozen = True, set()
        for argument, registry in self.registries.items():
            targets, capacities, unset = _saving.bind_config_specs(registry, maskable, key)
            self.table.from_config[argument] = {
                j: [v for v in maskable if key(v) in set(keys)] for j, keys in targets.items()
            }
            self.table.unset += [p for p in unset if p not in self.table.unset]
            resolved = registry.resolve(maskable, others=self.owner.non_trainable_variables())
            for i, value in sorted(resolved.items()):
                variable = maskable[i]
                entry = self.table.get(variable) or self.table.add(Entry(variable, position[key(variable)]))
                if registry.quantity is MASKS:
                    self.layout.add_mask(entry, value, capacities.get(key(variable)))
                    if entry.mask_shape == () and not np.any(value):
                        frozen.add(key(variable))
                else:
                    self.layout.add_multiplier(entry, value)
                identity = identity and registry.quantity.is_identity(value)
        self.table.identity = identity
        self.table.wholly_frozen = frozenset(frozen)

    # -------------------------------------------------------------- read

    def read(self, quantity: Quantity, entry: Entry) -> np.ndarray | None:
        """The stored value (None where the entry has none of `quantity`)."""
        if quantity is MASKS:
            return None if entry.mask_shape is None else self.layout.read_mask(entry)
        return None if entry.multiplier_shape is None else self.owner.read(entry.multiplier, entry.path)

    def get(self, quantity: Quantity, variable: keras.Variable, built: bool) -> np.ndarray:
        """The value at the variable's full shape (the identity where it has none)."""
        if not built:
            value = self.registry(quantity).resolve([variable], strict=False).get(0)
        else:
            entry = self.table.get(variable)
            value = None if entry is None else self.read(quantity, entry)
        value = np.ones((), quantity.dtype) if value is None else value
        return np.array(np.broadcast_to(value, tuple(variable.shape)), quantity.dtype)

    def refresh_identity(self) -> None:
        """Recomputes the table's flags from the stored values; rebuilds the
        owner model's train function if the wholly frozen variables changed
        (a step Keras's trainer traced gives them a zero gradient)."""
        masks = {id(e): self.read(MASKS, e) for e in self.table.masked()}
        self.table.identity = all(MASKS.is_identity(m) for m in masks.values()) and all(
            MULTIPLIERS.is_identity(self.read(MULTIPLIERS, e)) for e in self.table.multiplied()
        )
        frozen = frozenset(
            self.table.key(e.variable) for e in self.table.masked() if e.mask_shape == () and not np.any(masks[id(e)])
        )
        if frozen != self.table.wholly_frozen:
            self.table.wholly_frozen = frozen
            self.owner.retrace_train_function()

    # -------------------------------------------------------------- edit

    def edit(self, quantity: Quantity, kind: str, key: Key, payload: Any, variables: Sequence[keras.Variable]) -> None:
        """`kind` ("set", "freeze", "unfreeze") of the variables `key` selects."""
        method = quantity.methods[kind]
        check_key(key, argument=method)
        selected = [variables[i] for i in match_key(key, variables, argument=method)]
        commits = [self._plan(quantity, kind, key, payload, v, method) for v in selected]
        for commit in commits:
            commit()
        paths = {v.path for v in selected}
        self.table.unset = [p for p in self.table.unset if p not in paths]
        was = self.table.wholly_frozen
        self.refresh_identity()
        for variable in selected:  # trainable again: a fresh optimizer state, as a new variable gets
            if self.table.key(variable) in was - self.table.wholly_frozen:
                self.layout.fresh_state(self.table.get(variable))

    def _plan(self, quantity: Quantity, kind: str, key: Key, payload: Any, variable, method: str) -> Callable[[], None]:
        entry = self.table.get(variable)
        current = None if entry is None else self.read(quantity, entry)  # syncs JAX's trainer state
        if current is None:
            raise quantity.unallocated(method, key, variable)
        if quantity is MASKS:
            new = MASKS.apply_op(kind, payload, variable, None if kind == "set" else current)
            return self.layout.plan_mask(entry, new, f"{method}('{variable.path}')")
        what = f"{method}('{variable.path}', value)"
        new = MULTIPLIERS.resolve(payload, variable, what=what)
        stored = MULTIPLIERS.to_storage(new, entry.multiplier_shape, variable, what=what)
        return lambda: entry.multiplier.assign(stored)

    def reset_state(self, key: Key, where: Any, variables: Sequence[keras.Variable]) -> None:
        """Fresh inner-optimizer state for the elements `key` and `where` select."""
        check_key(key, argument="reset_state")
        plan = []
        for i in match_key(key, variables, argument="reset_state"):
            variable = variables[i]
            full = np.zeros(tuple(variable.shape), bool)
            apply_where(full, slice(None) if where is None else where, True, path=variable.path,
                        what=f"reset_state('{variable.path}')")
            plan.append((variable, np.flatnonzero(full)))
        for variable, positions in plan:
            self.layout.reset_state(self.table.get(variable), variable, positions)

    def load_unbuilt(self, store: Any) -> None:
        """Arrays saved by an optimizer saved before build, bound to the
        variables its config keys selected."""
        for argument, registry in self.registries.items():
            for j, variables in self.table.from_config.get(argument, {}).items():
                value = _saving.saved_arrays(store, registry, j)
                if value is not None:
                    for variable in variables:
                        self.edit(registry.quantity, "set", variable, value, variables)
