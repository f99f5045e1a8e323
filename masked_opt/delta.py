"""Sparse deltas: a fine-tune shipped as the elements it changed.

A `SparseDelta` holds, for each variable a fine-tune changed, the sorted flat
positions of the changed elements and their differences from the base model
(``tuned - base`` in the variable's dtype); a variable that changed almost
everywhere (a bias, a LayerNorm scale, BatchNorm statistics) is stored dense.

    delta = SparseDelta.from_models(base_model, tuned_model)
    delta.save("task.delta.npz")           # bytes ∝ changed elements
    ...                                    # elsewhere, any backend:
    SparseDelta.load("task.delta.npz").apply(base_model)
    delta.revert(base_model)               # bit-identical to the base again

Exactness: `apply(model)` (scale 1) writes the tuned values bit for bit and
`revert(model)` the base values bit for bit. Where ``base + diff`` (or
``tuned - diff``) does not round-trip in floating point, the delta stores
the exact value as a *fix-up* (rare: float32 differences of nearby values are
exact). Each touched base variable has a SHA-256 fingerprint; applying to a
model whose variable differs raises. Composition (`a + b`, LT-SFT's language
+ task) sums differences; `a + b` refuses overlapping elements, and
`SparseDelta.compose([a, b], overlap="sum")` adds them.

The file (`save`) is a pickle-free ``.npz`` of stored members (format in
`masked_opt/_delta_file.py`): per changed element the dtype's size plus its
position (about 1.3 bytes at 1 % density), plus about 0.4 KB of header per
variable. Each variable's entry carries its counts, a CRC-32 of its bytes and
the SHA-256 of the tuned values: `load` checks every size before reading
(memory stays within the file's size) and raises `DeltaFileError` on any
damage; `apply` checks the result against the tuned SHA-256 before it writes
anything.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import keras
import ml_dtypes
import numpy as np

from masked_opt import _delta_file, _side_path
from masked_opt._delta_file import DeltaFileError, Part, bits, fingerprint

__all__ = ["BaseRecord", "DeltaFileError", "SparseDelta"]

_AUTO_NUMBER = re.compile(r"_\d+(?=/|$)")


# ------------------------------------------------------------------ arrays


def _dtype(variable: keras.Variable) -> np.dtype:
    name = keras.backend.standardize_dtype(variable.dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _read(variable: keras.Variable) -> np.ndarray:
    """The variable's values as a flat NumPy copy in its own dtype."""
    return np.array(keras.ops.convert_to_numpy(variable.value)).astype(_dtype(variable)).reshape(-1)


def _write(variable: keras.Variable, flat: np.ndarray) -> None:
    values = flat.reshape(tuple(variable.shape))
    if values.dtype == ml_dtypes.bfloat16:  # not every backend takes NumPy bfloat16; float32 holds it exactly
        values = values.astype(np.float32)
    variable.assign(values)


# ----------------------------------------------------------------- parts


def _fixes(computed: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    at = np.flatnonzero(bits(computed) != bits(wanted))
    return at, wanted[at].copy()


def _part(path: str, shape: tuple, base: np.ndarray, tuned: np.ndarray, changed: np.ndarray, **where: int) -> Part:
    itemsize = base.dtype.itemsize
    dense = changed.size * (itemsize + 2) >= base.size * itemsize
    index = slice(None) if dense else changed
    b, t = base[index], tuned[index]
    with np.errstate(all="ignore"):
        diff = t - b
        apply_at, apply_fix = _fixes(b + diff, t)
        revert_at, revert_fix = _fixes(t - diff, b)
    return Part(
        path, tuple(shape), base.dtype, fingerprint(base), None if dense else changed.astype(np.int64), diff,
        apply_at, apply_fix, revert_at, revert_fix, tuned_sha256=fingerprint(tuned), **where,
    )


def _is_float(variable: keras.Variable) -> bool:
    return _dtype(variable).kind == "f" or _dtype(variable) == ml_dtypes.bfloat16


def _weights(model: Any, argument: str) -> list[keras.Variable]:
    if isinstance(model, keras.layers.Layer):
        if not model.built:
            raise ValueError(f"`{argument}` is not built yet: build it (call it on data) before building a delta.")
        return _side_path.without_held(list(model.weights))  # a side path's proxies are the optimizer's
    if isinstance(model, (list, tuple)) and all(isinstance(v, keras.Variable) for v in model):
        return list(model)
    raise TypeError(f"`{argument}` must be a Keras model or layer (or a list of variables). Received: {type(model).__name__}.")


# ------------------------------------------------------------- path lookup


def _normalized(path: str) -> str:
    return _AUTO_NUMBER.sub("", path)


def _find(part: Part, weights: list[keras.Variable]) -> keras.Variable:
    """The model variable `part` belongs to: the same path (up to a scope
    prefix), else the same position among as many weights with the same
    path up to Keras's auto-numbering ("dense_3/kernel" for "dense_1/kernel")."""
    exact = [v for v in weights if v.path == part.path or v.path.endswith("/" + part.path) or part.path.endswith("/" + v.path)]
    if len(exact) == 1:
        return exact[0]
    if len(weights) == part.num_weights and 0 <= part.position < len(weights):
        candidate = weights[part.position]
        if _normalized(candidate.path) == _normalized(part.path):
            return candidate
    close = [v.path for v in weights if _normalized(v.path) == _normalized(part.path)][:4]
    hint = f" Variables with a similar path: {close}." if close else ""
    raise ValueError(
        f"The delta changes variable {part.path!r} (shape {part.shape}), which the model does not have"
        f"{' unambiguously' if exact else ''}.{hint} Apply a delta to the architecture it was made on."
    )


def _check_shape(part: Part, variable: keras.Variable, action: str) -> None:
    if tuple(variable.shape) != part.shape or _dtype(variable) != part.dtype:
        raise ValueError(
            f"Cannot {action} the delta: variable {variable.path!r} has shape {tuple(variable.shape)} and dtype "
            f"{_dtype(variable)}, the delta's {part.path!r} has shape {part.shape} and dtype {part.dtype}: "
            "apply a delta to the architecture it was made on."
        )


def _write_all(plan: list[tuple[keras.Variable, np.ndarray, np.ndarray]]) -> None:
    """Writes each (variable, new values); if a write fails, writes the
    old values back into those already written and re-raises."""
    done = []
    try:
        for variable, values, old in plan:
            _write(variable, values)
            done.append((variable, old))
    except BaseException:
        for variable, old in done:
            _write(variable, old)
        raise


# ------------------------------------------------------------------- delta


class SparseDelta:
    """The elements a fine-tune changed, as differences from its base model.

    Build with `SparseDelta.from_models(base, tuned)` or from a `BaseRecord`
    (`BaseRecord(model, optimizer)` before training, `.delta(model)` after);
    ship with `save` / `SparseDelta.load`; use with `apply` / `revert`.
    A damaged or foreign file raises `DeltaFileError` (a `ValueError`) on
    `load`; `apply` never writes a value the file did not promise.
    """

    def __init__(self, parts: Iterable[Part] = ()):
        self._parts: dict[str, Part] = {}
        for part in parts:
            if part.path in self._parts:
                raise ValueError(f"Two entries for variable {part.path!r} in one delta.")
            self._parts[part.path] = part
        self._undo: dict[int, tuple[weakref.ref, np.ndarray, str]] = {}

    # ----------------------------------------------------------- building

    @classmethod
    def from_models(cls, base: Any, tuned: Any, *, trainable_only: bool = False) -> SparseDelta:
        """The elements whose bits differ between two models of one
        architecture, variables paired in `model.weights` order (paths and
        fingerprints from `base`). Non-float variables (seed-generator
        state) are left out; `trainable_only=True` also leaves out
        non-trainable ones (BatchNorm statistics)."""
        bases, tuneds = _weights(base, "base"), _weights(tuned, "tuned")
        if len(bases) != len(tuneds):
            raise ValueError(
                f"`base` has {len(bases)} weights and `tuned` {len(tuneds)}: a delta pairs the weights of two "
                "models of the same architecture."
            )
        parts = []
        for i, (b, t) in enumerate(zip(bases, tuneds)):
            if tuple(b.shape) != tuple(t.shape) or _dtype(b) != _dtype(t):
                raise ValueError(
                    f"Weight {i} differs: base {b.path!r} {tuple(b.shape)} {_dtype(b)} vs tuned {t.path!r} "
                    f"{tuple(t.shape)} {_dtype(t)}. A delta pairs the weights of two models of the same architecture."
                )
            if not _is_float(b) or (trainable_only and not b.trainable):
                continue
            bv, tv = _read(b), _read(t)
            changed = np.flatnonzero(bits(bv) != bits(tv))
            if changed.size:
                parts.append(_part(b.path, tuple(b.shape), bv, tv, changed, position=i, num_weights=len(bases)))
        return cls(parts)

    # ----------------------------------------------------------- queries

    @property
    def paths(self) -> list[str]:
        """The changed variables' paths."""
        return list(self._parts)

    @property
    def num_changed(self) -> int:
        """How many elements the delta changes."""
        return sum(p.count for p in self._parts.values())

    def positions(self, path: str) -> np.ndarray:
        """The sorted flat positions the delta changes in variable `path`."""
        return self._part(path).flat_positions().copy()

    def differences(self, path: str) -> np.ndarray:
        """``tuned - base`` at `positions(path)`, in the variable's dtype."""
        return self._part(path).diff.copy()

    def _part(self, path: str) -> Part:
        if path not in self._parts:
            raise KeyError(f"The delta does not change {path!r}; it changes {self.paths}.")
        return self._parts[path]

    def __len__(self) -> int:
        return len(self._parts)

    def __repr__(self) -> str:
        dense = sum(p.positions is None for p in self._parts.values())
        return f"<SparseDelta: {self.num_changed:,} elements in {len(self)} variables ({dense} dense)>"

    # ------------------------------------------------------ apply/revert

    def apply(self, model: Any, scale: float = 1.0) -> None:
        """Adds ``scale`` times the delta to `model`'s variables.

        Checks first that every variable the delta changes exists with the
        delta's shape and dtype, then that each is the base the delta was
        made on (its SHA-256). At ``scale=1.0`` the result is the tuned model
        bit for bit, and it is checked against the tuned SHA-256 the delta
        carries before anything is written: a delta that would give other
        values raises and leaves the model as it was."""
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"`scale` must be finite. Received: scale={scale}.")
        plan = []
        for part, variable, current in self._matched(model, "apply"):
            if fingerprint(current) != part.base_sha256:
                raise ValueError(
                    f"Variable {variable.path!r} is not the base this delta was made on (its SHA-256 differs): "
                    "apply a delta to the model it was fine-tuned from, and only once (revert first to re-apply)."
                )
            before = current[part.index()].copy()
            with np.errstate(all="ignore"):
                if scale == 1.0:
                    after = before + part.diff
                    after[part.apply_fix_at] = part.apply_fix
                else:
                    wide = np.float64 if part.dtype == np.float64 else np.float32
                    after = (before.astype(wide) + scale * part.diff.astype(wide)).astype(part.dtype)
            tuned = current.copy()
            tuned[part.index()] = after
            if scale == 1.0 and part.tuned_sha256 is not None and fingerprint(tuned) != part.tuned_sha256:
                raise ValueError(
                    f"Applying the delta to {variable.path!r} does not give the tuned values it was made from "
                    "(their SHA-256 differs): the delta is damaged. Nothing was written."
                )
            plan.append((part, variable, current, before, tuned))
        _write_all([(variable, tuned, current) for _, variable, current, _, tuned in plan])
        for part, variable, _, before, tuned in plan:
            self._undo[id(variable)] = (weakref.ref(variable), before, fingerprint(tuned))

    def revert(self, model: Any) -> None:
        """Undoes `apply`: bit-identical to the base. After an `apply` in
        this process it restores the saved values; otherwise (a tuned model
        loaded elsewhere) it subtracts the delta, using the fix-ups, and
        checks the result against the base fingerprints."""
        plan = []
        for part, variable, current in self._matched(model, "revert"):
            original = current.copy()
            undo = self._undo.get(id(variable))
            if undo is not None and undo[0]() is variable and undo[2] == fingerprint(current):
                current[part.index()] = undo[1]
            else:
                with np.errstate(all="ignore"):
                    values = current[part.index()] - part.diff
                values[part.revert_fix_at] = part.revert_fix
                current[part.index()] = values
            if fingerprint(current) != part.base_sha256:
                raise ValueError(
                    f"Variable {variable.path!r} is not this delta applied to its base (reverting does not give "
                    "the base's SHA-256): revert the delta that was applied, with the scale it was applied at."
                )
            plan.append((variable, current, original))
        _write_all(plan)
        for variable, _, _ in plan:
            self._undo.pop(id(variable), None)

    def _matched(self, model: Any, action: str) -> list[tuple[Part, keras.Variable, np.ndarray]]:
        """Each part with its model variable and current values, every
        variable's presence, shape and dtype checked before any value is."""
        weights = _weights(model, "model")
        matched = [(part, _find(part, weights)) for part in self._parts.values()]
        for part, variable in matched:
            _check_shape(part, variable, action)
        return [(part, variable, _read(variable)) for part, variable in matched]

    # -------------------------------------------------------- composition

    def __add__(self, other: SparseDelta) -> SparseDelta:
        return SparseDelta.compose([self, other], overlap="error")

    @staticmethod
    def compose(deltas: Sequence[SparseDelta], overlap: str = "error") -> SparseDelta:
        """One delta that applies all `deltas` to their common base.

        Where two change the same element, ``overlap="error"`` (what `a + b`
        does) raises, ``overlap="sum"`` adds their differences (LT-SFT's
        rule for a language and a task fine-tune); fix-ups are kept only
        where one delta changes an element, so a summed element is
        ``base + (d_a + d_b)`` in floating point."""
        if overlap not in ("error", "sum"):
            raise ValueError(f"`overlap` must be 'error' or 'sum'. Received: overlap={overlap!r}.")
        deltas = list(deltas)
        for d in deltas:
            if not isinstance(d, SparseDelta):
                raise TypeError(f"`compose` takes SparseDelta objects. Received: {type(d).__name__}.")
        by_variable: dict[Any, list[Part]] = {}
        for d in deltas:  # one variable: the same path up to Keras's auto-numbering, at the same position
            for part in d._parts.values():
                key = (_normalized(part.path), part.position, part.num_weights) if part.position >= 0 else part.path
                by_variable.setdefault(key, []).append(part)
        return SparseDelta(_merge(parts, overlap) for parts in by_variable.values())

    # ---------------------------------------------------------- save/load

    def save(self, path: str | os.PathLike) -> None:
        """Writes the delta as a ``.npz`` (format: `masked_opt._delta_file`)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(f"A delta file's name must end in '.npz'. Received: {path!r}.")
        _delta_file.write(list(self._parts.values()), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """Reads a delta written by `save` (no pickle)."""
        return cls(_delta_file.read(os.fspath(path)))


def _merge(parts: list[Part], overlap: str) -> Part:
    first = parts[0]
    for other in parts[1:]:
        if other.base_sha256 != first.base_sha256 or other.shape != first.shape or other.dtype != first.dtype:
            raise ValueError(
                f"Deltas for {first.path!r} were made on different base variables (SHA-256, shape or dtype "
                "differ): compose deltas fine-tuned from the same base model."
            )
    if len(parts) == 1:
        return replace(first)
    flat = [p.flat_positions() for p in parts]
    union, counts = np.unique(np.concatenate(flat), return_counts=True)
    shared = union[counts > 1]
    if shared.size and overlap == "error":
        raise ValueError(
            f"The deltas both change {shared.size:,} elements of {first.path!r} (first at flat position "
            f"{int(shared[0])}). Use `SparseDelta.compose([a, b], overlap='sum')` to add their differences "
            "there (LT-SFT's rule), or make the deltas disjoint."
        )
    diff = np.zeros(union.size, first.dtype)
    fixes = {"apply_fix": ([], []), "revert_fix": ([], [])}
    for part, positions in zip(parts, flat):
        at = np.searchsorted(union, positions)
        with np.errstate(all="ignore"):
            diff[at] = diff[at] + part.diff
        for name, (where, values) in fixes.items():
            fix_at = getattr(part, f"{name}_at")
            keep = ~np.isin(positions[fix_at], shared)
            where.append(at[fix_at[keep]])
            values.append(getattr(part, name)[keep])
    dense = union.size == first.size
    merged = {name: (np.concatenate(w).astype(np.int64), np.concatenate(v).astype(first.dtype)) for name, (w, v) in fixes.items()}
    return Part(
        first.path, first.shape, first.dtype, first.base_sha256, None if dense else union, diff,
        merged["apply_fix"][0], merged["apply_fix"][1], merged["revert_fix"][0], merged["revert_fix"][1],
        position=first.position, num_weights=first.num_weights,
    )


# ------------------------------------------------------------ base record


class BaseRecord:
    """The base values of the elements an optimizer may train, recorded
    before training (memory ∝ trainable elements, not a second model):

        record = BaseRecord(model, optimizer)   # after optimizer.build(...)
        model.fit(...)
        delta = record.delta(model)

    Variables the optimizer masks record their trainable elements; wholly
    trainable ones and non-trainable float weights (BatchNorm statistics)
    are recorded whole; wholly frozen ones only by fingerprint. `delta`
    raises if a mask let elements train that were not recorded (a mask
    grown after the record: record again, or use `SparseDelta.from_models`)."""

    def __init__(self, model: Any, optimizer: Any):
        from masked_opt.optimizer import MaskedOptimizer

        if not isinstance(optimizer, MaskedOptimizer) or not optimizer.built:
            raise ValueError(
                "`BaseRecord` needs a built MaskedOptimizer (call `optimizer.build(model.trainable_variables)` "
                f"or compile and run a step first). Received: {type(optimizer).__name__}"
                f"{' (not built)' if isinstance(optimizer, MaskedOptimizer) else ''}."
            )
        self._optimizer = optimizer
        weights = _weights(model, "model")
        built = {id(v) for v in optimizer.built_variables}
        self._records = []
        for i, variable in enumerate(weights):
            if not _is_float(variable):
                continue
            values = _read(variable)
            if id(variable) in built:
                positions = np.flatnonzero(optimizer.get_mask(variable).reshape(-1))
            elif variable.trainable:
                positions = np.zeros(0, np.int64)  # the optimizer does not touch it
            else:
                positions = np.arange(values.size)
            self._records.append((i, variable.path, fingerprint(values), positions, values[positions].copy()))
        self._num_weights = len(weights)

    def delta(self, model: Any) -> SparseDelta:
        """The delta from the recorded base to `model`'s current values."""
        weights = _weights(model, "model")
        if len(weights) != self._num_weights:
            raise ValueError(f"The model has {len(weights)} weights, the record {self._num_weights}: the same model, please.")
        built = {id(v) for v in self._optimizer.built_variables}
        parts = []
        for i, path, sha, positions, base in self._records:
            variable = weights[i]
            tuned = _read(variable)
            if id(variable) in built:
                now = np.flatnonzero(self._optimizer.get_mask(variable).reshape(-1))
                missing = np.setdiff1d(now, positions, assume_unique=True)
                if missing.size:
                    raise ValueError(
                        f"{missing.size:,} elements of {path!r} are trainable now but were frozen when the base was "
                        "recorded, so their base values are unknown: record after the last mask change that "
                        "unfreezes elements, or build the delta with `SparseDelta.from_models(base, tuned)`."
                    )
            changed_at = np.flatnonzero(bits(tuned[positions]) != bits(base))
            if changed_at.size == 0:
                continue
            full_base = tuned.copy()
            full_base[positions] = base
            if fingerprint(full_base) != sha:
                raise ValueError(
                    f"Elements of {path!r} outside the recorded trainable ones changed since the record: frozen "
                    "elements must not move; was the variable written outside the optimizer?"
                )
            changed = positions[changed_at]
            parts.append(_part(path, tuple(variable.shape), full_base, tuned, changed, position=i, num_weights=len(weights)))
        return SparseDelta(parts)
