"""Time to the first training step: MaskedOptimizer vs the bare optimizer.

What a user waits for before training starts: building
`keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))`,
`compile`, and the first `train_on_batch` (tracing, graph optimisation or
compilation, and the first execution), then the median of the next steps.
Variants, all with AdamW:

* ``bare``: the inner optimizer alone;
* ``whole``: every Conv2D kernel but the last block frozen whole, by one regex
  key (scalar ``False`` masks);
* ``columns``: the same kernels with every other output channel frozen (a
  column mask, stored at its broadcast shape ``(1, 1, 1, channels)``);
* ``element``: the same kernels with random 50 % element masks (full-shape);
* ``<variant>:nojit`` / ``<variant>:xla``: the same with
  ``MaskedOptimizer(..., jit_compile=False)`` / ``jit_compile=True`` instead of
  the default ``"auto"`` (e.g. ``--variants bare,whole,whole:nojit``).

Each measurement runs in a fresh subprocess (this script with ``--child``,
through ``harness.run_child``; no tracing cache shared between
variants); variants are interleaved over rounds and the medians reported with
the ratio to bare, and the median of the ratios paired within each round (on a
shared machine whose speed drifts between rounds, the steadier figure).

Usage::

    python benchmarks/bench_first_step.py --rounds 3
    KERAS_BACKEND=jax python benchmarks/bench_first_step.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Conv2D kernels (not the depthwise ones) outside the last block and the head.
FROZEN_KEY = r"(?!block_16_)(Conv1|expanded_conv_project|block_\d+_(expand|project))/kernel"


def child(variant: str, key: str) -> dict:
    """One measurement, in this (fresh) process."""
    t_import = time.perf_counter()
    import keras
    import numpy as np

    from masked_opt import MaskedOptimizer

    t0 = time.perf_counter()
    elapsed = harness.stopwatch()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10)
    inner = keras.optimizers.AdamW(1e-3)
    kind, _, jit = variant.partition(":")
    jit = {"": "auto", "xla": True, "nojit": False}[jit]
    if kind == "bare":
        opt = inner
    elif kind == "whole":
        opt = MaskedOptimizer(inner, {key: False}, jit_compile=jit)
    elif kind == "columns":
        opt = MaskedOptimizer(inner, {key: lambda v: (np.arange(v.shape[-1]) % 2 == 0).reshape(
            (1,) * (len(v.shape) - 1) + (-1,))}, jit_compile=jit)
    else:
        rng = np.random.default_rng(0)
        opt = MaskedOptimizer(inner, {key: lambda v: rng.random(tuple(v.shape)) < 0.5}, jit_compile=jit)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    x = rng.random((32, 64, 64, 3), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    model.train_on_batch(x, y)
    first, first_cpu = elapsed()
    steps = harness.time_steps(lambda: model.train_on_batch(x, y), 5)
    masked = len(opt.masked_variables) if kind != "bare" else 0
    return {"first": first, "first_cpu": first_cpu, "step": harness.median(steps.wall), "masked": masked,
            "import": t0 - t_import}


def measure(variant: str) -> dict:
    return harness.run_child([os.path.abspath(__file__), "--child", variant, FROZEN_KEY], what=variant)


def paired(ms: list[dict], bare: list[dict] | None) -> str:
    """Median (IQR) over rounds of the CPU-time ratio to bare *in the same
    round*: the machine's drift between rounds cancels out."""
    if not bare:
        return "n/a"
    return harness.ratio_cell([m["first_cpu"] for m in ms], [b["first_cpu"] for b in bare], method="exclusive")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="bare,whole,columns,element")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        harness.emit(child(*args.child))
        return
    variants = [v.strip() for v in args.variants.split(",")]
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    rng = random.Random(0)  # each measurement is a process of its own: rounds interleaved here
    for r in range(args.rounds):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            results[v].append(measure(v))
            print(f"  round {r + 1}: {v} {results[v][-1]}", file=sys.stderr, flush=True)
    print(f"- backend: {backend}; command: `{harness.command(__file__, backend)}`")
    print(f"- load average at end: {os.getloadavg()}\n")
    print("\n".join(harness.table(
        ["variant", "masked variables", "time to first step (s)", "ratio vs bare", "CPU time to first step (s)",
         "CPU ratio vs bare", "paired CPU ratio (IQR)", "steady step (ms)"], "lrrrrrrr")))
    bare = harness.median(m["first"] for m in results["bare"]) if "bare" in results else None
    bare_cpu = harness.median(m["first_cpu"] for m in results["bare"]) if "bare" in results else None
    for v, ms in results.items():
        first = harness.median(m["first"] for m in ms)
        first_cpu = harness.median(m["first_cpu"] for m in ms)
        step = harness.median(m["step"] for m in ms) * 1e3
        ratio = f"**{first / bare:.2f}**" if bare else "n/a"
        cpu_ratio = f"**{first_cpu / bare_cpu:.2f}**" if bare_cpu else "n/a"
        print(f"| {v} | {ms[0]['masked']} | {first:.1f} | {ratio} | {first_cpu:.1f} | {cpu_ratio} "
              f"| {paired(ms, results.get('bare'))} | {step:.0f} |")


if __name__ == "__main__":
    main()
