"""The owner model (`Owner`): the model whose trainer drives the optimizer.

Found once, when the optimizer is built or first traced, by walking up the
call stack to the `keras.Model` whose `optimizer` is this one (or wraps it).
Three uses: on JAX, during `fit` the trainer holds the state and detaches the
variables' values until `model.jax_state_sync()`, so reading a mask from a
callback that holds only the optimizer syncs through the owner first; steps
that the owner's `train_step` traces may bake in which variables are wholly
frozen, because the owner's train function is rebuilt when that changes
(`retrace_train_function`); and error messages name the model's
non-trainable variables when a key selects only those.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import keras
import numpy as np

from masked_opt import _backend


class Owner:
    def __init__(self) -> None:
        self._ref: Any = None
        self.rewrap: Any = None  # re-installs a train-function wrapper after a rebuild (`_wholly_frozen`)
        self.found_in = ""  # the owner's method the optimizer was found from

    @property
    def drives_training(self) -> bool:
        """Whether the owner's trainer found the optimizer (`fit`, `train_on_batch`:
        building it or tracing its step), not e.g. `load_model`'s compile."""
        return self.model() is not None and self.found_in in ("_symbolic_build", "train_step", "fit", "train_on_batch")

    def find(self, optimizer: Any) -> None:
        """Remembers the calling model of `optimizer` (trace time only)."""
        if self._ref is not None:
            return
        frame = inspect.currentframe()
        for _ in range(64):  # a LossScaleOptimizer cond adds ~10 frames
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, keras.Model):
                opt = getattr(candidate, "optimizer", None)
                if opt is optimizer or getattr(opt, "inner_optimizer", None) is optimizer:
                    self._ref = weakref.ref(candidate)
                    self.found_in = frame.f_code.co_name
                    return

    def model(self) -> keras.Model | None:
        return None if self._ref is None else self._ref()

    def in_train_step(self) -> bool:
        """Whether the caller runs inside the owner model's `train_step`
        (Keras's trainer: `fit`, `train_on_batch`, a custom `train_step`),
        whose traces `retrace_train_function` can renew."""
        model = self.model()
        frame = inspect.currentframe()
        for _ in range(64):
            frame = frame.f_back if frame is not None else None
            if frame is None or model is None:
                return False
            if frame.f_code.co_name.endswith("train_step") and frame.f_locals.get("self") is model:
                return True
        return False

    def retrace_train_function(self) -> None:
        """Rebuilds the owner model's train function (if it has one): its next
        step traces anew (TensorFlow, JAX; torch steps run eagerly)."""
        model = self.model()
        if model is not None and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
            if self.rewrap is not None:
                self.rewrap()

    def non_trainable_variables(self) -> list:
        return list(getattr(self.model(), "non_trainable_variables", []) or [])

    def read(self, variable: keras.Variable, path: str) -> np.ndarray:
        """The value of one of the optimizer's variables, syncing the trainer's
        state into the model first if it holds it (JAX during `fit`)."""
        if _backend.is_purged(variable):
            model = self.model()
            if model is None or not hasattr(model, "jax_state_sync"):
                raise RuntimeError(
                    f"The masks and multipliers of '{path}' are held by JAX's trainer "
                    "right now (its value is detached from the variable during "
                    "`fit`). Call `model.jax_state_sync()` first, e.g. by reading "
                    "`self.model` in your callback."
                )
            _backend.sync_model(model)
        return _backend.to_numpy(variable)


def current_step(model: keras.Model | keras.callbacks.Callback) -> int:
    """`model.optimizer.iterations` as an int, read cheaply during `fit`.

    Pass the model, or, in a callback, the callback itself (`current_step(self)`:
    `self.model` would sync JAX's trainer state first). On JAX, while `fit`
    holds the state (the variables detached), the value is read from the
    trainer's optimizer state without reattaching the model: syncing on every
    batch would cost a pass over every variable per step. Elsewhere, and if
    that state cannot be read, it is the variable's value (after a sync on JAX).
    """
    if isinstance(model, keras.callbacks.Callback):
        model = _backend.unsynced_model(model)
    optimizer = model.optimizer
    variables = list(optimizer.variables)
    # The step counter: before Keras 3.9 a LossScaleOptimizer's own
    # `iterations` never moves (3.9 made it its inner optimizer's).
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    step = _backend.step_while_detached(model, optimizer, variables)
    if step is not None:
        return step
    return int(keras.ops.convert_to_numpy(optimizer.iterations))
