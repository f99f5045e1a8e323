"""Step-time benchmark: MaskedOptimizer vs the bare optimizer, side by side.

Runs on the Keras backend selected by ``KERAS_BACKEND`` (``tensorflow``,
``jax`` or ``torch``; else ``~/.keras/keras.json``), which the Environment
section names, with the backend library's version.

Two parts, each run in ONE process with rounds interleaved (every round times
every variant once, in a fresh random order), so that machine noise hits all
variants alike. Reported for wall-clock time and for process CPU time (all
threads): the median time per step of each variant, and the median over rounds
of the paired ratio variant/bare (same round) with its interquartile range.
CPU time is the work done; it is far less disturbed than wall time by other
processes on a shared machine.

* ``full``: a whole training step, ``model.train_on_batch`` on a
  784-1024-1024-10 MLP (ReLU), batch 256, synthetic MNIST-shaped data,
  default ``model.compile`` (no ``jit_compile`` argument): a ``tf.function``
  without XLA on TensorFlow (CPU), the trainer's ``jax.jit`` on JAX, eager on
  torch.
* ``opt``: the optimizer step alone on ~7.3 M parameters with fixed gradients,
  as each backend's trainer runs it: ``opt.apply(grads, vars)`` inside a
  ``tf.function`` (TensorFlow); ``opt.stateless_apply(opt_vars, grads, vars)``
  inside ``jax.jit`` with the state donated (JAX: what the JAX trainer does);
  eager ``opt.apply`` under ``torch.no_grad()`` (torch: what the torch trainer
  does; with ``--jit-compile`` inside ``torch.compile``). Every timed round waits for its last step's results (JAX dispatches
  asynchronously; eager torch on CPU is synchronous).

Variants (``variants(part)`` builds a dict name -> ``Variant``; add a line there
to add one):

* ``bare``: the inner optimizer alone (the reference, ratio 1.00 by definition);
* ``masked, no masks``: ``MaskedOptimizer(inner)``; should cost nothing;
* ``masked, all-True``: every variable registered with a full-shape all-True
  mask (e.g. to edit single elements later). On TensorFlow the core skips the
  masking work while no element is frozen (one ``cond``), so this is the cost
  of the check; on JAX and torch there is no such shortcut (see
  ``masked_opt/_backend/``) and this costs what ``1 frozen`` costs;
* ``masked, 1 frozen``: the same masks with one kernel element frozen: the
  full cost of the machinery (mask the gradients, snapshot, restore), all masks
  full-shape;
* ``masked, 50% + bias``: a random 50% element mask on every kernel, biases
  frozen (scalar ``False``): a realistic setup;
* ``grad-only, 50% + bias``: the naive approach: the bare optimizer, gradients
  multiplied by the same masks (full part: the backend trainer's own
  ``train_step`` plus that one line). Not exact: weight decay and momentum
  still move "frozen" elements;
* ``compact, 50% + bias``: the same masks with ``compact_state=True`` (the
  inner optimizer updates a 1-D proxy of the trainable elements);
* ``masked, 50% + bias, bool masks``: the same with no bit-packed mask copies,
  so compiled steps read the bool masks (torch.compile: one element at a time);
* ``masked, 50% + bias, held int masks`` (torch only): eager masks converted
  to 0/1 integers once per step and held across the inner update, as before
  they became temporaries;
* ``masked, 50% + bias, multipliers 0.5, where blend`` (torch only): the
  multiplier blends by ``keras.ops`` (four new tensors, torch's scalar-loop
  ``where``) instead of the library's in-place blend and integer-bit
  ``select``: the before/after in one process;
* ``bare, XLA step`` (opt part, TensorFlow only): the bare optimizer's step
  traced with ``tf.function(jit_compile=True)``: the yardstick for a
  jit-compiled masked step (on JAX every step is an XLA step already);
* ``masked jit, 50% + bias`` (TensorFlow only):
  ``MaskedOptimizer(..., jit_compile=True)``, which other backends refuse.

Variants that do not apply to the backend are listed as skipped, with why.
After timing, every variant with masks is checked: its frozen elements must be
bit-identical to their values before warm-up.

Usage::

    python benchmarks/bench_step.py            # full run, default backend
    KERAS_BACKEND=jax python benchmarks/bench_step.py
    KERAS_BACKEND=torch python benchmarks/bench_step.py --quick   # smoke run
    python benchmarks/bench_step.py --parts opt --rounds 30 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import platform
import random
import re
import statistics
import sys
import types
import time
from collections.abc import Callable
from dataclasses import dataclass
from unittest.mock import patch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras.src.trainers.data_adapters import data_adapter_utils  # noqa: E402

from masked_opt import MaskedOptimizer  # noqa: E402

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
    raise SystemExit(f"bench_step.py: unsupported Keras backend {BACKEND!r}")

Masks = dict[str, object]
InnerFactory = Callable[[], keras.optimizers.Optimizer]

VARIANT_FILTER = ""  # regex from --variants; "bare" always runs
JIT_COMPILE = None  # --jit-compile: `model.compile(jit_compile=True)` in the full part
GRAPH_BREAKS: dict[str, int] = {}  # torch.compile: graph breaks while a variant is built and warmed up
FAILED: dict[str, str] = {}  # variant name -> error, shown under the tables
RETRACED: set[str] = set()  # opt-part variants whose step retraced while timed
SKIPPED: dict[str, str] = {}  # "part: variant" -> why it does not run on this backend

INNERS: dict[str, InnerFactory] = {
    "Adam": lambda: keras.optimizers.Adam(1e-3),
    "AdamW": lambda: keras.optimizers.AdamW(1e-3),  # weight_decay=0.004 (default)
    # Not run by default (--inners): no square root in the update, so what the
    # masking costs apart from Adam's sqrt of the frozen elements' zero velocity.
    "SGD": lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
    "Lion": lambda: keras.optimizers.Lion(1e-4),
}
DEFAULT_INNERS = ("Adam", "AdamW")

TF_ONLY = ("tensorflow",)
ALL_BACKENDS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class Variant:
    """How to build one contender from an inner-optimizer factory and the masks.

    ``make(inner, masks)`` returns the optimizer. ``grad_only`` variants get the
    bare optimizer and multiply the gradients by ``masks`` before ``apply``.
    ``masks`` is "realistic" (50% kernels, frozen biases), "all_true",
    "one_frozen" (all-True but one kernel element) or "none".
    ``parts`` names the benchmark parts ("full", "opt") the variant runs in,
    ``backends`` the Keras backends it runs on (``why_not`` says why not on
    the others).
    """

    make: Callable[[InnerFactory, Masks], keras.optimizers.Optimizer]
    masks: str = "none"
    grad_only: bool = False
    xla_step: bool = False  # opt part: trace the step with tf.function(jit_compile=True)
    # Around the build, the warm-up and every timed run: a library internal
    # swapped for what it was before a change (the before/after in one process).
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    parts: tuple[str, ...] = ("full", "opt")
    backends: tuple[str, ...] = ALL_BACKENDS
    why_not: str = ""


@contextlib.contextmanager
def unpacked():
    """No bit-packed mask copies (set at build): compiled steps read the bool masks."""
    from masked_opt import _backend

    with contextlib.ExitStack() as stack:
        for m in (_backend.common, _backend._impl):
            if hasattr(m, "PACK_MIN_SIZE"):
                stack.enter_context(patch.object(m, "PACK_MIN_SIZE", 1 << 62))
        yield


@contextlib.contextmanager
def where_blend():
    """Multiplier blends by `keras.ops` (subtract, multiply, add, `where`:
    torch's scalar loop on CPU), as before the eager torch blend."""
    from masked_opt import _backend

    with patch.object(_backend, "select", _backend.common.select), patch.object(_backend, "blend", _backend.common.blend):
        yield


def held_int_masks():
    """Eager torch: each half-frozen mask converted to 0/1 integers once per
    step and held across the inner update (the masking and the restore read
    that copy), instead of a temporary where each is used."""
    from masked_opt import _backend

    step_mask = _backend.step_mask

    def converted(mask, variable):
        form = step_mask(mask, variable)
        if getattr(form, "dtype", None) is torch.bool and variable.value.dtype.is_floating_point:
            return form.to(_backend._impl._ints(variable.value.dtype))
        return form

    return patch.object(_backend, "step_mask", converted)


def _patched_run(variant: Variant, run: Callable[[int], None]) -> Callable[[int], None]:
    """`run` under the variant's `patch`."""

    def patched(k: int) -> None:
        with variant.patch():
            run(k)

    return patched


def masked_accepts_jit() -> bool:
    return "jit_compile" in inspect.signature(MaskedOptimizer).parameters


def variants(part: str) -> dict[str, Variant]:
    """The contenders of `part` on this backend, in table order. The first one
    is the reference. Those of `part` that do not run here go to SKIPPED."""
    table = {
        "bare": Variant(lambda inner, m: inner()),
        "masked, no masks": Variant(lambda inner, m: MaskedOptimizer(inner())),
        "masked, all-True": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "all_true"),
        "masked, 1 frozen": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "one_frozen"),
        "masked, 50% + bias": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "realistic"),
        "grad-only, 50% + bias": Variant(lambda inner, m: inner(), "realistic", grad_only=True),
        # The same masks with state for the trainable elements only.
        "compact, 50% + bias": Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, compact_state=True), "realistic"
        ),
        # Update multipliers (0.5 on every variable: the cost of an LLRD step).
        "multipliers 0.5": Variant(lambda inner, m: MaskedOptimizer(inner(), multipliers={".*": 0.5})),
        "masked, 50% + bias, multipliers 0.5": Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, multipliers={".*": 0.5}), "realistic"
        ),
    }
    # What a compiled step costs reading the bool masks instead of their
    # bit-packed copies (the state before issue 16's torch.compile change).
    table["masked, 50% + bias, bool masks"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m), "realistic", patch=unpacked
    )
    # What XLA does for the bare optimizer: the yardstick for a jit-compiled masked step.
    # Multiplier blends by keras.ops (torch's scalar-loop `where`), as before
    # the eager torch blend: the before/after in one process.
    table["masked, 50% + bias, multipliers 0.5, where blend"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m, multipliers={".*": 0.5}),
        "realistic",
        patch=where_blend,
        backends=("torch",),
        why_not="only torch has a blend other than `keras.ops.where`",
    )
    table["masked, 50% + bias, held int masks"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m),
        "realistic",
        patch=held_int_masks,
        backends=("torch",),
        why_not="eager torch's integer masking only",
    )
    table["bare, XLA step"] = Variant(
        lambda inner, m: inner(),
        xla_step=True,
        parts=("opt",),
        backends=TF_ONLY,
        why_not="TensorFlow only (`tf.function(jit_compile=True)`); on JAX every "
        "step is an XLA step already, torch.compile is not benchmarked here",
    )
    if masked_accepts_jit():
        table["masked jit, 50% + bias"] = Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, jit_compile=True),
            "realistic",
            backends=TF_ONLY,
            why_not="`MaskedOptimizer(jit_compile=True)` is TensorFlow only "
            "(ValueError on other backends)",
        )
    selected = {}
    for name, v in table.items():
        if part not in v.parts or not (name == "bare" or re.search(VARIANT_FILTER, name)):
            continue
        if BACKEND not in v.backends:
            SKIPPED[f"{part}: {name}"] = v.why_not
            continue
        selected[name] = v
    return selected


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


# ------------------------------------------------------------------ timing


@dataclass
class Samples:
    """Per-round seconds per step of one variant: wall clock and process CPU."""

    wall: list[float]
    cpu: list[float]


def time_rounds(
    runners: dict[str, Callable[[int], None]], rounds: int, steps: int, seed: int = 0
) -> dict[str, Samples]:
    """Seconds per step of each runner, one sample per round; order shuffled per round.

    Wall time is what a user waits; process CPU time (all threads, user+sys) is
    the work done, and is much less sensitive to other processes on the machine.
    """
    rng = random.Random(seed)
    names = list(runners)
    samples = {n: Samples([], []) for n in names}
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            gc.collect()
            gc.disable()
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                runners[name](steps)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            finally:
                gc.enable()
            samples[name].wall.append(dt / steps)
            samples[name].cpu.append(dc / steps)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return samples


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def _ratio_cell(xs: list[float], ref: list[float]) -> str:
    q1, med, q3 = quartiles([x / b for x, b in zip(xs, ref)])
    return f"**{med:.2f}** ({q1:.2f}-{q3:.2f})"


def table_rows(inner_name: str, samples: dict[str, Samples], ref: str) -> list[str]:
    rows = []
    if ref not in samples:  # the reference failed to build: no ratios
        return [f"| {inner_name} | (reference `{ref}` failed: no ratios) | | | | |"]
    for name, s in samples.items():
        rows.append(
            f"| {inner_name} | {name} | {statistics.median(s.wall) * 1e3:.1f} | "
            f"{_ratio_cell(s.wall, samples[ref].wall)} | "
            f"{statistics.median(s.cpu) * 1e3:.1f} | {_ratio_cell(s.cpu, samples[ref].cpu)} |"
        )
    return rows


TABLE_HEAD = [
    "| inner | variant | wall ms/step | wall ratio vs bare (IQR) "
    "| CPU ms/step | CPU ratio vs bare (IQR) |",
    "|---|---|---:|---:|---:|---:|",
]


def _record_failure(key: str, e: Exception) -> None:
    FAILED[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    print(f"  {key} failed: {FAILED[key]}", file=sys.stderr, flush=True)


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


# ------------------------------------------------------------ full train step


def _short(path: str) -> str:
    """'sequential_3/fc1/kernel' -> 'fc1/kernel' (masks are keyed by layer/var)."""
    return "/".join(path.split("/")[-2:])


def _mask_grads(model, grads, variables) -> list:
    """The one line people add: each gradient times its 0/1 mask."""
    masks = model._grad_masks
    return [
        g * masks[_short(v.path)] if g is not None and _short(v.path) in masks else g
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
    (
        trainable_variables,
        non_trainable_variables,
        optimizer_variables,
        metrics_variables,
    ) = state
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
    state = (
        trainable_variables,
        non_trainable_variables,
        optimizer_variables,
        metrics_variables,
    )
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


def build_mlp(grad_only: bool) -> keras.Sequential:
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


def full_step_runners(inner: InnerFactory, warmup: int, label: str) -> tuple[dict, dict]:
    """One compiled model per variant, warmed up. Returns (runners, checks)."""
    x, y = full_step_batch()
    runners, checks = {}, {}
    for name, variant in variants("full").items():
        try:
            runners[name], checks[name] = _full_step_runner(variant, inner, x, y, warmup, f"{label}, {name}")
        except Exception as e:  # a variant under development must not sink the others
            _record_failure(f"{label}, {name}", e)
    return runners, checks


def _graph_breaks() -> int | None:
    """torch.compile's graph-break count so far (None when nothing is compiled)."""
    if not (IS_TORCH and JIT_COMPILE):
        return None
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _full_step_runner(variant: Variant, inner: InnerFactory, x, y, warmup: int, label: str):
    """Builds, compiles and warms up one model; returns (run(k), FrozenCheck)."""
    model = build_mlp(variant.grad_only)
    shapes = {_short(v.path): tuple(v.shape) for v in model.trainable_variables}
    masks = make_masks(variant.masks, shapes)
    opt = variant.make(inner, masks)
    if variant.grad_only:
        model.set_grad_masks(float_masks(masks, shapes))
    compile_args = {} if JIT_COMPILE is None else {"jit_compile": JIT_COMPILE}
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_args,
    )
    paths = [_short(v.path) for v in model.trainable_variables]
    before = [to_numpy(v) for v in model.trainable_variables]
    breaks = _graph_breaks()
    with variant.patch():  # the first step builds the optimizer
        for _ in range(warmup):
            model.train_on_batch(x, y)
    if breaks is not None:
        GRAPH_BREAKS[label] = _graph_breaks() - breaks

    def run(k: int) -> None:
        for _ in range(k):
            model.train_on_batch(x, y)  # returns the logs as Python floats
        wait_for([v.value for v in model.trainable_variables])

    def now() -> list[np.ndarray]:
        return [to_numpy(v) for v in model.trainable_variables]

    return _patched_run(variant, run), FrozenCheck(masks, paths, before, now)


# ------------------------------------------------------- optimizer step alone

OPT_SHAPES = {
    "big1/kernel": (3000, 1024),
    "big1/bias": (1024,),
    "big2/kernel": (2048, 2048),
    "big2/bias": (2048,),
    "head/kernel": (1024, 10),
    "head/bias": (10,),
}


def opt_step_runners(inner: InnerFactory, warmup: int, label: str) -> tuple[dict, dict]:
    """One optimizer (on its own copy of the variables) per variant, warmed up.
    Returns (runners, checks)."""
    runners, checks = {}, {}
    for name, variant in variants("opt").items():
        try:
            runners[name], checks[name] = _opt_step_runner(
                variant, inner, warmup, f"{label}, {name}"
            )
        except Exception as e:  # a variant under development must not sink the others
            _record_failure(f"{label}, {name}", e)
    return runners, checks


def opt_variables(seed: int = 1) -> tuple[list, list]:
    """The opt part's variables (paths `OPT_SHAPES`) and fixed gradients, the
    same for every variant."""
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


def _opt_step_runner(variant: Variant, inner: InnerFactory, warmup: int, variant_name: str):
    """Builds one optimizer on fresh variables, traces and warms up its step.
    Returns (run(k), FrozenCheck)."""
    variables, grads = opt_variables()
    masks = make_masks(variant.masks, OPT_SHAPES)
    opt = variant.make(inner, masks)
    with variant.patch():
        opt.build(variables)
    fmasks = float_masks(masks, OPT_SHAPES) if variant.grad_only else {}
    mask_list = [fmasks.get(p) for p in OPT_SHAPES]
    paths = list(OPT_SHAPES)
    before = [to_numpy(v) for v in variables]
    build = {"tensorflow": _tf_opt_step, "jax": _jax_opt_step, "torch": _torch_opt_step}[BACKEND]
    with variant.patch():
        run, now = build(opt, variables, grads, mask_list, variant, warmup, variant_name)
    return _patched_run(variant, run), FrozenCheck(masks, paths, before, now)


def _masked(grads, mask_list) -> list:
    return [g if m is None else g * m for g, m in zip(grads, mask_list)]


def _tf_opt_step(opt, variables, grads, mask_list, variant, warmup, variant_name):
    """`opt.apply` in a `tf.function` (XLA-compiled for `xla_step` variants)."""

    @tf.function(jit_compile=variant.xla_step)
    def step():
        opt.apply(_masked(grads, mask_list), variables)
        return opt.iterations

    for _ in range(warmup):
        step().numpy()
    traces = step.experimental_get_tracing_count()

    def run(k: int) -> None:
        for _ in range(k):
            it = step()
        it.numpy()
        if step.experimental_get_tracing_count() != traces:
            RETRACED.add(variant_name)

    return run, lambda: [to_numpy(v) for v in variables]


def _jax_opt_step(opt, variables, grads, mask_list, variant, warmup, variant_name):
    """`opt.stateless_apply` in `jax.jit`, optimizer and model state donated:
    what the JAX trainer's jitted train step does with the optimizer."""
    traced = [0]

    def pure(opt_values, var_values, grads):
        traced[0] += 1  # runs at trace time only
        new_vars, new_opt = opt.stateless_apply(opt_values, _masked(grads, mask_list), var_values)
        return new_opt, new_vars

    step = jax.jit(pure, donate_argnums=(0, 1))
    # Copies: the donated buffers must not be the ones the Variables hold.
    state = [
        [jax.numpy.array(v.value, copy=True) for v in opt.variables],
        [jax.numpy.array(v.value, copy=True) for v in variables],
    ]

    def run(k: int) -> None:
        opt_values, var_values = state
        for _ in range(k):
            opt_values, var_values = step(opt_values, var_values, grads)
        jax.block_until_ready((opt_values, var_values))
        state[:] = [opt_values, var_values]

    run(warmup)
    traces = traced[0]

    def timed(k: int) -> None:
        run(k)
        if traced[0] != traces:
            RETRACED.add(variant_name)

    return timed, lambda: [to_numpy(x) for x in state[1]]


def _torch_opt_step(opt, variables, grads, mask_list, variant, warmup, variant_name):
    """Eager `opt.apply` under `torch.no_grad()`: what the torch trainer does
    (with `--jit-compile`, in `torch.compile`, as `model.compile(jit_compile=True)`
    compiles it). On CPU each op has finished when it returns."""

    def apply(grads):
        opt.apply(_masked(grads, mask_list), variables)

    if JIT_COMPILE:  # a code object of its own: dynamo caches compiled frames per code object
        apply = types.FunctionType(apply.__code__.replace(), apply.__globals__, "apply", None, apply.__closure__)
    step = torch.compile(apply) if JIT_COMPILE else apply

    def run(k: int) -> None:
        with torch.no_grad():
            for _ in range(k):
                step(grads)

    run(warmup)
    return run, lambda: [to_numpy(v) for v in variables]


# ---------------------------------------------------------------------- main


def _git_state() -> str:
    """The commit of the checkout, '+dirty' if masked_opt/ has uncommitted edits."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "masked_opt"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {rev or 'unknown'}{' +dirty' if dirty else ''}"


def _backend_lines() -> list[str]:
    """The backend library's version, devices and thread settings."""
    if IS_TF:
        return [
            f"tensorflow {tf.__version__}, devices: "
            f"{[d.device_type for d in tf.config.list_logical_devices()]}",
            f"tf threads: intra_op={tf.config.threading.get_intra_op_parallelism_threads()} "
            f"inter_op={tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF default)",
        ]
    if IS_JAX:
        import jaxlib

        return [
            f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, devices: {jax.devices()}",
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!r}",
        ]
    return [
        f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()} (CPU used)",
        f"torch threads: intra_op={torch.get_num_threads()} "
        f"inter_op={torch.get_num_interop_threads()}",
    ]


def environment() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = "n/a"
    return [
        f"**Keras backend: {BACKEND}** (KERAS_BACKEND="
        f"{os.environ.get('KERAS_BACKEND', '(unset: keras.json)')})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"cpu: os.cpu_count()={os.cpu_count()}, usable={affinity}, "
        f"processor={platform.processor() or 'n/a'}",
        f"keras {keras.__version__}, numpy {np.__version__}",
        *_backend_lines(),
        f"masked_opt at {_git_state()}; MaskedOptimizer accepts jit_compile: "
        f"{masked_accepts_jit()}",
        f"load average at start: {os.getloadavg()}",
    ]


FULL_COMPILE = {
    "tensorflow": "`tf.function`, no XLA",
    "jax": "the trainer's `jax.jit`",
    "torch": "eager",
}


def full_compile() -> str:
    if JIT_COMPILE is None:
        return f"default compile ({FULL_COMPILE[BACKEND]}"
    return f"`model.compile(jit_compile={JIT_COMPILE})` ({JIT_HOW[BACKEND]}"


JIT_HOW = {"tensorflow": "XLA", "jax": "the trainer's `jax.jit`", "torch": "torch.compile"}
OPT_HOW = {
    "tensorflow": "`opt.apply` in a `tf.function`",
    "jax": "`opt.stateless_apply` in `jax.jit`, state donated",
    "torch": "eager `opt.apply` under `torch.no_grad()`",
}


def opt_how() -> str:
    if IS_TORCH and JIT_COMPILE:
        return "`opt.apply` in `torch.compile` under `torch.no_grad()`"
    return OPT_HOW[BACKEND]


GRAD_ONLY_HOW = {
    "tensorflow": "the TF trainer's `train_step` (GradientTape)",
    "jax": "the JAX trainer's stateless `train_step` (jax.value_and_grad over "
    "`compute_loss_and_updates`, in the trainer's jit)",
    "torch": "the torch trainer's `train_step` (`loss.backward()`)",
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds/steps: a smoke run")
    p.add_argument("--rounds", type=int, help="timed rounds (default 15; quick 4)")
    p.add_argument("--steps", type=int, help="steps per round, full part (default 3; quick 2)")
    p.add_argument("--opt-steps", type=int, help="steps per round, opt part (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after tracing")
    p.add_argument("--parts", default="full,opt", help="comma list of: full, opt")
    p.add_argument("--inners", default=",".join(DEFAULT_INNERS), help=f"comma list of: {', '.join(INNERS)}")
    p.add_argument(
        "--variants", default="", help="regex: run only matching variants (and bare)"
    )
    p.add_argument(
        "--jit-compile", action="store_true", help="full part: model.compile(jit_compile=True) for every variant"
    )
    args = p.parse_args(argv)
    global VARIANT_FILTER, JIT_COMPILE
    VARIANT_FILTER = args.variants
    JIT_COMPILE = True if args.jit_compile else None
    if IS_TORCH and JIT_COMPILE:
        import torch._dynamo

        # Every variant's model compiles Keras's one `train_step` code object
        # (guarded on the model): without a higher limit dynamo would run the
        # ninth and later models eagerly.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
    rounds = args.rounds or (4 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 3)
    opt_steps = args.opt_steps or (2 if args.quick else 3)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    inners = [s.strip() for s in args.inners.split(",") if s.strip()]

    print("## Environment\n")
    for line in environment():
        print(f"- {line}")
    print(
        f"- command: `KERAS_BACKEND={BACKEND} python benchmarks/{os.path.basename(__file__)} "
        f"{' '.join(sys.argv[1:])}`"
    )
    print(f"- rounds={rounds}, steps/round full={steps}, opt={opt_steps}, warmup={args.warmup}")
    t_start = time.perf_counter()

    if "full" in parts:
        print(
            f"\n## Full training step ({BACKEND}): `train_on_batch`, MLP 784-1024-1024-10, "
            f"batch 256, {full_compile()}, CPU)\n"
        )
        rows, frozen_lines = [], []
        for inner_name in inners:
            print(f"[full] {inner_name}: building + warming up", file=sys.stderr, flush=True)
            runners, checks = full_step_runners(
                INNERS[inner_name], args.warmup, f"full/{inner_name}"
            )
            samples = time_rounds(runners, rounds, steps)
            rows += table_rows(inner_name, samples, ref="bare")
            frozen_lines += [f"- {inner_name}, {line}" for line in frozen_report(checks)]
            del runners, checks
            keras.backend.clear_session()
            print("\n".join(TABLE_HEAD + rows), file=sys.stderr, flush=True)
        print("\n".join(TABLE_HEAD + rows))
        print(f"\ngrad-only: {GRAD_ONLY_HOW[BACKEND]} plus one line multiplying the gradients.")
        print("\nFrozen elements after all timed steps (bit-identical check):\n")
        print("\n".join(frozen_lines))
        if GRAPH_BREAKS:
            print("\ntorch.compile graph breaks while building and warming up (stock Keras breaks at `loss.backward()`):\n")
            print("\n".join(f"- {k}: {v}" for k, v in GRAPH_BREAKS.items()))

    if "opt" in parts:
        n = sum(int(np.prod(s)) for s in OPT_SHAPES.values())
        print(
            f"\n## Optimizer step alone ({BACKEND}): {opt_how()}, "
            f"{n:,} parameters, fixed gradients (CPU)\n"
        )
        rows, frozen_lines = [], []
        for inner_name in inners:
            print(f"[opt] {inner_name}: building + warming up", file=sys.stderr, flush=True)
            runners, checks = opt_step_runners(
                INNERS[inner_name], args.warmup, f"opt/{inner_name}"
            )
            samples = time_rounds(runners, rounds, opt_steps)
            rows += table_rows(inner_name, samples, ref="bare")
            frozen_lines += [f"- {inner_name}, {line}" for line in frozen_report(checks)]
            del runners, checks
            keras.backend.clear_session()
            print("\n".join(TABLE_HEAD + rows), file=sys.stderr, flush=True)
        print("\n".join(TABLE_HEAD + rows))
        print("\nFrozen elements after all timed steps (bit-identical check):\n")
        print("\n".join(frozen_lines))
        if IS_TORCH:
            print("\n- opt part, retracing: n/a (eager torch traces nothing)")
        else:
            print(f"\n- opt part, steps retraced while timed: {sorted(RETRACED) or 'none'}")

    if SKIPPED:
        print(f"\nVariants skipped on {BACKEND}:\n")
        for name, why in SKIPPED.items():
            print(f"- {name}: {why}")
    if FAILED:
        print("\nVariants that failed to build or trace (not timed):\n")
        for name, err in FAILED.items():
            print(f"- {name}: {err}")
    print(f"\n- load average at end: {os.getloadavg()}")
    print(f"- total wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
