"""The variable table (`VariableTable`): an entry per masked or multiplied variable.

The host-side table: one place that knows, for each model variable the
optimizer masks or multiplies, its mask and multiplier variables, their
storage shapes and its compact-state indices.

It is a plain Python object, so neither Keras's nor TensorFlow's attribute
tracking treats it as optimizer state: the arrays it points at live in the
optimizer's own variables (saved by position, see `_saving`); the table only
says which is which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from masked_opt._info import VariableInfo


@dataclass(eq=False)
class CompactState:
    """The compact state of one masked variable (`compact_state=True`)."""

    proxy: keras.Variable  # (capacity,) the trainable elements, what the inner optimizer updates
    indices: keras.Variable  # int32 (capacity,) flat positions; `count` of them valid
    count: keras.Variable  # int32 scalar
    capacity: int


@dataclass(eq=False)
class Entry:
    """Everything the optimizer keeps for one masked or multiplied variable."""

    variable: keras.Variable
    position: int  # among the variables the optimizer is built on
    mask_shape: tuple[int, ...] | None = None  # storage shape; None: no mask
    mask: keras.Variable | None = None  # bool, dense state only
    bits: keras.Variable | None = None  # the mask bit-packed for compiled steps (derived, not saved)
    compact: CompactState | None = None  # compact state only
    ema: keras.Variable | None = None  # the inner optimizer's EMA of the variable (dense state)
    multiplier_shape: tuple[int, ...] | None = None  # storage shape; None: no multiplier
    multiplier: keras.Variable | None = None  # float32
    side: Any = None  # `_side_path.Side`: trained through its layer's side term (`side_path=True`)

    @property
    def path(self) -> str:
        return self.variable.path

    @property
    def size(self) -> int:
        return int(np.prod(self.variable.shape, dtype=np.int64))


class VariableTable:
    """Entries by variable, in build order; `identity` says whether every mask
    is all True and every multiplier 1 (the bare optimizer's update);
    `wholly_frozen` holds the keys of the variables whose mask is stored as a
    scalar False (see `_wholly_frozen`)."""

    def __init__(self, key: Callable[[Any], Any]):
        self._key = key
        self._entries: dict[Any, Entry] = {}
        self.identity = True
        self.wholly_frozen: frozenset = frozenset()
        self.handed_out: dict = {}  # key -> path: what `trained_variables` left out
        self.unset: list[str] = []  # masks from a config awaiting their saved values
        # Entries rebuilt from a config: {argument: {config entry: [variables]}}.
        self.from_config: dict[str, dict[int, list]] = {}

    def key(self, variable: Any) -> Any:
        return self._key(variable)

    def add(self, entry: Entry) -> Entry:
        self._entries[self._key(entry.variable)] = entry
        return entry

    def get(self, variable: Any) -> Entry | None:
        return self._entries.get(self._key(variable))

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.position))

    def __len__(self) -> int:
        return len(self._entries)

    def handled(self, grads: list, variables: list, bare_at_identity: Callable[[Any], bool]) -> list[tuple[int, Entry]]:
        """(position, entry) of each variable with a gradient that has an entry;
        none when nothing is frozen or scaled and `bare_at_identity(a
        gradient)` says the update is then the bare one (the layout's bare
        update, in a step that runs eagerly: a trace would bake the host-side
        `identity` flag in)."""
        if self.identity:
            first = next((g for g in grads if g is not None), None)
            if first is not None and bare_at_identity(first):
                return []
        out = []
        for i, (grad, variable) in enumerate(zip(grads, variables)):
            entry = None if grad is None else self.get(variable)
            if entry is not None:
                out.append((i, entry))
        return out

    def wholly_frozen_at(self, grads: list, variables: list) -> list[int]:
        """Positions of the gradients of wholly frozen variables."""
        if not self.wholly_frozen:
            return []
        return [i for i, (g, v) in enumerate(zip(grads, variables))
                if g is not None and self._key(v) in self.wholly_frozen]

    def check_loaded(self) -> None:
        """Refuses to train while masks rebuilt from a config await their values."""
        if self.unset:
            more = " ..." if len(self.unset) > 5 else ""
            raise ValueError(
                f"The masks of variables {self.unset[:5]}{more} "
                "were rebuilt from a config without their values, which live in the "
                "saved weights. Load them (`keras.models.load_model` or "
                "`model.load_weights`), or give them with `set_mask`, before training."
            )

    def masked(self) -> list[Entry]:
        return [e for e in self if e.mask_shape is not None]

    def multiplied(self) -> list[Entry]:
        return [e for e in self if e.multiplier_shape is not None]

    def info(self) -> tuple[VariableInfo, ...]:
        return tuple(
            VariableInfo(
                path=e.path,
                shape=tuple(e.variable.shape),
                mask_shape=e.mask_shape,
                multiplier_shape=e.multiplier_shape,
                compact_capacity=None if e.compact is None else e.compact.capacity,
                packed_mask=e.bits is not None,
            )
            for e in self
        )
