"""What differs between the Keras backends in the tests, in one place.

The suite runs once per backend (`KERAS_BACKEND=tensorflow|jax|torch`, see
`tests/run_backends.py`). Tests use these helpers instead of `tf.constant`,
`tf.function` or `tf.GradientTape`, so the same test checks every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
IS_TF = BACKEND == "tensorflow"
IS_JAX = BACKEND == "jax"
IS_TORCH = BACKEND == "torch"
KERAS_VERSION = tuple(int(p) for p in keras.__version__.split(".")[:2])

tf_only = pytest.mark.skipif(not IS_TF, reason="TensorFlow-only feature")
jax_only = pytest.mark.skipif(not IS_JAX, reason="JAX-only feature")
torch_only = pytest.mark.skipif(not IS_TORCH, reason="torch-only feature")
needs_multi_optimizer = pytest.mark.skipif(
    not hasattr(keras.optimizers, "MultiOptimizer"),
    reason=f"keras.optimizers.MultiOptimizer needs Keras 3.15 (this is {keras.__version__})",
)


def optimizer_class(name: str):
    """`keras.optimizers.<name>`, or a skip of the calling test on a Keras
    without it (Muon: Keras 3.10, ScheduleFreeAdamW: 3.14, MultiOptimizer: 3.15)."""
    cls = getattr(keras.optimizers, name, None)
    if cls is None:
        pytest.skip(f"keras.optimizers.{name} is not in Keras {keras.__version__}")
    return cls


def tensor(x, dtype=None):
    """A backend tensor holding a copy of `x`."""
    return keras.ops.convert_to_tensor(np.array(x, dtype=dtype))


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of a tensor or variable (never an alias of live memory)."""
    if isinstance(x, keras.Variable):
        x = x.value
    return np.array(keras.ops.convert_to_numpy(x))


def gradients(loss_fn: Callable[[], object], variables: Sequence[keras.Variable]) -> list:
    """d loss_fn() / d variables with the active backend (eager)."""
    variables = list(variables)
    if IS_TF:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, [v.value for v in variables])
    if IS_JAX:
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        return list(jax.grad(pure)([v.value for v in variables]))
    import torch

    loss = loss_fn()
    return list(torch.autograd.grad(loss, [v.value for v in variables]))


class CompiledStep:
    """`grads -> None`: the optimizer's update as each backend's trainer
    compiles it: `tf.function` (TF), `jax.jit` over `stateless_apply` (JAX,
    exactly what the JAX trainer runs), `torch.compile` (torch, only with
    `torch_compile=True`; eager otherwise). `traces()` counts compilations
    (under torch.compile: the graphs dynamo made)."""

    def __init__(self, optimizer, variables, *, torch_compile: bool = False):
        self.optimizer, self.variables = optimizer, list(variables)
        self._count = 0
        if IS_TF:
            import tensorflow as tf

            def step(grads):
                optimizer.apply_gradients(zip(grads, self.variables))

            self._fn = tf.function(step, autograph=False)
        elif IS_JAX:
            import jax

            if not optimizer.built:
                optimizer.build(self.variables)

            def pure(opt_values, var_values, grads):
                self._count += 1  # runs at trace time only
                return optimizer.stateless_apply(opt_values, grads, var_values)

            self._jitted = jax.jit(pure)
            self._fn = self._jax_step
        else:
            def step(grads):
                self._count += 1 if not torch_compile else 0
                optimizer.apply(grads, self.variables)

            if torch_compile:
                import torch
                from torch._dynamo.utils import counters

                torch._dynamo.reset()
                self._graphs = lambda: counters["stats"]["unique_graphs"]
                self._count = -self._graphs()
                self._fn = torch.compile(step)
            else:
                self._fn = step

    def _jax_step(self, grads):
        opt = self.optimizer
        new_vars, new_opt = self._jitted(
            [v.value for v in opt.variables], [v.value for v in self.variables], list(grads)
        )
        for v, x in zip(self.variables, new_vars):
            v.assign(x)
        for v, x in zip(opt.variables, new_opt):
            v.assign(x)

    def __call__(self, grads):
        self._fn(list(grads))

    def traces(self) -> int:
        if IS_TF:
            return self._fn.experimental_get_tracing_count()
        if hasattr(self, "_graphs"):  # torch.compile: graphs dynamo made since
            return self._count + self._graphs()
        return self._count


def synced(model):
    """`model`, with JAX's trainer state written back into its variables.

    During `fit` on JAX the variables are detached until `jax_state_sync()`
    (which `Callback.model` calls); a callback that holds the model in a
    closure (a `LambdaCallback`) must sync before reading weights or masks.
    A no-op on the other backends.
    """
    if IS_JAX:
        model.jax_state_sync()
    return model


def assert_ulp_close(actual, expected, max_ulp: int, err_msg: str = "") -> None:
    """The suite's one ulp comparison: every element of `actual` within
    `max_ulp` units in the last place of `expected`, an ulp being the spacing
    of the floats at the arrays' scale (their largest finite magnitude).
    Elementwise ulps would blow up where a value cancels towards 0 (Adam's
    momentum of a gradient that changes sign). `max_ulp=0` is equality
    (`np.array_equal`, NaN equal to NaN). Shapes and dtypes must
    match, non-finite values must sit at the same places, and non-float
    arrays must be equal."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    label = f"{err_msg}: " if err_msg else ""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{label}{actual.dtype}{actual.shape} vs {expected.dtype}{expected.shape}"
    )
    floating = np.issubdtype(actual.dtype, np.floating)
    if max_ulp == 0 or not floating:
        assert np.array_equal(actual, expected, equal_nan=floating), f"{label}values differ"
        return
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), f"{label}non-finite values at other places"
    assert np.array_equal(actual[~finite], expected[~finite], equal_nan=True), f"{label}non-finite values differ"
    magnitudes = np.abs(np.concatenate([actual[finite], expected[finite]]).astype(np.float64))
    scale = actual.dtype.type(magnitudes.max(initial=0))
    bound = max_ulp * np.spacing(scale).astype(np.float64)
    diff = np.abs(actual[finite].astype(np.float64) - expected[finite].astype(np.float64))
    worst = diff.max(initial=0)
    assert worst <= bound, (
        f"{label}{int(np.sum(diff > bound))} of {diff.size} elements differ by more than "
        f"{max_ulp} ulp at scale {scale!r} ({bound:.3g}); worst {worst:.3g} "
        f"({worst / np.spacing(scale):.1f} ulp)"
    )


# Where a masked model and its oracle each get their own compiled train step
# (JAX's `fit` jits each model's step), the two are separate XLA programs,
# which XLA may fuse and round differently in the last bit. TensorFlow (graph
# mode) and torch (eager) run the same kernels op by op there: to the bit.
XLA_MAX_ULP = 4


def assert_equal_across_programs(actual, expected, err_msg: str = "") -> None:
    """`actual == expected` to the bit on torch (eager); within `XLA_MAX_ULP`
    ulp on JAX, where each side is its own XLA program, and on TensorFlow,
    where a traced step with frozen elements runs the masked update under XLA
    by default (`jit_compile="auto"`) while the oracle runs in graph mode."""
    assert_ulp_close(actual, expected, 0 if IS_TORCH else XLA_MAX_ULP, err_msg)


def grad_masked(optimizer, masks: dict):
    """Independent oracle: `optimizer` applied to gradients zeroed where
    `masks[key]` is False (keys are variable path suffixes). Its class is
    swapped for a subclass of its own class (not of `keras.optimizers.Adam`),
    so on torch the oracle keeps the fused `torch._foreach` implementation
    that `keras.optimizers.Adam(...)` returns there."""

    class GradMasked(type(optimizer)):
        def apply(self, grads, trainable_variables=None):
            variables = trainable_variables or self._trainable_variables
            out = []
            for g, v in zip(grads, variables):
                for key, mask in masks.items():
                    if g is not None and v.path.endswith(key):
                        g = keras.ops.where(mask, g, keras.ops.zeros_like(g))
                out.append(g)
            return super().apply(out, trainable_variables)

    optimizer.__class__ = GradMasked
    return optimizer


class TraceCounter(keras.layers.Layer):
    """Identity layer counting Python executions of `call` (= traces in graph mode)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 0

    def call(self, x):
        self.count += 1
        return x


# Keras keeps an optimizer's per-variable state in private attributes: the
# suite reads them through these three helpers only.


def ema_of(optimizer, variable):
    """The moving average (`use_ema=True`) `optimizer` keeps of `variable`,
    or None where it keeps none."""
    if not getattr(optimizer, "use_ema", False):
        return None
    if optimizer._var_key(variable) not in optimizer._trainable_variables_indices:
        return None
    return optimizer._model_variables_moving_average[optimizer._get_variable_index(variable)]


def built_on(optimizer) -> list:
    """The variables a Keras optimizer was built with, in order."""
    return list(optimizer._trainable_variables)


def slot(optimizer, at, name: str):
    """Adam's `name` slot ("momentum" or "velocity") of a variable, given as
    the variable or its position in build order."""
    index = at if isinstance(at, int) else optimizer._get_variable_index(at)
    return {"momentum": optimizer._momentums, "velocity": optimizer._velocities}[name][index]


def pack_masks_from(monkeypatch, size: int) -> None:
    """Masks of at least `size` elements get a bit-packed copy for this test
    (the threshold lives in the active backend's module)."""
    from masked_opt._backend import common

    import masked_opt._backend as dispatcher

    for module in {common, dispatcher._impl}:
        if hasattr(module, "PACK_MIN_SIZE"):
            monkeypatch.setattr(module, "PACK_MIN_SIZE", size)


def frozen_slot_names(optimizer) -> tuple[str, ...]:
    """Name prefixes of the inner optimizer's slots of the variables wholly
    frozen now (mask stored as a scalar False): their values are not state (a
    fresh state comes when they train), and the dense layout may hold them at
    size 0 (stand-ins) where another build holds them full-size."""
    prefixes = []
    for v in optimizer.masked_variables:
        if optimizer.mask_storage_shape(v) == () and not optimizer.get_mask(v).any():
            prefix = v.path.replace("/", "_") + "_"
            prefixes += [prefix, "masked_frozen_" + prefix]
    return tuple(prefixes)


def is_frozen_slot(variable, prefixes: tuple[str, ...]) -> bool:
    return variable.name.startswith(prefixes) or any(("_" + p) in variable.name for p in prefixes)
