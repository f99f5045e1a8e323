"""torch's CPU `sqrt` on the values a masked Adam step feeds it.

Keras's torch Adam/AdamW/Adamax-family updates take `torch._foreach_sqrt` of
the second-moment state. A frozen element that was never trained has a
velocity of exactly 0.0; one frozen after training keeps a velocity that
decays by `beta_2` each step and, after ~64,000 steps at `beta_2=0.999`,
falls into the subnormal range. This script times that `sqrt` (and, for
scale, a `mul` and NumPy's `sqrt`) on 1 M float32 elements that are all
normal, all zero, half zero and all subnormal, interleaved rounds, medians
of wall and process CPU time: the cost outside the wrapper that bare Keras
pays on the same state.

    KERAS_BACKEND=torch python benchmarks/bench_torch_sqrt.py [--rounds 9] [--size 1048576]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

import harness


def inputs(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    normal = rng.uniform(1e-8, 1e-6, size).astype(np.float32)  # typical Adam velocities
    half = np.where(rng.random(size) < 0.5, normal, np.float32(0.0)).astype(np.float32)
    return {
        "normal": torch.from_numpy(normal),
        "zero": torch.zeros(size),
        "half zero": torch.from_numpy(half),
        "subnormal": torch.full((size,), 1e-40),
    }


def ops() -> dict[str, object]:
    return {
        "torch._foreach_sqrt": lambda x: torch._foreach_sqrt([x]),
        "torch.mul": lambda x: torch.mul(x, 0.999),
        "numpy.sqrt": lambda x: np.sqrt(x.numpy()),
    }


def runner(fn, x):
    """run(k): `fn(x)` k times."""

    def run(k: int) -> None:
        for _ in range(k):
            fn(x)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--size", type=int, default=1 << 20)
    args = p.parse_args(argv)
    xs, fns = inputs(args.size), ops()
    runners = {(op, kind): runner(fns[op], xs[kind]) for op in fns for kind in xs}
    for run in runners.values():  # warm-up
        run(2)
    # Interleaved rounds in an unseeded order: wall and CPU seconds per call.
    samples = harness.time_rounds(runners, args.rounds, args.calls, seed=None, progress=False)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, {args.size:,} float32 elements, {args.rounds} rounds\n")
    print("Wall ms per call, CPU ms per call in brackets, and the ratio of CPU time to normal values.\n")
    print("\n".join(harness.table(["op", *xs], "l" + "r" * len(xs))))
    for op in fns:
        ref = statistics.median(samples[(op, "normal")].cpu)
        cells = []
        for kind in xs:
            wall = statistics.median(samples[(op, kind)].wall)
            cpu = statistics.median(samples[(op, kind)].cpu)
            cells.append(f"{wall * 1e3:.3f} ({cpu * 1e3:.3f}) **{cpu / ref:.1f}x**")
        print(f"| {op} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
