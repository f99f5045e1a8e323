"""The inner optimizer's internals: what the wrapper needs to know about it.

Which optimizers update variables (a MultiOptimizer's sub-optimizers), where
the EMA of a variable lives, weight-decay exclusions, the state a fresh copy
would give new elements, and the checks that the inner optimizer can serve
this wrapper (not a LossScaleOptimizer, not another model's optimizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from masked_opt import _compat


# Base-optimizer arguments: they belong on the inner optimizer.
BASE_ARGUMENTS = ("learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                  "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")


def check_wrapper_kwargs(kwargs: dict) -> None:
    """Refuses base-optimizer arguments (and unknown ones) on the wrapper."""
    for arg in BASE_ARGUMENTS:
        if arg in kwargs:
            raise ValueError(
                f"MaskedOptimizer does not take `{arg}`: set it on the inner "
                f"optimizer instead, e.g. `keras.optimizers.AdamW(..., {arg}=...)`."
            )
    if kwargs:
        raise TypeError(f"MaskedOptimizer got unexpected argument(s): {sorted(kwargs)}.")


def resolve(inner_optimizer: Any, wrapper: type) -> keras.optimizers.Optimizer:
    """The inner optimizer from what `MaskedOptimizer(inner_optimizer)` got."""
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
    if isinstance(inner_optimizer, wrapper):
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


def build(inner: keras.optimizers.Optimizer, variables: list, *, compact: bool) -> None:
    """Builds the inner optimizer on `variables`, or checks that the one it
    was built on before covers them (an optimizer serves one model)."""
    if not inner.built:
        inner.build(variables)
        return
    if compact:
        raise ValueError(
            "`compact_state=True` needs an inner optimizer that is not built "
            f"yet: '{inner.name}' is already built on full-size "
            "variables. Pass a fresh optimizer."
        )
    known = {id(v) for v in _compat.built_on(inner)}
    strangers = [v for v in variables if id(v) not in known]
    if strangers:
        theirs = [v.path for v in _compat.built_on(inner)][:3]
        raise ValueError(
            f"The inner optimizer '{inner.name}' ({type(inner).__name__}) is already "
            f"built on {len(known)} other variables (e.g. {theirs}): it is in use by "
            "another model or another MaskedOptimizer, and an optimizer keeps its "
            f"state for the variables it was built on. '{strangers[0].path}' is not "
            "among them. Give each model its own optimizer instance, e.g. "
            f"`MaskedOptimizer(keras.optimizers.{type(inner).__name__}(...), masks=...)`."
        )


def is_multi_optimizer(optimizer: Any) -> bool:
    """A `keras.optimizers.MultiOptimizer` (never on a Keras without one)."""
    return _compat.MULTI_OPTIMIZER is not None and isinstance(optimizer, _compat.MULTI_OPTIMIZER)


def leaf_optimizers(inner: Any, var_list: Sequence[Any] | None = None) -> list[Any]:
    """The optimizers that update variables: a MultiOptimizer's sub-optimizers
    (those it knows, plus those its map gives `var_list`), else the optimizer."""
    subs = getattr(inner, "optimizers", None)
    if not is_multi_optimizer(inner) or subs is None:
        return [inner]
    found = list(subs)
    mapping = _compat.multi_optimizer_map(inner)
    if var_list is not None and mapping is not None:
        for variable in var_list:
            opt = mapping(variable)
            if isinstance(opt, keras.optimizers.Optimizer) and all(opt is not o for o in found):
                found.append(opt)
    return found


def optimizer_for(inner: Any, variable: Any) -> Any | None:
    """The (sub-)optimizer that updates `variable` once built, or None."""
    if not is_multi_optimizer(inner):
        return inner
    if not inner.built:
        return None
    index = _compat.multi_optimizer_index(inner, variable)
    return None if index is None else inner.optimizers[index]


def ema_owner(inner: Any, variable: Any) -> tuple[Any, Any]:
    """(the optimizer that averages `variable`, its moving average) when the
    inner optimizer has `use_ema=True`, else (None, None)."""
    for opt in leaf_optimizers(inner):
        if getattr(opt, "use_ema", False):
            average = _compat.ema_average(opt, variable)
            if average is not None:
                return opt, average
    return None, None


def uses_ema(inner: Any) -> bool:
    return any(getattr(o, "use_ema", False) for o in leaf_optimizers(inner))


def check_multiplier_support(inner: Any, var_list: Sequence[Any]) -> None:
    for opt in leaf_optimizers(inner, var_list) + [inner]:
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


def share_weight_decay_exclusions(inner: Any, pairs: list[tuple[Any, Any]]) -> None:
    """`exclude_from_weight_decay(var_list=...)` keys variables by identity: a
    stand-in (a compact proxy) of an excluded variable is excluded too."""
    for opt in leaf_optimizers(inner) + [inner]:
        excluded = _compat.weight_decay_exclusions(opt)
        if not excluded:
            continue
        for variable, stand_in in pairs:
            if _compat.var_key(opt, variable) in excluded:
                excluded.add(_compat.var_key(opt, stand_in))


def slot_variables(inner_variables: list, reference: keras.Variable) -> dict[str, keras.Variable]:
    """The inner optimizer's variables made from `reference`, by name suffix
    ("momentum", "velocity", "average", ...): Keras names a slot
    `{reference.path with '/' -> '_'}_{name}`."""
    prefix = reference.path.replace("/", "_") + "_"
    return {v.name[len(prefix):]: v for v in inner_variables if v.name.startswith(prefix)}


def fresh_state(inner: Any, reference: keras.Variable, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The state a fresh copy of the inner optimizer (or of the sub-optimizer
    that updates `reference`) would give elements with these `weights`, by
    slot name suffix; a fresh EMA starts at the weight."""
    leaf = optimizer_for(inner, reference) or inner
    clone = type(leaf).from_config(leaf.get_config())
    temp = keras.Variable(weights, dtype=reference.dtype, name="fresh", trainable=False)
    clone.build([temp])
    fresh = {k: np.asarray(v.numpy()) for k, v in slot_variables(clone.variables, temp).items()}
    if "average" in fresh:  # EMA: a fresh optimizer's first step copies the weight
        fresh["average"] = np.asarray(weights, fresh["average"].dtype)
    return fresh
