"""`MaskedOptimizer`: exact element-wise freezing around any Keras optimizer.

The class orchestrates; docs/architecture.md says which module owns what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from masked_opt import (_backend, _compact_state, _compat, _info, _inner_optimizer, _saving, _side_path, _wholly_frozen,
                        _xla_update)
from masked_opt._dense_state import DenseLayout
from masked_opt._mask_store import MaskStore
from masked_opt._owner_model import Owner
from masked_opt._variable_table import VariableTable
from masked_opt.keys import Key, one_variable
from masked_opt.registry import MASKS, MULTIPLIERS, MaskValue, MultiplierValue, Registry, Where


@keras.saving.register_keras_serializable(package="masked_opt")
class MaskedOptimizer(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer and keeps masked-out elements bit-identical.

    Each step, masked gradients are zeroed where the mask is False (NaN/inf
    too), the inner optimizer applies them as usual (weight decay, momentum,
    EMA, constraints), and frozen elements are restored to their exact
    values; trainable elements get exactly the inner optimizer's update.

    Args:
        inner_optimizer: a `keras.optimizers.Optimizer` instance (one per
            model), or anything `keras.optimizers.get` accepts ("adam", a
            config dict).
        masks: `{key: mask}`, or `(key, mask)` pairs (for `keras.Variable`
            keys, unhashable on TF). A key is a variable, a layer, or a string
            matched against `variable.path` (exact, "/"-suffix, layer, regex);
            a mask a bool scalar, a bool array-like broadcastable to the
            variable, or a callable `variable -> array`; True = trainable.
            Resolved at build; unmatched variables train as bare, at no cost.
        multipliers: update multipliers, given like `masks`: floats >= 0 (or
            arrays, callables). The stored weight becomes
            `w_old + m * (w_inner - w_old)`: 1 leaves the inner update
            bit-identical, 0 holds the weight exactly. Masks and multipliers
            compose, frozen wins. See docs/multipliers.md.
        jit_compile: TensorFlow only: "auto" (default), True or False; when
            the masked update runs as its own XLA function (docs/compilation.md).
        compact_state: if True, the inner optimizer keeps state only for the
            trainable elements of masked variables (element-wise optimizers;
            docs/compact-state.md).
        compact_capacity: with `compact_state`, the trainable elements each
            masked variable's state can hold: None (the count at build), an
            int, or a float in (0, 1] (a fraction of each variable).
        side_path: with `compact_state`, whole slices (rows, columns, heads,
            channels) of stock `Dense`, `EinsumDense`, `Conv`, `Embedding`,
            `ReversibleEmbedding` kernels train through their layer, never
            forming the full weight gradient; `Dense`/`EinsumDense` element
            masks gather it in the layer (docs/sparse-fine-tuning.md).
        name: the optimizer's name.

    After build, `set_mask`, `freeze`, `unfreeze`, `set_multiplier` change the
    stored values in place (the next step uses them, no retrace); `inspect()`
    tells what is stored per variable and how the update ran.
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer | str | dict,
        masks: Mapping[Key, MaskValue] | Sequence[tuple[Key, MaskValue]] | None = None,
        *,
        multipliers: Mapping[Key, MultiplierValue] | Sequence[tuple[Key, MultiplierValue]] | None = None,
        jit_compile: bool | str = "auto",
        compact_state: bool = False,
        compact_capacity: int | float | None = None,
        side_path: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ):
        saved = _saving.Saving.pop_config_entries(kwargs)  # a saved config's (values: from the weights)
        _compact_state.check_arguments(compact_state, compact_capacity)
        _side_path.check_arguments(side_path, compact_state, compact_capacity)
        compilation = _xla_update.Compilation(jit_compile)
        _inner_optimizer.check_wrapper_kwargs(kwargs)
        inner = _inner_optimizer.resolve(inner_optimizer, MaskedOptimizer)
        registries = [Registry(MASKS, masks, saved[MASKS]), Registry(MULTIPLIERS, multipliers, saved[MULTIPLIERS])]
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.jit_compile, self.compact_state, self.compact_capacity = jit_compile, compact_state, compact_capacity
        self.side_path, self._sides = side_path, {}
        # Host-side state: plain objects, which no attribute tracking touches.
        self._table = VariableTable(self._key)
        self._compile = compilation
        self._owner = Owner()
        self._state_layout = (_compact_state.CompactLayout(inner, self.add_variable, self._owner, compact_capacity)
                              if compact_state else DenseLayout(inner, self.add_variable, self._owner))
        self._state_layout.trainable_proxies = side_path
        self._store = MaskStore(self._table, self._state_layout, self._owner, *registries)
        self._saving = _saving.Saving(self._table, self._store, self._state_layout, inner)

    def _key(self, variable: Any) -> Any:
        return _compat.var_key(self, variable)

    # ------------------------------------------------------------------ build

    def build(self, var_list: Sequence[keras.Variable]) -> None:
        if self.built:  # called again (a custom loop after `fit`): full-size state for every variable
            return self._state_layout.grow_all()
        given, var_list = var_list, list(var_list)
        self._owner.find(self)
        with _backend.state_scope():  # TF: eagerly (a variable made in a trace costs ~10 ms)
            self._build(var_list)
        if self._sides and isinstance(given, list):  # a LossScaleOptimizer builds itself on this list next
            given[:] = _compat.built_on(self)

    def _build(self, var_list: list) -> None:
        _backend.check_strategy_support(self.inner_optimizer, _inner_optimizer.leaf_optimizers(self.inner_optimizer, var_list))
        # Float8 scale variables are overwritten with their gradient: never masked.
        maskable = [v for v in var_list if not _compat.overwrites_with_gradient(self, v)]
        self._store.build(var_list, maskable, self._key)
        if self.side_path and not self._table.unset:  # else at load, which brings the masks
            self._sides = _side_path.attach(self._table, self._owner, self)
        inner_variables = self._state_layout.inner_variables(var_list, self._table)
        _inner_optimizer.build(self.inner_optimizer, inner_variables, compact=self.compact_state)
        self._state_layout.after_inner_build(self._table)
        _wholly_frozen.skip_in_backward(self._table, self._owner, self.inner_optimizer, var_list)
        if self._table.multiplied():
            _inner_optimizer.check_multiplier_support(self.inner_optimizer, var_list)
        super().build(_side_path.with_proxies(var_list, self._sides, self._key))

    def _model_variables(self) -> list:
        """The variables built on, without the side path's (what keys select)."""
        return _side_path.without_held(_compat.built_on(self))

    # ------------------------------------------------------------------ apply

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(list(grads), list(trainable_variables))
        return _compat.step_counter(self.inner_optimizer)

    @_backend.no_autograph
    def apply(self, grads, trainable_variables=None):
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError("When passing `grads` without `variables`, the optimizer must already be built: "
                                 "call `optimizer.build(trainable_variables)` first.")
            trainable_variables = _compat.built_on(self)
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))  # a copy: build adds side-path proxies to its list
        self._table.check_loaded()
        grads = [g if g is None or _backend.is_sparse(g) else keras.ops.convert_to_tensor(g) for g in grads]
        grads, trainable_variables = _side_path.fold(self._table, self._owner, self._sides, grads, trainable_variables)
        grads, trainable_variables = _wholly_frozen.leave_out(self._table, self._owner, self.inner_optimizer, grads,
                                                              trainable_variables)
        xla = self._compile.wants_xla(grads, self._table.identity) and (  # not when nothing masked is left
            self.jit_compile is True or self._table.handled(grads, trainable_variables, lambda g: False))
        key = tuple(self._key(v) for v in trainable_variables) if xla else None
        self._compile.run(self._state_layout.update, self._table, grads, trainable_variables, key)

    def finalize_variable_values(self, var_list):
        var_list = _side_path.without_held(list(var_list))
        # JAX's `fit` calls this from a `finally`, where the variables may still be
        # detached after an error: read nothing then (it would hide that error).
        if any(_backend.is_purged(v) for v in var_list) or self._state_layout.detached(self._table):
            return
        if not _inner_optimizer.uses_ema(self.inner_optimizer):
            self.inner_optimizer.finalize_variable_values(var_list)
            return
        self._state_layout.finalize(var_list, self._table)

    # ------------------------------------------------- masks and multipliers

    def set_mask(self, key: Key, mask: MaskValue) -> None:
        """Sets the mask of the variable(s) `key` selects (True = trainable).
        Before build the call is recorded and replayed at build; after build
        the stored mask changes in place (next step, no retrace)."""
        self._edit(MASKS, "set", key, mask)

    def freeze(self, key: Key, where: Where = None) -> None:
        """Freezes the variable(s) `key` selects, wholly or at `where` (a NumPy
        index expression such as `np.s_[:, :10]`, indices, or a bool array)."""
        self._edit(MASKS, "freeze", key, where)

    def unfreeze(self, key: Key, where: Where = None) -> None:
        """Makes the variable(s) `key` selects trainable, wholly or at `where`."""
        self._edit(MASKS, "unfreeze", key, where)

    def set_multiplier(self, key: Key, value: MultiplierValue) -> None:
        """Sets the update multiplier of the variable(s) `key` selects (only
        variables that had one at build have one); like `set_mask`."""
        self._edit(MULTIPLIERS, "set", key, value)

    def reset_state(self, key: Key, where: Where = None) -> None:
        """Gives the selected elements a fresh inner optimizer's state (zero
        moments, the EMA at the weight), as for a newly grown connection."""
        if not self.built:  # nothing to reset
            raise ValueError("`reset_state` needs a built optimizer: build it (or run a step) first.")
        self._store.reset_state(key, where, self._model_variables())

    def _edit(self, quantity, kind: str, key: Key, payload: Any) -> None:
        if self.built:  # validates every selected variable, then changes them all
            self._store.edit(quantity, kind, key, payload, self._model_variables())
        else:  # recorded, replayed at build
            self._store.registry(quantity).record(kind, key, payload)

    def get_mask(self, variable: Key) -> np.ndarray:
        """The variable's mask as a bool array of its full shape (True = trainable)."""
        return self._get(MASKS, variable, "get_mask")

    def get_multiplier(self, variable: Key) -> np.ndarray:
        """The variable's update multiplier as a float32 array of its full shape
        (1 where it has none)."""
        return self._get(MULTIPLIERS, variable, "get_multiplier")

    def _get(self, quantity, key: Key, method: str) -> np.ndarray:
        variable = one_variable(key, self._model_variables(), argument=method, built=self.built)
        return self._store.get(quantity, variable, self.built)

    # ------------------------------------------------------------ inspection

    @property
    def masked_variables(self) -> list[keras.Variable]:
        """The model variables that have a mask, in build order."""
        return [e.variable for e in self._table.masked()]

    @property
    def multiplied_variables(self) -> list[keras.Variable]:
        """The model variables that have an update multiplier, in build order."""
        return [e.variable for e in self._table.multiplied()]

    @property
    def built_variables(self) -> list[keras.Variable]:
        """The variables the optimizer was built on (empty before build), without
        the side path's."""
        return self._model_variables()

    def trained_variables(self, variables: Sequence[keras.Variable]) -> list[keras.Variable]:
        """`variables` without the wholly frozen ones (mask False), in order: what
        a custom loop differentiates to skip their gradient (docs/freezing-cost.md)."""
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(variables))
        return _wholly_frozen.trained(self._table, list(variables))

    def mask_storage_shape(self, variable: keras.Variable) -> tuple[int, ...] | None:
        """The shape the variable's mask is stored at (fixed at build), or None."""
        entry = self._table.get(variable)
        return None if entry is None else entry.mask_shape

    def inspect(self) -> _info.OptimizerInfo:
        """What the optimizer keeps per variable and how its update ran."""
        return _info.OptimizerInfo(
            built=bool(self.built),
            compact_state=self.compact_state,
            variables=self._table.info(),
            update_traces=self._compile.traces,
            xla_functions=self._compile.functions,
            last_update_compiled=self._compile.last_compiled,
        )

    # ------------------------------------------------------ forwarded to inner

    @property
    def _model_variables_moving_average(self):
        # For `SwapEMAWeights`, which unwraps one level (under mixed_float16, us).
        return _compat.ema_averages(self.inner_optimizer)

    @property
    def optimizers(self):
        """A MultiOptimizer inner's sub-optimizers (for Keras's learning-rate callbacks)."""
        return self.inner_optimizer.optimizers

    @property
    def variables(self):
        return _compat.own_variables(self) + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        # The base runs `apply` in a StatelessScope: masks are read from `optimizer_variables`.
        self._owner.find(self)
        return super().stateless_apply(optimizer_variables, grads, trainable_variables)

    # ----------------------------------------------------------------- saving

    def get_config(self) -> dict:
        return self._saving.config(self.name, self.jit_compile, self.compact_state, self.compact_capacity, self.built,
                                   self.side_path)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        inner, kwargs = _saving.Saving.constructor_arguments(config, custom_objects)
        return cls(inner, **kwargs)

    def save_own_variables(self, store):
        self._saving.save(store, self.variables, self.built, self.name)

    def load_own_variables(self, store):
        self._saving.load(store, self.variables, self.built, [v.path for v in self.built_variables], self.name)
        if self.side_path and self.built and not self._sides and not self._table.unset:  # masks from the file
            self._sides = _side_path.attach_loaded(self._table, self._owner, self, self._key)


def unwrap(optimizer: Any, *, caller: str, require_built: bool = True) -> MaskedOptimizer:
    """The MaskedOptimizer itself or the one a LossScaleOptimizer wraps; `require_built`: built."""
    inner = optimizer.inner_optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer
    if not isinstance(inner, MaskedOptimizer):
        raise TypeError(f"`{caller}` needs a MaskedOptimizer (or a LossScaleOptimizer wrapping one). Received: {type(optimizer).__name__}.")
    if require_built and not inner.built:
        raise ValueError(f"`{caller}`: optimizer '{inner.name}' is not built yet, so its masks are not resolved "
                         "against variables. Build it first with `optimizer.build(model.trainable_variables)`, "
                         "or call `model.fit` (which builds it).")
    return inner


def masked_optimizer(model: keras.Model, *, build: bool = True) -> MaskedOptimizer:
    """The `MaskedOptimizer` a compiled model trains with (unwrapping a `LossScaleOptimizer`); with
    `build=True` built on `model.trainable_variables` if it is not yet, so masks can be read and
    changed before the first step."""
    outer = getattr(model, "optimizer", None)
    try:
        optimizer = unwrap(outer, caller="masked_optimizer", require_built=False)
    except TypeError:
        got = "no optimizer (not compiled)" if outer is None else type(outer).__name__
        raise TypeError(
            f"Model '{model.name}' must be compiled with a MaskedOptimizer to change masks while training; its "
            f"optimizer is {got}. Compile with e.g. `model.compile(optimizer=masked_opt.MaskedOptimizer("
            "keras.optimizers.Adam(1e-3), masks={...}), ...)`.") from None
    if build and not optimizer.built:
        if not model.trainable_variables:
            raise ValueError(f"Model '{model.name}' has no variables yet, so its MaskedOptimizer cannot be built "
                             "before the first step. Build the model first: start it with `keras.Input(shape)` or "
                             "call `model.build(input_shape)`.")
        with keras.name_scope(outer.name, caller=outer):
            outer.build(model.trainable_variables)
    return optimizer
