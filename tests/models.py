"""The small models and data the tests train, in one place.

`mlp(6, ("d1", 5), ("d2", 3))` is `Input(6) -> Dense(5, name="d1") ->
Dense(3, name="d2")`; a layer is `units`, `(name, units)` or
`(name, units, {Dense kwargs})`. `init_seed` sets every weight from a NumPy
generator (independent of Keras's initializers and backend), `counter`
inserts an identity layer that counts traces.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from backends import gradients, tensor


def _dense(spec: Any, common: dict) -> keras.layers.Dense:
    if isinstance(spec, int):
        return keras.layers.Dense(spec, **common)
    name, units, *rest = spec  # name None: Keras's automatic name
    return keras.layers.Dense(units, name=name, **{**common, **(rest[0] if rest else {})})


def mlp(n_in: int, *layers: Any, name: str | None = None, init_seed: int | None = None,
        counter: keras.layers.Layer | None = None, **common: Any) -> keras.Sequential:
    """A Sequential MLP of Dense layers (see the module docstring)."""
    stack = [keras.Input((n_in,))] + ([counter] if counter is not None else [])
    model = keras.Sequential(stack + [_dense(spec, common) for spec in layers], name=name)
    if init_seed is not None:
        init = np.random.default_rng(init_seed)
        for v in model.trainable_variables:
            v.assign(init.normal(size=v.shape).astype("float32"))
    return model


def regression_data(n: int, n_in: int, n_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype("float32"), rng.normal(size=(n, n_out)).astype("float32")


def classification_data(n: int, n_in: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype("float32"), rng.integers(0, classes, size=(n,))


def mse_step(model: keras.Model, optimizer: Any, x: np.ndarray, y: np.ndarray) -> None:
    """One eager custom-loop step: MSE gradients through `optimizer.apply`."""
    x, y = tensor(x, "float32"), tensor(y, "float32")
    grads = gradients(lambda: keras.ops.mean((model(x) - y) ** 2), model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)


def weights(model: keras.Model) -> list[np.ndarray]:
    """Copies of the model's trainable weights."""
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_variables]


def small_masked(masks: Any, inner: Any = None, build: bool = True) -> tuple[keras.Model, Any]:
    """`mlp(4, 3, 2)` (kernel (4, 3), bias (3,), kernel_1 (3, 2), bias_1 (2,):
    23 elements) and a `MaskedOptimizer` with `masks` around `inner` (SGD 0.1
    by default), built on the model unless `build=False`."""
    from masked_opt import MaskedOptimizer

    model = mlp(4, 3, 2)
    optimizer = MaskedOptimizer(inner or keras.optimizers.SGD(0.1), masks=masks)
    if build:
        optimizer.build(model.trainable_variables)
    return model, optimizer


def small_data(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Regression data for `small_masked`'s model."""
    return regression_data(n, 4, 2)


def jax_step(model, optimizer, chosen, run=True):
    """`stateless_call` + `stateless_apply` under `jax.jit`; the gradients of
    variables not in `chosen` are given as None."""
    import jax

    variables = model.trainable_variables
    keep = [any(v is c for c in chosen) for v in variables]
    if not optimizer.built:
        optimizer.build(variables)

    def loss_fn(trainable, non_trainable, x, y):
        out, non_trainable = model.stateless_call(trainable, non_trainable, x)
        return keras.ops.mean((out - y) ** 2), non_trainable

    @jax.jit
    def step(trainable, non_trainable, opt_vars, x, y):
        grads, non_trainable = jax.grad(loss_fn, has_aux=True)(trainable, non_trainable, x, y)
        grads = [g if k else None for g, k in zip(grads, keep)]
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars

    def state():
        return ([v.value for v in variables], [v.value for v in model.non_trainable_variables],
                [v.value for v in optimizer.variables])

    def apply(x, y):
        trainable, non_trainable, opt_vars = step(*state(), x, y)
        for v, value in zip(variables + model.non_trainable_variables + optimizer.variables,
                            trainable + non_trainable + opt_vars):
            v.assign(value)

    return apply if run else (step, state)
