"""Per-element quantities given per variable: masks and update multipliers.

A *quantity* assigns each element of a trainable variable a value that the
optimizer stores in its own variables: a mask (bool, True = trainable) or
an update multiplier (float >= 0). Both are given the same way -- a dict from
keys (`masks.keys`) to values, a value being a scalar, an array-like
broadcastable to the variable, or a callable `variable -> value` -- and both
are validated, resolved against the variables and fitted to their storage
shape here. A third such quantity is a new small `Quantity` subclass.

Everything here is plain NumPy and runs on the host, never inside a traced
train step. The *storage shape* of a variable's value is fixed when the
optimizer is built: the shape the user gave (a `(1, units)` column mask stays
`(1, units)`, a scalar stays a scalar).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import keras
import numpy as np

from masked_opt.keys import Key, check_key, describe_key, keyed_items, select_variables

__all__ = ["MaskValue", "MultiplierValue", "Where"]

MaskValue = Union[bool, int, np.ndarray, Sequence, Any, Callable[[keras.Variable], Any]]
"""A bool scalar, an array-like of bools (or 0/1 integers) broadcastable to the
variable, or a callable `variable -> array-like` resolved at build."""

MultiplierValue = Union[float, int, np.ndarray, Sequence, Any, Callable[[keras.Variable], Any]]
"""A float >= 0, an array-like of floats >= 0 broadcastable to the variable, or
a callable `variable -> value` resolved at build."""

Where = Union[None, int, slice, tuple, np.ndarray, Sequence]
"""`None` (whole variable), a NumPy index expression such as `np.s_[:, :10]`,
an integer index array (first axis), or a bool array of positions."""


def _as_array(value: Any, *, what: str) -> np.ndarray:
    if isinstance(value, keras.Variable):
        value = value.numpy()
    try:
        return np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value)
    except Exception as e:  # e.g. ragged nested lists
        raise TypeError(
            f"`{what}` could not be converted to a NumPy array ({e}). "
            f"Received: {type(value).__name__}."
        ) from None


def _first_bad(arr: np.ndarray, bad: np.ndarray) -> tuple[Any, str]:
    """(the first offending value, " at index (i, j)" or "")."""
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    return (arr[pos] if arr.ndim else arr.item()), (f" at index {pos}" if arr.ndim else "")


class Quantity:
    """One kind of per-element value: its argument, dtype, validation and ops."""

    noun: ClassVar[str]  # "mask"
    argument: ClassVar[str]  # the MaskedOptimizer argument: "masks"
    dtype: ClassVar[type]  # the stored dtype
    setter: ClassVar[str]  # the method that sets it after build: "set_mask"
    methods: ClassVar[dict[str, str]]  # op kind -> the method that records it
    two_keys_fix: ClassVar[str]  # how to fix a variable that two keys select
    register_example: ClassVar[str]  # a value that registers a variable at build

    def validate(self, value: Any, *, what: str) -> np.ndarray:
        """`value` as an array of `dtype` (shape kept), or a clear error."""
        raise NotImplementedError

    def is_identity(self, value: np.ndarray) -> bool:
        """Whether `value` leaves training as the inner optimizer alone would."""
        raise NotImplementedError

    def resolve(self, value: Any, variable: keras.Variable, *, what: str) -> np.ndarray:
        """A value (a callable is called on `variable`), validated and checked to
        broadcast to the variable."""
        if callable(value) and not isinstance(value, np.ndarray):
            try:
                value = value(variable)
            except Exception as e:
                if isinstance(e, (ValueError, TypeError)) and variable.path in str(e):
                    raise  # already a clear error about this variable (a builder's)
                raise ValueError(
                    f"`{what}`: the {self.noun} callable raised {type(e).__name__}: {e} "
                    f"when called on variable '{variable.path}' of shape "
                    f"{tuple(variable.shape)}."
                ) from e
        arr = self.validate(value, what=what)
        check_broadcast(arr, variable, what=what, noun=self.noun)
        return arr

    def checked_payload(self, kind: str, key: Key, payload: Any) -> Any:
        """An op's payload, validated where it can be before build."""
        if kind == "set" and not callable(payload):
            return self.validate(payload, what=f"{self.setter}({describe_key(key)}, {self.noun})")
        return payload

    def apply_op(self, kind: str, payload: Any, variable: keras.Variable, current: np.ndarray | None) -> np.ndarray:
        """The value after a `set` op (kept at `current`'s storage shape where
        it broadcasts to it)."""
        new = self.resolve(payload, variable, what=f"{self.setter}('{variable.path}', {self.noun})")
        if current is not None and np.broadcast_shapes(new.shape, current.shape) == current.shape:
            return np.array(np.broadcast_to(new, current.shape))
        return new

    def unallocated(self, method: str, key: Key, variable: keras.Variable) -> ValueError:
        """The error for an edit after build of a variable that has no value."""
        path = variable.path
        example = f"`{self.argument}={{'{path}': {self.register_example}}}`"
        return ValueError(
            f"`{method}({describe_key(key)})`: variable '{path}' has no {self.noun}, "
            f"and {self.argument} are allocated when the optimizer is built. Register "
            f"it before build, e.g. {example} (or an array of "
            + (f"its shape {tuple(variable.shape)}" if self is MASKS else "the shape you will need, for rows or elements")
            + " to change single elements later)."
        )

    def to_storage(self, new: np.ndarray, storage_shape: tuple[int, ...], variable: keras.Variable, *, what: str) -> np.ndarray:
        """`new` at the storage shape fixed at build (or a clear error)."""
        if np.broadcast_shapes(new.shape, storage_shape) == tuple(storage_shape):
            return np.array(np.broadcast_to(new, storage_shape), dtype=self.dtype)
        full = np.broadcast_to(new, tuple(variable.shape))
        return fit_to_storage(full, storage_shape, path=variable.path, what=what, quantity=self)


class Masks(Quantity):
    noun = "mask"
    argument = "masks"
    dtype = np.bool_
    setter = "set_mask"
    methods = {"set": "set_mask", "freeze": "freeze", "unfreeze": "unfreeze"}
    two_keys_fix = "combine the two masks into one."
    register_example = "True"

    def validate(self, value: Any, *, what: str) -> np.ndarray:
        """Bools, bool arrays, and 0/1 integers or floats."""
        if value is None or isinstance(value, (str, bytes, dict, set)):
            raise TypeError(
                f"`{what}` must be a bool, a bool array-like broadcastable to the "
                "variable (True = trainable), or a callable `variable -> array`. "
                f"Received: {value!r} of type {type(value).__name__}."
            )
        arr = _as_array(value, what=what)
        if arr.dtype == np.bool_:
            return arr
        if arr.dtype.kind in "iuf":
            bad = ~((arr == 0) | (arr == 1))
            if np.any(bad):
                bad_value, at = _first_bad(arr, bad)
                raise ValueError(
                    f"`{what}` must hold booleans (True = trainable) or 0/1 values; "
                    f"found {bad_value!r}{at}. Threshold it first, e.g. "
                    "`mask = scores > threshold`."
                )
            return arr.astype(np.bool_)
        raise TypeError(
            f"`{what}` must have a boolean (or 0/1 integer) dtype. "
            f"Received: array of dtype {arr.dtype}."
        )

    def is_identity(self, value: np.ndarray) -> bool:
        return bool(np.all(value))

    def apply_op(self, kind, payload, variable, current):
        """`set`, or `freeze`/`unfreeze` of the whole variable or at `where`."""
        if kind == "set":
            return super().apply_op(kind, payload, variable, current)
        value = kind == "unfreeze"
        if payload is None:
            return np.full(() if current is None else current.shape, value)
        shape = tuple(variable.shape)
        full = np.array(np.broadcast_to(np.ones(shape, bool) if current is None else current, shape))
        apply_where(full, payload, value, path=variable.path, what=f"{kind}('{variable.path}', where)")
        return full


class Multipliers(Quantity):
    noun = "multiplier"
    argument = "multipliers"
    dtype = np.float32
    setter = "set_multiplier"
    methods = {"set": "set_multiplier"}
    two_keys_fix = "give one multiplier per variable."
    register_example = "1.0"

    def validate(self, value: Any, *, what: str) -> np.ndarray:
        """Finite floats >= 0 (integers accepted), as float32."""
        if value is None or isinstance(value, (str, bytes, dict, set, bool, np.bool_)):
            hint = (
                " To freeze or unfreeze, use `masks=` / `freeze()` (True/False); a "
                "multiplier of 0.0 also holds a weight."
                if isinstance(value, (bool, np.bool_))
                else ""
            )
            raise TypeError(
                f"`{what}` must be a float >= 0, an array-like of floats >= 0 "
                "broadcastable to the variable, or a callable `variable -> value`. "
                f"Received: {value!r} of type {type(value).__name__}.{hint}"
            )
        arr = _as_array(value, what=what)
        if arr.dtype.kind not in "iuf":
            raise TypeError(
                f"`{what}` must hold real numbers (a float dtype). Received: array of "
                f"dtype {arr.dtype}."
            )
        arr = arr.astype(np.float64)
        bad = ~np.isfinite(arr) | (arr < 0)
        if np.any(bad):
            bad_value, at = _first_bad(arr, bad)
            kind = "non-finite" if not np.isfinite(bad_value) else "negative"
            raise ValueError(
                f"`{what}` must be finite and >= 0 (0 holds the weight, 1 applies the "
                f"inner optimizer's update unchanged); found the {kind} value "
                f"{float(bad_value)!r}{at}."
            )
        return arr.astype(np.float32)

    def is_identity(self, value: np.ndarray) -> bool:
        return bool(np.all(value == 1))


MASKS = Masks()
MULTIPLIERS = Multipliers()


def check_broadcast(value: np.ndarray, variable: keras.Variable, *, what: str, noun: str = "mask") -> None:
    shape = tuple(variable.shape)
    try:
        ok = np.broadcast_shapes(value.shape, shape) == shape
    except ValueError:
        ok = False
    if ok:
        return
    examples = []
    if len(shape) >= 2:
        examples = [
            f"{(1,) * (len(shape) - 1) + shape[-1:]} for columns",
            f"{shape[:1] + (1,) * (len(shape) - 1)} for rows",
        ]
    hint = " or one that broadcasts to it" + (f", such as {' or '.join(examples)}" if examples else "")
    raise ValueError(
        f"`{what}` has shape {value.shape}, which does not broadcast to the "
        f"shape {shape} of variable '{variable.path}'. Pass a {noun} of shape "
        f"{shape}{hint}."
    )


def apply_where(full: np.ndarray, where: Where, value: bool, *, path: str, what: str) -> None:
    """`full[where] = value` in place, with errors that name the variable."""
    if isinstance(where, (str, bytes, dict, set)):
        raise TypeError(
            f"`{what}`: `where` must be None, a NumPy index expression such as "
            "`np.s_[:, :10]`, an integer index array or a bool array. "
            f"Received: {where!r}."
        )
    index = where
    if isinstance(where, list) or (
        not isinstance(where, (tuple, slice, int, np.ndarray)) and hasattr(where, "__array__")
    ):
        index = np.asarray(where)
    try:
        full[index] = value
    except (IndexError, ValueError, TypeError) as e:
        raise ValueError(
            f"`{what}`: `where`={where!r} is not a valid index into variable "
            f"'{path}' of shape {full.shape} ({e})."
        ) from None


def fit_to_storage(
    full: np.ndarray, storage_shape: tuple[int, ...], *, path: str, what: str, quantity: Quantity = MASKS
) -> np.ndarray:
    """Reduces a value of the variable's full shape to `storage_shape`:
    possible when it is constant along every axis the storage broadcasts over
    (e.g. a column-aligned change to a `(1, units)` mask)."""
    storage_shape = tuple(storage_shape)
    if full.shape == storage_shape:
        return np.array(full, dtype=quantity.dtype)
    padded = (1,) * (full.ndim - len(storage_shape)) + storage_shape
    reduced = full
    for axis, (n_store, n_full) in enumerate(zip(padded, full.shape)):
        if n_store == n_full:
            continue
        first = np.take(reduced, [0], axis=axis)
        if not np.array_equal(np.broadcast_to(first, reduced.shape), reduced):
            noun = quantity.noun
            example = (
                f"masks={{'{path}': np.ones({full.shape}, bool)}}"
                if quantity is MASKS
                else f"{quantity.argument}={{'{path}': np.ones({full.shape})}}"
            )
            raise ValueError(
                f"`{what}`: the {noun} of variable '{path}' is stored with shape "
                f"{storage_shape} (fixed when the optimizer was built), and the "
                f"new {noun} varies along axis {axis} of the variable's shape "
                f"{full.shape}, so it cannot be stored. Give the variable a {noun} "
                f"of its full shape {full.shape} before the optimizer is built "
                f"(e.g. `{example}`) to change single elements later."
            )
        reduced = first
    return np.array(reduced, dtype=quantity.dtype).reshape(storage_shape)


@dataclass
class Op:
    kind: str  # "set", or for masks "freeze" / "unfreeze"
    key: Key
    payload: Any  # the value for "set", `where` otherwise


class Registry:
    """The values of one quantity given before build (`masks=`, and calls such
    as `set_mask` made before build), resolved against variables at build."""

    def __init__(self, quantity: Quantity, spec: Mapping[Key, Any] | Sequence | None, saved: Sequence = ()):
        self.quantity = quantity
        q = quantity
        items = keyed_items(spec, q.argument, "a path string, a layer or a variable", q.noun)
        self._specs: list[tuple[Key, Any]] = []
        for key, value in items:
            check_key(key, argument=q.argument)
            if not callable(value):
                value = q.validate(value, what=f"{q.argument}[{describe_key(key)}]")
            self._specs.append((key, value))
        self._specs += list(saved)  # a saved config's entries (`_saving`): values come with the weights
        self.ops: list[Op] = []

    @property
    def specs(self) -> list[tuple[Key, Any]]:
        """(key, value) pairs given before build, in order."""
        return list(self._specs)

    def bind_saved(self, specs: list[tuple[Key, Any]]) -> None:
        """Replaces the specs by their binding at build (`_saving.bind_config_specs`)."""
        if len(specs) != len(self._specs):
            raise AssertionError("a binding keeps one spec per entry")
        self._specs = list(specs)

    def record(self, kind: str, key: Key, payload: Any) -> None:
        """Records a call (`set_mask`, `freeze`, `set_multiplier`, ...) made before build."""
        check_key(key, argument=self.quantity.methods[kind])
        self.ops.append(Op(kind, key, self.quantity.checked_payload(kind, key, payload)))

    def resolve(
        self,
        variables: Sequence[keras.Variable],
        *,
        strict: bool = True,
        others: Sequence[keras.Variable] = (),
    ) -> dict[int, np.ndarray]:
        """Maps variable index -> value (at its storage shape). A variable
        selected by two keys is an error. With `strict=False`, keys that select
        none of `variables` are skipped instead of raising (used to look up one
        variable before build); `others` only improve the error messages."""
        q = self.quantity
        out: dict[int, np.ndarray] = {}
        owner: dict[int, Key] = {}
        for key, value in self.specs:
            what = f"{q.argument}[{describe_key(key)}]"
            for i in select_variables(key, variables, argument=q.argument, strict=strict, others=others):
                if i in owner:
                    raise ValueError(
                        f"Variable '{variables[i].path}' is matched by two `{q.argument}` "
                        f"keys: {describe_key(owner[i])} and {describe_key(key)}. "
                        f"Make the keys disjoint (e.g. a more specific regex), or {q.two_keys_fix}"
                    )
                owner[i] = key
                out[i] = q.resolve(value, variables[i], what=what)
        for op in self.ops:
            argument = q.methods[op.kind]
            for i in select_variables(op.key, variables, argument=argument, strict=strict, others=others):
                out[i] = q.apply_op(op.kind, op.payload, variables[i], out.get(i))
        return out
