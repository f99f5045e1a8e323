"""Keras callbacks that change masks while a model trains.

Masks live in bool variables of the `MaskedOptimizer`, so a callback that
calls `set_mask`/`freeze`/`unfreeze` between batches changes what the next
step trains, without retracing the train function. The variables a callback
touches must have a mask slot from the start (slots are allocated when the
optimizer is built): register them in `MaskedOptimizer(..., masks=...)`.

* `DynamicMask`: recompute masks from a function every N steps or epochs.
* `GradualUnfreezing`: ULMFiT-style unfreezing of layer groups, last to first.

Any callback can also set masks directly, e.g. from `on_train_batch_begin`
(a mask driven from outside, like an extra input, with the model unchanged);
`masked_optimizer(model)` finds the `MaskedOptimizer` to call:

```python
def begin(batch, logs):
    masked_optimizer(model).set_mask("dense/kernel", mask_for_next_batch())

model.fit(x, y, callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=begin)])
```

Backends: all of this works on TensorFlow, JAX and torch. On JAX, `fit` keeps
the weights, optimizer state and masks in the trainer and detaches them from
the variables until `model.jax_state_sync()`; `Callback.model` syncs (on
every access), and so do `set_mask`/`freeze`/`unfreeze`/`get_mask` once the
optimizer has run a step. A callback that reads weights from a model it
holds in a closure must sync first (`model.jax_state_sync()`). The callbacks
here sync only at the steps where they change masks: they read the step
from the trainer's state without reattaching it (`current_step(self)`, also
for your own callbacks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

import keras

from masked_opt._owner_model import current_step
from masked_opt.optimizer import MaskedOptimizer, masked_optimizer
from masked_opt.keys import Key, check_key, describe_key, match_key
from masked_opt.registry import MaskValue

__all__ = ["DynamicMask", "GradualUnfreezing", "MaskUpdateFn", "current_step", "masked_optimizer"]

MaskUpdateFn = Callable[[keras.Model, MaskedOptimizer, int], Union[Mapping[Key, MaskValue], None]]
"""`fn(model, optimizer, step) -> {key: mask}`, or None for "no change"."""

Group = Union[keras.layers.Layer, Key, Sequence[Union[keras.layers.Layer, Key]]]
"""A layer, a variable key, or a list of those, unfrozen together."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}.")
    return int(value)


class DynamicMask(keras.callbacks.Callback):
    """Recomputes masks every N steps or every N epochs while training.

    `fn(model, optimizer, step)` returns `{key: mask}` (True = trainable) or
    None for "no change"; each mask is applied with `optimizer.set_mask`. It is
    called before the step (or epoch) it first applies to, starting at step 0,
    so a change takes effect at the very next step and never retraces (but
    a change of which variables are wholly frozen, scalar `False` masks,
    retraces `fit`'s step once: docs/freezing-cost.md). `step`
    is `optimizer.iterations`, which carries over between `fit` calls. `fn`
    sees the model's current weights on every backend (on JAX the trainer's
    state is synced into the variables just before, and only then).

    Args:
        fn: the mask function.
        every_n_steps: call `fn` at the first step this callback sees and
            whenever `step` reaches a multiple of N (with `steps_per_execution`
            > 1: at the first batch at or past it).
        every_n_epochs: call `fn` at the start of epochs 0, N, 2N, ...
            Exactly one of `every_n_steps`, `every_n_epochs` is required.

    Example: freeze the units of a stock `Dense(units)` layer whose mean
    |activation| on a probe batch is below a threshold (a column mask):

    ```python
    opt = MaskedOptimizer(keras.optimizers.Adam(1e-3), masks={
        "hidden/kernel": np.ones((1, units), bool),   # one entry per unit
        "hidden/bias": np.ones((units,), bool),
    })
    probe = keras.Model(model.inputs[0], model.get_layer("hidden").output)

    def active_units(model, optimizer, step):
        act = keras.ops.convert_to_numpy(probe(x_probe))
        alive = np.abs(act).mean(axis=0) >= threshold
        return {"hidden/kernel": alive[None, :], "hidden/bias": alive}

    model.fit(x, y, callbacks=[DynamicMask(active_units, every_n_steps=100)])
    ```
    """

    def __init__(
        self,
        fn: MaskUpdateFn,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ):
        super().__init__()
        if not callable(fn):
            raise TypeError(
                "`fn` must be a callable `fn(model, optimizer, step) -> {key: mask} "
                f"or None`. Received: {fn!r} of type {type(fn).__name__}."
            )
        if (every_n_steps is None) == (every_n_epochs is None):
            raise ValueError(
                "Pass exactly one of `every_n_steps` and `every_n_epochs`. Received: "
                f"every_n_steps={every_n_steps!r}, every_n_epochs={every_n_epochs!r}."
            )
        self.fn = fn
        self.every_n_steps = None if every_n_steps is None else _positive_int(
            every_n_steps, "every_n_steps"
        )
        self.every_n_epochs = None if every_n_epochs is None else _positive_int(
            every_n_epochs, "every_n_epochs"
        )
        self._last_bucket: int | None = None

    def on_train_begin(self, logs=None):
        masked_optimizer(self.model)  # fail fast, and build

    def on_epoch_begin(self, epoch, logs=None):
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0:
            model = self.model  # syncs JAX's trainer state
            self._update(model, masked_optimizer(model), current_step(model))

    def on_train_batch_begin(self, batch, logs=None):
        if self.every_n_steps is None:
            return
        # No JAX state sync unless `fn` runs.
        step = current_step(self)
        bucket = step // self.every_n_steps
        if bucket != self._last_bucket:
            model = self.model
            self._update(model, masked_optimizer(model), step)
            self._last_bucket = bucket

    def _update(self, model: keras.Model, optimizer: MaskedOptimizer, step: int) -> None:
        masks = self.fn(model, optimizer, step)
        if masks is None:
            return
        if not isinstance(masks, Mapping):
            raise TypeError(
                "DynamicMask: `fn` must return a dict `{key: mask}` or None. "
                f"Received at step {step}: {masks!r} of type {type(masks).__name__}."
            )
        for key, mask in masks.items():
            try:
                optimizer.set_mask(key, mask)
            except (ValueError, TypeError) as e:
                raise type(e)(
                    f"DynamicMask: the mask `fn` returned at step {step} for key "
                    f"{describe_key(key)} was rejected: {e}"
                ) from e


class GradualUnfreezing(keras.callbacks.Callback):
    """ULMFiT-style gradual unfreezing (Howard & Ruder, 2018).

    Training starts with every listed group frozen except the last one; every
    `epochs_per_stage` epochs the next group, going from last to first, is
    unfrozen. Variables not in any group are left alone.

    Groups are layers, variable keys (a `keras.Variable`, or a path / regex
    string), or lists of those. Their variables need masks from the start:
    pass `masks=callback.masks()` (merged with your own masks) to the
    `MaskedOptimizer`; it also sets the frozen state of stage 0.

    Example:

    ```python
    unfreeze = GradualUnfreezing([model.get_layer("embed"), ".*/block_1/.*",
                                  model.get_layer("head")], epochs_per_stage=2)
    model.compile(optimizer=MaskedOptimizer("adam", masks=unfreeze.masks()), ...)
    model.fit(x, y, epochs=6, callbacks=[unfreeze])
    # epochs 0-1: head; 2-3: head + block_1; 4-5: everything.
    ```

    Stage changes overwrite the whole masks of the groups' variables (each is
    entirely trainable or frozen). Frozen groups are wholly frozen: `fit`
    leaves them out (no gradient on TF/JAX, no update); each stage change
    retraces the step once (docs/freezing-cost.md).
    """

    def __init__(self, layers_or_keys: Sequence[Group], epochs_per_stage: int = 1):
        super().__init__()
        if isinstance(layers_or_keys, (str, keras.layers.Layer, keras.Variable)) or not (
            isinstance(layers_or_keys, Sequence) and len(layers_or_keys) > 0
        ):
            raise TypeError(
                "`layers_or_keys` must be a non-empty list of groups (a layer, a "
                "variable key, or a list of those), ordered first to last. "
                f"Received: {layers_or_keys!r}."
            )
        self.groups = [
            list(g) if isinstance(g, (list, tuple)) else [g] for g in layers_or_keys
        ]
        for group in self.groups:
            for item in group:
                if not isinstance(item, keras.layers.Layer):
                    check_key(item, argument="layers_or_keys")
        self.epochs_per_stage = _positive_int(epochs_per_stage, "epochs_per_stage")
        self.stage: int | None = None

    def _group_keys(self, group: list) -> list[Key]:
        keys: list[Key] = []
        for item in group:
            if isinstance(item, keras.layers.Layer):
                if not item.trainable_variables:
                    raise ValueError(
                        f"GradualUnfreezing: layer '{item.name}' has no trainable "
                        "variables (is it built? call the model once or start it "
                        "with `keras.Input`)."
                    )
                keys.extend(item.trainable_variables)
            else:
                keys.append(item)
        return keys

    def masks(self) -> dict[str, bool]:
        """The `masks=` entries to give the `MaskedOptimizer`: stage 0's state.

        Keys are strings (variables are not hashable on TensorFlow): a
        variable's path, or the group's string key as given.
        """
        out: dict[str, bool] = {}
        last = len(self.groups) - 1
        for i, group in enumerate(self.groups):
            for key in self._group_keys(group):
                out[key if isinstance(key, str) else key.path] = i == last
        return out

    def num_trainable_groups(self, epoch: int) -> int:
        """How many groups (counted from the last) train at `epoch`."""
        return min(len(self.groups), 1 + epoch // self.epochs_per_stage)

    def on_train_begin(self, logs=None):
        optimizer = masked_optimizer(self.model)
        masked = {id(v) for v in optimizer.masked_variables}
        variables = self.model.trainable_variables
        for group in self.groups:
            for key in self._group_keys(group):
                for i in match_key(key, variables, argument="GradualUnfreezing"):
                    if id(variables[i]) not in masked:
                        raise ValueError(
                            f"GradualUnfreezing: variable '{variables[i].path}' (from "
                            f"group key {describe_key(key)}) has no mask slot in the "
                            "MaskedOptimizer, and slots are allocated when it is "
                            "built. Pass `masks=callback.masks()` (merged with your "
                            "own) to `MaskedOptimizer` before compiling."
                        )
        self.stage = None

    def on_epoch_begin(self, epoch, logs=None):
        n = self.num_trainable_groups(epoch)
        if n == self.stage:
            return
        optimizer = masked_optimizer(self.model)
        first_trainable = len(self.groups) - n
        for i, group in enumerate(self.groups):
            for key in self._group_keys(group):
                optimizer.set_mask(key, i >= first_trainable)
        self.stage = n
