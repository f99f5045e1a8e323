"""Step-time benchmark: MaskedOptimizer vs the bare optimizer, side by side.

Runs on the Keras backend selected by ``KERAS_BACKEND`` (``tensorflow``,
``jax`` or ``torch``; else ``~/.keras/keras.json``), which the Environment
section names, with the backend library's version.

Two parts, each run in ONE process with rounds interleaved (every round times
every variant once, in a fresh random order: ``harness.time_rounds``), so that
machine noise hits all variants alike. Reported for wall-clock time and for
process CPU time (all threads): the median time per step of each variant, and
the median over rounds of the paired ratio variant/bare (same round) with its
interquartile range. CPU time is the work done; it is far less disturbed than
wall time by other processes on a shared machine.

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

The variants (bare, masked with no / all-True / 1 frozen / 50 % + bias masks,
grad-only, compact, multipliers, the before/after patches, TensorFlow's XLA
ones) are listed and built in ``variants.py``; the models, data and masks are
in ``workloads.py``. Variants that do not apply to the backend are listed as
skipped, with why. After timing, every variant with masks is checked: its
frozen elements must be bit-identical to their values before warm-up.

Usage::

    python benchmarks/bench_step.py            # full run, default backend
    KERAS_BACKEND=jax python benchmarks/bench_step.py
    KERAS_BACKEND=torch python benchmarks/bench_step.py --quick   # smoke run
    python benchmarks/bench_step.py --parts opt --rounds 30 --steps 5
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import types
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from variants import Variant, patched_run, variants  # noqa: E402
from workloads import (  # noqa: E402
    BACKEND, DEFAULT_INNERS, GRAD_ONLY_HOW, INNERS, IS_JAX, IS_TF, IS_TORCH, OPT_SHAPES, FrozenCheck, InnerFactory,
    build_mlp, float_masks, frozen_report, full_step_batch, make_masks, masked_grads, opt_variables, short_path,
    to_numpy, wait_for,
)
if IS_TF:
    import tensorflow as tf
elif IS_JAX:
    import jax
elif IS_TORCH:
    import torch

TABLE_HEAD = harness.table(
    ["inner", "variant", "wall ms/step", "wall ratio vs bare (IQR)", "CPU ms/step", "CPU ratio vs bare (IQR)"],
    "llrrrr",
)


@dataclass
class Run:
    """The options of this run and what it records besides the timings."""

    pattern: str = ""  # --variants: regex; "bare" always runs
    jit_compile: bool | None = None  # --jit-compile: `model.compile(jit_compile=True)`
    graph_breaks: dict[str, int] = field(default_factory=dict)  # torch.compile: while built and warmed up
    failed: dict[str, str] = field(default_factory=dict)  # variant -> error, shown under the tables
    retraced: set[str] = field(default_factory=set)  # opt-part variants whose step retraced while timed
    skipped: dict[str, str] = field(default_factory=dict)  # "part: variant" -> why not on this backend

    def record_failure(self, key: str, e: Exception) -> None:
        self.failed[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        print(f"  {key} failed: {self.failed[key]}", file=sys.stderr, flush=True)

    def graph_break_count(self) -> int | None:
        """torch.compile's graph-break count so far (None when nothing is compiled)."""
        if not (IS_TORCH and self.jit_compile):
            return None
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())


def runners(run: Run, part: str, inner: InnerFactory, warmup: int, label: str) -> tuple[dict, dict]:
    """One model (full) or optimizer on its own variables (opt) per variant,
    warmed up. Returns (runners, checks)."""
    # The full part's variants share one batch.
    build = functools.partial(_full_step_runner, batch=full_step_batch()) if part == "full" else _opt_step_runner
    selected, skipped = variants(part, run.pattern)
    run.skipped.update(skipped)
    out, checks = {}, {}
    for name, variant in selected.items():
        try:
            out[name], checks[name] = build(run, variant, inner, warmup, f"{label}, {name}")
        except Exception as e:  # a variant under development must not sink the others
            run.record_failure(f"{label}, {name}", e)
    return out, checks


# ------------------------------------------------------------ full train step


def _full_step_runner(run: Run, variant: Variant, inner: InnerFactory, warmup: int, label: str, batch):
    """Builds, compiles and warms up one model; returns (run(k), FrozenCheck)."""
    x, y = batch
    model = build_mlp(variant.grad_only)
    shapes = {short_path(v.path): tuple(v.shape) for v in model.trainable_variables}
    masks = make_masks(variant.masks, shapes)
    opt = variant.make(inner, masks)
    if variant.grad_only:
        model.set_grad_masks(float_masks(masks, shapes))
    compile_args = {} if run.jit_compile is None else {"jit_compile": run.jit_compile}
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_args,
    )
    paths = [short_path(v.path) for v in model.trainable_variables]
    before = [to_numpy(v) for v in model.trainable_variables]
    breaks = run.graph_break_count()
    with variant.patch():  # the first step builds the optimizer
        for _ in range(warmup):
            model.train_on_batch(x, y)
    if breaks is not None:
        run.graph_breaks[label] = run.graph_break_count() - breaks

    def steps(k: int) -> None:
        for _ in range(k):
            model.train_on_batch(x, y)  # returns the logs as Python floats
        wait_for([v.value for v in model.trainable_variables])

    def now() -> list[np.ndarray]:
        return [to_numpy(v) for v in model.trainable_variables]

    return patched_run(variant, steps), FrozenCheck(masks, paths, before, now)


# ------------------------------------------------------- optimizer step alone


def _opt_step_runner(run: Run, variant: Variant, inner: InnerFactory, warmup: int, label: str):
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
        steps, now = build(run, opt, variables, grads, mask_list, variant, warmup, label)
    return patched_run(variant, steps), FrozenCheck(masks, paths, before, now)


def _tf_opt_step(run: Run, opt, variables, grads, mask_list, variant, warmup, label):
    """`opt.apply` in a `tf.function` (XLA-compiled for `xla_step` variants)."""

    @tf.function(jit_compile=variant.xla_step)
    def step():
        opt.apply(masked_grads(grads, mask_list), variables)
        return opt.iterations

    for _ in range(warmup):
        step().numpy()
    traces = step.experimental_get_tracing_count()

    def steps(k: int) -> None:
        for _ in range(k):
            it = step()
        it.numpy()
        if step.experimental_get_tracing_count() != traces:
            run.retraced.add(label)

    return steps, lambda: [to_numpy(v) for v in variables]


def _jax_opt_step(run: Run, opt, variables, grads, mask_list, variant, warmup, label):
    """`opt.stateless_apply` in `jax.jit`, optimizer and model state donated:
    what the JAX trainer's jitted train step does with the optimizer."""
    traced = [0]

    def pure(opt_values, var_values, grads):
        traced[0] += 1  # runs at trace time only
        new_vars, new_opt = opt.stateless_apply(opt_values, masked_grads(grads, mask_list), var_values)
        return new_opt, new_vars

    step = jax.jit(pure, donate_argnums=(0, 1))
    # Copies: the donated buffers must not be the ones the Variables hold.
    state = [
        [jax.numpy.array(v.value, copy=True) for v in opt.variables],
        [jax.numpy.array(v.value, copy=True) for v in variables],
    ]

    def steps(k: int) -> None:
        opt_values, var_values = state
        for _ in range(k):
            opt_values, var_values = step(opt_values, var_values, grads)
        jax.block_until_ready((opt_values, var_values))
        state[:] = [opt_values, var_values]

    steps(warmup)
    traces = traced[0]

    def timed(k: int) -> None:
        steps(k)
        if traced[0] != traces:
            run.retraced.add(label)

    return timed, lambda: [to_numpy(x) for x in state[1]]


def _torch_opt_step(run: Run, opt, variables, grads, mask_list, variant, warmup, label):
    """Eager `opt.apply` under `torch.no_grad()`: what the torch trainer does
    (with `--jit-compile`, in `torch.compile`, as `model.compile(jit_compile=True)`
    compiles it). On CPU each op has finished when it returns."""

    def apply(grads):
        opt.apply(masked_grads(grads, mask_list), variables)

    if run.jit_compile:  # a code object of its own: dynamo caches compiled frames per code object
        apply = types.FunctionType(apply.__code__.replace(), apply.__globals__, "apply", None, apply.__closure__)
    step = torch.compile(apply) if run.jit_compile else apply

    def steps(k: int) -> None:
        with torch.no_grad():
            for _ in range(k):
                step(grads)

    steps(warmup)
    return steps, lambda: [to_numpy(v) for v in variables]


# ---------------------------------------------------------------------- main

FULL_COMPILE = {"tensorflow": "`tf.function`, no XLA", "jax": "the trainer's `jax.jit`", "torch": "eager"}
JIT_HOW = {"tensorflow": "XLA", "jax": "the trainer's `jax.jit`", "torch": "torch.compile"}
OPT_HOW = {
    "tensorflow": "`opt.apply` in a `tf.function`",
    "jax": "`opt.stateless_apply` in `jax.jit`, state donated",
    "torch": "eager `opt.apply` under `torch.no_grad()`",
}


def title(run: Run, part: str) -> str:
    if part == "full":
        how = (f"default compile ({FULL_COMPILE[BACKEND]}" if run.jit_compile is None
               else f"`model.compile(jit_compile={run.jit_compile})` ({JIT_HOW[BACKEND]}")
        return f"Full training step ({BACKEND}): `train_on_batch`, MLP 784-1024-1024-10, batch 256, {how}, CPU)"
    how = "`opt.apply` in `torch.compile` under `torch.no_grad()`" if IS_TORCH and run.jit_compile else OPT_HOW[BACKEND]
    n = sum(int(np.prod(s)) for s in OPT_SHAPES.values())
    return f"Optimizer step alone ({BACKEND}): {how}, {n:,} parameters, fixed gradients (CPU)"


def run_part(run: Run, part: str, inners: list[str], rounds: int, steps: int, warmup: int) -> None:
    """Times every variant of `part` for each inner optimizer; prints the table
    (again on stderr after each inner optimizer, as progress) and the checks."""
    print(f"\n## {title(run, part)}\n")
    rows, frozen_lines = [], []
    for inner_name in inners:
        print(f"[{part}] {inner_name}: building + warming up", file=sys.stderr, flush=True)
        timed, checks = runners(run, part, INNERS[inner_name], warmup, f"{part}/{inner_name}")
        samples = harness.time_rounds(timed, rounds, steps)
        if "bare" in samples:
            rows += harness.timing_rows(samples, "bare", prefix=[inner_name])
        else:  # the reference failed to build: no ratios
            rows.append(f"| {inner_name} | (reference `bare` failed: no ratios) | | | | |")
        frozen_lines += [f"- {inner_name}, {line}" for line in frozen_report(checks)]
        del timed, checks
        keras.backend.clear_session()
        print("\n".join(TABLE_HEAD + rows), file=sys.stderr, flush=True)
    print("\n".join(TABLE_HEAD + rows))
    if part == "full":
        print(f"\ngrad-only: {GRAD_ONLY_HOW[BACKEND]} plus one line multiplying the gradients.")
    print("\nFrozen elements after all timed steps (bit-identical check):\n")
    print("\n".join(frozen_lines))
    if part == "full" and run.graph_breaks:
        print("\ntorch.compile graph breaks while building and warming up (stock Keras breaks at `loss.backward()`):\n")
        print("\n".join(f"- {k}: {v}" for k, v in run.graph_breaks.items()))
    if part == "opt":
        if IS_TORCH:
            print("\n- opt part, retracing: n/a (eager torch traces nothing)")
        else:
            print(f"\n- opt part, steps retraced while timed: {sorted(run.retraced) or 'none'}")


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
    run = Run(pattern=args.variants, jit_compile=True if args.jit_compile else None)
    if IS_TORCH and run.jit_compile:
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
    for line in harness.environment():
        print(f"- {line}")
    print(f"- command: `{harness.command(__file__, BACKEND)}`")
    print(f"- rounds={rounds}, steps/round full={steps}, opt={opt_steps}, warmup={args.warmup}")
    t_start = time.perf_counter()

    if "full" in parts:
        run_part(run, "full", inners, rounds, steps, args.warmup)
    if "opt" in parts:
        run_part(run, "opt", inners, rounds, opt_steps, args.warmup)

    if run.skipped:
        print(f"\nVariants skipped on {BACKEND}:\n")
        for name, why in run.skipped.items():
            print(f"- {name}: {why}")
    if run.failed:
        print("\nVariants that failed to build or trace (not timed):\n")
        for name, err in run.failed.items():
            print(f"- {name}: {err}")
    print(f"\n- load average at end: {os.getloadavg()}")
    print(f"- total wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
