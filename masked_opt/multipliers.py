"""Update multipliers: which trainable variable scales its update by how much.

A multiplier `m` scales what the inner optimizer does to a weight:
``w_new = w_old + m * (w_inner - w_old)``, where `w_inner` is the weight the
inner optimizer produced (its update, weight decay included). Under Adam this
is a per-element learning-rate multiplier (scaling the gradient would not be:
Adam normalises it away). `m = 1` leaves the inner update untouched
(bit-identical), `m = 0` holds the weight exactly, as a False mask does.

Like the mask registry, everything here is host-side NumPy: values are
validated and resolved against variables at build, and the optimizer copies
the result into float32 variables (stored at the shape given: a scalar stays
a scalar, a `(1, units)` column multiplier stays `(1, units)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

import keras

from masked_opt.registry import (
    Key,
    check_broadcast,
    check_key,
    describe_key,
    keyed_items,
    resolve_specs,
    select_variables,
)

__all__ = ["MultiplierValue"]

MultiplierValue = Union[float, int, np.ndarray, Sequence, Any, Callable[[keras.Variable], Any]]
"""A float >= 0, an array-like of floats >= 0 broadcastable to the variable, or
a callable `variable -> value` resolved at build."""


def to_multiplier(value: Any, *, what: str) -> np.ndarray:
    """Validates a multiplier value; returns it as a float32 ndarray (shape kept)."""
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
    if isinstance(value, keras.Variable):
        value = value.numpy()
    try:
        arr = np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value)
    except Exception as e:
        raise TypeError(
            f"`{what}` could not be converted to a NumPy array ({e}). "
            f"Received: {type(value).__name__}."
        ) from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"`{what}` must hold real numbers (a float dtype). Received: array of "
            f"dtype {arr.dtype}."
        )
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if np.any(bad):
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        bad_value = float(arr[pos]) if arr.ndim else float(arr)
        at = f" at index {pos}" if arr.ndim else ""
        kind = "non-finite" if not np.isfinite(bad_value) else "negative"
        raise ValueError(
            f"`{what}` must be finite and >= 0 (0 holds the weight, 1 applies the "
            f"inner optimizer's update unchanged); found the {kind} value "
            f"{bad_value!r}{at}."
        )
    return arr.astype(np.float32)


def resolve_multiplier(value: MultiplierValue, variable: keras.Variable, *, what: str) -> np.ndarray:
    if callable(value) and not isinstance(value, np.ndarray):
        try:
            value = value(variable)
        except Exception as e:
            raise ValueError(
                f"`{what}`: the multiplier callable raised {type(e).__name__}: {e} "
                f"when called on variable '{variable.path}' of shape "
                f"{tuple(variable.shape)}."
            ) from e
    arr = to_multiplier(value, what=what)
    check_broadcast(arr, variable, what=what)
    return arr


class MultiplierRegistry:
    """Multiplier specifications given before build, resolved at build."""

    def __init__(self, multipliers: Mapping[Key, MultiplierValue] | Sequence | None):
        items = keyed_items(multipliers, "multipliers", "a path string / regex, a layer", "multiplier")
        self.specs: list[tuple[Key, Any]] = []
        for key, value in items:
            check_key(key, argument="multipliers")
            if not callable(value) or isinstance(value, np.ndarray):
                value = to_multiplier(value, what=f"multipliers[{describe_key(key)}]")
            self.specs.append((key, value))
        self.ops: list[tuple[Key, Any]] = []  # set_multiplier calls before build

    def record(self, key: Key, value: Any) -> None:
        check_key(key, argument="set_multiplier")
        if not callable(value) or isinstance(value, np.ndarray):
            value = to_multiplier(value, what=f"set_multiplier({describe_key(key)}, value)")
        self.ops.append((key, value))

    def resolve(
        self,
        variables: Sequence[keras.Variable],
        *,
        strict: bool = True,
        others: Sequence[keras.Variable] = (),
    ) -> dict[int, np.ndarray]:
        """Maps variable index -> multiplier (float32, at its storage shape)."""
        out = resolve_specs(
            self.specs,
            variables,
            lambda value, variable, what: resolve_multiplier(value, variable, what=what),
            argument="multipliers",
            strict=strict,
            others=others,
        )
        for key, value in self.ops:
            for i in select_variables(key, variables, argument="set_multiplier", strict=strict, others=others):
                new = resolve_multiplier(value, variables[i], what=f"set_multiplier('{variables[i].path}', value)")
                current = out.get(i)
                if current is not None and np.broadcast_shapes(new.shape, current.shape) == current.shape:
                    new = np.array(np.broadcast_to(new, current.shape))
                out[i] = new
        return out
