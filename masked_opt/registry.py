"""The mask registry: which trainable variable gets which mask.

Everything here is plain NumPy and runs on the host, never inside a traced
train step: keys are resolved, masks validated and fitted to their storage
shape here, and the optimizer only copies the result into bool variables.

Vocabulary used throughout:

* a *key* is a `keras.Variable`, a `keras.layers.Layer` (all its trainable
  variables), or a string matched against `variable.path` (see `match_key`):
  the exact path; else a suffix at a "/" boundary ("dense_1/kernel",
  "kernel"); else a layer, i.e. a "/"-bounded run of the path before the
  variable's name ("dense_1", "encoder/dense_1"), selecting all its variables;
  else the same two as a regex (`re.fullmatch` of a "/"-bounded suffix, then
  of a layer run);
* a *mask* is a bool array (True = trainable) broadcastable to the variable;
* the *storage shape* of a variable's mask is fixed when the optimizer is
  built: the shape the user gave (a `(1, units)` column mask stays
  `(1, units)`, a scalar stays a scalar).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

import keras

__all__ = ["Key", "MaskValue", "Where"]

Key = Union[str, keras.Variable, keras.layers.Layer]
"""A `keras.Variable`, a `keras.layers.Layer`, or a string matched against
`variable.path`."""

MaskValue = Union[bool, int, np.ndarray, Sequence, Any, Callable[[keras.Variable], Any]]
"""A bool scalar, an array-like of bools (or 0/1 integers) broadcastable to the
variable, or a callable `variable -> array-like` resolved at build."""

Where = Union[None, int, slice, tuple, np.ndarray, Sequence]
"""`None` (whole variable), a NumPy index expression such as `np.s_[:, :10]`,
an integer index array (first axis), or a bool array of positions."""


def describe_key(key: Key) -> str:
    """`'dense_1/kernel'` for a string key, the path for a variable key."""
    if isinstance(key, str):
        return repr(key)
    if isinstance(key, keras.layers.Layer):
        return f"<{type(key).__name__} layer {key.name!r}>"
    return f"<Variable path={getattr(key, 'path', key)!r}>"


def check_key(key: Any, *, argument: str) -> None:
    if isinstance(key, str):
        return
    if isinstance(key, (keras.Variable, keras.layers.Layer)):
        return
    raise TypeError(
        f"`{argument}` keys must be a `keras.Variable`, a `keras.layers.Layer` or "
        "a string matched against `variable.path` (exact path, '/'-suffix, "
        "layer name or path, or a regex of those). "
        f"Received: {key!r} of type {type(key).__name__}."
    )


def to_bool_mask(value: Any, *, what: str) -> np.ndarray:
    """Validates a mask value and returns it as a bool ndarray (shape kept).

    Accepts bools, bool arrays, and 0/1 integers or floats; rejects anything
    else with an error naming `what` (e.g. "masks['dense_1/kernel']").
    """
    if value is None or isinstance(value, (str, bytes, dict, set)):
        raise TypeError(
            f"`{what}` must be a bool, a bool array-like broadcastable to the "
            "variable (True = trainable), or a callable `variable -> array`. "
            f"Received: {value!r} of type {type(value).__name__}."
        )
    if isinstance(value, keras.Variable):
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. ragged nested lists
        raise TypeError(
            f"`{what}` could not be converted to a NumPy array ({e}). "
            f"Received: {type(value).__name__}."
        ) from None
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iuf":
        bad = ~((arr == 0) | (arr == 1))
        if np.any(bad):
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            bad_value = arr[pos] if arr.ndim else arr.item()
            at = f" at index {pos}" if arr.ndim else ""
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


def check_broadcast(mask: np.ndarray, variable: keras.Variable, *, what: str) -> None:
    shape = tuple(variable.shape)
    try:
        ok = np.broadcast_shapes(mask.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        examples = []
        if len(shape) >= 2:
            examples = [
                f"{(1,) * (len(shape) - 1) + shape[-1:]} for columns",
                f"{shape[:1] + (1,) * (len(shape) - 1)} for rows",
            ]
        hint = " or one that broadcasts to it" + (
            f", such as {' or '.join(examples)}" if examples else ""
        )
        raise ValueError(
            f"`{what}` has shape {mask.shape}, which does not broadcast to the "
            f"shape {shape} of variable '{variable.path}'. Pass a mask of shape "
            f"{shape}{hint}."
        )


def _near_paths(key: str, paths: list[str]) -> str:
    close = difflib.get_close_matches(key, paths, n=3, cutoff=0.5)
    shown = close + [p for p in paths if p not in close]
    shown = shown[:6]
    more = f", ... ({len(paths)} in all)" if len(paths) > len(shown) else ""
    return ", ".join(repr(p) for p in shown) + more


def _suffixes(path: str) -> list[str]:
    """'a/b/kernel' -> ['a/b/kernel', 'b/kernel', 'kernel']."""
    parts = path.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _layer_runs(path: str) -> list[str]:
    """The "/"-bounded runs of the path before the variable's name:
    'model/enc/dense_1/kernel' -> ['model', 'model/enc', 'enc', 'dense_1', ...]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]


def match_key(
    key: Key,
    variables: Sequence[keras.Variable],
    *,
    argument: str,
    others: Sequence[keras.Variable] = (),
) -> list[int]:
    """Indices of `variables` that `key` selects; raises if it selects none.

    A string key selects, by the first rule that selects anything: the
    variable whose path it is; the variables whose path ends with it at a "/"
    boundary; the variables of the layer it names (a "/"-bounded run of the
    path before the variable name: a layer name or path); then the same two
    with the key as a regex (`re.fullmatch`). `others` (e.g. the model's
    non-trainable variables) only improve the error message.
    """
    if isinstance(key, keras.layers.Layer):
        own = list(key.trainable_variables)
        hits = [i for i, v in enumerate(variables) if any(v is w for w in own)]
        if not hits:
            why = (
                "it has no trainable variables (`trainable=False`, or not built yet)"
                if not own
                else "none of its trainable variables is among those this optimizer is built on"
            )
            raise ValueError(
                f"`{argument}`: layer {key.name!r} ({type(key).__name__}) selects no "
                f"variable: {why}. Pass a layer of the model being trained."
            )
        return hits
    if isinstance(key, keras.Variable):
        hits = [i for i, v in enumerate(variables) if v is key]
        if not hits:
            raise ValueError(
                f"`{argument}`: variable '{key.path}' is not one of the "
                "trainable variables this optimizer is built on"
                + (
                    " (it is not trainable: optimizers never update it, so it needs no mask)"
                    if not getattr(key, "trainable", True)
                    else ""
                )
                + ". Pass a trainable variable of the model (or its path)."
            )
        return hits
    paths = [v.path for v in variables]
    rules = [
        lambda p: p == key,
        lambda p: key in _suffixes(p)[1:],
        lambda p: key in _layer_runs(p),
    ]
    pattern = None
    try:
        pattern = re.compile(key)
    except re.error:
        pass
    if pattern is not None:
        rules += [
            lambda p: any(pattern.fullmatch(s) for s in _suffixes(p)),
            lambda p: any(pattern.fullmatch(r) for r in _layer_runs(p)),
        ]
    for rule in rules:
        hits = [i for i, p in enumerate(paths) if rule(p)]
        if hits:
            return hits
    frozen = [v.path for v in others if any(rule(v.path) for rule in rules)]
    if frozen:
        raise ValueError(
            f"`{argument}` key {key!r} names non-trainable variable(s) "
            f"{frozen[:5]}{' ...' if len(frozen) > 5 else ''}: optimizers never "
            "update non-trainable variables (BatchNormalization moving statistics, "
            "layers with `trainable=False`), so they stay fixed without a mask. "
            "Drop the key, or set `layer.trainable = True` before compiling to train them."
        )
    if pattern is None:
        raise ValueError(
            f"`{argument}` key {key!r} matches no variable path exactly, as a "
            "'/'-suffix or as a layer, and is not a valid regex either. "
            f"Trainable variable paths: {_near_paths(key, paths)}."
        )
    raise ValueError(
        f"`{argument}` key {key!r} matches no trainable variable. Keys match "
        "`variable.path` exactly, as a suffix at a '/' boundary ('dense_1/kernel'), "
        "as a layer name or path ('dense_1'), or as a regex of those (re.fullmatch). "
        f"Trainable variable paths: {_near_paths(key, paths)}."
    )


def apply_where(
    full: np.ndarray, where: Where, value: bool, *, path: str, what: str
) -> None:
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
    full: np.ndarray,
    storage_shape: tuple[int, ...],
    *,
    path: str,
    what: str,
    kind: str = "mask",
    dtype: Any = bool,
) -> np.ndarray:
    """Reduces a value of the variable's full shape to `storage_shape`.

    Possible when the value is constant along every axis the storage
    broadcasts over (e.g. a column-aligned change to a `(1, units)` mask).
    `kind` is "mask" or "multiplier" (the error's wording and its fix).
    """
    storage_shape = tuple(storage_shape)
    if full.shape == storage_shape:
        return np.array(full, dtype=dtype)
    padded = (1,) * (full.ndim - len(storage_shape)) + storage_shape
    reduced = full
    for axis, (n_store, n_full) in enumerate(zip(padded, full.shape)):
        if n_store == n_full:
            continue
        first = np.take(reduced, [0], axis=axis)
        if not np.array_equal(np.broadcast_to(first, reduced.shape), reduced):
            example = (
                f"masks={{'{path}': np.ones({full.shape}, bool)}}"
                if kind == "mask"
                else f"multipliers={{'{path}': np.ones({full.shape})}}"
            )
            raise ValueError(
                f"`{what}`: the {kind} of variable '{path}' is stored with shape "
                f"{storage_shape} (fixed when the optimizer was built), and the "
                f"new {kind} varies along axis {axis} of the variable's shape "
                f"{full.shape}, so it cannot be stored. Give the variable a {kind} "
                f"of its full shape {full.shape} before the optimizer is built "
                f"(e.g. `{example}`) to change single elements later."
            )
        reduced = first
    return np.array(reduced, dtype=dtype).reshape(storage_shape)


def resolve_specs(
    specs: Sequence[tuple[Key, Any]],
    variables: Sequence[keras.Variable],
    resolve: Callable[[Any, keras.Variable, str], np.ndarray],
    *,
    argument: str,
    strict: bool = True,
    others: Sequence[keras.Variable] = (),
) -> dict[int, np.ndarray]:
    """`{variable index: resolve(value, variable, what)}` for `(key, value)`
    specs of the `argument` dict ("masks", "multipliers"); a variable selected
    by two keys is an error. With `strict=False`, keys that select none of
    `variables` are skipped (used to look up one variable before build)."""
    out: dict[int, np.ndarray] = {}
    owner: dict[int, Key] = {}
    for key, value in specs:
        what = f"{argument}[{describe_key(key)}]"
        for i in select_variables(key, variables, argument=argument, strict=strict, others=others):
            if i in owner:
                raise ValueError(
                    f"Variable '{variables[i].path}' is matched by two `{argument}` "
                    f"keys: {describe_key(owner[i])} and {describe_key(key)}. "
                    "Make the keys disjoint (e.g. a more specific regex), or "
                    + ("combine the two masks into one." if argument == "masks"
                       else f"give one {argument.rstrip('s')} per variable.")
                )
            owner[i] = key
            out[i] = resolve(value, variables[i], what)
    return out


def select_variables(
    key: Key,
    variables: Sequence[keras.Variable],
    *,
    argument: str,
    strict: bool = True,
    others: Sequence[keras.Variable] = (),
) -> list[int]:
    """`match_key`, or `[]` instead of an error when not `strict`."""
    try:
        return match_key(key, variables, argument=argument, others=others)
    except ValueError:
        if strict:
            raise
        return []


@dataclass
class _Op:
    kind: str  # "set", "freeze" or "unfreeze"
    key: Key
    payload: Any  # the mask value for "set", `where` otherwise


def keyed_items(spec: Any, argument: str, keys: str, value: str) -> list[tuple[Key, Any]]:
    """`(key, value)` pairs from a dict or a list of pairs (TF-backed
    `keras.Variable`s are unhashable, so variable keys come as pairs);
    `None` is no pairs. `keys`/`value` word the TypeError."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in spec
    ):
        return [tuple(p) for p in spec]
    raise TypeError(
        f"`{argument}` must be a dict mapping keys ({keys}) to {value}s, or a list of "
        f"`(key, {value})` pairs (use pairs for `keras.Variable` keys, which are "
        f"unhashable). Received: {spec!r} of type {type(spec).__name__}."
    )


class MaskRegistry:
    """Mask specifications given before build, resolved against variables at build."""

    def __init__(self, masks: Mapping[Key, MaskValue] | None):
        items = keyed_items(masks, "masks", "a path string / regex", "mask")
        self.specs: list[tuple[Key, MaskValue]] = []
        for key, value in items:
            check_key(key, argument="masks")
            if not callable(value):
                value = to_bool_mask(value, what=f"masks[{describe_key(key)}]")
            self.specs.append((key, value))
        self.ops: list[_Op] = []

    def record(self, kind: str, key: Key, payload: Any) -> None:
        """Records a `set_mask`/`freeze`/`unfreeze` call made before build."""
        check_key(key, argument=f"{kind}")
        if kind == "set" and not callable(payload):
            payload = to_bool_mask(payload, what=f"set_mask({describe_key(key)}, mask)")
        self.ops.append(_Op(kind, key, payload))

    def resolve(
        self,
        variables: Sequence[keras.Variable],
        *,
        strict: bool = True,
        others: Sequence[keras.Variable] = (),
    ) -> dict[int, np.ndarray]:
        """Maps variable index -> mask (bool, at its storage shape).

        With `strict=False`, keys that select none of `variables` are skipped
        instead of raising (used to look up one variable before build).
        """
        masks = resolve_specs(
            self.specs,
            variables,
            lambda value, variable, what: resolve_value(value, variable, what=what),
            argument="masks",
            strict=strict,
            others=others,
        )
        for op in self.ops:
            for i in select_variables(op.key, variables, argument=op.kind, strict=strict, others=others):
                masks[i] = apply_op(op.kind, op.payload, variables[i], masks.get(i))
        return masks


def resolve_value(value: MaskValue, variable: keras.Variable, *, what: str) -> np.ndarray:
    if callable(value) and not isinstance(value, np.ndarray):
        try:
            value = value(variable)
        except (ValueError, TypeError) as e:
            if variable.path in str(e):
                raise  # already a clear error about this variable (a builder's)
            raise ValueError(
                f"`{what}`: the mask callable raised {type(e).__name__}: {e} "
                f"when called on variable '{variable.path}' of shape "
                f"{tuple(variable.shape)}."
            ) from e
        except Exception as e:
            raise ValueError(
                f"`{what}`: the mask callable raised {type(e).__name__}: {e} "
                f"when called on variable '{variable.path}' of shape "
                f"{tuple(variable.shape)}."
            ) from e
    arr = to_bool_mask(value, what=what)
    check_broadcast(arr, variable, what=what)
    return arr


def apply_op(
    kind: str, payload: Any, variable: keras.Variable, current: np.ndarray | None
) -> np.ndarray:
    """The mask after a set/freeze/unfreeze, before any storage shape is fixed."""
    path = variable.path
    if kind == "set":
        new = resolve_value(payload, variable, what=f"set_mask('{path}', mask)")
        if current is not None and np.broadcast_shapes(new.shape, current.shape) == current.shape:
            # Keep the registered storage shape (as `set_mask` after build does).
            return np.array(np.broadcast_to(new, current.shape))
        return new
    value = kind == "unfreeze"
    if payload is None:
        shape = () if current is None else current.shape
        return np.full(shape, value)
    shape = tuple(variable.shape)
    base = np.ones(shape, bool) if current is None else current
    full = np.array(np.broadcast_to(base, shape))
    apply_where(full, payload, value, path=path, what=f"{kind}('{path}', where)")
    return full
