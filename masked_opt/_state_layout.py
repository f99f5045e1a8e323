"""The state layout interface (`StateLayout`): where masked variables keep optimizer state.

The step over that state is the layout's too (`update`, `step`). Two layouts implement one interface: `DenseLayout` (the default: the inner
optimizer keeps full-size state, masks are bool variables) and
`CompactLayout` (`compact_state=True`: the inner optimizer keeps state for
the trainable elements only). The orchestrator (`MaskedOptimizer`) builds the
table of entries, then asks its layout to create a mask's state, to run a
step, to finalize the EMA, and to read or edit a mask. Multipliers are
stored the same way in both layouts (see `add_multiplier`). The layouts make
the wrapper's own variables (masks, multipliers, compact indices) through its
`add_variable` (`add_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from masked_opt import _backend, _compat, _inner_optimizer
from masked_opt._variable_table import Entry, VariableTable

AddVariable = Callable[..., keras.Variable]
"""The wrapper's `keras.optimizers.Optimizer.add_variable`: its own variables
(saved with it, by position)."""

def mask_sharding(variable: Any, mask_shape: tuple[int, ...]) -> Any:
    """The keras.distribution layout for a mask of `variable` stored at
    `mask_shape`: the variable's own layout for a full-shape mask (sharded as
    its weight is), replicated for a broadcast mask, None without a
    distribution (or on Keras < 3.10, whose optimizer variables take no
    layout: the distribution places the mask by its own path, as it places
    Keras's own optimizer slots there)."""
    distribution = _compat.keras_distribution()
    if not _compat.ADD_VARIABLE_TAKES_LAYOUT or distribution is None:
        return None
    layout = _compat.variable_layout(variable)
    if layout is not None and tuple(mask_shape) == tuple(variable.shape):
        return layout
    return keras.distribution.TensorLayout([None] * len(mask_shape), distribution.device_mesh)


Read = Callable[[keras.Variable, str], np.ndarray]
"""`read(state_variable, path) -> np.ndarray`, syncing JAX's trainer first if
it holds the value (see `_owner_model.Owner.read`)."""


# Built-in optimizers whose update of an element depends on that element's
# gradient, weight and slots only (and on scalars: step count, learning rate).
ELEMENTWISE = ("SGD", "RMSprop", "Adam", "AdamW", "Adamax", "Nadam", "Adagrad", "Adadelta", "Ftrl", "Lion")


def scoped_variable(scopes: list[str], name: str, shape: tuple, dtype: Any, layout: Any, trainable: bool = False):
    """An untracked scratch `keras.Variable` of zeros with path `scope/.../name`."""
    if not scopes:
        kwargs = {} if layout is None else {"layout": layout}
        return keras.Variable("zeros", shape=shape, dtype=dtype, name=name, trainable=trainable, **kwargs)
    with keras.name_scope(scopes[0]):
        return scoped_variable(scopes[1:], name, shape, dtype, layout, trainable)


class StateLayout:
    """The interface; `DenseLayout` and `CompactLayout` implement it."""

    bare_at_identity = True  # with nothing frozen or scaled, the step is the bare inner update

    def __init__(self, inner: keras.optimizers.Optimizer, add_variable: AddVariable, owner: Any):
        self.inner, self.add_variable, self.owner = inner, add_variable, owner  # owner: `_owner_model.Owner`
        self.read: Read = owner.read

    # -- build
    def add_state(self, variable: keras.Variable, value: np.ndarray, suffix: str, *, sharded: bool = True):
        """One of the wrapper's variables, holding `value` from its initializer
        (an `assign` in a build traced by `fit` can be lost), named after
        `variable`; `sharded`: laid out like it under keras.distribution."""
        value = np.asarray(value)
        layout = mask_sharding(variable, value.shape) if sharded else None
        return self.add_variable(
            shape=value.shape,
            initializer=lambda shape, dtype=None: value,
            dtype=value.dtype.name,
            aggregation="only_first_replica",
            name=variable.path.replace("/", "_") + suffix,
            **({} if layout is None else {"layout": layout}),
        )

    def add_mask(self, entry: Entry, mask: np.ndarray, capacity: int | None) -> None:
        """Creates the optimizer variables that hold `entry`'s mask (and state)."""
        raise NotImplementedError

    def add_multiplier(self, entry: Entry, value: np.ndarray) -> None:
        entry.multiplier_shape = tuple(value.shape)
        entry.multiplier = self.add_state(entry.variable, np.array(value, np.float32), "_multiplier")

    def inner_variables(self, variables: list, table: VariableTable) -> list:
        """The variables the inner optimizer is built on."""
        return list(variables)

    def after_inner_build(self, table: VariableTable) -> None:
        """Links entries to state the inner optimizer made (its EMA)."""

    def after_load(self, table: VariableTable) -> None:
        """Brings derived state in line with loaded (or assigned) masks."""

    stand_ins: dict = {}  # the dense layout's zero-size stand-ins of wholly frozen variables

    def grow_all(self) -> None:
        """Full-size state for every variable (the dense layout's stand-ins)."""

    def load_deferred(self, deferred: list, table: VariableTable) -> None:
        """Saved (slot, values) whose size differs from the slot: only the dense
        layout's stand-ins can take them."""
        if deferred:
            slot, value = deferred[0]
            raise ValueError(f"Cannot load the optimizer state: '{slot.path}' was saved with shape "
                             f"{tuple(value.shape)}, here {tuple(slot.shape)}.")

    # -- train
    @_backend.no_autograph
    def update(self, grads: list, variables: list, table: VariableTable) -> None:
        """One step: the `handled` entries through `step`; with none (nothing
        masked or scaled among these variables), the bare inner update."""
        handled = table.handled(grads, variables, lambda g: self.bare_at_identity and _backend.runs_eagerly(g))
        if handled:
            self.step(grads, variables, handled, table.identity)
        else:
            self.inner.apply(grads, variables)

    def step(self, grads: list, variables: list, handled: list[tuple[int, Entry]], identity: bool = False) -> None:
        """The inner optimizer's update with `handled` entries masked/multiplied;
        `identity`: nothing is frozen or scaled now (the host-side flag)."""
        raise NotImplementedError

    def finalize(self, var_list: list, table: VariableTable) -> None:
        """`finalize_variable_values` with EMA (the average swapped in)."""
        raise NotImplementedError

    # -- masks on the host
    def read_mask(self, entry: Entry) -> np.ndarray:
        """The stored mask, at its storage shape (or the full shape)."""
        raise NotImplementedError

    def plan_mask(self, entry: Entry, new: np.ndarray, what: str) -> Callable[[], None]:
        """Validates a mask edit now; returns the function that makes it."""
        raise NotImplementedError

    def detached(self, table: VariableTable) -> bool:
        """Whether JAX's trainer holds some mask's value (a failed step)."""
        raise NotImplementedError

    # -- optimizer state on the host
    def fresh_state(self, entry: Entry) -> None:
        """A fresh inner optimizer's state for the whole of `entry`'s variable
        (every slot made from it, whatever its shape; an EMA at the weight):
        what a variable that stops being wholly frozen starts from."""
        variable = entry.variable
        weights = np.asarray(self.read(variable, variable.path))
        fresh = _inner_optimizer.fresh_state(self.inner, variable, weights)
        for suffix, slot in _inner_optimizer.slot_variables(self.inner.variables, variable).items():
            if suffix in fresh and tuple(np.shape(fresh[suffix])) == tuple(slot.shape):
                slot.assign(np.asarray(fresh[suffix]))

    def reset_state(self, entry: Entry | None, variable: keras.Variable, positions: np.ndarray) -> None:
        """Gives the elements at flat `positions` a fresh inner optimizer's
        state (the inner optimizer's slots made from `variable`)."""
        weights = np.asarray(self.read(variable, variable.path)).reshape(-1)
        reset_slots(self.inner, variable, variable, positions, weights[positions], self.read)


def reset_slots(inner: Any, reference: keras.Variable, variable: keras.Variable, at: np.ndarray,
                weights: np.ndarray, read: Read) -> None:
    """Sets the inner optimizer's slots made from `reference` to a fresh
    optimizer's values at flat positions `at` (whose weights are `weights`)."""
    if at.size == 0:
        return
    fresh = _inner_optimizer.fresh_state(inner, reference, weights)
    for suffix, slot in _inner_optimizer.slot_variables(inner.variables, reference).items():
        if tuple(slot.shape) != tuple(reference.shape) or suffix not in fresh:
            raise ValueError(
                f"`reset_state('{variable.path}')`: the inner optimizer's state '{slot.name}' has shape "
                f"{tuple(slot.shape)}, not the variable's {tuple(reference.shape)}: it is not kept per element, so "
                "it cannot be reset per element. Use an element-wise optimizer (Adam, AdamW, SGD, ...)."
            )
        values = np.array(read(slot, variable.path)).reshape(-1)
        values[at] = np.asarray(fresh[suffix]).reshape(-1)
        slot.assign(values.reshape(tuple(slot.shape)))
