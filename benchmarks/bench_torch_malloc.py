"""Eager torch on CPU: what glibc's allocator adds to a masked optimizer step.

Each eager masked step makes a few new tensors the size of a variable (the
masked gradient, the snapshot, the 0/1 integer masks); bare Keras's SGD makes
none, its Adam family a few. glibc hands large freed blocks back to the OS
(`munmap`, heap trimming), so a new block is faulted in again, page by page,
and how often that happens depends on the whole process's allocation history.
`bench_step.py` interleaves every variant in one process, which mixes their
allocator states; here each measurement is a fresh process running one
optimizer alone: bare or masked (the `bench_step.py --parts opt` variables,
7.3 M parameters, random 50 % kernel masks, frozen biases), under glibc's
default settings and with trimming and `mmap` turned off through its
environment variables (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TOP_PAD_`). Reported per step: median process CPU time and minor
page faults (`getrusage`), medians over rounds, and the masked/bare ratio of
each round's pair.

    KERAS_BACKEND=torch python benchmarks/bench_torch_malloc.py [--rounds 3] [--steps 20] [--inners SGD,AdamW] [--parts opt,full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import harness

ENVIRONMENTS = {
    "glibc defaults": {},
    "no trim, no mmap": {
        "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
        "MALLOC_MMAP_THRESHOLD_": str(1 << 25),  # 32 MiB, glibc's 64-bit maximum: no variable here is larger
        "MALLOC_TOP_PAD_": str(1 << 28),
    },
    # c10's CPU allocator: blocks of >= 2 MiB aligned to 2 MiB and advised as
    # transparent huge pages (one fault per 2 MiB where the kernel allows it).
    "torch THP": {"THP_MEM_ALLOC_ENABLE": "1"},
}
KINDS = ("bare", "masked")


def child(part: str, inner_name: str, kind: str, steps: int, warmup: int) -> dict:
    """One optimizer alone in this process: per-step CPU ms and page faults of
    the optimizer step alone (`opt`) or of `train_on_batch` (`full`)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import torch
    from workloads import OPT_SHAPES, build_mlp, full_step_batch, make_masks, opt_variables, short_path

    from masked_opt import MaskedOptimizer

    def optimizer(shapes):
        inner = getattr(keras.optimizers, inner_name)(1e-3)
        return inner if kind == "bare" else MaskedOptimizer(inner, make_masks("realistic", shapes))

    if part == "opt":
        variables, grads = opt_variables()
        opt = optimizer(OPT_SHAPES)
        opt.build(variables)

        def step():
            with torch.no_grad():
                opt.apply(grads, variables)

    else:
        x, y = full_step_batch()
        model = build_mlp(False)
        shapes = {short_path(v.path): tuple(v.shape) for v in model.trainable_variables}
        model.compile(optimizer=optimizer(shapes), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

        def step():
            model.train_on_batch(x, y)

    timed = harness.time_steps(step, steps, warmup)
    return {"cpu_ms": statistics.median(c * 1e3 for c in timed.cpu), "faults": statistics.median(timed.faults)}


def run_child(part: str, inner: str, kind: str, env_name: str, steps: int, warmup: int) -> dict:
    env = {"KERAS_BACKEND": "torch", **ENVIRONMENTS[env_name]}
    cmd = [os.path.abspath(__file__), "--child", part, inner, kind, str(steps), str(warmup)]
    return harness.run_child(cmd, env)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        part, inner, kind, steps, warmup = sys.argv[2:5] + [int(a) for a in sys.argv[5:7]]
        harness.emit(child(part, inner, kind, steps, warmup))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inners", default="SGD,AdamW")
    p.add_argument("--parts", default="opt,full", help="opt: the optimizer step alone; full: train_on_batch of the MLP")
    args = p.parse_args(argv)
    for part in args.parts.split(","):
        report(part, args)


def report(part: str, args: argparse.Namespace) -> None:
    inners = args.inners.split(",")
    results: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for inner in inners:
            for env_name in ENVIRONMENTS:
                for kind in KINDS:
                    results.setdefault((inner, env_name, kind), []).append(
                        run_child(part, inner, kind, env_name, args.steps, args.warmup)
                    )
    what = {"opt": "optimizer step alone, 7.3 M parameters (`bench_step.py --parts opt`)",
            "full": "`train_on_batch`, MLP 784-1024-1024-10, batch 256 (`bench_step.py --parts full`)"}[part]
    print(f"## Eager torch, {what}: the allocator (one optimizer per process)\n")
    print(f"- command: `{harness.command(__file__, 'torch')}`".rstrip())
    print(f"- rounds={args.rounds}, steps per process={args.steps} (after {args.warmup} warm-up)")
    print(f"- {os.cpu_count()} CPUs; load average at end {os.getloadavg()}\n")
    print("\n".join(harness.table(
        ["inner", "allocator", "variant", "CPU ms/step", "minor faults/step", "masked / bare (per round)"], "lllrrr")))
    for inner in inners:
        for env_name in ENVIRONMENTS:
            bare = results[(inner, env_name, "bare")]
            for kind in KINDS:
                runs = results[(inner, env_name, kind)]
                cpu = statistics.median(r["cpu_ms"] for r in runs)
                faults = statistics.median(r["faults"] for r in runs)
                ratio = ""
                if kind == "masked":
                    ratio = harness.ratio_cell([m["cpu_ms"] for m in runs], [b["cpu_ms"] for b in bare],
                                               digits=1, spread="range")
                print(f"| {inner} | {env_name} | {kind} | {cpu:.1f} | {faults:,.0f} | {ratio} |")
    print()


if __name__ == "__main__":
    main()
