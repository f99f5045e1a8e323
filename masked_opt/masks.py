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

import itertools
import math
import numbers
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np

import keras

from masked_opt import _backend
from masked_opt.registry import match_key, to_bool_mask

__all__ = [
    "MaskFn",
    "columns",
    "diff",
    "fisher",
    "fisher_scores",
    "global_magnitude",
    "magnitude",
    "random",
    "rows",
]

Indices = Union[int, Sequence[int], np.ndarray, range]
"""An integer, or a 1-D sequence of integers (negative ones count from the end)."""

Arrays = Union[Mapping[str, Any], Sequence[Any]]
"""`{path: array}`, or a list of arrays aligned with a list of variables."""

Verbose = Literal["auto"] | int
"""Progress output, as `model.predict`'s `verbose`: "auto" (1), 0, 1 or 2."""


# --------------------------------------------------------------------- helpers


def _path(variable: Any) -> str:
    return str(getattr(variable, "path", "<array>"))


def _shape(variable: Any) -> tuple[int, ...]:
    shape = getattr(variable, "shape", None)
    if shape is None:
        shape = np.shape(variable)
    return tuple(int(d) for d in shape)


def _values(value: Any) -> np.ndarray:
    if isinstance(value, keras.Variable):
        _check_attached(value)
        return np.asarray(value.numpy())
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(keras.ops.convert_to_numpy(value))


def _check_attached(variable: keras.Variable) -> None:
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


def _top_k(scores: Sequence[np.ndarray], k: int, *, largest: bool = True) -> list[np.ndarray]:
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
    _check_unique([p for p, _ in items], builder=builder)
    return items


def _check_unique(paths: Sequence[str], *, builder: str) -> None:
    seen = set()
    for p in paths:
        if p in seen:
            raise ValueError(
                f"`{builder}`: two variables share the path '{p}', so a "
                "`{path: mask}` dict cannot tell them apart. Give the layers "
                "distinct names, or build those masks per variable."
            )
        seen.add(p)


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
            return to_bool_mask(x, what=f"mask operand for '{_path(variable)}'")

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
        shape, path = _shape(variable), _path(variable)
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
        shape, path = _shape(variable), _path(variable)
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
        shape, path = _shape(variable), _path(variable)
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
        w = _values(variable)
        return _top_k([np.abs(w)], count(fraction, w.size), largest=largest)[0]

    return MaskFn(build, f"magnitude({fraction}, largest={largest})")


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
    scores = [np.abs(_values(v)) for _, v in items]
    total = sum(s.size for s in scores)
    masks = _top_k(scores, count(fraction, total), largest=largest)
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
        paths = [v if isinstance(v, str) else _path(v) for v in variables]
        pairs = list(zip(before, after))
    _check_unique(paths, builder="diff")
    scores = []
    for path, (b, a) in zip(paths, pairs):
        b, a = _values(b), _values(a)
        if b.shape != a.shape:
            raise ValueError(
                f"`diff`: variable '{path}' has shape {b.shape} in "
                f"`weights_before` but {a.shape} in `weights_after`."
            )
        scores.append(np.abs(a.astype(np.float64) - b.astype(np.float64)))
    total = sum(s.size for s in scores)
    masks = _top_k(scores, count(fraction, total))
    return dict(zip(paths, masks))


# ------------------------------------------------------------------- Fisher


def fisher(
    model: keras.Model,
    data: Any,
    fraction: float,
    *,
    variables: Sequence[keras.Variable | str] | None = None,
    loss: Any = None,
    batch_size: int = 32,
    num_batches: int | None = None,
    verbose: Verbose = "auto",
) -> dict[str, np.ndarray]:
    """The FISH mask (Sung et al. 2021): trains the `fraction` of elements with
    the largest empirical Fisher information, ranked across `variables`.

    Arguments as in `fisher_scores`. Returns `{path: bool mask}`.
    """
    fraction = check_fraction(fraction, builder="fisher")
    scores = fisher_scores(
        model,
        data,
        variables=variables,
        loss=loss,
        batch_size=batch_size,
        num_batches=num_batches,
        verbose=verbose,
    )
    total = sum(s.size for s in scores.values())
    masks = _top_k(list(scores.values()), count(fraction, total))
    return dict(zip(scores, masks))


def fisher_scores(
    model: keras.Model,
    data: Any,
    *,
    variables: Sequence[keras.Variable | str] | None = None,
    loss: Any = None,
    batch_size: int = 32,
    num_batches: int | None = None,
    verbose: Verbose = "auto",
) -> dict[str, np.ndarray]:
    """Empirical Fisher information per element: the mean over examples of the
    squared per-example gradient of the loss. Returns `{path: float64 array}`.

    Args:
        model: a Keras model, called with `training=False`.
        data: a tuple `(x, y)` of arrays (or dicts / lists of arrays for
            multi-input models), split into batches of `batch_size`; or any
            iterable of `(x, y)` batches (a list, a generator, a
            `tf.data.Dataset` on TensorFlow).
        variables: the variables to score, as `keras.Variable`s or path keys
            (matched like `masks=` keys); default all trainable variables.
        loss: `(y_true, y_pred) -> loss` (a `keras.losses.Loss`, a function
            or a name such as "mse"); default the loss the model was compiled
            with. One example's loss is reduced to a scalar by its mean.
        batch_size: examples per batch for array data.
        num_batches: stop after this many batches (default: all).
        verbose: progress over the batches, as in `model.predict`: `"auto"`
            (default; 1), 0 (silent), 1 (a `keras.utils.Progbar`, updated per
            batch) or 2 (one line at the end). Printed with `keras.utils`'s
            `print_msg`, so `keras.config.disable_interactive_logging()`
            sends it to the Python log instead.

    Per-example gradients are computed with the active backend, a batch at
    a time:

    * TensorFlow: `tf.vectorized_map` over the examples of a `GradientTape`,
      in a `tf.function`;
    * JAX: `jax.vmap(jax.grad(...))` of the model called statelessly (in a
      `keras.StatelessScope`, as `model.stateless_call` does), under
      `jax.jit` (compiled once per batch shape; a last, smaller batch
      compiles once more);
    * torch: `torch.func.vmap(torch.func.grad(...))` of the model called
      statelessly. Layers whose torch kernels `torch.func.vmap`
      cannot batch (e.g. `Conv2D`, whose channels-last copy it rejects) make
      it fall back, for the rest of the call, to a loop over the examples
      with one `torch.autograd.grad` each: same result, slower.

    The vectorised paths hold every per-example gradient of a batch at once:
    peak memory is about `batch_size` times the size of the scored
    variables, so lower `batch_size` for large models. The model's
    variables are read when `fisher_scores` is called; on JAX, inside a
    callback during `fit`, read `self.model` first (it syncs the trainer's
    state back into the variables).
    """
    if (
        not isinstance(batch_size, numbers.Integral)
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(
            f"`fisher_scores`: `batch_size` must be a positive int. Received: {batch_size!r}."
        )
    if num_batches is not None and (
        not isinstance(num_batches, numbers.Integral)
        or isinstance(num_batches, bool)
        or num_batches < 1
    ):
        raise ValueError(
            f"`fisher_scores`: `num_batches` must be a positive int or None. Received: {num_batches!r}."
        )
    verbose = _check_verbose(verbose, caller="fisher_scores")
    loss_fn = _resolve_loss(model, loss)
    batches = _batches(data, int(batch_size))  # checks a tuple `data`
    target = _num_batches(data, int(batch_size), num_batches)
    if num_batches is not None:
        batches = itertools.islice(batches, int(num_batches))
    first = next(batches, None)
    if first is None:
        raise ValueError("`fisher_scores`: `data` holds no examples.")
    for v in model.variables:
        _check_attached(v)
    _check_fits(model, first, loss_fn)  # also builds an unbuilt model
    chosen = _resolve_variables(model, variables)
    if _backend.BACKEND not in _SQUARED_GRAD_SUMS:
        raise NotImplementedError(
            "`fisher_scores` computes per-example gradients on the TensorFlow, "
            f"JAX and torch backends; the active backend is '{_backend.BACKEND}'. "
            "Set KERAS_BACKEND to one of those."
        )
    step = _SQUARED_GRAD_SUMS[_backend.BACKEND](model, loss_fn, [v for _, v in chosen])
    sums = [np.zeros(_shape(v), np.float64) for _, v in chosen]
    n = seen = 0
    progbar = keras.utils.Progbar(target, verbose=verbose, unit_name="step") if verbose else None
    for x, y in itertools.chain([first], batches):
        for acc, part in zip(sums, step(x, y)):
            acc += keras.ops.convert_to_numpy(part)
        n += _num_examples(x)
        seen += 1
        if progbar is not None and verbose == 1:
            progbar.update(seen, finalize=False)
    if progbar is not None:
        progbar.update(seen, finalize=True)
    if n == 0:
        raise ValueError("`fisher_scores`: `data` holds no examples.")
    return {path: acc / n for (path, _), acc in zip(chosen, sums)}


def _check_verbose(verbose: Any, *, caller: str) -> int:
    if verbose == "auto":
        return 1  # as `model.predict`
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            f'`{caller}`: `verbose` must be "auto", 0, 1 or 2 (as in '
            f"`model.predict`). Received: verbose={verbose!r}."
        )
    return int(verbose)


def _num_batches(data: Any, batch_size: int, num_batches: int | None) -> int | None:
    """How many batches `_batches` will yield, where known (for the progress bar)."""
    if isinstance(data, tuple):
        n = math.ceil(int(np.shape(_leaves(data[0])[0])[0]) / batch_size)
    else:
        try:
            n = len(data)
        except TypeError:  # a generator, a dataset of unknown cardinality
            n = None
    if num_batches is not None:
        n = int(num_batches) if n is None else min(n, int(num_batches))
    return n


def _resolve_loss(model: keras.Model, loss: Any) -> Callable:
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                f"`fisher_scores`: model '{model.name}' is not compiled with a "
                "loss. Pass `loss=` (e.g. `loss='sparse_categorical_crossentropy'` "
                "or a `keras.losses.Loss`), or compile the model first."
            )
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "`fisher_scores`: the model's loss is a structure "
            f"({type(loss).__name__}) for several outputs; pass one callable "
            "`loss=(y_true, y_pred) -> scalar` that combines them."
        )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(
            "`fisher_scores`: `loss` must be a callable `(y_true, y_pred) -> loss`, "
            f"a `keras.losses.Loss` or a loss name. Received: {loss!r}."
        )
    return loss


def _leaves(x: Any) -> list:
    return keras.tree.flatten(x)


def _num_examples(x: Any) -> int:
    return int(_shape(_leaves(x)[0])[0])


def _to_floatx(x: Any) -> Any:
    def cast(a):
        if isinstance(a, np.ndarray) and a.dtype == np.float64:
            return a.astype(keras.config.floatx())
        return a

    return keras.tree.map_structure(cast, x)


def _batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(
                "`fisher_scores`: a tuple `data` must be `(x, y)`. Received a "
                f"tuple of length {len(data)}."
            )
        x, y = (
            keras.tree.map_structure(np.asarray, data[0]),
            keras.tree.map_structure(np.asarray, data[1]),
        )
        sizes = {_shape(a)[0] if _shape(a) else None for a in _leaves(x) + _leaves(y)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "`fisher_scores`: x and y must hold the same number of examples "
                "(first axis). Received: x shapes "
                f"{[_shape(a) for a in _leaves(x)]}, y shapes {[_shape(a) for a in _leaves(y)]}."
            )
        (n,) = sizes
        x, y = _to_floatx(x), _to_floatx(y)

        def take(tree: Any, start: int) -> Any:
            return keras.tree.map_structure(lambda a: a[start : start + batch_size], tree)

        return ((take(x, s), take(y, s)) for s in range(0, n, batch_size))
    if isinstance(data, (Mapping, np.ndarray, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "`fisher_scores`: `data` must be a tuple `(x, y)` of arrays, or a "
            "`tf.data.Dataset` / iterable of `(x, y)` batches. Received: "
            f"{type(data).__name__}."
        )

    def gen():
        for i, batch in enumerate(data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    "`fisher_scores`: each batch of `data` must be a pair "
                    f"`(x, y)`. Batch {i} is a {type(batch).__name__}"
                    f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}."
                )
            yield _to_floatx(batch[0]), _to_floatx(batch[1])

    return gen()


def _expected_shapes(model: keras.Model) -> list[tuple] | None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [tuple(t.shape) for t in inputs]


def _check_fits(model: keras.Model, batch: tuple[Any, Any], loss_fn: Callable) -> None:
    x, y = batch
    received = [_shape(a) for a in _leaves(x)]
    expected = _expected_shapes(model)
    hint = (
        f"; the model expects inputs of shape {expected[0] if len(expected) == 1 else expected} (batch first)"
        if expected
        else ""
    )
    if expected is not None and len(expected) == len(received) == 1:
        # Static check for single-input models; others are checked by the call below.
        exp, got = expected[0], received[0]
        if len(exp) != len(got) or any(e is not None and e != g for e, g in zip(exp[1:], got[1:])):
            raise ValueError(
                f"`fisher_scores`: `data` does not fit model '{model.name}': x "
                f"has shape {got}{hint}."
            )
    one = keras.tree.map_structure(lambda a: a[:1], x)
    try:
        y_pred = model(one, training=False)
    except Exception as e:
        raise ValueError(
            f"`fisher_scores`: `data` does not fit model '{model.name}': calling "
            f"it on x of shape {received[0] if len(received) == 1 else received}"
            f" failed{hint}. ({type(e).__name__}: {e})"
        ) from e
    y_one = keras.tree.map_structure(lambda a: a[:1], y)
    try:
        keras.ops.mean(loss_fn(y_one, y_pred))
    except Exception as e:
        pred_shapes = [tuple(t.shape) for t in _leaves(y_pred)]
        raise ValueError(
            "`fisher_scores`: the loss could not be computed from y of shape "
            f"{[_shape(a) for a in _leaves(y)]} (batch first) and model outputs "
            f"of shape {pred_shapes} (one example). ({type(e).__name__}: {e})"
        ) from e


def _resolve_variables(model: keras.Model, variables: Any) -> list[tuple[str, keras.Variable]]:
    trainable = list(model.trainable_variables)
    if variables is None:
        chosen = trainable
    else:
        if isinstance(variables, (str, keras.Variable)):
            variables = [variables]
        chosen = []
        for key in variables:
            if isinstance(key, keras.Variable) and not any(key is v for v in trainable):
                raise ValueError(
                    f"`fisher_scores`: variable '{key.path}' is not a trainable "
                    f"variable of model '{model.name}'."
                )
            for i in match_key(key, trainable, argument="fisher_scores(variables=...)"):
                if not any(trainable[i] is c for c in chosen):
                    chosen.append(trainable[i])
    if not chosen:
        raise ValueError(
            f"`fisher_scores`: model '{model.name}' has no trainable variables to score."
        )
    _check_unique([v.path for v in chosen], builder="fisher_scores")
    return [(v.path, v) for v in chosen]


# Per-example gradients, one implementation per backend. Each returns
# `step(x, y) -> [sum over the batch of squared per-example gradients]`, one
# float32 tensor per variable in `variables` (trainable variables of `model`).


def _one(tree: Any) -> Any:
    """One example as a batch of one."""
    return keras.tree.map_structure(lambda t: t[None], tree)


def _squared_grad_sums_tensorflow(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """A `tf.function`: `tf.vectorized_map` over one GradientTape per example."""
    import tensorflow as tf

    def one_example(example):
        xi, yi = example
        with tf.GradientTape() as tape:
            value = keras.ops.mean(loss_fn(_one(yi), model(_one(xi), training=False)))
        grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [keras.ops.square(tf.convert_to_tensor(g)) for g in grads]

    @tf.function(autograph=False, reduce_retracing=True)
    def step(x, y):
        per_example = tf.vectorized_map(one_example, (x, y))
        return [keras.ops.sum(g, axis=0) for g in per_example]

    return step


def _stateless_loss(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`loss(chosen, trainable, non_trainable, xi, yi)`: one example's loss as
    a pure function of the values of `variables` (`chosen`): the model is
    called in a `keras.StatelessScope` (as `model.stateless_call` does, but
    through `model(...)`, which drops `training` for a `call` without it).
    `trainable` holds the values of all trainable variables, the chosen ones
    replaced by `chosen`."""
    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)
    positions = [next(i for i, t in enumerate(trainable) if t is v) for v in variables]

    def loss(chosen, trainable_values, non_trainable_values, xi, yi):
        values = list(trainable_values)
        for i, value in zip(positions, chosen):
            values[i] = value
        mapping = list(zip(trainable, values)) + list(zip(non_trainable, non_trainable_values))
        with keras.StatelessScope(state_mapping=mapping):
            y_pred = model(_one(xi), training=False)
        return keras.ops.mean(loss_fn(_one(yi), y_pred))

    return loss


def _squared_grad_sums_jax(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """`jax.vmap(jax.grad(loss))` over the examples of a batch, under `jax.jit`."""
    import jax
    import jax.numpy as jnp

    loss = _stateless_loss(model, loss_fn, variables)
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0))

    @jax.jit
    def sums(chosen, trainable_values, non_trainable_values, x, y):
        grads = per_example(chosen, trainable_values, non_trainable_values, x, y)
        return [jnp.sum(jnp.square(g), axis=0) for g in grads]

    def step(x, y):
        return sums(
            [v.value for v in variables],
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            _as_tensors(x),
            _as_tensors(y),
        )

    return step


class _SquaredGradSumsTorch:
    """`torch.func.vmap(torch.func.grad(loss))` over the examples of a batch.

    Where `torch.func` cannot batch a layer's kernels (it raises a
    `RuntimeError` or `NotImplementedError`, e.g. for the channels-last copy
    in `Conv2D`), this falls back, for this and every later batch, to a loop
    with one `torch.autograd.grad` per example; a genuine error is raised
    again by the loop. `vectorised` says which path is in use.
    """

    def __init__(self, model: keras.Model, loss_fn: Callable, variables: list):
        import torch

        self.model, self.loss_fn, self.variables = model, loss_fn, variables
        self.vectorised = True
        loss = _stateless_loss(model, loss_fn, variables)
        self._per_example = torch.func.vmap(
            torch.func.grad(loss), in_dims=(None, None, None, 0, 0)
        )

    def __call__(self, x: Any, y: Any) -> list:
        x, y = _as_tensors(x), _as_tensors(y)
        if self.vectorised:
            try:
                return self._batched(x, y)
            except (RuntimeError, NotImplementedError):
                self.vectorised = False
        return self._looped(x, y)

    def _batched(self, x: Any, y: Any) -> list:
        import torch

        def values(variables):
            return [v.value.detach() for v in variables]

        grads = self._per_example(
            values(self.variables),
            values(self.model.trainable_variables),
            values(self.model.non_trainable_variables),
            x,
            y,
        )
        return [torch.sum(torch.square(g), dim=0) for g in grads]

    def _looped(self, x: Any, y: Any) -> list:
        import torch

        targets = [v.value for v in self.variables]
        sums = [torch.zeros_like(t.detach()) for t in targets]
        with torch.enable_grad():
            for i in range(_num_examples(x)):
                xi = keras.tree.map_structure(lambda t: t[i], x)
                yi = keras.tree.map_structure(lambda t: t[i], y)
                y_pred = self.model(_one(xi), training=False)
                value = keras.ops.mean(self.loss_fn(_one(yi), y_pred))
                grads = torch.autograd.grad(value, targets, allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc += torch.square(g.detach())
        return sums


def _as_tensors(tree: Any) -> Any:
    return keras.tree.map_structure(keras.ops.convert_to_tensor, tree)


_SQUARED_GRAD_SUMS = {
    "tensorflow": _squared_grad_sums_tensorflow,
    "jax": _squared_grad_sums_jax,
    "torch": _SquaredGradSumsTorch,
}
