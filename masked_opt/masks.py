"""Mask builders: what to train, as masks `MaskedOptimizer(masks=...)` accepts.

Two kinds of builder:

* **per variable** -- `rows`, `columns`, `random`, `magnitude` return a
  `MaskFn`, a callable `variable -> bool array` that the optimizer resolves
  when it is built (so `magnitude` ranks the weights the model holds then).
  Use one as the value of a `masks` entry; a key that matches several
  variables (a regex) gets each variable's own mask. Call it yourself on a
  variable (or a NumPy array) to get the array.
* **across variables** -- `global_magnitude`, `fisher` and `diff` rank all the
  chosen elements together (global top-k) and return a `{path: bool array}`
  dict, usable directly as `masks=`.

True means trainable. `fraction` is the share of elements that stay
trainable, in (0, 1]; the count is `floor(fraction * size + 0.5)` (round half
up) and at least 1. Ties in a top-k are broken by position: the earlier
variable, then the lower flat (C-order) index, wins.

Masks compose with NumPy operators: arrays with `&`, `|`, `^`, `~` as usual,
and a `MaskFn` with arrays, bools and other `MaskFn`s (the result is again a
`MaskFn`), e.g. `rows(new_tokens) | magnitude(0.01)`.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np

import keras

from masked_opt._ranking import (  # noqa: F401  (count, check_fraction: public helpers)
    check_fraction,
    check_unique,
    count,
    path_of,
    shape_of,
    top_k,
    values_of,
)
from masked_opt.registry import MASKS

__all__ = [
    "MaskFn",
    "columns",
    "diff",
    "fisher",
    "fisher_scores",
    "global_magnitude",
    "lora_budget",
    "lora_count",
    "magnitude",
    "random",
    "rows",
]

Indices = Union[int, Sequence[int], np.ndarray, range]
"""An integer, or a 1-D sequence of integers (negative ones count from the end)."""

Arrays = Union[Mapping[str, Any], Sequence[Any]]
"""`{path: array}`, or a list of arrays aligned with a list of variables."""



# --------------------------------------------------------------------- helpers


def _check_indices(indices: Any, *, builder: str) -> np.ndarray:
    if isinstance(indices, (bool, np.bool_)) or isinstance(indices, (str, bytes, float)):
        raise TypeError(
            f"`{builder}`: `indices` must be an integer or a 1-D sequence of "
            f"integers. Received: {indices!r} of type {type(indices).__name__}."
        )
    arr = np.asarray(list(indices) if isinstance(indices, range) else indices)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(
            f"`{builder}`: `indices` must be an integer or a 1-D sequence of "
            f"integers (for a bool selector pass `np.flatnonzero(selector)`). "
            f"Received: array of dtype {arr.dtype} and shape {arr.shape}."
        )
    return arr.reshape(-1).astype(np.int64)


def _check_range(idx: np.ndarray, size: int, *, path: str, builder: str, axis: str) -> None:
    bad = idx[(idx >= size) | (idx < -size)]
    if bad.size:
        raise ValueError(
            f"`{builder}`: index {int(bad[0])} is out of range for variable "
            f"'{path}', whose {axis} has size {size} (valid: {-size} to {size - 1})."
        )


def _named(variables: Any, *, builder: str, argument: str = "variables") -> list[tuple[str, Any]]:
    """[(path, value)] from a `{path: array}` dict or a list of `keras.Variable`s."""
    if isinstance(variables, Mapping):
        items = [(str(k), v) for k, v in variables.items()]
    elif isinstance(variables, keras.Variable):
        items = [(variables.path, variables)]
    elif isinstance(variables, Iterable) and not isinstance(variables, (str, bytes, np.ndarray)):
        items = []
        for v in variables:
            if not isinstance(v, keras.Variable):
                raise TypeError(
                    f"`{builder}`: `{argument}` must be a list of `keras.Variable`s "
                    f"or a dict {{path: array}}. Received an element {v!r} of type "
                    f"{type(v).__name__}."
                )
            items.append((v.path, v))
    else:
        raise TypeError(
            f"`{builder}`: `{argument}` must be a list of `keras.Variable`s or a "
            f"dict {{path: array}}. Received: {type(variables).__name__}."
        )
    check_unique([p for p, _ in items], builder=builder)
    return items


# --------------------------------------------------------------------- MaskFn


class MaskFn:
    """A per-variable mask builder: `mask_fn(variable) -> bool ndarray`.

    Resolved by `MaskedOptimizer` at build; also callable on a `keras.Variable`
    or a NumPy array. Composes with `&`, `|`, `^`, `~` against bools, arrays
    and other `MaskFn`s, giving a new `MaskFn`.
    """

    __array_ufunc__ = None  # make `ndarray & MaskFn` defer to MaskFn.__rand__

    def __init__(self, fn: Callable[[Any], np.ndarray], description: str):
        self._fn = fn
        self._description = description

    def __call__(self, variable: Any) -> np.ndarray:
        return self._fn(variable)

    def __repr__(self) -> str:
        return self._description

    def _combine(self, other: Any, op: Callable, symbol: str, swap: bool = False) -> MaskFn:
        if not (callable(other) or isinstance(other, (bool, np.bool_, np.ndarray, list, tuple))):
            return NotImplemented

        def operand(x: Any, variable: Any) -> np.ndarray:
            if callable(x) and not isinstance(x, np.ndarray):
                x = x(variable)
            return MASKS.validate(x, what=f"mask operand for '{path_of(variable)}'")

        first, second = (other, self) if swap else (self, other)
        return MaskFn(
            lambda v: op(operand(first, v), operand(second, v)),
            f"({first!r} {symbol} {second!r})",
        )

    def __and__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_and, "&")

    def __rand__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_and, "&", swap=True)

    def __or__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_or, "|")

    def __ror__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_or, "|", swap=True)

    def __xor__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_xor, "^")

    def __rxor__(self, other: Any) -> MaskFn:
        return self._combine(other, np.logical_xor, "^", swap=True)

    def __invert__(self) -> MaskFn:
        return MaskFn(lambda v: np.logical_not(self(v)), f"~{self!r}")


# ------------------------------------------------------------ per variable


def rows(indices: Indices) -> MaskFn:
    """Trains only the given rows (first axis) of a variable of rank >= 2.

    The mask keeps the broadcast shape `(n_rows, 1, ..., 1)`, O(n_rows)
    memory. For a rank-2 kernel `(in, out)` or an embedding `(vocab, dim)`
    rows are inputs or tokens; for a Conv2D kernel `(kh, kw, in, out)` they
    are the first (kernel height) axis. Negative indices count from the end.
    Example: `masks={"embedding/embeddings": rows(new_token_ids)}`.
    """
    idx = _check_indices(indices, builder="rows")

    def build(variable: Any) -> np.ndarray:
        shape, path = shape_of(variable), path_of(variable)
        if len(shape) < 2:
            raise ValueError(
                f"`rows`: variable '{path}' has shape {shape} (rank {len(shape)}); "
                "rows need rank >= 2. For a rank-1 variable such as a bias use "
                "`columns(indices)`, which indexes its only axis."
            )
        _check_range(idx, shape[0], path=path, builder="rows", axis="first axis (rows)")
        mask = np.zeros((shape[0],) + (1,) * (len(shape) - 1), bool)
        mask[idx] = True
        return mask

    return MaskFn(build, f"rows({_short(idx)})")


def columns(indices: Indices) -> MaskFn:
    """Trains only the given columns (last axis) of a variable of rank >= 1.

    The mask keeps the broadcast shape `(1, ..., 1, n_cols)`, O(n_cols)
    memory. The last axis is the output units of a Dense or Conv kernel, and
    a rank-1 variable (a bias) is its own last axis, so one `columns(units)`
    under the regex key `".*dense_1/.*"` trains those units' kernel columns and bias.
    Negative indices count from the end.
    """
    idx = _check_indices(indices, builder="columns")

    def build(variable: Any) -> np.ndarray:
        shape, path = shape_of(variable), path_of(variable)
        if len(shape) < 1:
            raise ValueError(
                f"`columns`: variable '{path}' is a scalar (shape ()); columns "
                "need rank >= 1. Use True or False as its mask."
            )
        _check_range(idx, shape[-1], path=path, builder="columns", axis="last axis (columns)")
        mask = np.zeros((1,) * (len(shape) - 1) + (shape[-1],), bool)
        mask[..., idx] = True
        return mask

    return MaskFn(build, f"columns({_short(idx)})")


def _short(idx: np.ndarray) -> str:
    items = [int(i) for i in idx[:6]]
    return repr(items)[:-1] + (", ...]" if idx.size > 6 else "]")


def random(fraction: float, seed: int | None = None) -> MaskFn:
    """Trains a uniformly random `fraction` of each variable's elements.

    Exactly `floor(fraction * size + 0.5)` elements (at least 1) are
    trainable. With an integer `seed` the mask is a function of the seed and
    the variable's path (variables of the same shape get different masks);
    `seed=None` draws fresh randomness.
    """
    fraction = check_fraction(fraction, builder="random")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"`random`: `seed` must be an int or None. Received: {seed!r}.")

    def build(variable: Any) -> np.ndarray:
        shape, path = shape_of(variable), path_of(variable)
        size = math.prod(shape)
        k = count(fraction, size)
        rng = np.random.default_rng(
            None if seed is None else [int(seed) % 2**63, zlib.crc32(path.encode())]
        )
        flat = np.zeros(size, bool)
        flat[rng.choice(size, size=k, replace=False)] = True
        return flat.reshape(shape)

    return MaskFn(build, f"random({fraction}, seed={seed})")


def magnitude(fraction: float, *, largest: bool = True) -> MaskFn:
    """Trains each variable's `fraction` of elements with the largest |w|
    (`largest=False`: the smallest), ranked per variable at build.

    Exact count as in `random`; ties go to the lower flat index. To rank
    across variables, use `global_magnitude`.
    """
    fraction = check_fraction(fraction, builder="magnitude")

    def build(variable: Any) -> np.ndarray:
        w = values_of(variable)
        return top_k([np.abs(w)], count(fraction, w.size), largest=largest)[0]

    return MaskFn(build, f"magnitude({fraction}, largest={largest})")


def lora_count(shape: Sequence[int], rank: int) -> int:
    """The parameters Keras's `enable_lora(rank)` adds to a kernel of `shape`
    (`Dense`, `EinsumDense`, `Embedding`, `Conv*`: A is `shape[:-1] + (rank,)`,
    B is `(rank, shape[-1])`), capped at the kernel's size."""
    shape = tuple(int(d) for d in shape)
    return min(math.prod(shape), int(rank) * (math.prod(shape[:-1]) + shape[-1]))


def lora_budget(rank: int, *, axis: int | None = None, scores: Any = None, seed: int | None = None) -> MaskFn:
    """Trains as many elements of each kernel as LoRA of `rank` would add
    (`lora_count`), for sparse fine-tuning at LoRA's parameter count.

    `axis=None` chooses single elements (exactly the count). An int chooses
    whole slices along that axis (0: rows, -1: columns; attention heads: 0
    for KerasHub Gemma's `(heads, hidden, head_dim)` query/key/value kernels,
    1 for Keras's `MultiHeadAttention` `(hidden, heads, head_dim)`): the count
    divided by the slice size, rounded half up, at least 1; the mask is stored
    broadcast (O(slices)). Which elements or slices: `scores=None` at random
    (an int `seed` makes it a function of the seed and the path), "magnitude"
    by |w|, or a `{path: array}` of per-element scores (`fisher_scores(...)`,
    accumulated |gradients|), a slice scoring the sum of its elements; ties
    go to the lower index. Kernels only: a rank-1 variable (a bias) is an
    error, give it its own mask (LoRA does not adapt biases).
    Example: `masks={r".*ffw.*kernel": lora_budget(8, axis=-1)}` (whole
    FFN channels; docs/sparse-fine-tuning.md has a whole-model recipe).
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"`lora_budget`: `rank` must be an int >= 1. Received: {rank!r}.")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"`lora_budget`: `axis` must be an int or None. Received: {axis!r}.")
    if not (scores is None or (isinstance(scores, str) and scores == "magnitude") or isinstance(scores, Mapping)):
        raise TypeError('`lora_budget`: `scores` must be None, "magnitude" or a {path: array} dict. '
                        f"Received: {scores!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"`lora_budget`: `seed` must be an int or None. Received: {seed!r}.")

    def build(variable: Any) -> np.ndarray:
        shape, path = shape_of(variable), path_of(variable)
        if len(shape) < 2:
            raise ValueError(f"`lora_budget`: variable '{path}' has shape {shape}; LoRA adapts kernels (rank >= 2). "
                             "Give biases and other 1-D variables their own mask (False, or True to train them).")
        if axis is not None and not -len(shape) <= axis < len(shape):
            raise ValueError(f"`lora_budget`: `axis={axis}` is out of range for variable '{path}' of shape {shape}.")
        element_scores = _budget_scores(variable, shape, path, seed)
        k = lora_count(shape, rank)
        if axis is None:
            return top_k([element_scores], k)[0]
        a = axis % len(shape)
        slice_size = math.prod(shape) // shape[a]
        n = min(shape[a], max(1, math.floor(k / slice_size + 0.5)))
        summed = np.moveaxis(element_scores, a, 0).reshape(shape[a], -1).sum(axis=1)
        stored = [1] * len(shape)
        stored[a] = shape[a]
        return top_k([summed], n)[0].reshape(stored)

    def _budget_scores(variable: Any, shape: tuple, path: str, seed: int | None) -> np.ndarray:
        if scores is None:
            rng = np.random.default_rng(None if seed is None else [int(seed) % 2**63, zlib.crc32(path.encode())])
            return rng.random(shape)
        if isinstance(scores, str):
            return np.abs(values_of(variable)).astype(np.float64)
        if path not in scores:
            raise ValueError(f"`lora_budget`: `scores` has no entry for variable '{path}' "
                             f"(it has {sorted(map(str, scores))[:5]}).")
        value = np.asarray(scores[path], np.float64)
        if value.shape != shape:
            raise ValueError(f"`lora_budget`: `scores['{path}']` has shape {value.shape}, the variable {shape}.")
        return value

    where = "elements" if axis is None else f"axis={axis}"
    return MaskFn(build, f"lora_budget({rank}, {where}, scores={'dict' if isinstance(scores, Mapping) else scores})")


# --------------------------------------------------------- across variables


def global_magnitude(
    variables: Sequence[keras.Variable] | Mapping[str, Any],
    fraction: float,
    *,
    largest: bool = True,
) -> dict[str, np.ndarray]:
    """Trains the `fraction` of all given elements with the largest |w|,
    ranked together across `variables` (a list of `keras.Variable`s or a
    `{path: array}` dict). Returns `{path: bool mask}` of full shapes.
    """
    fraction = check_fraction(fraction, builder="global_magnitude")
    items = _named(variables, builder="global_magnitude")
    scores = [np.abs(values_of(v)) for _, v in items]
    total = sum(s.size for s in scores)
    masks = top_k(scores, count(fraction, total), largest=largest)
    return {p: m for (p, _), m in zip(items, masks)}


def diff(
    weights_before: Arrays,
    weights_after: Arrays,
    fraction: float,
    *,
    variables: Sequence[keras.Variable | str] | None = None,
) -> dict[str, np.ndarray]:
    """Trains the `fraction` of elements that moved most, |after - before|,
    ranked across all variables: the LT-SFT mask of Ansell et al. (2022).

    Either both weight sets are dicts `{path: array}` with the same keys, or
    both are lists of arrays aligned with `variables` (a list of
    `keras.Variable`s or paths), e.g.
    `before = [v.numpy() for v in model.trainable_variables]`, a few epochs of
    full fine-tuning, then
    `diff(before, [v.numpy() for v in model.trainable_variables], 0.01,
    variables=model.trainable_variables)`. Returns `{path: bool mask}`.
    """
    fraction = check_fraction(fraction, builder="diff")
    before, after = weights_before, weights_after
    if isinstance(before, Mapping) != isinstance(after, Mapping):
        raise TypeError(
            "`diff`: `weights_before` and `weights_after` must both be dicts "
            "{path: array} or both lists aligned with `variables`. Received: "
            f"{type(before).__name__} and {type(after).__name__}."
        )
    if isinstance(before, Mapping):
        if variables is not None:
            raise ValueError(
                "`diff`: `variables` is only for list inputs; dict inputs are "
                "keyed by path already."
            )
        missing, extra = set(before) - set(after), set(after) - set(before)
        if missing or extra:
            raise ValueError(
                "`diff`: `weights_before` and `weights_after` must have the same "
                f"keys. Only in before: {sorted(map(str, missing))}; only in after: "
                f"{sorted(map(str, extra))}."
            )
        paths = [str(k) for k in before]
        pairs = [(before[k], after[k]) for k in before]
    else:
        if variables is None:
            raise ValueError(
                "`diff`: list inputs need `variables` (the `keras.Variable`s or "
                "paths the arrays belong to, in the same order), e.g. "
                "`variables=model.trainable_variables`; or pass dicts {path: array}."
            )
        before, after, variables = list(before), list(after), list(variables)
        if not len(before) == len(after) == len(variables):
            raise ValueError(
                "`diff`: `weights_before`, `weights_after` and `variables` must "
                f"have the same length. Received: {len(before)}, {len(after)} "
                f"and {len(variables)}."
            )
        paths = [v if isinstance(v, str) else path_of(v) for v in variables]
        pairs = list(zip(before, after))
    check_unique(paths, builder="diff")
    scores = []
    for path, (b, a) in zip(paths, pairs):
        b, a = values_of(b), values_of(a)
        if b.shape != a.shape:
            raise ValueError(
                f"`diff`: variable '{path}' has shape {b.shape} in "
                f"`weights_before` but {a.shape} in `weights_after`."
            )
        scores.append(np.abs(a.astype(np.float64) - b.astype(np.float64)))
    total = sum(s.size for s in scores)
    masks = top_k(scores, count(fraction, total))
    return dict(zip(paths, masks))


# Fisher information (FISH masks) lives in `masked_opt.fisher`; re-exported here.
from masked_opt.fisher import fisher, fisher_scores  # noqa: E402
