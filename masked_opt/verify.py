"""Checks that frozen weights stay put, bit for bit.

`snapshot_frozen(optimizer)` copies every masked variable that has frozen
elements, with where it is frozen; `verify_frozen(optimizer, snapshot)`
checks those elements (frozen then and now) against the copy and raises
`FrozenWeightsChangedError` naming each variable that moved. The
`VerifyFrozen` callback does both around every epoch of `fit`. They take a
built `MaskedOptimizer`, or a `LossScaleOptimizer` wrapping one, on every
backend (masks are read with `get_mask`, which syncs JAX's trainer state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np

from masked_opt.optimizer import MaskedOptimizer, unwrap

__all__ = ["FrozenSnapshot", "FrozenWeightsChangedError", "VerifyFrozen", "snapshot_frozen", "verify_frozen"]


class FrozenWeightsChangedError(AssertionError):
    """Frozen elements differ from their values at the snapshot."""


@dataclass(frozen=True)
class FrozenSnapshot:
    """Per masked variable path: where it was frozen, and its values, at snapshot time."""

    frozen: Mapping[str, np.ndarray]  # bool, full shape, True = frozen
    values: Mapping[str, np.ndarray]


def _by_path(optimizer: MaskedOptimizer, *, caller: str) -> dict[str, keras.Variable]:
    out: dict[str, keras.Variable] = {}
    for v in optimizer.masked_variables:
        if v.path in out:
            raise ValueError(
                f"`{caller}`: two masked variables share the path '{v.path}', so a "
                "snapshot keyed by path cannot tell them apart. Give the layers "
                "distinct names."
            )
        out[v.path] = v
    return out


def snapshot_frozen(optimizer: keras.optimizers.Optimizer) -> FrozenSnapshot:
    """Copies the values of every masked variable that has frozen elements,
    with where it is frozen, for a later `verify_frozen`."""
    opt = unwrap(optimizer, caller="snapshot_frozen")
    frozen, values = {}, {}
    for path, variable in _by_path(opt, caller="snapshot_frozen").items():
        f = ~opt.get_mask(variable)
        if f.any():
            frozen[path] = f
            values[path] = np.array(variable.numpy(), copy=True)
    return FrozenSnapshot(frozen=frozen, values=values)


def _bits(a: np.ndarray) -> np.ndarray:
    # Compare bit patterns, so a frozen NaN equals itself and -0.0 != 0.0.
    if a.dtype.itemsize in (1, 2, 4, 8):
        return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def verify_frozen(optimizer: keras.optimizers.Optimizer, reference: FrozenSnapshot) -> int:
    """Checks that elements frozen at `reference` and frozen now still hold
    their values from `reference`, bit for bit. Returns how many were checked.

    Raises `FrozenWeightsChangedError` (an `AssertionError`) naming each
    variable path with changed elements, their count, and the first change.
    """
    opt = unwrap(optimizer, caller="verify_frozen")
    if not isinstance(reference, FrozenSnapshot):
        raise TypeError(
            "`verify_frozen`: `reference` must be a FrozenSnapshot from "
            f"`snapshot_frozen(optimizer)`. Received: {type(reference).__name__}."
        )
    variables = _by_path(opt, caller="verify_frozen")
    problems, checked = [], 0
    for path, was_frozen in reference.frozen.items():
        variable = variables.get(path)
        if variable is None:
            raise ValueError(
                f"`verify_frozen`: the snapshot has variable '{path}', which "
                f"optimizer '{opt.name}' does not mask. Take the snapshot from "
                "the same optimizer."
            )
        check = was_frozen & ~opt.get_mask(variable)
        old, new = reference.values[path], np.asarray(variable.numpy())
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ValueError(
                f"`verify_frozen`: variable '{path}' is {new.dtype}{new.shape} now "
                f"but was {old.dtype}{old.shape} in the snapshot."
            )
        changed = check & (_bits(old) != _bits(new))
        checked += int(np.count_nonzero(check))
        n = int(np.count_nonzero(changed))
        if n:
            first = tuple(int(i) for i in np.argwhere(changed)[0])
            problems.append(
                f"'{path}': {n:,} of {int(np.count_nonzero(check)):,} frozen "
                f"elements changed (first at index {first}: {old[first]!r} -> {new[first]!r})"
            )
    if problems:
        raise FrozenWeightsChangedError(
            "Frozen weights changed since the snapshot: "
            + "; ".join(problems)
            + ". Something outside the MaskedOptimizer step wrote to them "
            "(a callback, a constraint applied by hand, another optimizer, or "
            "`variable.assign`)."
        )
    return checked


class VerifyFrozen(keras.callbacks.Callback):
    """Checks during `fit` that frozen elements never move.

    Snapshots at train begin and, at each epoch end (and at train end),
    verifies then re-snapshots. An element is checked when it was frozen at
    the last snapshot and is frozen at the check, so mask changes are allowed
    between snapshots: a newly frozen element is checked from the next epoch
    on, and an element unfrozen in between is not checked. (An element frozen,
    unfrozen, trained and frozen again within one epoch would be reported.)

    Checks run at epoch boundaries only, where JAX's trainer has synced its
    state into the variables anyway: no extra work per batch on any backend.

    Args:
        optimizer: the MaskedOptimizer to check (default: the model's
            optimizer, unwrapping a LossScaleOptimizer). If it is not built at
            train begin, it is built on `model.trainable_variables`.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer | None = None):
        super().__init__()
        if optimizer is not None:
            unwrap(optimizer, caller="VerifyFrozen", require_built=False)
        self._optimizer = optimizer
        self._snapshot: FrozenSnapshot | None = None
        self.checked = 0  # elements checked over all verifications

    def _target(self) -> MaskedOptimizer:
        model = self.model  # on JAX, syncs the trainer's state into the variables
        opt = self._optimizer if self._optimizer is not None else model.optimizer
        masked = unwrap(opt, caller="VerifyFrozen", require_built=False)
        if not masked.built:
            top = model.optimizer
            if top is not opt and getattr(top, "inner_optimizer", None) is not masked:
                top = opt
            top.build(model.trainable_variables)
        return masked

    def _verify(self) -> None:
        if self._snapshot is not None:
            opt = self._target()
            self.checked += verify_frozen(opt, self._snapshot)
            self._snapshot = snapshot_frozen(opt)

    def on_train_begin(self, logs=None):
        self._snapshot = snapshot_frozen(self._target())

    def on_epoch_end(self, epoch, logs=None):
        self._verify()

    def on_train_end(self, logs=None):
        self._verify()
        self._snapshot = None
