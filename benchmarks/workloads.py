"""What the benchmarks run (no measuring: that is ``harness.py``): the
inner optimizers, the masks, the MLP of the full step and its batch, the
variables and gradients of the optimizer step alone, the gradient-only
``train_step`` of each backend, and the frozen-element check.

Imports Keras, so the backend is chosen (``KERAS_BACKEND``) before this
module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras.src.trainers.data_adapters import data_adapter_utils  # noqa: E402

BACKEND = keras.backend.backend()
IS_TF = BACKEND == "tensorflow"
IS_JAX = BACKEND == "jax"
IS_TORCH = BACKEND == "torch"
if IS_TF:
    import tensorflow as tf

    # One tf.function per variant trips TF's "N out of the last M calls
    # triggered retracing" heuristic while building; timed steps are checked
    # for retracing.
    tf.get_logger().setLevel("ERROR")
elif IS_JAX:
    import jax
elif IS_TORCH:
    import torch
else:
    raise SystemExit(f"unsupported Keras backend {BACKEND!r}")

Masks = dict[str, object]
InnerFactory = Callable[[], keras.optimizers.Optimizer]

INNERS: dict[str, InnerFactory] = {
    "Adam": lambda: keras.optimizers.Adam(1e-3),
    "AdamW": lambda: keras.optimizers.AdamW(1e-3),  # weight_decay=0.004 (default)
    # Not run by default (--inners): no square root in the update, so what the
    # masking costs apart from Adam's sqrt of the frozen elements' zero velocity.
    "SGD": lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
    "Lion": lambda: keras.optimizers.Lion(1e-4),
}
DEFAULT_INNERS = ("Adam", "AdamW")

# The optimizer step alone: ~7.3 M parameters, paths as in a model.
OPT_SHAPES = {
    "big1/kernel": (3000, 1024),
    "big1/bias": (1024,),
    "big2/kernel": (2048, 2048),
    "big2/bias": (2048,),
    "head/kernel": (1024, 10),
    "head/bias": (10,),
}


def make_masks(kind: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Masks:
    """Masks keyed by variable path. 2-D variables are "kernels", 1-D "biases"."""
    rng = np.random.default_rng(seed)
    if kind == "none":
        return {}
    if kind == "all_true":
        return {path: np.ones(shape, bool) for path, shape in shapes.items()}
    if kind == "one_frozen":  # all-True but one element: the masked path, at full cost
        masks = {path: np.ones(shape, bool) for path, shape in shapes.items()}
        first = next(p for p, s in shapes.items() if len(s) >= 2)
        masks[first][(0,) * len(shapes[first])] = False
        return masks
    if kind == "realistic":
        return {
            path: (rng.random(shape) < 0.5) if len(shape) >= 2 else False
            for path, shape in shapes.items()
        }
    raise ValueError(f"unknown mask kind {kind!r}")


def float_masks(masks: Masks, shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """The masks as float32 0/1 backend tensors of full shape (for gradient-only masking)."""
    return {
        path: keras.ops.convert_to_tensor(
            np.array(np.broadcast_to(np.asarray(m, np.float32), shapes[path]))
        )
        for path, m in masks.items()
    }


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of a backend tensor or variable (never an alias)."""
    if isinstance(x, keras.Variable):
        x = x.value
    return np.array(keras.ops.convert_to_numpy(x))


def wait_for(values) -> None:
    """Blocks until `values` (backend tensors) are computed. Only JAX
    dispatches asynchronously; TF eager calls and eager torch on CPU return
    when their work is done."""
    if IS_JAX:
        jax.block_until_ready(values)


def short_path(path: str) -> str:
    """'sequential_3/fc1/kernel' -> 'fc1/kernel' (masks are keyed by layer/var)."""
    return "/".join(path.split("/")[-2:])


def opt_variables(seed: int = 1) -> tuple[list, list]:
    """The variables of the optimizer step alone (paths `OPT_SHAPES`) and
    fixed gradients, the same for every variant."""
    rng = np.random.default_rng(seed)
    variables, grads = [], []
    for path, shape in OPT_SHAPES.items():
        layer, var = path.split("/")
        with keras.name_scope(layer):
            variables.append(
                keras.Variable(rng.standard_normal(shape, dtype=np.float32) * 0.05, name=var)
            )
        grads.append(keras.ops.convert_to_tensor(rng.standard_normal(shape, dtype=np.float32)))
    return variables, grads


def masked_grads(grads, mask_list) -> list:
    """Each gradient times its 0/1 mask (None: unmasked)."""
    return [g if m is None else g * m for g, m in zip(grads, mask_list)]


# ------------------------------------------------- the full step: MLP, batch


def _mask_grads(model, grads, variables) -> list:
    """The one line people add: each gradient times its 0/1 mask."""
    masks = model._grad_masks
    return [
        g * masks[short_path(v.path)] if g is not None and short_path(v.path) in masks else g
        for g, v in zip(grads, variables)
    ]


def _tf_train_step(self, data):
    """Keras 3.15's TensorFlow ``train_step`` plus the gradient masking line."""
    from keras.src.losses import loss as loss_module

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        if self._call_has_training_arg:
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0],
        )
        if self.optimizer is not None:
            loss = self.optimizer.scale_loss(loss)
    weights = self.trainable_weights
    grads = tape.gradient(loss, weights)
    grads = _mask_grads(self, grads, weights)  # the one added line
    self.optimizer.apply_gradients(zip(grads, weights))
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _jax_train_step(self, state, data):
    """Keras 3.15's JAX ``train_step`` (stateless, run in the trainer's
    ``jax.jit``) plus the gradient masking line."""
    trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
    (loss, aux), grads = grad_fn(
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=True,
        optimizer_variables=optimizer_variables,
    )
    (unscaled_loss, y_pred, non_trainable_variables, metrics_variables) = aux
    grads = _mask_grads(self, grads, self.trainable_variables)  # the one added line
    (trainable_variables, optimizer_variables) = self.optimizer.stateless_apply(
        optimizer_variables, grads, trainable_variables
    )
    logs, metrics_variables = self._update_metrics_variables(
        metrics_variables, unscaled_loss, x, y, y_pred, sample_weight
    )
    state = (trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables)
    return logs, state


def _torch_train_step(self, data):
    """Keras 3.15's torch ``train_step`` (eager) plus the gradient masking line."""
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    if self._call_has_training_arg:
        y_pred = self(x, training=True)
    else:
        y_pred = self(x)
    self.zero_grad()
    loss = self._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    self._loss_tracker.update_state(
        loss, sample_weight=next(i for i in keras.tree.flatten(x) if i is not None).shape[0]
    )
    if self.optimizer is not None:
        loss = self.optimizer.scale_loss(loss)
    loss.backward()
    trainable_weights = self.trainable_weights[:]
    gradients = [v.value.grad for v in trainable_weights]
    gradients = _mask_grads(self, gradients, trainable_weights)  # the one added line
    with torch.no_grad():
        self.optimizer.apply(gradients, trainable_weights)
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


class GradMaskMLP(keras.Sequential):
    """Gradient-only masking: the backend trainer's own ``train_step`` (Keras
    3.15) plus one line multiplying each gradient by its 0/1 mask (what people
    write by hand)."""

    def set_grad_masks(self, masks: dict[str, object]) -> None:
        self._grad_masks = masks

    train_step = {"tensorflow": _tf_train_step, "jax": _jax_train_step, "torch": _torch_train_step}[
        BACKEND
    ]


GRAD_ONLY_HOW = {
    "tensorflow": "the TF trainer's `train_step` (GradientTape)",
    "jax": "the JAX trainer's stateless `train_step` (jax.value_and_grad over "
    "`compute_loss_and_updates`, in the trainer's jit)",
    "torch": "the torch trainer's `train_step` (`loss.backward()`)",
}


def build_mlp(grad_only: bool) -> keras.Sequential:
    """The full step's MLP 784-1024-1024-10 (ReLU); `grad_only`: a `GradMaskMLP`."""
    keras.utils.set_random_seed(0)
    cls = GradMaskMLP if grad_only else keras.Sequential
    return cls(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, activation="relu", name="fc1"),
            keras.layers.Dense(1024, activation="relu", name="fc2"),
            keras.layers.Dense(10, name="out"),
        ]
    )


def full_step_batch() -> tuple[object, object]:
    """The full part's batch: 256 random inputs of the MLP and their labels."""
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal((256, 784), dtype=np.float32))
    y = keras.ops.convert_to_tensor(rng.integers(0, 10, size=(256,)).astype(np.int32))
    return x, y


# ------------------------------------------------------- frozen-element check


@dataclass
class FrozenCheck:
    """What the frozen-element check of one variant needs: the masks by path,
    the values before the first step and a function reading the current ones
    (same order as ``paths``)."""

    masks: Masks
    paths: list[str]
    before: list[np.ndarray]
    now: Callable[[], list[np.ndarray]]


def frozen_report(checks: dict[str, FrozenCheck]) -> list[str]:
    """For each variant with masks: did every frozen element stay bit-identical?"""
    lines = []
    for name, c in checks.items():
        if not c.masks:
            continue
        moved = total = 0
        for path, b, now in zip(c.paths, c.before, c.now()):
            m = c.masks.get(path)
            if m is None:
                continue
            frozen = ~np.broadcast_to(np.asarray(m, bool), b.shape)
            moved += int(np.sum(now[frozen] != b[frozen]))
            total += int(frozen.sum())
        note = " (not exact by design)" if name.startswith("grad-only") else ""
        lines.append(f"{name}: {moved:,} of {total:,} frozen elements moved{note}")
    return lines
