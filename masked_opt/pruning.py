"""Magnitude pruning for Keras 3, through the optimizer.

TFMOT's `prune_low_magnitude` supports Keras 2 only. Here pruning needs no
wrapper layer and no strip step: at each pruning step `MagnitudePruning` sets
the smallest-|w| weights of each targeted variable to exactly 0 and freezes
them in the `MaskedOptimizer`, which keeps them bit-exactly 0 however the
inner optimizer updates (momentum, weight decay, EMA). The model stays a stock
Keras model and saves and loads as usual, masks included.

```python
model.compile(
    optimizer=MaskedOptimizer(keras.optimizers.Adam(1e-3), masks=prunable_masks(".*kernel")),
    loss="sparse_categorical_crossentropy",
)
schedule = PolynomialSparsity(final_sparsity=0.8, begin_step=0, end_step=1000, frequency=100)
model.fit(x, y, epochs=5, callbacks=[MagnitudePruning(schedule, keys=".*kernel")])
```

Schedules follow TFMOT: `PolynomialSparsity` is TFMOT's `PolynomialDecay`,
`ConstantSparsity` its namesake; the step is `optimizer.iterations`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import keras

from masked_opt._owner_model import current_step
from masked_opt._ranking import count
from masked_opt.optimizer import MaskedOptimizer, masked_optimizer
from masked_opt.keys import Key, check_key, match_key

__all__ = [
    "ConstantSparsity",
    "MagnitudePruning",
    "PolynomialSparsity",
    "PruningSchedule",
    "prunable_masks",
    "prune_variable",
]


def _check_sparsity(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number in [0, 1). Received: {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1) (the fraction of weights set to zero). "
            f"Received: {name}={value!r}."
        )
    return float(value)


def _check_step(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}.")
    return int(value)


class PruningSchedule:
    """Base class: when to prune, and to what sparsity."""

    begin_step: int
    end_step: int
    frequency: int

    def sparsity(self, step: int) -> float:
        """The target sparsity (fraction of zeros) at `step`."""
        raise NotImplementedError

    def should_prune(self, step: int) -> bool:
        """TFMOT's rule: in [begin_step, end_step] (end -1: no end), every `frequency` steps."""
        in_range = step >= self.begin_step and (self.end_step < 0 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.frequency == 0


@dataclass(frozen=True)
class PolynomialSparsity(PruningSchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` (TFMOT `PolynomialDecay`).

    `s(step) = final + (initial - final) * (1 - p) ** power` with
    `p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`; pruning
    happens at `begin_step`, then every `frequency` steps up to `end_step`.
    """

    final_sparsity: float
    end_step: int
    initial_sparsity: float = 0.0
    begin_step: int = 0
    frequency: int = 100
    power: float = 3.0

    def __post_init__(self):
        _check_sparsity(self.initial_sparsity, "initial_sparsity")
        _check_sparsity(self.final_sparsity, "final_sparsity")
        _check_step(self.begin_step, "begin_step", minimum=0)
        _check_step(self.end_step, "end_step", minimum=self.begin_step + 1)
        _check_step(self.frequency, "frequency", minimum=1)
        if isinstance(self.power, bool) or not isinstance(self.power, numbers.Real) or self.power <= 0:
            raise ValueError(f"`power` must be a positive number. Received: power={self.power!r}.")

    def sparsity(self, step: int) -> float:
        p = min(1.0, max(0.0, (step - self.begin_step) / (self.end_step - self.begin_step)))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power


@dataclass(frozen=True)
class ConstantSparsity(PruningSchedule):
    """One target sparsity, applied at `begin_step` and every `frequency` steps
    up to `end_step` (-1: to the end of training)."""

    target_sparsity: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self):
        _check_sparsity(self.target_sparsity, "target_sparsity")
        _check_step(self.begin_step, "begin_step", minimum=0)
        if self.end_step != -1:
            _check_step(self.end_step, "end_step", minimum=self.begin_step)
        _check_step(self.frequency, "frequency", minimum=1)

    def sparsity(self, step: int) -> float:
        return self.target_sparsity


def prunable_masks(pattern: str | Sequence[str] = ".*kernel") -> dict[str, Any]:
    """The `masks=` entries that let `MagnitudePruning` prune the matched variables.

    Pruning freezes single elements, so each variable needs an all-True mask of
    its full shape, registered before the optimizer is built. Merge with your
    own masks (keys must select disjoint variables):
    `MaskedOptimizer(opt, masks={**prunable_masks(".*kernel"), "out/bias": False})`.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    for p in patterns:
        check_key(p, argument="prunable_masks")
    return {p: _full_true for p in patterns}


def _full_true(variable: keras.Variable) -> np.ndarray:
    return np.ones(tuple(variable.shape), bool)


def _storage_shape(optimizer: MaskedOptimizer, variable: keras.Variable) -> tuple[int, ...] | None:
    return optimizer.mask_storage_shape(variable)


def prune_variable(
    optimizer: MaskedOptimizer,
    variable: keras.Variable,
    sparsity: float,
    pruned: np.ndarray | None = None,
) -> np.ndarray:
    """Prunes `variable` to `sparsity` by magnitude; returns the pruned positions.

    The `n = size - count(1 - sparsity, size)` elements with the smallest |w|
    (already `pruned` ones first, ties to the lower flat index) are set to
    exactly 0 and frozen; pruning never regrows. Other mask entries are kept.

    Callable from any callback during `fit`: on JAX, reading the mask first
    syncs the trainer's state once the optimizer has run a step.
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    mask = optimizer.get_mask(variable)  # first: on JAX it syncs a detached state
    w = np.array(keras.ops.convert_to_numpy(variable.value))
    size = w.size
    pruned = np.zeros(w.shape, bool) if pruned is None else np.asarray(pruned, bool)
    n_prune = max(size - count(1.0 - sparsity, size), int(np.count_nonzero(pruned)))
    scores = np.where(pruned, -1.0, np.abs(w.astype(np.float64))).ravel()
    scores = np.where(np.isnan(scores), np.inf, scores)
    new = np.zeros(size, bool)
    new[np.argsort(scores, kind="stable")[:n_prune]] = True
    new = new.reshape(w.shape)
    variable.assign(np.where(new, np.zeros((), w.dtype), w))
    optimizer.set_mask(variable, mask & ~new)
    return new


class MagnitudePruning(keras.callbacks.Callback):
    """Magnitude pruning on a schedule, kept exact by the `MaskedOptimizer`.

    Before each step where `schedule.should_prune(step)`, every variable that
    `keys` selects is pruned, on its own, to `schedule.sparsity(step)`: its
    smallest-|w| elements are set to exactly 0 and frozen. Pruned weights stay
    0 through any further training, and across `model.save`/`load_model`
    (the masks are optimizer variables; a new callback picks up the zeros).

    The targeted variables need full-shape masks: compile with
    `MaskedOptimizer(inner, masks=prunable_masks(keys))`.

    Works on TensorFlow, JAX and torch. On JAX the trainer's state is synced
    into the variables only before the steps that prune (the step is read
    from the trainer's state, see `masked_opt.callbacks.current_step`).

    Args:
        schedule: a `PruningSchedule` (`PolynomialSparsity`, `ConstantSparsity`).
        keys: a key or list of keys (path, '/'-suffix or regex, or a variable)
            selecting the variables to prune; default every kernel.
    """

    def __init__(self, schedule: PruningSchedule, keys: Key | Sequence[Key] = ".*kernel"):
        super().__init__()
        if not isinstance(schedule, PruningSchedule):
            raise TypeError(
                "`schedule` must be a PruningSchedule such as "
                "`PolynomialSparsity(final_sparsity=0.8, end_step=1000)`. "
                f"Received: {schedule!r} of type {type(schedule).__name__}."
            )
        self.schedule = schedule
        self.keys = [keys] if isinstance(keys, (str, keras.Variable)) else list(keys)
        if not self.keys:
            raise ValueError("`keys` must select at least one variable. Received: [].")
        for key in self.keys:
            check_key(key, argument="MagnitudePruning(keys)")
        self._targets: list[keras.Variable] = []
        self._pruned: list[np.ndarray] = []
        self.last_pruned_step: int | None = None

    def on_train_begin(self, logs=None):
        model = self.model  # syncs JAX's trainer state
        optimizer = masked_optimizer(model)
        variables = model.trainable_variables
        targets: list[keras.Variable] = []
        for key in self.keys:
            for i in match_key(key, variables, argument="MagnitudePruning(keys)"):
                if not any(variables[i] is t for t in targets):
                    targets.append(variables[i])
        for variable in targets:
            shape = tuple(variable.shape)
            stored = _storage_shape(optimizer, variable)
            if stored != shape:
                has = "no mask" if stored is None else f"a mask stored with shape {stored}"
                raise ValueError(
                    f"MagnitudePruning: variable '{variable.path}' has {has}, but pruning "
                    f"freezes single elements and needs a mask of its full shape {shape}, "
                    "allocated when the optimizer is built. Compile with "
                    f"`MaskedOptimizer(inner, masks=prunable_masks({self._hint()}))`."
                )
        self._targets = targets
        # Resume-safe: what is frozen at exactly 0 counts as already pruned.
        self._pruned = [
            ~optimizer.get_mask(v) & (keras.ops.convert_to_numpy(v.value) == 0) for v in targets
        ]

    def _hint(self) -> str:
        keys = [k if isinstance(k, str) else k.path for k in self.keys]
        return repr(keys[0]) if len(keys) == 1 else repr(keys)

    def on_train_batch_begin(self, batch, logs=None):
        # On JAX, sync the trainer's state only at the steps that prune.
        step = current_step(self)
        if step == self.last_pruned_step or not self.schedule.should_prune(step):
            return
        optimizer = masked_optimizer(self.model)
        sparsity = self.schedule.sparsity(step)
        self._pruned = [
            prune_variable(optimizer, v, sparsity, pruned)
            for v, pruned in zip(self._targets, self._pruned)
        ]
        self.last_pruned_step = step
