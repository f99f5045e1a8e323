"""`MaskedOptimizer`: exact element-wise freezing around any Keras optimizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import inspect
import warnings
import weakref

import numpy as np

import keras
from keras.src.utils import tracking

from masked_opt import _backend, _compact, _saving
from masked_opt.registry import (
    Key,
    MaskRegistry,
    MaskValue,
    Where,
    apply_op,
    check_key,
    describe_key,
    fit_to_storage,
    match_key,
)
from masked_opt.multipliers import (
    MultiplierRegistry,
    MultiplierValue,
    resolve_multiplier,
)

_BASE_ARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


@dataclass
class _Slot:
    """One masked model variable and the bool variable holding its mask."""

    variable: keras.Variable
    mask: keras.Variable | None  # None in compact mode (see `compact`)
    shape: tuple[int, ...]  # storage shape, fixed at build
    ema: keras.Variable | None = None  # the inner optimizer's EMA of `variable`
    compact: _compact.CompactSlot | None = None  # compact_state=True
    bits: keras.Variable | None = None  # the mask bit-packed, read by XLA-compiled steps


@dataclass
class _Multiplier:
    """One model variable with an update multiplier (`multipliers=`)."""

    variable: keras.Variable
    value: keras.Variable  # float32, at `shape`
    shape: tuple[int, ...]  # storage shape, fixed at build


def _ema_owner(inner: keras.optimizers.Optimizer, variable: keras.Variable) -> tuple[Any, Any]:
    """(the optimizer that averages `variable`, its moving average) when the
    inner optimizer has `use_ema=True`, else (None, None).

    The same private attributes `keras.callbacks.SwapEMAWeights` reads.
    """
    for opt in getattr(inner, "optimizers", None) or [inner]:  # MultiOptimizer
        if not getattr(opt, "use_ema", False):
            continue
        try:
            index = opt._get_variable_index(variable)
        except KeyError:  # a MultiOptimizer's other sub-optimizer
            continue
        return opt, opt._model_variables_moving_average[index]
    return None, None


def _ema_average(inner: keras.optimizers.Optimizer, variable: keras.Variable) -> Any:
    return _ema_owner(inner, variable)[1]


def _multiplied_items(target, mask, m, old, ema=None, old_ema=None, momentum=None) -> list[tuple]:
    """`restore_frozen` items that give `target` (a weight, or a compact proxy)
    `old + m * (current - old)` where `mask` (None: everywhere) is True, and
    its EMA the average of that stored value.

    Exactness: where `m == 1` the current value (the inner optimizer's) is kept
    as is, and the EMA as the inner optimizer computed it; where `m == 0` or
    the mask is False, the old value is written back, and the EMA is held at
    it (as for frozen elements). In between, the EMA is recomputed with Keras's
    own formula on the value actually stored.
    """
    ops = keras.ops
    m = ops.cast(m, target.dtype)
    moving = ops.not_equal(m, 0)
    keep = ops.equal(m, 1)
    if mask is not None:
        moving = ops.logical_and(mask, moving)
        keep = ops.logical_and(mask, keep)
    current = target.value
    scaled = ops.add(old, ops.multiply(m, ops.subtract(current, old)))
    new = ops.where(moving, scaled, old)
    items = [(target, keep, new)]
    if ema is not None:
        stored = ops.where(keep, current, new)
        average = ops.add(
            ops.multiply(momentum, old_ema), ops.multiply(ops.subtract(1, momentum), stored)
        )
        items.append((ema, keep, ops.where(moving, average, old)))
    return items


class _HostCache:
    """A dict-like cache that TensorFlow's attribute tracking leaves alone."""

    def __init__(self):
        self._items: dict = {}

    def __len__(self):
        return len(self._items)

    def get(self, key, default=None):
        return self._items.get(key, default)

    def __setitem__(self, key, value):
        self._items[key] = value


def _uses_ema(inner: keras.optimizers.Optimizer) -> bool:
    return any(getattr(o, "use_ema", False) for o in getattr(inner, "optimizers", None) or [inner])


def _overwrites_with_gradient(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """Float8 scale variables are overwritten with their gradient (Keras >= 3.9
    has a helper for it; older versions read the flag)."""
    check = getattr(optimizer, "_overwrite_variable_with_gradient", None)
    if check is not None:
        return bool(check(variable))
    return bool(getattr(variable, "overwrite_with_gradient", False))


def _scoped_variable(scopes: list[str], name: str, shape: tuple, dtype: Any, layout: Any):
    """An untracked scratch `keras.Variable` of zeros with path `scope/.../name`."""
    if not scopes:
        kwargs = {} if layout is None else {"layout": layout}
        return keras.Variable(
            "zeros", shape=shape, dtype=dtype, name=name, trainable=False, **kwargs
        )
    with keras.name_scope(scopes[0]):
        return _scoped_variable(scopes[1:], name, shape, dtype, layout)


def _share_weight_decay_exclusions(inner: Any, slots: dict) -> None:
    """`exclude_from_weight_decay(var_list=...)` keys variables by identity:
    the proxy of an excluded variable is excluded too."""
    for opt in _backend._leaf_optimizers(inner) + [inner]:
        excluded = getattr(opt, "_exclude_from_weight_decay", None)
        if not excluded:
            continue
        for slot in slots.values():
            if slot.compact is not None and opt._var_key(slot.variable) in excluded:
                excluded.add(opt._var_key(slot.compact.proxy))


def _resolve_inner(inner_optimizer: Any) -> keras.optimizers.Optimizer:
    if isinstance(inner_optimizer, (str, dict)):
        try:
            inner_optimizer = keras.optimizers.get(inner_optimizer)
        except ValueError as e:
            raise ValueError(
                f"`inner_optimizer`={inner_optimizer!r} is not a known Keras "
                f"optimizer identifier ({e}). Pass an optimizer instance such as "
                "`keras.optimizers.Adam(1e-3)`, a name such as 'adam', or a config dict."
            ) from None
    if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`inner_optimizer` must not be a LossScaleOptimizer. Wrap the plain "
            "optimizer instead: under a 'mixed_float16' policy, `model.compile` "
            "wraps the optimizer it is given in a LossScaleOptimizer itself, "
            "giving LossScaleOptimizer(MaskedOptimizer(inner)), and for a custom "
            "loop wrap it yourself in that order. "
            f"Received: {inner_optimizer.__class__.__name__}."
        )
    if isinstance(inner_optimizer, MaskedOptimizer):
        raise ValueError(
            "`inner_optimizer` is already a MaskedOptimizer. Put all masks on one "
            "MaskedOptimizer (combine them with `&`, `|`) instead of nesting."
        )
    if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`inner_optimizer` must be a Keras 3 optimizer instance (e.g. "
            "`keras.optimizers.AdamW(1e-3)`), a name such as 'adam', or a config "
            f"dict. Received: {inner_optimizer!r} of type "
            f"{type(inner_optimizer).__name__}."
        )
    return inner_optimizer


@keras.saving.register_keras_serializable(package="masked_opt")
class MaskedOptimizer(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer and keeps masked-out elements bit-identical.

    Each step, gradients of masked variables are zeroed where the mask is
    False (NaN/inf there included), the inner optimizer applies them as usual
    (weight decay, momentum, EMA, constraints and all), and the elements that
    are frozen are then restored to their exact values from before the step.
    Trainable elements receive exactly the inner optimizer's update.

    Args:
        inner_optimizer: a `keras.optimizers.Optimizer` instance, or anything
            `keras.optimizers.get` accepts ("adam", a config dict).
        masks: dict from keys to masks, or a list of `(key, mask)` pairs (use
            pairs for `keras.Variable` keys: TF variables are unhashable). A key
            is a `keras.Variable` or a string matched against `variable.path`: the exact path, else a suffix at a
            "/" boundary ("dense_1/kernel" matches "sequential/dense_1/kernel"),
            else a regex (`re.fullmatch`). A mask is a bool scalar, a bool
            array-like broadcastable to the variable (0/1 integers accepted), or
            a callable `variable -> array`; True means trainable. Keys are
            resolved when the optimizer is built. Variables no key matches are
            trained as by the inner optimizer alone, at no cost.
        multipliers: dict from keys (as for `masks`) to update multipliers,
            or a list of `(key, multiplier)` pairs. A multiplier is a float
            >= 0, an array-like of them broadcastable to the variable (per
            row, column or element; stored at the shape given), or a callable
            `variable -> value`. The stored weight becomes
            `w_old + m * (w_inner - w_old)`, where `w_inner` is what the inner
            optimizer produced: a learning-rate multiplier that is right under
            Adam (scaling the gradient is not). 1 leaves the inner update
            bit-identical; 0 holds the weight exactly (the inner optimizer's
            state still follows the gradient: a warm start when the
            multiplier later rises; use a mask to zero the gradient too).
            Masks and multipliers compose, frozen wins. The EMA (`use_ema`)
            averages the weights actually stored. Change them with
            `set_multiplier` (no retrace); see also `layerwise_decay`.
        jit_compile: TensorFlow only. "auto" (default): inside a traced
            train step (`fit`, a `tf.function`), if some element is frozen when
            the step is traced, the masked update (masking, the inner
            optimizer's update, the restore) runs as one XLA-compiled function,
            several times faster on CPU than graph mode, when its compile pays
            back soon: at most 16 variables in the update, or 32 k elements or
            more per variable on average (many small variables, such as a
            CNN's, stay in graph mode: there XLA's compile costs more than it
            saves in the first hundreds of steps); with no element frozen
            at trace time, and in eager calls, it runs as the bare optimizer
            would (the identity law). True: always XLA (eager calls too).
            False: never. Under XLA the inner update is rounded as XLA rounds
            it, which can differ in the last bits from graph mode (it matches
            the bare optimizer compiled with XLA). Frozen elements stay
            bit-identical either way. Falls back to graph mode under a
            `tf.distribute` strategy and for sparse (`IndexedSlices`)
            gradients. Other backends compile the whole train step anyway
            (JAX: `jax.jit`; torch: `model.compile(jit_compile=True)`): there
            only "auto" and False are accepted.
        compact_state: if True, the inner optimizer keeps state (slots, EMA,
            accumulators) only for the trainable elements of each masked
            variable: optimizer memory and update work proportional to the
            trainable count. Element-wise optimizers only (SGD, RMSprop, Adam,
            AdamW, Adamax, Nadam, Adagrad, Adadelta, Ftrl, Lion); no
            constraints on masked variables. A mask edit keeps the state of
            elements that stay trainable, gives newly trainable ones a fresh
            optimizer's state and drops the rest.
        compact_capacity: with `compact_state`, how many trainable elements
            each masked variable's state can hold (fixed at build): None (the
            trainable count at build), an int, or a float in (0, 1] (a
            fraction of each variable).
        name: the optimizer's name.

    Example:

    ```python
    opt = MaskedOptimizer(keras.optimizers.AdamW(1e-4), masks={
        "dense_1/kernel": kernel_mask,   # bool array, True = trainable
        "dense_1/bias": False,           # freeze the whole variable
    })
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer | str | dict,
        masks: Mapping[str, MaskValue] | Sequence[tuple[Key, MaskValue]] | None = None,
        *,
        multipliers: Mapping[str, MultiplierValue] | Sequence[tuple[Key, MultiplierValue]] | None = None,
        jit_compile: bool | str = "auto",
        compact_state: bool = False,
        compact_capacity: int | float | None = None,
        name: str | None = None,
        **kwargs: Any,
    ):
        config_masks = kwargs.pop("mask_entries", None)
        config_multipliers = kwargs.pop("multiplier_entries", None)
        if not isinstance(compact_state, bool):
            raise TypeError(
                f"`compact_state` must be True or False. Received: {compact_state!r}."
            )
        if compact_capacity is not None:
            ok = (
                isinstance(compact_capacity, float) and 0.0 < compact_capacity <= 1.0
            ) or (
                isinstance(compact_capacity, int)
                and not isinstance(compact_capacity, bool)
                and compact_capacity >= 0
            )
            if not ok:
                raise ValueError(
                    "`compact_capacity` must be None (the trainable count at build), "
                    "an int >= 0 (elements per masked variable) or a float in (0, 1] "
                    f"(a fraction of each masked variable). Received: {compact_capacity!r}."
                )
            if not compact_state:
                raise ValueError(
                    "`compact_capacity` is only used with `compact_state=True`. "
                    f"Received: compact_capacity={compact_capacity!r}, compact_state=False."
                )
        if not (isinstance(jit_compile, bool) or jit_compile == "auto"):
            raise TypeError(
                f"`jit_compile` must be True, False or 'auto'. Received: {jit_compile!r}."
            )
        if jit_compile is True and not _backend.IS_TF:
            raise ValueError(
                "`MaskedOptimizer(jit_compile=True)` compiles the masked update "
                "with XLA on the TensorFlow backend only; the active backend is "
                f"'{_backend.BACKEND}'. "
                + (
                    "On JAX the trainer already compiles the whole train step, the "
                    "masked update included, with XLA (`model.compile(jit_compile=True)`, "
                    "the default): drop the argument."
                    if _backend.IS_JAX
                    else "On torch use `model.compile(jit_compile=True)` (torch.compile), "
                    "which compiles the masked update with the train step: drop the argument."
                )
            )
        for arg in _BASE_ARGS:
            if arg in kwargs:
                raise ValueError(
                    f"MaskedOptimizer does not take `{arg}`: set it on the inner "
                    f"optimizer instead, e.g. `keras.optimizers.AdamW(..., {arg}=...)`."
                )
        if kwargs:
            raise TypeError(
                f"MaskedOptimizer got unexpected argument(s): {sorted(kwargs)}."
            )
        inner_optimizer = _resolve_inner(inner_optimizer)
        registry = MaskRegistry(masks)
        mult_registry = MultiplierRegistry(multipliers)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.jit_compile = jit_compile
        self.compact_state = compact_state
        self.compact_capacity = compact_capacity
        self._set_host_state(registry, config_masks, mult_registry, config_multipliers)

    @tracking.no_automatic_dependency_tracking
    def _set_host_state(
        self,
        registry: MaskRegistry,
        config_masks: list | None,
        mult_registry: MultiplierRegistry,
        config_multipliers: list | None,
    ) -> None:
        # Host-side bookkeeping that must stay out of Keras/TF variable tracking.
        self._registry = registry
        self._mult_registry = mult_registry
        self._mults: dict[Any, _Multiplier] = {}
        self._mult_targets: dict[int, list] = {}  # config entry -> variable keys
        mult_registry.specs.extend(_saving.specs_from_config(config_multipliers or [], kind="multiplier"))
        # XLA-compiled updates by variable list. Held in a plain object: TF's
        # AutoTrackable would wrap a dict attribute and try to checkpoint it.
        self._jit_functions = _HostCache()
        self._owner: Any = None  # weakref to the model whose JAX trainer drives us
        self._frozen_somewhere = False  # host-side: some mask has a False element
        self._slots: dict[Any, _Slot] = {}
        self._unset_paths: list[str] = []  # masks from a config awaiting their values
        self._config_targets: dict[int, list] = {}  # config entry -> variable keys
        self._config_capacities: dict[Any, int | None] = {}  # compact: saved capacities
        registry.specs.extend(_saving.specs_from_config(config_masks or []))

    # ------------------------------------------------------------------ build

    def build(self, var_list: Sequence[keras.Variable]) -> None:
        if self.built:
            return
        var_list = list(var_list)
        if self._owner is None:
            self._find_owner()
        # Float8 scale variables are overwritten with their gradient; never mask them.
        maskable = [v for v in var_list if not _overwrites_with_gradient(self, v)]
        _backend.check_strategy_support(self.inner_optimizer, var_list)
        resolved, unset = self._resolve_masks(maskable)
        slots = {}
        for j, (i, mask) in enumerate(sorted(resolved.items())):
            variable = maskable[i]
            if self.compact_state:
                slots[self._var_key(variable)] = _Slot(
                    variable=variable,
                    mask=None,
                    shape=tuple(mask.shape),
                    compact=self._add_compact_slot(variable, mask, j),
                )
                continue
            slots[self._var_key(variable)] = _Slot(
                variable=variable,
                mask=self._add_mask_variable(variable, mask),
                shape=tuple(mask.shape),
                bits=self._add_bits_variable(variable, mask),
            )
        mults = {}
        resolved_mults = self._resolve_multipliers(maskable, unset)
        for i, value in sorted(resolved_mults.items()):
            variable = maskable[i]
            mults[self._var_key(variable)] = _Multiplier(
                variable=variable,
                value=self._add_multiplier_variable(variable, value),
                shape=tuple(value.shape),
            )
        inner_vars = var_list
        if self.compact_state:
            _compact.check_inner(
                self.inner_optimizer, _backend._leaf_optimizers(self.inner_optimizer, var_list)
            )
            inner_vars = [self._inner_variable(v, slots) for v in var_list]
            _share_weight_decay_exclusions(self.inner_optimizer, slots)
        if self.inner_optimizer.built:
            if self.compact_state:
                raise ValueError(
                    "`compact_state=True` needs an inner optimizer that is not built "
                    f"yet: '{self.inner_optimizer.name}' is already built on full-size "
                    "variables. Pass a fresh optimizer."
                )
        else:
            self.inner_optimizer.build(inner_vars)
        for slot in slots.values():
            if slot.compact is None:
                slot.ema = _ema_average(self.inner_optimizer, slot.variable)
        if mults:
            self._check_multiplier_support(var_list)
        self._store_slots(slots, unset, mults)
        self._refresh_frozen_flag(list(resolved.values()), list(resolved_mults.values()))
        super().build(var_list)

    def _check_multiplier_support(self, var_list) -> None:
        for opt in _backend._leaf_optimizers(self.inner_optimizer, var_list) + [self.inner_optimizer]:
            if getattr(opt, "use_ema", False) and getattr(opt, "ema_overwrite_frequency", None):
                raise ValueError(
                    "`multipliers` cannot be combined with `ema_overwrite_frequency` "
                    f"(inner optimizer '{opt.name}' has ema_overwrite_frequency="
                    f"{opt.ema_overwrite_frequency}): the overwrite replaces the "
                    "weights with their average inside the inner optimizer's step, "
                    "before the multiplier can scale its update. Keep `use_ema=True` "
                    "without `ema_overwrite_frequency` and swap the average in with "
                    "`keras.callbacks.SwapEMAWeights` (or at the end of `fit`)."
                )

    def _bind_config_specs(self, registry, variables, unset: list, *, argument: str, dtype: Any) -> dict:
        """Specs rebuilt from a config (`_saving.ConfigMask`): their values come
        from the saved weights. Each is bound to the variable at its saved
        position (paths can lose a Sequential prefix across save/load) and held
        at zero (frozen) until the values are loaded (fail-safe)."""
        specs = list(registry.specs)
        targets = {}
        for j, (key, value) in enumerate(specs):
            if not isinstance(value, _saving.ConfigMask):
                continue
            i = value.index
            if i is not None and i < len(variables) and _saving.paths_compatible(key, variables[i].path):
                key = variables[i]
            shape = value.shape
            specs[j] = (key, lambda v, s=shape: np.zeros(v.shape if s is None else s, dtype))
            hits = match_key(key, variables, argument=argument)
            unset.extend(variables[i].path for i in hits if variables[i].path not in unset)
            for i in hits:
                if argument == "masks":
                    self._config_capacities[self._var_key(variables[i])] = value.capacity
            targets[value.entry] = [self._var_key(variables[i]) for i in hits]
        registry.specs = specs
        return targets

    def _non_trainable_of_owner(self) -> list:
        # The model (found when it builds us) names its non-trainable
        # variables, for a clearer error when a key selects only those.
        model = self._owner() if self._owner is not None else None
        return list(getattr(model, "non_trainable_variables", []) or [])

    def _resolve_masks(self, variables):
        unset: list[str] = []
        targets = self._bind_config_specs(self._registry, variables, unset, argument="masks", dtype=bool)
        self._config_targets.update(targets)
        return self._registry.resolve(variables, others=self._non_trainable_of_owner()), unset

    def _resolve_multipliers(self, variables, unset: list) -> dict[int, np.ndarray]:
        targets = self._bind_config_specs(
            self._mult_registry, variables, unset, argument="multipliers", dtype=np.float32
        )
        self._mult_targets.update(targets)
        return self._mult_registry.resolve(variables, others=self._non_trainable_of_owner())

    def _add_state(
        self, variable: keras.Variable, value: np.ndarray, suffix: str, *, sharded: bool = True
    ) -> keras.Variable:
        """An optimizer variable holding `value` (its dtype and shape), named
        after `variable`. Values go in through the initializer: an `assign`
        inside a build that runs while the train function is traced could be
        lost. `sharded`: under keras.distribution, laid out as `mask_layout`
        says (like its weight when full-shape, else replicated)."""
        value = np.asarray(value)
        layout = _backend.mask_layout(variable, value.shape) if sharded else None
        kwargs = {} if layout is None else {"layout": layout}
        return self.add_variable(
            shape=value.shape,
            initializer=lambda shape, dtype=None: value,
            dtype=value.dtype.name,
            aggregation="only_first_replica",
            name=variable.path.replace("/", "_") + suffix,
            **kwargs,
        )

    def _add_multiplier_variable(self, variable: keras.Variable, value: np.ndarray) -> keras.Variable:
        return self._add_state(variable, np.array(value, dtype=np.float32), "_multiplier")

    def _add_mask_variable(self, variable: keras.Variable, mask: np.ndarray) -> keras.Variable:
        return self._add_state(variable, np.array(mask, dtype=bool), "_mask")

    def _add_bits_variable(self, variable: keras.Variable, mask: np.ndarray) -> keras.Variable | None:
        """A bit-packed copy of a large full-shape mask (see `_backend.packs_mask`),
        kept equal to the mask by every edit; XLA-compiled steps read it."""
        if not _backend.packs_mask(tuple(variable.shape), tuple(mask.shape)):
            return None
        return self._add_state(variable, _backend.pack_bits(mask), "_mask_bits", sharded=False)

    def _add_compact_slot(self, variable: keras.Variable, mask: np.ndarray, j: int):
        _compact.check_variable(variable)
        full = np.broadcast_to(mask, tuple(variable.shape))
        size = int(full.size)
        count = int(np.count_nonzero(full))
        capacity = self._config_capacities.get(self._var_key(variable))
        if capacity is None:
            capacity = _compact.capacity_for(self.compact_capacity, count, size, variable.path)
        indices, count = _compact.padded_indices(full, capacity, variable.path, "masks")
        layout = _backend.mask_layout(variable, (capacity,))
        index_var = self._add_state(variable, np.asarray(indices, np.int32), "_compact_indices")
        count_var = self._add_state(
            variable, np.array(count, np.int32), "_compact_count", sharded=False
        )
        # The proxy: what the inner optimizer sees and builds its slots from.
        # Its path ends with the variable's own path, so MultiOptimizer maps and
        # `exclude_from_weight_decay(var_names=...)` select it as they would the
        # variable. It is scratch space (re-gathered every step), not state.
        proxy = _scoped_variable(
            [f"masked_compact_{j}", *variable.path.split("/")[:-1]],
            variable.path.split("/")[-1],
            (capacity,),
            variable.dtype,
            layout,
        )
        return _compact.CompactSlot(variable, proxy, index_var, count_var, capacity)

    def _inner_variable(self, variable: keras.Variable, slots: dict) -> keras.Variable:
        slot = slots.get(self._var_key(variable))
        return variable if slot is None or slot.compact is None else slot.compact.proxy

    @tracking.no_automatic_dependency_tracking
    def _store_slots(self, slots: dict, unset: list[str], mults: dict) -> None:
        self._slots = slots
        self._mults = mults
        self._unset_paths = list(unset)

    # ------------------------------------------------------------------ apply

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(list(grads), list(trainable_variables))
        return self.inner_optimizer._iterations

    @_backend.no_autograph
    def apply(self, grads, trainable_variables=None):
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must "
                    "already be built: call `optimizer.build(trainable_variables)` first."
                )
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        if self._unset_paths:
            raise ValueError(
                "The masks of variables "
                f"{self._unset_paths[:5]}{' ...' if len(self._unset_paths) > 5 else ''} "
                "were rebuilt from a config without their values, which live in the "
                "saved weights. Load them (`keras.models.load_model` or "
                "`model.load_weights`), or give them with `set_mask`, before training."
            )
        grads = [
            g if g is None or _backend.is_sparse(g) else keras.ops.convert_to_tensor(g)
            for g in grads
        ]
        if self._use_xla(grads):
            key = tuple(self._var_key(v) for v in trainable_variables)
            fn = self._jit_functions.get(key)
            if fn is None:
                fn = _backend.jit_function(self._masked_apply, list(trainable_variables))
                self._jit_functions[key] = fn
            fn(grads)
        else:
            self._masked_apply(grads, trainable_variables)

    def _use_xla(self, grads) -> bool:
        if self.jit_compile is False or not _backend.can_jit(grads):
            return False
        if self.jit_compile is True:
            return True
        # "auto": in a traced step, if some element is frozen at trace time
        # (read eagerly from the mask variables). No element frozen: the
        # masked path in graph mode is bit-identical to the bare optimizer.
        # Read from a host-side flag: at the first trace the mask variables
        # may not be initialized yet (they are created inside the trace).
        # And only when the compile pays back soon (`_backend.xla_pays`: few
        # variables, or large ones; not a CNN's many small kernels).
        return _backend.in_traced_function() and self._frozen_somewhere and _backend.xla_pays(grads)

    @tracking.no_automatic_dependency_tracking
    def _refresh_frozen_flag(
        self, masks: list[np.ndarray] | None = None, mults: list[np.ndarray] | None = None
    ) -> None:
        """Whether some element is frozen or has a multiplier other than 1,
        from host values (those just resolved or edited), or from the
        optimizer's variables when called eagerly."""
        if masks is None:
            masks = [self._mask_numpy(slot) for slot in self._slots.values()]
        if mults is None:
            mults = [self._multiplier_numpy(m) for m in self._mults.values()]
        self._frozen_somewhere = any(not bool(np.all(m)) for m in masks) or any(
            bool(np.any(m != 1)) for m in mults
        )

    @_backend.no_autograph
    def _masked_apply(self, grads, trainable_variables):
        handled = []
        for i, (grad, variable) in enumerate(zip(grads, trainable_variables)):
            key = self._var_key(variable)
            slot, mult = self._slots.get(key), self._mults.get(key)
            if grad is not None and (slot is not None or mult is not None):
                handled.append((i, slot, mult))
        if not handled:
            self.inner_optimizer.apply(grads, trainable_variables)
            return

        if self.compact_state:
            self._compact_apply(grads, trainable_variables, handled)
            return

        # No conditionals: with an all-True mask (a multiplier of 1) every
        # step below is exact (`where` with a True condition returns its
        # input), so the result is the bare optimizer's. A `cond` shortcut
        # would trace the inner update twice (time to the first step), leak
        # tracers on JAX and sync the host on torch.
        masked_grads = list(grads)
        pending = []
        for i, slot, mult in handled:
            variable = trainable_variables[i]
            if slot is None:
                mask = None
            elif slot.bits is not None and _backend._compiled_by_xla(grads[i]):
                mask = _backend.unpack_bits(slot.bits.value, slot.shape)  # 1 bit per element read
            else:
                mask = slot.mask.value
            if mask is not None:
                masked_grads[i] = _backend.mask_gradient(grads[i], mask, tuple(variable.shape))
            # A multiplier blends the whole value: no row-only snapshot then.
            old = _backend.snapshot(
                variable, masked_grads[i] if mult is None else None, self.inner_optimizer
            )
            pending.append((variable, slot, mult, mask, old, self._ema_before(variable, mult)))
        self.inner_optimizer.apply(masked_grads, trainable_variables)
        restore = []
        for variable, slot, mult, mask, old, ema in pending:
            if mult is None:
                restore.extend(self._restore_items(slot, mask, old))
            else:
                restore.extend(_multiplied_items(variable, mask, mult.value.value, old, *ema))
        _backend.restore_frozen(restore)

    def _ema_before(self, target: keras.Variable, mult: _Multiplier | None) -> tuple:
        """(EMA variable, its value before the step, the momentum of this
        step's EMA update) for a multiplied `target`, or three Nones."""
        if mult is None:
            return None, None, None
        opt, average = _ema_owner(self.inner_optimizer, target)
        if average is None:
            return None, None, None
        # Keras's EMA momentum: zero at the first step (the average starts
        # at the weight), read before the step increments `iterations`.
        first = keras.ops.not_equal(keras.ops.copy(opt.iterations.value), 0)
        momentum = keras.ops.multiply(keras.ops.cast(first, target.dtype), opt.ema_momentum)
        return average, keras.ops.copy(average.value), momentum

    def _compact_apply(self, grads, trainable_variables, handled) -> None:
        grads, variables = list(grads), list(trainable_variables)
        pending, dense = [], []
        for i, slot, mult in handled:
            variable = trainable_variables[i]
            if slot is None:  # a multiplier only: the variable keeps dense state
                old = _backend.snapshot(variable)
                dense.append((variable, mult, old, self._ema_before(variable, mult)))
                continue
            grads[i], old, valid = _compact.gather(slot.compact, grads[i])
            variables[i] = slot.compact.proxy
            m = None
            if mult is not None:
                m = _compact.gather_multiplier(slot.compact, mult.value.value)
            pending.append((slot.compact, old, valid, m, self._ema_before(slot.compact.proxy, mult)))
        self.inner_optimizer.apply(grads, variables)
        restore = []
        for variable, mult, old, ema in dense:
            restore.extend(_multiplied_items(variable, None, mult.value.value, old, *ema))
        for compact, old, valid, m, ema in pending:
            if m is not None:  # blend on the proxy, then write it back
                restore.extend(_multiplied_items(compact.proxy, valid, m, old, *ema))
        _backend.restore_frozen(restore)
        for compact, old, valid, m, ema in pending:
            _compact.scatter(compact, old, valid)

    def finalize_variable_values(self, var_list):
        var_list = list(var_list)
        # Only an EMA swap-in moves weights here. Without one there is nothing
        # to hold, and nothing is read: on JAX, `fit` calls this from a
        # `finally` in which the variables may still be detached after an
        # error, and reading them would hide that error.
        if any(_backend.is_purged(v) for v in var_list) or any(
            _backend.is_purged(s.mask if s.compact is None else s.compact.indices)
            for s in self._slots.values()
        ):
            return  # JAX state still detached after a failed step: read nothing
        if not _uses_ema(self.inner_optimizer):
            self.inner_optimizer.finalize_variable_values(var_list)
            return
        if self.compact_state:
            # The EMA of the trainable elements lives on the proxies: swap it in
            # there, then write the trainable elements back.
            pending, inner_vars = [], []
            for variable in var_list:
                slot = self._slots.get(self._var_key(variable))
                if slot is None:
                    inner_vars.append(variable)
                    continue
                _, old, valid = _compact.gather(slot.compact, keras.ops.zeros(variable.shape, variable.dtype))
                pending.append((slot.compact, old, valid))
                inner_vars.append(slot.compact.proxy)
            self.inner_optimizer.finalize_variable_values(inner_vars)
            for compact, old, valid in pending:
                _compact.scatter(compact, old, valid)
            return
        restore = []
        for variable in var_list:
            slot = self._slots.get(self._var_key(variable))
            if slot is not None:
                mask = slot.mask.value
                restore.extend(self._restore_items(slot, mask, _backend.snapshot(variable)))
        self.inner_optimizer.finalize_variable_values(var_list)
        _backend.restore_frozen(restore)

    @staticmethod
    def _restore_items(slot: _Slot, mask: Any, old: Any) -> list[tuple]:
        # The EMA of a frozen element is the element itself: it is restored
        # too, or `SwapEMAWeights`/`finalize` would swap a drifted value in.
        items = [(slot.variable, mask, old)]
        if slot.ema is not None:
            items.append((slot.ema, mask, old))
        return items

    # ------------------------------------------------------------------ masks

    def set_mask(self, key: Key, mask: MaskValue) -> None:
        """Sets the mask of the variable(s) `key` selects (True = trainable).

        Before build the call is recorded and replayed at build. After build
        the stored mask is updated in place: it takes effect at the next step,
        also from a callback between batches, without retracing.
        """
        self._update("set", key, mask)

    def freeze(self, key: Key, where: Where = None) -> None:
        """Freezes the whole variable(s) `key` selects, or the positions `where`.

        `where` is None, a NumPy index expression such as `np.s_[:, :10]`, an
        integer index array (first axis), or a bool array of positions.
        """
        self._update("freeze", key, where)

    def unfreeze(self, key: Key, where: Where = None) -> None:
        """Makes the variable(s) `key` selects trainable, wholly or at `where`."""
        self._update("unfreeze", key, where)

    def _update(self, kind: str, key: Key, payload: Any) -> None:
        if not self.built:
            self._registry.record(kind, key, payload)
            return
        check_key(key, argument=kind)
        variables = self._trainable_variables
        for i in match_key(key, variables, argument=kind):
            variable = variables[i]
            slot = self._slots.get(self._var_key(variable))
            path = variable.path
            if slot is None:
                raise ValueError(
                    f"`{kind}({describe_key(key)})`: variable '{path}' has no mask, "
                    "and masks are allocated when the optimizer is built. Register "
                    f"it before build, e.g. `masks={{'{path}': True}}` (or an array "
                    f"of its shape {tuple(variable.shape)} to change single elements later)."
                )
            current = self._mask_numpy(slot)
            new = apply_op(kind, payload, variable, current if kind != "set" else None)
            what = f"{kind}('{path}')"
            if slot.compact is not None:
                self._relayout(slot.compact, np.broadcast_to(new, tuple(variable.shape)), what)
            else:
                if np.broadcast_shapes(new.shape, slot.shape) == slot.shape:
                    stored = np.array(np.broadcast_to(new, slot.shape), dtype=bool)
                else:
                    full = np.broadcast_to(new, tuple(variable.shape))
                    stored = fit_to_storage(full, slot.shape, path=path, what=what)
                    stored = np.array(stored, dtype=bool).reshape(slot.shape)
                slot.mask.assign(stored)
                if slot.bits is not None:
                    slot.bits.assign(_backend.pack_bits(stored))
            if path in self._unset_paths:
                self._unset_paths.remove(path)
        self._refresh_frozen_flag()

    def get_mask(self, variable: Key) -> np.ndarray:
        """The variable's mask as a bool array of its full shape (True = trainable)."""
        variable = self._one_variable(variable, "get_mask")
        shape = tuple(variable.shape)
        if self.built:
            slot = self._slots.get(self._var_key(variable))
            mask = np.ones((), bool) if slot is None else self._mask_numpy(slot)
        else:
            resolved = self._registry.resolve([variable], strict=False)
            mask = resolved.get(0, np.ones((), bool))
        return np.array(np.broadcast_to(mask, shape))

    # ------------------------------------------------------------ multipliers

    def set_multiplier(self, key: Key, value: MultiplierValue) -> None:
        """Sets the update multiplier of the variable(s) `key` selects.

        `value` is a float >= 0, an array-like broadcastable to the variable,
        or a callable `variable -> value`. The variable's stored weight moves
        by `value` times the inner optimizer's update. Before build the call
        is recorded and replayed at build. After build the stored multiplier
        is updated in place (next step, no retrace, also from a callback);
        only variables that had a multiplier at build have one.
        """
        if not self.built:
            self._mult_registry.record(key, value)
            return
        check_key(key, argument="set_multiplier")
        variables = self._trainable_variables
        hits = match_key(key, variables, argument="set_multiplier")
        for i in hits:  # validate everything before changing anything
            variable = variables[i]
            if self._mults.get(self._var_key(variable)) is None:
                path = variable.path
                raise ValueError(
                    f"`set_multiplier({describe_key(key)})`: variable '{path}' has no "
                    "multiplier, and multipliers are allocated when the optimizer is "
                    f"built. Register it before build, e.g. `multipliers={{'{path}': 1.0}}` "
                    "(or an array of the shape you will need, for rows or elements)."
                )
        for i in hits:
            variable = variables[i]
            mult = self._mults[self._var_key(variable)]
            path = variable.path
            what = f"set_multiplier('{path}', value)"
            new = resolve_multiplier(value, variable, what=what)
            if np.broadcast_shapes(new.shape, mult.shape) == mult.shape:
                stored = np.array(np.broadcast_to(new, mult.shape), np.float32)
            else:
                full = np.broadcast_to(new, tuple(variable.shape))
                stored = fit_to_storage(
                    full, mult.shape, path=path, what=what, kind="multiplier", dtype=np.float32
                )
            if _backend.is_purged(mult.value):
                self._sync_jax_state(path)
            mult.value.assign(stored)
            if path in self._unset_paths:
                self._unset_paths.remove(path)
        self._refresh_frozen_flag()

    def get_multiplier(self, variable: Key) -> np.ndarray:
        """The variable's update multiplier as a float32 array of its full
        shape (1 where it has none)."""
        variable = self._one_variable(variable, "get_multiplier")
        shape = tuple(variable.shape)
        if self.built:
            mult = self._mults.get(self._var_key(variable))
            value = np.ones((), np.float32) if mult is None else self._multiplier_numpy(mult)
        else:
            resolved = self._mult_registry.resolve([variable], strict=False)
            value = resolved.get(0, np.ones((), np.float32))
        return np.array(np.broadcast_to(value, shape), np.float32)

    @property
    def multiplied_variables(self) -> list[keras.Variable]:
        """The model variables that have an update multiplier, in build order."""
        return [m.variable for m in self._mults.values()]

    def _multiplier_numpy(self, mult: _Multiplier) -> np.ndarray:
        if _backend.is_purged(mult.value):
            self._sync_jax_state(mult.variable.path)
        return np.array(mult.value.numpy(), np.float32)

    def _one_variable(self, variable: Key, argument: str) -> keras.Variable:
        """The one trainable variable a string key names (built only)."""
        if isinstance(variable, str):
            if not self.built:
                raise ValueError(
                    f"`{argument}({variable!r})`: string keys are resolved when the "
                    "optimizer is built; pass the `keras.Variable` itself, or build "
                    "first with `optimizer.build(model.trainable_variables)`."
                )
            hits = match_key(variable, self._trainable_variables, argument=argument)
            if len(hits) > 1:
                paths = [self._trainable_variables[i].path for i in hits]
                raise ValueError(
                    f"`{argument}({variable!r})` selects {len(hits)} variables "
                    f"({paths[:5]}); pass one variable or its exact path."
                )
            variable = self._trainable_variables[hits[0]]
        check_key(variable, argument=argument)
        if isinstance(variable, keras.layers.Layer):
            raise TypeError(
                f"`{argument}` takes one variable (or its path), not a layer "
                f"({variable.name!r}): pass e.g. `layer.kernel`."
            )
        return variable

    def _mask_numpy(self, slot: _Slot) -> np.ndarray:
        """The stored mask (full shape in compact mode)."""
        if _backend.is_purged(slot.mask if slot.compact is None else slot.compact.indices):
            self._sync_jax_state(slot.variable.path)
        if slot.compact is None:
            return np.array(slot.mask.numpy())
        c = slot.compact
        return _compact.full_mask(c, np.asarray(c.indices.numpy()), int(c.count.numpy()))

    def _relayout(self, c: _compact.CompactSlot, new_full: np.ndarray, what: str) -> None:
        """Compact mode: a mask edit. Elements that stay trainable keep their
        state; newly trainable ones get a fresh optimizer's state (the EMA
        starts at the weight); dropped ones lose theirs."""
        path = c.variable.path
        old_idx = np.asarray(c.indices.numpy())[: int(c.count.numpy())]
        new_idx, new_count = _compact.padded_indices(new_full, c.capacity, path, what)
        valid = new_idx[:new_count]
        loc = np.searchsorted(old_idx, valid)  # both sorted (np.flatnonzero)
        kept = loc < len(old_idx)
        kept[kept] = old_idx[loc[kept]] == valid[kept]
        flat_w = np.asarray(keras.ops.convert_to_numpy(c.variable.value)).reshape(-1)
        fresh = self._fresh_state(c, flat_w[new_idx])
        for suffix, var in _compact.state_variables(self.inner_optimizer.variables, c.proxy).items():
            values = np.array(fresh[suffix])
            values[:new_count][kept] = np.asarray(var.numpy())[loc[kept]]
            var.assign(values)
        c.indices.assign(new_idx)
        c.count.assign(np.array(new_count, np.int32))

    def _fresh_state(self, c: _compact.CompactSlot, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The state a fresh copy of the inner optimizer would give elements
        with these `weights`, by slot name suffix."""
        leaf = _backend._optimizer_for(self.inner_optimizer, c.proxy) or self.inner_optimizer
        clone = type(leaf).from_config(leaf.get_config())
        temp = keras.Variable(weights, dtype=c.proxy.dtype, name="fresh", trainable=False)
        clone.build([temp])
        fresh = {
            k: np.asarray(v.numpy()) for k, v in _compact.state_variables(clone.variables, temp).items()
        }
        if "average" in fresh:  # EMA: a fresh optimizer's first step copies the weight
            fresh["average"] = np.asarray(weights, fresh["average"].dtype)
        return fresh

    def _sync_jax_state(self, path: str) -> None:
        # During a JAX `fit` the trainer holds the state and has detached the
        # variables' values; `Callback.model` syncs them back the same way. A
        # callback that only holds the optimizer gets the same behaviour.
        model = self._owner() if self._owner is not None else None
        if model is None or not hasattr(model, "jax_state_sync"):
            raise RuntimeError(
                f"The masks and multipliers of '{path}' are held by JAX's trainer "
                "right now (its value is detached from the variable during "
                "`fit`). Call `model.jax_state_sync()` first, e.g. by reading "
                "`self.model` in your callback."
            )
        model.jax_state_sync()

    @property
    def masked_variables(self) -> list[keras.Variable]:
        """The model variables that have a mask, in build order."""
        return [slot.variable for slot in self._slots.values()]

    @property
    def built_variables(self) -> list[keras.Variable]:
        """The variables the optimizer was built on (empty before build)."""
        return list(self._trainable_variables)

    def mask_storage_shape(self, variable: keras.Variable) -> tuple[int, ...] | None:
        """The shape the variable's mask is stored at (fixed at build), or None
        if the variable has no mask."""
        slot = self._slots.get(self._var_key(variable))
        return None if slot is None else slot.shape

    # ------------------------------------------------------ forwarded to inner

    @property
    def _model_variables_moving_average(self):
        # Read by `keras.callbacks.SwapEMAWeights`, which unwraps one
        # `inner_optimizer` level: under mixed_float16 that level is us.
        return self.inner_optimizer._model_variables_moving_average

    @property
    def optimizers(self):
        """A MultiOptimizer inner's sub-optimizers (what Keras's learning-rate
        callbacks look for); AttributeError for other inner optimizers."""
        try:
            return self.inner_optimizer.optimizers
        except AttributeError:
            raise AttributeError(
                f"'{type(self.inner_optimizer).__name__}' inner optimizer has no "
                "attribute 'optimizers'"
            ) from None

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

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
        # The base implementation runs `apply` in a StatelessScope, in which
        # masks are read from `optimizer_variables` (never baked in) and the
        # masked path runs without conditionals (see `_masked_apply`).
        if self._owner is None:
            self._find_owner()
        return super().stateless_apply(optimizer_variables, grads, trainable_variables)

    @tracking.no_automatic_dependency_tracking
    def _find_owner(self) -> None:
        """Remembers the model whose trainer calls `stateless_apply` (once, at
        trace time), so that mask edits from a callback that holds only the
        optimizer can sync JAX's trainer state first."""
        frame = inspect.currentframe()
        for _ in range(64):  # trace time only; a LossScaleOptimizer cond adds ~10
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, keras.Model):
                opt = getattr(candidate, "optimizer", None)
                if opt is self or getattr(opt, "inner_optimizer", None) is self:
                    self._owner = weakref.ref(candidate)
                    return

    # ------------------------------------------------------------- saving

    def get_config(self) -> dict:
        config = {
            "name": self.name,
            "inner_optimizer": _saving.inner_config(self.inner_optimizer),
            "mask_entries": _saving.config_entries(self),
            "jit_compile": self.jit_compile,
        }
        multipliers = _saving.multiplier_entries(self)
        if multipliers:
            config["multiplier_entries"] = multipliers
        if self.compact_state:
            config["compact_state"] = True
            config["compact_capacity"] = self.compact_capacity
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if config.get("jit_compile") is True and not _backend.IS_TF:
            warnings.warn(
                f"MaskedOptimizer '{config.get('name')}' was saved with "
                "`jit_compile=True`, which applies to the TensorFlow backend only; "
                f"loading it on '{_backend.BACKEND}' with jit_compile=False (the "
                "trainer compiles the masked update with the train step here).",
                stacklevel=2,
            )
            config["jit_compile"] = False
        inner = _saving.inner_from_config(config.pop("inner_optimizer"), custom_objects)
        return cls(inner, **config)

    def save_own_variables(self, store):
        _saving.save_state(self, store)

    def load_own_variables(self, store):
        _saving.load_state(self, store)
