"""Every private Keras and TensorFlow API masked_opt touches, in one place.

A Keras upgrade is a review of this file: each row of `PRIVATE_APIS` names
what is used, where, why, and the Keras versions it was checked on (the
lowest declared, 3.8.0 with TensorFlow 2.18, and the newest tested, 3.15.1
with TensorFlow 2.21; CI runs the suite on both). Keras-private attributes
are read through the functions below; the TensorFlow-private modules are
used by `masked_opt/_backend/tensorflow.py` only, each behind a fallback.
`tests/test_code_structure.py` fails if code elsewhere in the package touches a
private attribute of an object it does not own, or a private attribute that
is not listed here.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import keras
from keras.src.backend.common import stateless_scope
from keras.src.utils import tracking


class PrivateApi(NamedTuple):
    name: str  # the attribute or module, as the code spells it
    owner: str  # the Keras/TF class or module it belongs to
    used_for: str
    checked_on: str = "Keras 3.8.0, 3.15.1"


PRIVATE_APIS: tuple[PrivateApi, ...] = (
    PrivateApi("keras.src.backend.common.stateless_scope.in_stateless_scope", "Keras function",
               "a step inside `stateless_apply`, which cannot create optimizer state"),
    PrivateApi("keras.src.utils.tracking", "Keras module",
               "no_automatic_dependency_tracking (re-exported for code that assigns containers in build)"),
    PrivateApi("_var_key", "BaseOptimizer", "the per-variable key Keras's optimizers use (id, or TF's unique id)"),
    PrivateApi("_variables", "BaseOptimizer",
               "the wrapper's own variables (`variables` is own + inner); a grown slot takes its stand-in's place"),
    PrivateApi("_trainable_variables", "BaseOptimizer", "the variables the optimizer was built on"),
    PrivateApi("_trainable_variables_indices", "BaseOptimizer",
               "dense state: a wholly frozen variable's zero-size stand-in is replaced by the variable"),
    PrivateApi("_iterations", "BaseOptimizer", "`apply_gradients` returns the step counter as Keras's does"),
    PrivateApi("_get_variable_index", "BaseOptimizer", "which EMA average belongs to a variable"),
    PrivateApi("_model_variables_moving_average", "BaseOptimizer",
               "the EMA averages (also read by keras.callbacks.SwapEMAWeights)"),
    PrivateApi("_exclude_from_weight_decay", "BaseOptimizer",
               "compact state: a proxy is excluded from weight decay with its variable"),
    PrivateApi("_use_weight_decay", "BaseOptimizer", "whether a sparse SGD update may touch other rows"),
    PrivateApi("_overwrite_variable_with_gradient", "BaseOptimizer (Keras >= 3.9)",
               "float8 scale variables are never masked (older Keras: the variable flag)"),
    PrivateApi("_optimizer_map", "MultiOptimizer (Keras >= 3.15)", "the sub-optimizer a variable will get"),
    PrivateApi("_var_to_optimizer_idx", "MultiOptimizer (Keras >= 3.15)", "the sub-optimizer a variable has"),
    PrivateApi("_distribution_strategy", "TF optimizer", "the strategy an optimizer was created under"),
    PrivateApi("_value", "keras.Variable (JAX)", "JAX's trainer detaches values during fit (None)"),
    PrivateApi("_layout", "keras.Variable",
               "keras.distribution: masks are sharded like their variable (`_state_layout.mask_sharding`)"),
    PrivateApi("_model", "keras.callbacks.Callback", "the model without the JAX state sync `.model` does"),
    PrivateApi("_jax_state", "Trainer (JAX)", "the step counter during fit without a full state sync"),
    PrivateApi("_nodes_by_depth", "Functional", "layerwise_decay orders layers by graph depth"),
    PrivateApi("_flatten_layers", "Layer", "side path: the layer that owns a kernel"),
    PrivateApi("Layer._trainable_variables", "Layer", "side path: a layer's own trainable variables (not its sublayers')"),
    PrivateApi("_layers", "Layer",
               "side path: a layer holds its slice variable in its sublayer list, which Keras's saving skips"),
    PrivateApi("_track_variable", "Layer", "side path: the holder layer tracks the slice variable"),
    PrivateApi("_unique_id", "tf.Variable", "(via `_var_key` on TensorFlow)"),
    PrivateApi("tensorflow.python.ops.control_flow_util", "TensorFlow",
               "whether a TF graph is compiled by XLA (fallback: never; only a speed-up is lost)",
               "TF 2.18, 2.21"),
    PrivateApi("tensorflow.python.distribute.mirrored_strategy", "TensorFlow",
               "MirroredStrategy family check (fallback: public classes)", "TF 2.18, 2.21"),
    PrivateApi("tf.__internal__.distribute.interim.maybe_merge_call", "TensorFlow",
               "restore frozen elements in a replica context, as Keras's TF optimizer does",
               "TF 2.18, 2.21"),
    PrivateApi("_version", "torch.Tensor",
               "eager torch: a mask's frozen positions are looked up again after each in-place write (an edit)",
               "torch 2.14"),
    PrivateApi("keras.src.backend.*", "Keras module names",
               "a saved inner optimizer is named by its public class, not torch's subclass"),
)

no_automatic_dependency_tracking = tracking.no_automatic_dependency_tracking


def var_key(optimizer: keras.optimizers.Optimizer, variable: Any) -> Any:
    """The key Keras's optimizers file a variable under."""
    return optimizer._var_key(variable)


def own_variables(optimizer: keras.optimizers.Optimizer) -> list:
    return optimizer._variables[:]


def built_on(optimizer: keras.optimizers.Optimizer) -> list:
    """The variables an optimizer was built on (empty before build)."""
    return list(getattr(optimizer, "_trainable_variables", []) or [])


def step_counter(optimizer: keras.optimizers.Optimizer) -> keras.Variable:
    return optimizer._iterations


def ema_average(optimizer: keras.optimizers.Optimizer, variable: Any) -> Any:
    """The EMA average of `variable` in an optimizer with `use_ema=True`, or
    None if the optimizer was not built on it."""
    try:
        index = optimizer._get_variable_index(variable)
    except KeyError:
        return None
    return optimizer._model_variables_moving_average[index]


def ema_averages(optimizer: keras.optimizers.Optimizer) -> Any:
    return optimizer._model_variables_moving_average


def weight_decay_exclusions(optimizer: keras.optimizers.Optimizer) -> set | None:
    """The set of variable keys `exclude_from_weight_decay(var_list=...)` made."""
    return getattr(optimizer, "_exclude_from_weight_decay", None)


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    return bool(optimizer.weight_decay) and bool(optimizer._use_weight_decay(variable))


def overwrites_with_gradient(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """Float8 scale variables are overwritten with their gradient (Keras >= 3.9
    has a helper for it; older versions read the flag)."""
    check = getattr(optimizer, "_overwrite_variable_with_gradient", None)
    if check is not None:
        return bool(check(variable))
    return bool(getattr(variable, "overwrite_with_gradient", False))


def multi_optimizer_map(optimizer: Any) -> Any:
    """A MultiOptimizer's `variable -> sub-optimizer` function, or None."""
    mapping = getattr(optimizer, "_optimizer_map", None)
    return mapping if callable(mapping) else None


def multi_optimizer_index(optimizer: Any, variable: Any) -> int | None:
    """The index of the sub-optimizer a built MultiOptimizer gave `variable`."""
    return optimizer._var_to_optimizer_idx.get(optimizer._var_key(variable))


def creation_strategy(optimizer: Any) -> Any:
    """The tf.distribute strategy a TF optimizer was created under (or None)."""
    return getattr(optimizer, "_distribution_strategy", None)


def is_detached(variable: Any) -> bool:
    """Whether JAX's trainer has detached the variable's value during `fit`."""
    return getattr(variable, "_value", True) is None


def keras_distribution() -> Any:
    """keras.distribution's active distribution; None where there is none (or
    the backend or Keras version has no keras.distribution)."""
    try:
        return keras.distribution.distribution()
    except (AttributeError, NotImplementedError):
        return None


def variable_layout(variable: Any) -> Any:
    return getattr(variable, "_layout", None)


def callback_model(callback: keras.callbacks.Callback) -> Any:
    """The callback's model without the JAX state sync `callback.model` does."""
    return callback._model


def jax_trainer_state(model: Any) -> dict:
    return getattr(model, "_jax_state", None) or {}


def nodes_by_depth(model: Any) -> dict:
    return model._nodes_by_depth


ADD_VARIABLE_TAKES_LAYOUT = "layout" in inspect.signature(keras.optimizers.Optimizer.add_variable).parameters
"""`Optimizer.add_variable(layout=...)` arrived in Keras 3.10 (public signature)."""

MULTI_OPTIMIZER = getattr(keras.optimizers, "MultiOptimizer", None)
"""keras.optimizers.MultiOptimizer arrived in Keras 3.15."""

BACKEND_MODULE_PREFIX = "keras.src.backend."


def replace_built_variable(optimizer: Any, old: Any, new: Any) -> None:
    """Puts `new` where `old` is among the variables `optimizer` was built on
    (same index, so its slots and saved positions stay put)."""
    i = optimizer._get_variable_index(old)
    optimizer._trainable_variables[i] = new
    del optimizer._trainable_variables_indices[optimizer._var_key(old)]
    optimizer._trainable_variables_indices[optimizer._var_key(new)] = i


def set_built_on(optimizer: Any, variables: list) -> None:
    """Makes `variables` the list `optimizer` was built on (the same ones in the
    same order, with more added: indices of the existing ones may shift)."""
    with tracking.DotNotTrackScope():  # the list is not the optimizer's own state
        optimizer._trainable_variables = list(variables)
        optimizer._trainable_variables_indices = {optimizer._var_key(v): i for i, v in enumerate(variables)}


def replace_state_variable(optimizer: Any, old: Any, new: Any) -> None:
    """Puts `new` (made last by `add_variable_from_reference`) where `old` is
    among the optimizer's variables (saved by position) and in every list of
    slots the optimizer keeps (`_momentums`, `_velocities`, ...)."""
    variables = optimizer._variables
    del variables[next(k for k, v in enumerate(variables) if v is new)]
    variables[next(k for k, v in enumerate(variables) if v is old)] = new
    for value in vars(optimizer).values():
        if isinstance(value, list) and value is not variables:
            for k, v in enumerate(value):
                if v is old:
                    value[k] = new


def in_stateless_scope() -> bool:
    """Whether a `keras.StatelessScope` is active (a step inside `stateless_apply`)."""
    return stateless_scope.in_stateless_scope()


def flatten_layers(model: Any) -> list:
    """Every layer of `model`, nested ones included."""
    return list(model._flatten_layers())


def own_trainable_variables(layer: Any) -> list:
    """A layer's own trainable variables, without its sublayers'."""
    return list(getattr(layer, "_trainable_variables", None) or ())  # () for a layer mid-construction


def hold_in_sublayers(layer: Any, holder: Any, variable: Any) -> None:
    """Has `holder` (a bare Layer) track `variable` and `layer` list it among its
    sublayers: `layer.trainable_weights` then includes it, while Keras's saving
    (which walks attributes, and skips `_layers`) never sees it."""
    holder._track_variable(variable)
    layer._layers.append(holder)
