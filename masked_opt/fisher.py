"""Fisher information per element, and the FISH mask (Sung et al. 2021).

`fisher_scores` averages squared per-example gradients over data, a batch at
a time, with the active backend's per-example gradients
(`_backend.squared_grad_sums`: `tf.vectorized_map`, `jax.vmap`,
`torch.func.vmap`); `fisher` keeps the top `fraction` across variables.
Both are re-exported by `masked_opt.masks`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import keras
import numpy as np

from masked_opt import _backend
from masked_opt._ranking import check_attached, check_fraction, check_unique, count, shape_of, top_k
from masked_opt.keys import match_key

__all__ = ["fisher", "fisher_scores"]

Verbose = Literal["auto"] | int
"""Progress output, as `model.predict`'s `verbose`: "auto" (1), 0, 1 or 2."""


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
    masks = top_k(list(scores.values()), count(fraction, total))
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
    _check_count(batch_size, "batch_size")
    if num_batches is not None:
        _check_count(num_batches, "num_batches", " or None")
    verbose = _check_verbose(verbose, caller="fisher_scores")
    loss_fn = resolve_loss(model, loss)
    batches = _batches(data, int(batch_size))  # checks a tuple `data`
    target = _num_batches(data, int(batch_size), num_batches)
    if num_batches is not None:
        batches = itertools.islice(batches, int(num_batches))
    first = next(batches, None)
    if first is None:
        raise ValueError("`fisher_scores`: `data` holds no examples.")
    for v in model.variables:
        check_attached(v)
    _check_fits(model, first, loss_fn)  # also builds an unbuilt model
    chosen = _resolve_variables(model, variables)
    step = _backend.squared_grad_sums(model, loss_fn, [v for _, v in chosen])
    sums = _accumulate(step, itertools.chain([first], batches), [shape_of(v) for _, v in chosen], target, verbose)
    return {path: acc for (path, _), acc in zip(chosen, sums)}


def _check_count(value: Any, name: str, alternative: str = "") -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`fisher_scores`: `{name}` must be a positive int{alternative}. Received: {value!r}."
        )


def _accumulate(step: Callable, batches: Iterable, shapes: list, target: int | None, verbose: int) -> list:
    """The mean over examples of `step(x, y)`'s per-batch sums, with a progress bar."""
    sums = [np.zeros(shape, np.float64) for shape in shapes]
    n = seen = 0
    progbar = keras.utils.Progbar(target, verbose=verbose, unit_name="step") if verbose else None
    for x, y in batches:
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
    return [acc / n for acc in sums]


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


def resolve_loss(model: keras.Model, loss: Any, caller: str = "fisher_scores") -> Callable:
    """`loss`, else the model's compiled loss, as `(y_true, y_pred) -> loss`."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                f"`{caller}`: model '{model.name}' is not compiled with a "
                "loss. Pass `loss=` (e.g. `loss='sparse_categorical_crossentropy'` "
                "or a `keras.losses.Loss`), or compile the model first."
            )
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            f"`{caller}`: the model's loss is a structure "
            f"({type(loss).__name__}) for several outputs; pass one callable "
            "`loss=(y_true, y_pred) -> scalar` that combines them."
        )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(
            f"`{caller}`: `loss` must be a callable `(y_true, y_pred) -> loss`, "
            f"a `keras.losses.Loss` or a loss name. Received: {loss!r}."
        )
    return loss


def _leaves(x: Any) -> list:
    return keras.tree.flatten(x)


def _num_examples(x: Any) -> int:
    return int(shape_of(_leaves(x)[0])[0])


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
        sizes = {shape_of(a)[0] if shape_of(a) else None for a in _leaves(x) + _leaves(y)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "`fisher_scores`: x and y must hold the same number of examples "
                "(first axis). Received: x shapes "
                f"{[shape_of(a) for a in _leaves(x)]}, y shapes {[shape_of(a) for a in _leaves(y)]}."
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
    received = [shape_of(a) for a in _leaves(x)]
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
            f"{[shape_of(a) for a in _leaves(y)]} (batch first) and model outputs "
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
    check_unique([v.path for v in chosen], builder="fisher_scores")
    return [(v.path, v) for v in chosen]
