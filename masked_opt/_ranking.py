"""Counting and ranking elements: the arithmetic the mask builders share
(`masks`, `fisher`, `pruning`).

`fraction` is the share of elements that stay trainable, in (0, 1]; the count
is `floor(fraction * size + 0.5)` (round half up) and at least 1. Ties in a
top-k are broken by position: the earlier variable, then the lower flat
(C-order) index, wins.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from masked_opt import _backend


def path_of(variable: Any) -> str:
    return str(getattr(variable, "path", "<array>"))


def shape_of(variable: Any) -> tuple[int, ...]:
    shape = getattr(variable, "shape", None)
    if shape is None:
        shape = np.shape(variable)
    return tuple(int(d) for d in shape)


def values_of(value: Any) -> np.ndarray:
    if isinstance(value, keras.Variable):
        check_attached(value)
        return np.asarray(value.numpy())
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(keras.ops.convert_to_numpy(value))


def check_attached(variable: keras.Variable) -> None:
    """A clear error for a variable whose value JAX's trainer holds during `fit`."""
    if _backend.is_purged(variable):
        raise RuntimeError(
            f"The value of variable '{variable.path}' is held by JAX's trainer "
            "right now (during `fit` it is detached from the variable until "
            "`model.jax_state_sync()`). In a callback, read `self.model` "
            "(which syncs) before building masks, or call "
            "`model.jax_state_sync()` first."
        )


def check_fraction(fraction: Any, *, builder: str) -> float:
    """`fraction` as a float in (0, 1], or a clear error."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(
            f"`{builder}`: `fraction` must be a number in (0, 1], the share of "
            f"elements that stay trainable. Received: {fraction!r} of type "
            f"{type(fraction).__name__}."
        )
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise ValueError(
            f"`{builder}`: `fraction` must be in (0, 1], the share of elements "
            f"that stay trainable (to freeze a whole variable, use the mask "
            f"False). Received: fraction={fraction!r}."
        )
    return fraction


def count(fraction: float, size: int) -> int:
    """Trainable elements for `fraction` of `size`: round half up, at least 1."""
    if size == 0:
        return 0
    return min(size, max(1, math.floor(fraction * size + 0.5)))


def top_k(scores: Sequence[np.ndarray], k: int, *, largest: bool = True) -> list[np.ndarray]:
    """Bool masks (shapes of `scores`) selecting exactly the `k` best elements
    across all arrays; ties go to the earlier array, then the lower flat index.
    NaN scores rank last."""
    flat = np.concatenate([np.ravel(s) for s in scores]) if scores else np.zeros(0)
    flat = flat.astype(np.result_type(flat.dtype, np.float32), copy=False)
    if not largest:
        flat = -flat
    flat = np.where(np.isnan(flat), -np.inf, flat)
    chosen = np.zeros(flat.shape, bool)
    n = flat.size
    if k >= n:
        chosen[:] = True
    elif k > 0:
        threshold = np.partition(flat, n - k)[n - k]  # the k-th largest
        chosen = flat > threshold
        need = k - int(np.count_nonzero(chosen))
        chosen[np.flatnonzero(flat == threshold)[:need]] = True
    out, start = [], 0
    for s in scores:
        size = int(np.size(s))
        out.append(chosen[start : start + size].reshape(np.shape(s)))
        start += size
    return out


def check_unique(paths: Sequence[str], *, builder: str) -> None:
    seen = set()
    for p in paths:
        if p in seen:
            raise ValueError(
                f"`{builder}`: two variables share the path '{p}', so a "
                "`{path: mask}` dict cannot tell them apart. Give the layers "
                "distinct names, or build those masks per variable."
            )
        seen.add(p)
