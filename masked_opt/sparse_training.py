"""Dynamic sparse training: callbacks that move a fixed budget of trainable
elements while the model trains.

* `RigL` (Evci et al., 2020): every `update_every` steps until `end_step`,
  drop the active elements of smallest magnitude and grow as many inactive
  ones where the dense gradient is largest; grown weights start at zero with
  a fresh optimizer state (an element dropped and regrown in the same update
  keeps its value and state, as in RigL's reference code, unless
  `reinit_when_same=True`). Inactive weights are zero (a sparse network).
* `SET` (Mocanu et al., 2018): the same drop, random growth.
* `SpIEL` (Ansell et al., 2024): for fine-tuning a pretrained model. Drop
  the active elements that moved least from their pretrained value (they go
  back to it exactly), grow by gradient magnitude; inactive weights keep
  their pretrained values.

The number of active elements of each variable never changes: it is
``round(density * size)`` from the start (uniform or ERK densities, see
`layer_densities`), so the target density holds exactly after every update,
and `compact_state=True` works at its default capacity (state and update
work ∝ density, no retrace: an update rewrites the index variables).

    rigl = RigL(model, sparsity=0.9, update_every=100, end_step=3000, data=(x_batch, y_batch))
    opt = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks=rigl.masks(), compact_state=True)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=10, callbacks=[rigl])

The drop fraction at step t is ``drop_fraction / 2 * (1 + cos(pi * t / end_step))``
(RigL's cosine schedule). Gradients for growth are those of the model's
compiled loss (or `loss=`) on a batch from `data`, in inference mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np

from masked_opt import _backend, _inner_optimizer
from masked_opt._compact_state import ELEMENTWISE
from masked_opt._owner_model import current_step
from masked_opt.fisher import resolve_loss
from masked_opt.optimizer import masked_optimizer
from masked_opt.keys import Key, match_key

__all__ = ["RigL", "SET", "SpIEL", "layer_densities"]


def layer_densities(
    variables: Any, *args: Any, sparsity: float | None = None, distribution: str = "erk"
) -> list[float]:
    """Per-variable densities (trainable fractions) whose element-weighted
    mean is ``1 - sparsity``: what `RigL`, `SET` and `SpIEL` start from.

    Args:
        variables: a built Keras model (its trainable variables with two or
            more dimensions, the default targets of `RigL`), a list of
            `keras.Variable`, or a list of shapes.
        sparsity: the fraction of the elements that are frozen (zero in
            RigL), in [0, 1), as `RigL(sparsity=...)` takes it.
        distribution: "uniform": every variable at ``1 - sparsity``. "erk"
            (Erdős–Rényi-Kernel, RigL): density ∝ sum(shape) / prod(shape),
            scaled to the target; variables that would exceed 1 are made
            dense and the rest rescaled.

    Returns:
        One density per variable, in the order given.

        layer_densities(model, sparsity=0.9)                 # ERK, mean density 0.1
        layer_densities([(784, 300), (300, 10)], sparsity=0.99, distribution="uniform")
    """
    if args or sparsity is None:
        raise TypeError(
            "`layer_densities` takes the quantity as `sparsity=` (like `RigL`), not positionally: "
            f"`layer_densities(variables, sparsity=1 - density)`. Received: positional {args!r}, sparsity={sparsity!r}."
        )
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be a number in [0, 1). Received: sparsity={sparsity!r}.")
    items = _GrowDrop._targets(variables, None) if isinstance(variables, keras.Model) else variables
    return _densities([_shape(v) for v in items], 1.0 - float(sparsity), distribution)


def _shape(item: Any) -> tuple[int, ...]:
    if isinstance(item, keras.Variable):
        return tuple(item.shape)
    if isinstance(item, (tuple, list)) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in item):
        return tuple(item)
    raise TypeError(
        f"`layer_densities` takes a Keras model, a list of variables or a list of shapes. Received an item {item!r}."
    )


def _densities(shapes: Sequence[tuple[int, ...]], density: float, distribution: str) -> list[float]:
    sizes = np.array([math.prod(s) for s in shapes], np.float64)
    if distribution == "uniform":
        return [density] * len(shapes)
    if distribution != "erk":
        raise ValueError(f"`distribution` must be 'erk' or 'uniform'. Received: distribution={distribution!r}.")
    raw = np.array([sum(s) / math.prod(s) for s in shapes], np.float64)
    dense = np.zeros(len(shapes), bool)
    while True:
        budget = density * sizes.sum() - sizes[dense].sum()
        eps = budget / np.sum(raw[~dense] * sizes[~dense])
        over = ~dense & (eps * raw > 1)
        if not over.any():
            break
        dense |= over
    return [1.0 if d else float(eps * r) for d, r in zip(dense, raw)]


def _check_density(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={value!r}.")


def _batches(data: Any) -> Callable[[], tuple]:
    """`next_batch()` from an (x, y) tuple (the same batch each time), a
    callable returning one, or an iterable of them (cycled)."""
    if data is None:
        return None
    if callable(data):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return lambda: data
    if isinstance(data, Iterable):
        state = {"it": iter(data)}

        def next_batch():
            try:
                return tuple(next(state["it"]))[:2]
            except StopIteration:
                state["it"] = iter(data)
                return tuple(next(state["it"]))[:2]

        return next_batch
    raise TypeError(
        "`data` must be an (x, y) tuple, an iterable of (x, y) batches (a tf.data.Dataset, a "
        f"generator factory's output, a list) or a callable returning one. Received: {type(data).__name__}."
    )


class _GrowDrop(keras.callbacks.Callback):
    """The shared schedule and bookkeeping; subclasses say how to score."""

    needs_gradients = True
    zero_inactive = True

    def __init__(
        self,
        model: keras.Model,
        sparsity: float = 0.9,
        *,
        update_every: int = 100,
        end_step: int,
        drop_fraction: float = 0.3,
        distribution: str = "erk",
        variables: Sequence[Key] | None = None,
        data: Any = None,
        loss: Any = None,
        seed: int = 0,
        reinit_when_same: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        if not isinstance(model, keras.Model) or not model.built:
            raise ValueError(f"`{name}` needs a built Keras model (call it on data first). Received: {model!r}.")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(
                f"`sparsity` must be in [0, 1) (density = 1 - sparsity in (0, 1]). Received: sparsity={sparsity!r}."
            )
        for value, arg in ((update_every, "update_every"), (end_step, "end_step")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}.")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction <= 1:
            raise ValueError(f"`drop_fraction` must be in (0, 1]. Received: drop_fraction={drop_fraction!r}.")
        if not isinstance(reinit_when_same, bool):
            raise TypeError(f"`reinit_when_same` must be True or False. Received: reinit_when_same={reinit_when_same!r}.")
        self.reinit_when_same = reinit_when_same
        self.set_model(model)  # `self.model` works outside `fit` too (custom loops)
        self.sparsity, self.update_every, self.end_step = float(sparsity), update_every, end_step
        self.drop_fraction = float(drop_fraction)
        self.targets = self._targets(model, variables)
        self.densities = _densities([tuple(v.shape) for v in self.targets], 1.0 - self.sparsity, distribution)
        self.counts = [max(1, int(round(d * int(np.prod(v.shape))))) for d, v in zip(self.densities, self.targets)]
        self._next_batch = _batches(data)
        if self.needs_gradients and self._next_batch is None:
            raise ValueError(f"`{name}` grows by gradient magnitude: pass `data=(x_batch, y_batch)` (or batches).")
        self._loss = loss
        self._gradients = None
        self._rng = np.random.default_rng(seed)
        self._initial = [self._initial_mask(v, n) for v, n in zip(self.targets, self.counts)]
        self._last_update: int | None = None
        self.history: list[dict] = []

    @staticmethod
    def _targets(model: keras.Model, variables: Sequence[Key] | None) -> list[keras.Variable]:
        trainable = list(model.trainable_variables)
        if variables is None:  # kernels and embeddings; biases and norms stay dense
            return [v for v in trainable if len(v.shape) >= 2]
        chosen = sorted({i for key in variables for i in match_key(key, trainable, argument="variables")})
        return [trainable[i] for i in chosen]

    def _initial_mask(self, variable: keras.Variable, count: int) -> np.ndarray:
        size = int(np.prod(variable.shape))
        flat = np.zeros(size, bool)
        flat[self._rng.choice(size, count, replace=False)] = True
        return flat.reshape(tuple(variable.shape))

    def masks(self) -> dict[str, np.ndarray]:
        """The initial masks, `{path: bool array}` (random at each
        variable's density): pass them as `MaskedOptimizer(masks=...)`."""
        return {v.path: m.copy() for v, m in zip(self.targets, self._initial)}

    def drop_fraction_at(self, step: int) -> float:
        """The fraction of each variable's active elements an update at `step` moves."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    # ---------------------------------------------------------- callback

    def on_train_begin(self, logs=None):
        optimizer = masked_optimizer(self.model)
        self._check(optimizer)
        if self.zero_inactive and self._last_update is None:  # a sparse network: inactive weights are zero
            for variable in self.targets:
                mask = optimizer.get_mask(variable)
                values = np.array(keras.ops.convert_to_numpy(variable.value))
                if np.any(values[~mask] != 0):
                    variable.assign(np.where(mask, values, np.zeros_like(values)))
        self._on_begin(optimizer)

    def _on_begin(self, optimizer: Any) -> None:
        pass

    def on_train_batch_begin(self, batch, logs=None):
        step = current_step(self)
        if 0 < step < self.end_step and step % self.update_every == 0 and step != self._last_update:
            self.update(step)

    def _check(self, optimizer: Any) -> None:
        name = type(self).__name__
        for leaf in _inner_optimizer.leaf_optimizers(optimizer.inner_optimizer):
            if type(leaf).__name__ not in ELEMENTWISE:
                raise ValueError(
                    f"`{name}` gives grown elements a fresh optimizer state, element by element; the inner "
                    f"optimizer '{leaf.name}' ({type(leaf).__name__}) couples the elements of a variable. Use one "
                    f"of: {', '.join(ELEMENTWISE)}."
                )
        for variable, count in zip(self.targets, self.counts):
            if optimizer.mask_storage_shape(variable) != tuple(variable.shape):
                raise ValueError(
                    f"`{name}`: variable '{variable.path}' needs an element mask in the MaskedOptimizer (it has "
                    f"{optimizer.mask_storage_shape(variable)}): pass `masks={name.lower()}.masks()`."
                )
            active = int(np.count_nonzero(optimizer.get_mask(variable)))
            if active != count:
                raise ValueError(
                    f"`{name}`: variable '{variable.path}' has {active:,} trainable elements, the target is "
                    f"{count:,} (density {count / math.prod(variable.shape):.4f}): start from `masks={name.lower()}.masks()`."
                )

    # ------------------------------------------------------------- update

    def update(self, step: int) -> None:
        """One drop-and-grow update (what the callback does at `step`)."""
        model = self.model  # syncs JAX's trainer state
        optimizer = masked_optimizer(model)
        fraction = self.drop_fraction_at(step)
        grads = self._grow_gradients(model) if self.needs_gradients else [None] * len(self.targets)
        moved = 0
        for variable, grad in zip(self.targets, grads):
            moved += self._update_variable(optimizer, variable, grad, fraction)
        self._last_update = step
        self.history.append({"step": step, "drop_fraction": fraction, "moved": moved})

    def _grow_gradients(self, model: keras.Model) -> list[np.ndarray]:
        if self._gradients is None:
            loss_fn = resolve_loss(model, self._loss, caller=type(self).__name__)
            self._gradients = _backend.loss_gradients(model, loss_fn, self.targets)
        x, y = self._next_batch()
        return [np.asarray(keras.ops.convert_to_numpy(g)) for g in self._gradients(x, y)]

    def _update_variable(self, optimizer: Any, variable: keras.Variable, grad: Any, fraction: float) -> int:
        mask = optimizer.get_mask(variable).reshape(-1)
        values = np.array(keras.ops.convert_to_numpy(variable.value)).reshape(-1)
        active = np.flatnonzero(mask)
        k = min(int(round(fraction * active.size)), active.size)
        if k == 0:
            return 0
        drop_scores = self._drop_scores(variable, values, active)
        dropped = active[np.argsort(drop_scores, kind="stable")[:k]]
        mask[dropped] = False
        inactive = np.flatnonzero(~mask)
        grown = inactive[self._grow_order(grad, inactive)[:k]]
        mask[grown] = True
        new_values = self._new_values(variable, values, dropped, grown)
        if not self.reinit_when_same:  # RigL's reference rule: dropped and regrown at once keeps its value and state
            regrown = np.intersect1d(dropped, grown, assume_unique=True)
            new_values[regrown] = values[regrown]
            grown = np.setdiff1d(grown, regrown, assume_unique=True)
        optimizer.set_mask(variable, mask.reshape(tuple(variable.shape)))
        variable.assign(new_values.reshape(tuple(variable.shape)))
        if grown.size:
            optimizer.reset_state(variable, np.unravel_index(grown, tuple(variable.shape)))
        self._after_update(variable, values, dropped, grown, mask)
        return int(k)

    # ---------------------------------------------------------- the rules

    def _drop_scores(self, variable: keras.Variable, values: np.ndarray, active: np.ndarray) -> np.ndarray:
        return np.abs(values[active].astype(np.float64))

    def _grow_order(self, grad: np.ndarray, inactive: np.ndarray) -> np.ndarray:
        scores = np.abs(np.asarray(grad, np.float64).reshape(-1)[inactive])
        return np.argsort(-scores, kind="stable")

    def _new_values(self, variable, values: np.ndarray, dropped: np.ndarray, grown: np.ndarray) -> np.ndarray:
        new = values.copy()
        new[dropped] = 0
        new[grown] = 0
        return new

    def _after_update(self, variable, values, dropped, grown, mask) -> None:
        pass


class RigL(_GrowDrop):
    """RigL (Evci et al., 2020): drop by weight magnitude, grow by dense
    gradient magnitude, grown weights at zero with fresh optimizer state.

    Args:
        model: the built model whose variables it sparsifies.
        sparsity: the fraction of each target's elements that are zero
            (across targets with `distribution="erk"`); in [0, 1).
        update_every: steps between updates (RigL's ΔT).
        end_step: no updates from this step on (RigL's T_end).
        drop_fraction: the fraction moved at step 0, annealed by cosine.
        distribution: "erk" or "uniform" (see `layer_densities`).
        variables: keys of the variables to sparsify (default: every
            trainable variable with two or more dimensions).
        data: the batch(es) the growth gradient is computed on.
        loss: the loss for that gradient (default: the model's compiled one).
        seed: for the initial masks (and SET's growth).
        reinit_when_same: what happens to an element dropped and grown again
            in the same update. False (the default, as in RigL's reference
            code): it keeps its value and its optimizer state; only elements
            inactive before the update start at zero with fresh state. True:
            it restarts like a newly grown one.
    """


class SET(_GrowDrop):
    """SET (Mocanu et al., 2018): drop by weight magnitude, grow at random
    among inactive elements (no gradient, no `data`). Arguments as `RigL`."""

    needs_gradients = False

    def _grow_order(self, grad: Any, inactive: np.ndarray) -> np.ndarray:
        return self._rng.permutation(inactive.size)


class SpIEL(_GrowDrop):
    """SpIEL-style sparse fine-tuning (Ansell et al., 2024): drop the active
    elements that moved least from their pretrained value (they return to
    it exactly), grow by gradient magnitude; inactive weights keep their
    pretrained values. Arguments as `RigL`; `sparsity` is typically 0.99+.
    """

    zero_inactive = False

    def _on_begin(self, optimizer: Any) -> None:
        if self._last_update is None:  # the pretrained values of the active elements
            self._base = {}
            for variable in self.targets:
                active = np.flatnonzero(optimizer.get_mask(variable).reshape(-1))
                values = np.array(keras.ops.convert_to_numpy(variable.value)).reshape(-1)
                self._base[id(variable)] = (active, values[active].copy())

    def _base_at(self, variable: keras.Variable, positions: np.ndarray) -> np.ndarray:
        active, base = self._base[id(variable)]
        return base[np.searchsorted(active, positions)]

    def _drop_scores(self, variable, values: np.ndarray, active: np.ndarray) -> np.ndarray:
        return np.abs(values[active].astype(np.float64) - self._base_at(variable, active).astype(np.float64))

    def _new_values(self, variable, values: np.ndarray, dropped: np.ndarray, grown: np.ndarray) -> np.ndarray:
        new = values.copy()
        new[dropped] = self._base_at(variable, dropped)  # back to the pretrained value, exactly
        return new  # grown elements were frozen: at their pretrained value already

    def _after_update(self, variable, values, dropped, grown, mask) -> None:
        active, base = self._base[id(variable)]
        now = np.flatnonzero(mask)
        known = np.isin(now, active, assume_unique=True)
        new_base = np.empty(now.size, base.dtype)
        new_base[known] = base[np.searchsorted(active, now[known])]
        new_base[~known] = values[now[~known]]  # frozen until now: the pretrained value
        self._base[id(variable)] = (now, new_base)
