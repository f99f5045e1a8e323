"""Keys: which trainable variables an entry of `masks=` or `multipliers=`
(or a `set_mask`, `freeze`, `set_multiplier` call) selects.

A *key* is a `keras.Variable`, a `keras.layers.Layer` (all its trainable
variables), or a string matched against `variable.path` (see `match_key`):
the exact path; else a suffix at a "/" boundary ("dense_1/kernel",
"kernel"); else a layer, i.e. a "/"-bounded run of the path before the
variable's name ("dense_1", "encoder/dense_1"), selecting all its variables;
else the same two as a regex (`re.fullmatch` of a "/"-bounded suffix, then
of a layer run).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import keras

__all__ = ["Key"]

Key = Union[str, keras.Variable, keras.layers.Layer]
"""A `keras.Variable`, a `keras.layers.Layer`, or a string matched against
`variable.path`."""


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
        return _match_layer(key, variables, argument)
    if isinstance(key, keras.Variable):
        return _match_variable(key, variables, argument)
    return _match_string(key, variables, argument, others)


def _match_layer(layer: keras.layers.Layer, variables: Sequence[keras.Variable], argument: str) -> list[int]:
    own = list(layer.trainable_variables)
    hits = [i for i, v in enumerate(variables) if any(v is w for w in own)]
    if not hits:
        why = (
            "it has no trainable variables (`trainable=False`, or not built yet)"
            if not own
            else "none of its trainable variables is among those this optimizer is built on"
        )
        raise ValueError(
            f"`{argument}`: layer {layer.name!r} ({type(layer).__name__}) selects no "
            f"variable: {why}. Pass a layer of the model being trained."
        )
    return hits


def _match_variable(key: keras.Variable, variables: Sequence[keras.Variable], argument: str) -> list[int]:
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


def _string_rules(key: str) -> tuple[list, bool]:
    """The matching rules for a string key, in order, and whether it is a regex."""
    rules = [
        lambda p: p == key,
        lambda p: key in _suffixes(p)[1:],
        lambda p: key in _layer_runs(p),
    ]
    try:
        pattern = re.compile(key)
    except re.error:
        return rules, False
    rules += [
        lambda p: any(pattern.fullmatch(s) for s in _suffixes(p)),
        lambda p: any(pattern.fullmatch(r) for r in _layer_runs(p)),
    ]
    return rules, True


def _match_string(
    key: str, variables: Sequence[keras.Variable], argument: str, others: Sequence[keras.Variable]
) -> list[int]:
    paths = [v.path for v in variables]
    rules, is_regex = _string_rules(key)
    for rule in rules:
        hits = [i for i, p in enumerate(paths) if rule(p)]
        if hits:
            return hits
    named = [v for v in others if any(rule(v.path) for rule in rules)]
    frozen = [v.path for v in named]
    quantized = [v.path for v in named if keras.backend.standardize_dtype(v.dtype).startswith(("int", "uint"))]
    if quantized:
        raise ValueError(
            f"`{argument}` key {key!r} names integer (quantized) variable(s) {quantized[:5]}"
            f"{' ...' if len(quantized) > 5 else ''}: a kernel quantized by `model.quantize(\"int8\")` (or "
            "\"int4\") holds integers, which take no gradient, so no optimizer, masked or not, can train its "
            "elements. Mask the float model before quantizing, or train the quantized model through LoRA "
            "adapters (`layer.enable_lora(rank)`: QLoRA), whose float variables masks can select."
        )
    if frozen:
        raise ValueError(
            f"`{argument}` key {key!r} names non-trainable variable(s) "
            f"{frozen[:5]}{' ...' if len(frozen) > 5 else ''}: optimizers never "
            "update non-trainable variables (BatchNormalization moving statistics, "
            "layers with `trainable=False`), so they stay fixed without a mask. "
            "Drop the key, or set `layer.trainable = True` before compiling to train them."
        )
    if not is_regex:
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


def one_variable(key: Key, variables: Sequence[keras.Variable], *, argument: str, built: bool) -> keras.Variable:
    """The one trainable variable a key names (a string key only once the
    optimizer is built and knows its variables)."""
    if isinstance(key, str):
        if not built:
            raise ValueError(
                f"`{argument}({key!r})`: string keys are resolved when the "
                "optimizer is built; pass the `keras.Variable` itself, or build "
                "first with `optimizer.build(model.trainable_variables)`."
            )
        hits = match_key(key, variables, argument=argument)
        if len(hits) > 1:
            paths = [variables[i].path for i in hits]
            raise ValueError(
                f"`{argument}({key!r})` selects {len(hits)} variables "
                f"({paths[:5]}); pass one variable or its exact path."
            )
        key = variables[hits[0]]
    check_key(key, argument=argument)
    if isinstance(key, keras.layers.Layer):
        raise TypeError(
            f"`{argument}` takes one variable (or its path), not a layer "
            f"({key.name!r}): pass e.g. `layer.kernel`."
        )
    if built:  # not the identity for a variable of another model (a loaded copy)
        _match_variable(key, variables, argument)
    return key


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
