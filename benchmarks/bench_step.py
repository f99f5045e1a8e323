"""Step-time benchmark: MaskedOptimizer vs the bare optimizer, side by side.

Two parts, each run in ONE process with rounds interleaved (every round times
every variant once, in a fresh random order), so that machine noise hits all
variants alike. Reported for wall-clock time and for process CPU time (all
threads): the median time per step of each variant, and the median over rounds
of the paired ratio variant/bare (same round) with its interquartile range.
CPU time is the work done; it is far less disturbed than wall time by other
processes on a shared machine.

* ``full``: a whole training step, ``model.train_on_batch`` on a
  784-1024-1024-10 MLP (ReLU), batch 256, synthetic MNIST-shaped data,
  default ``model.compile`` (no ``jit_compile`` argument).
* ``opt``: the optimizer step alone, ``opt.apply(grads, vars)`` inside a
  ``tf.function`` on ~7.3 M parameters with fixed gradients.

Variants (``variants(part)`` builds a dict name -> ``Variant``; add a line there
to add one):

* ``bare``: the inner optimizer alone (the reference, ratio 1.00 by definition);
* ``masked, no masks``: ``MaskedOptimizer(inner)``; should cost nothing;
* ``masked, all-True``: every variable registered with a full-shape all-True
  mask (e.g. to edit single elements later). The core skips the masking work
  while no element is frozen (one ``cond``), so this is the cost of the check;
* ``masked, 1 frozen``: the same masks with one kernel element frozen: the
  full cost of the machinery (mask the gradients, snapshot, restore), all masks
  full-shape;
* ``masked, 50% + bias``: a random 50% element mask on every kernel, biases
  frozen (scalar ``False``): a realistic setup;
* ``grad-only, 50% + bias``: the naive approach: the bare optimizer, gradients
  multiplied by the same masks (custom ``train_step``). Not exact: weight
  decay and momentum still move "frozen" elements;
* ``bare, XLA step`` (opt part only): the bare optimizer's step traced with
  ``tf.function(jit_compile=True)``: the yardstick for a jit-compiled masked step;
* ``masked jit, 50% + bias``: ``MaskedOptimizer(..., jit_compile=True)``, only
  if the installed ``MaskedOptimizer`` accepts ``jit_compile``.

Usage::

    python benchmarks/bench_step.py            # full run (~5-10 min on 2 cores)
    python benchmarks/bench_step.py --quick    # smoke run (~1 min)
    python benchmarks/bench_step.py --parts opt --rounds 30 --steps 5
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from keras.src.losses import loss as loss_module  # noqa: E402

from masked_opt import MaskedOptimizer  # noqa: E402

# One tf.function per variant trips TF's "N out of the last M calls triggered
# retracing" heuristic while building; timed steps are checked for retracing.
tf.get_logger().setLevel("ERROR")

Masks = dict[str, object]
InnerFactory = Callable[[], keras.optimizers.Optimizer]

VARIANT_FILTER = ""  # regex from --variants; "bare" always runs
FAILED: dict[str, str] = {}  # variant name -> error, shown under the tables
RETRACED: set[str] = set()  # opt-part variants whose step retraced while timed

INNERS: dict[str, InnerFactory] = {
    "Adam": lambda: keras.optimizers.Adam(1e-3),
    "AdamW": lambda: keras.optimizers.AdamW(1e-3),  # weight_decay=0.004 (default)
}


@dataclass(frozen=True)
class Variant:
    """How to build one contender from an inner-optimizer factory and the masks.

    ``make(inner, masks)`` returns the optimizer. ``grad_only`` variants get the
    bare optimizer and multiply the gradients by ``masks`` before ``apply``.
    ``masks`` is "realistic" (50% kernels, frozen biases), "all_true",
    "one_frozen" (all-True but one kernel element) or "none".
    ``parts`` names the benchmark parts ("full", "opt") the variant runs in.
    """

    make: Callable[[InnerFactory, Masks], keras.optimizers.Optimizer]
    masks: str = "none"
    grad_only: bool = False
    xla_step: bool = False  # opt part: trace the step with tf.function(jit_compile=True)
    parts: tuple[str, ...] = ("full", "opt")


def masked_accepts_jit() -> bool:
    return "jit_compile" in inspect.signature(MaskedOptimizer).parameters


def variants(part: str) -> dict[str, Variant]:
    """The contenders of `part`, in table order. The first one is the reference."""
    table = {
        "bare": Variant(lambda inner, m: inner()),
        "masked, no masks": Variant(lambda inner, m: MaskedOptimizer(inner())),
        "masked, all-True": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "all_true"),
        "masked, 1 frozen": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "one_frozen"),
        "masked, 50% + bias": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "realistic"),
        "grad-only, 50% + bias": Variant(lambda inner, m: inner(), "realistic", grad_only=True),
    }
    # What XLA does for the bare optimizer: the yardstick for a jit-compiled masked step.
    table["bare, XLA step"] = Variant(lambda inner, m: inner(), xla_step=True, parts=("opt",))
    if masked_accepts_jit():
        table["masked jit, 50% + bias"] = Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, jit_compile=True), "realistic"
        )
    return {
        name: v
        for name, v in table.items()
        if part in v.parts and (name == "bare" or re.search(VARIANT_FILTER, name))
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


def float_masks(masks: Masks, shapes: dict[str, tuple[int, ...]]) -> dict[str, tf.Tensor]:
    """The masks as float32 0/1 tensors of full shape (for gradient-only masking)."""
    return {
        path: tf.constant(np.broadcast_to(np.asarray(m, np.float32), shapes[path]))
        for path, m in masks.items()
    }


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


# ------------------------------------------------------------ full train step


class GradMaskMLP(keras.Sequential):
    """Gradient-only masking: Keras 3.15's TF ``train_step`` plus one line
    multiplying each gradient by its 0/1 mask (what people write by hand)."""

    def set_grad_masks(self, masks: dict[str, tf.Tensor]) -> None:
        self._grad_masks = masks

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self._loss_tracker.update_state(
                loss_module.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(x)[0],
            )
            loss = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        grads = tape.gradient(loss, weights)
        grads = [  # the one added line
            g * self._grad_masks[_short(v.path)] if _short(v.path) in self._grad_masks else g
            for g, v in zip(grads, weights)
        ]
        self.optimizer.apply_gradients(zip(grads, weights))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _short(path: str) -> str:
    """'sequential_3/fc1/kernel' -> 'fc1/kernel' (masks are keyed by layer/var)."""
    return "/".join(path.split("/")[-2:])


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


def full_step_runners(inner: InnerFactory, warmup: int, label: str) -> tuple[dict, dict]:
    """One compiled model per variant, warmed up. Returns (runners, checks)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((256, 784), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, size=(256,)), dtype=tf.int32)
    runners, checks = {}, {}
    for name, variant in variants("full").items():
        try:
            runners[name], checks[name] = _full_step_runner(variant, inner, x, y, warmup)
        except Exception as e:  # a variant under development must not sink the others
            key = f"{label}, {name}"
            FAILED[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            print(f"  {key} failed: {FAILED[key]}", file=sys.stderr, flush=True)
    return runners, checks


def _full_step_runner(variant: Variant, inner: InnerFactory, x, y, warmup: int):
    """Builds, compiles and warms up one model; returns (run(k), check data)."""
    model = build_mlp(variant.grad_only)
    shapes = {_short(v.path): tuple(v.shape) for v in model.trainable_variables}
    masks = make_masks(variant.masks, shapes)
    opt = variant.make(inner, masks)
    if variant.grad_only:
        model.set_grad_masks(float_masks(masks, shapes))
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [v.numpy() for v in model.trainable_variables]
    for _ in range(warmup):
        model.train_on_batch(x, y)

    def run(k: int) -> None:
        for _ in range(k):
            model.train_on_batch(x, y)

    return run, (model, masks, before)


def frozen_report(checks: dict) -> list[str]:
    """For each masked variant: did every frozen element stay bit-identical?"""
    lines = []
    for name, (model, masks, before) in checks.items():
        if not masks:
            continue
        moved = total = 0
        for v, b in zip(model.trainable_variables, before):
            m = masks.get(_short(v.path))
            if m is None:
                continue
            frozen = ~np.broadcast_to(np.asarray(m, bool), b.shape)
            moved += int(np.sum(v.numpy()[frozen] != b[frozen]))
            total += int(frozen.sum())
        lines.append(f"{name}: {moved:,} of {total:,} frozen elements moved")
    return lines


# ------------------------------------------------------- optimizer step alone

OPT_SHAPES = {
    "big1/kernel": (3000, 1024),
    "big1/bias": (1024,),
    "big2/kernel": (2048, 2048),
    "big2/bias": (2048,),
    "head/kernel": (1024, 10),
    "head/bias": (10,),
}


def _make_apply_step(opt, variables, grads, mask_list, xla: bool) -> Callable[[], tf.Tensor]:
    @tf.function(jit_compile=xla)
    def step():
        gs = [g if m is None else g * m for g, m in zip(grads, mask_list)]
        opt.apply(gs, variables)
        return opt.iterations

    return step


def opt_step_runners(
    inner: InnerFactory, warmup: int, label: str
) -> dict[str, Callable[[int], None]]:
    """One optimizer (on its own copy of the variables) per variant, warmed up."""
    runners = {}
    for name, variant in variants("opt").items():
        try:
            runners[name] = _opt_step_runner(variant, inner, warmup, f"{label}, {name}")
        except Exception as e:  # a variant under development must not sink the others
            key = f"{label}, {name}"
            FAILED[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            print(f"  {key} failed: {FAILED[key]}", file=sys.stderr, flush=True)
    return runners


def _opt_step_runner(variant: Variant, inner: InnerFactory, warmup: int, variant_name: str):
    """Builds one optimizer on fresh variables, traces and warms up its step."""
    rng = np.random.default_rng(1)  # same variables and gradients for every variant
    variables, grads = [], []
    for path, shape in OPT_SHAPES.items():
        layer, var = path.split("/")
        with keras.name_scope(layer):
            variables.append(
                keras.Variable(rng.standard_normal(shape, dtype=np.float32) * 0.05, name=var)
            )
        grads.append(tf.constant(rng.standard_normal(shape, dtype=np.float32)))
    masks = make_masks(variant.masks, OPT_SHAPES)
    opt = variant.make(inner, masks)
    opt.build(variables)
    fmasks = float_masks(masks, OPT_SHAPES) if variant.grad_only else {}
    mask_list = [fmasks.get(p) for p in OPT_SHAPES]

    step = _make_apply_step(opt, variables, grads, mask_list, variant.xla_step)
    for _ in range(warmup):
        step().numpy()
    traces = step.experimental_get_tracing_count()

    def run(k: int) -> None:
        for _ in range(k):
            it = step()
        it.numpy()
        if step.experimental_get_tracing_count() != traces:
            RETRACED.add(variant_name)

    return run


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


def environment() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = "n/a"
    return [
        f"python {platform.python_version()} on {platform.platform()}",
        f"cpu: os.cpu_count()={os.cpu_count()}, usable={affinity}, "
        f"processor={platform.processor() or 'n/a'}",
        f"tensorflow {tf.__version__}, keras {keras.__version__} "
        f"(backend {keras.backend.backend()}), numpy {np.__version__}",
        f"tf threads: intra_op={tf.config.threading.get_intra_op_parallelism_threads()} "
        f"inter_op={tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF default)",
        f"masked_opt at {_git_state()}; MaskedOptimizer accepts jit_compile: "
        f"{masked_accepts_jit()}",
        f"load average at start: {os.getloadavg()}",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds/steps: a smoke run")
    p.add_argument("--rounds", type=int, help="timed rounds (default 15; quick 4)")
    p.add_argument("--steps", type=int, help="steps per round, full part (default 3; quick 2)")
    p.add_argument("--opt-steps", type=int, help="steps per round, opt part (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after tracing")
    p.add_argument("--parts", default="full,opt", help="comma list of: full, opt")
    p.add_argument("--inners", default=",".join(INNERS), help="comma list of inner optimizers")
    p.add_argument(
        "--variants", default="", help="regex: run only matching variants (and bare)"
    )
    args = p.parse_args(argv)
    global VARIANT_FILTER
    VARIANT_FILTER = args.variants
    rounds = args.rounds or (4 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 3)
    opt_steps = args.opt_steps or (2 if args.quick else 3)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    inners = [s.strip() for s in args.inners.split(",") if s.strip()]

    print("## Environment\n")
    for line in environment():
        print(f"- {line}")
    print(f"- command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`")
    print(f"- rounds={rounds}, steps/round full={steps}, opt={opt_steps}, warmup={args.warmup}")
    t_start = time.perf_counter()

    if "full" in parts:
        print(
            "\n## Full training step: `train_on_batch`, MLP 784-1024-1024-10, "
            "batch 256, default compile (CPU)\n"
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
        print("\nFrozen elements after all timed steps (bit-identical check):\n")
        print("\n".join(frozen_lines))

    if "opt" in parts:
        n = sum(int(np.prod(s)) for s in OPT_SHAPES.values())
        print(
            f"\n## Optimizer step alone: `opt.apply` in a `tf.function`, "
            f"{n:,} parameters, fixed gradients (CPU)\n"
        )
        rows = []
        for inner_name in inners:
            print(f"[opt] {inner_name}: building + warming up", file=sys.stderr, flush=True)
            runners = opt_step_runners(INNERS[inner_name], args.warmup, f"opt/{inner_name}")
            samples = time_rounds(runners, rounds, opt_steps)
            rows += table_rows(inner_name, samples, ref="bare")
            del runners
            keras.backend.clear_session()
            print("\n".join(TABLE_HEAD + rows), file=sys.stderr, flush=True)
        print("\n".join(TABLE_HEAD + rows))

    if "opt" in parts:
        print(f"\n- opt part, steps retraced while timed: {sorted(RETRACED) or 'none'}")
    if FAILED:
        print("\nVariants that failed to build or trace (not timed):\n")
        for name, err in FAILED.items():
            print(f"- {name}: {err}")
    print(f"\n- load average at end: {os.getloadavg()}")
    print(f"- total wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
