"""Optimizer memory: compact state vs dense state vs the bare optimizer.

Two parts:

* ``bytes``: the bytes of every optimizer variable (masks, indices, counters
  and the inner optimizer's slots all included) for one 2048 x 2048 kernel
  trained by Adam, at element densities 0.1 %, 1 %, 10 % and 100 %:
  the bare optimizer (all elements), ``MaskedOptimizer`` with dense state
  (the default), with ``compact_state=True``, and the floor a layer-freezing
  approach would reach if the same number of elements formed whole trainable
  variables (Adam's two slots for exactly those elements). The compact mode's
  scratch proxy (the gathered trainable weights, re-gathered every step; not
  optimizer state) is reported in its own column.
* ``speed``: the optimizer step alone on one 4096 x 4096 kernel at 1 %
  density, compiled as the backend's trainer compiles it (TF: `tf.function`,
  JAX: `jax.jit` over `stateless_apply`, torch: eager): bare Adam vs masked
  dense state vs compact state; medians over interleaved rounds.
* ``rss``: peak resident memory of a fresh process (``ru_maxrss``) that
  builds a 4096 x 4096 Dense kernel, trains it for 3 steps with Adam and
  exits: bare vs masked dense vs masked compact at 1 % density (`--density`). Each variant
  runs in its own subprocess (``--child``, ``harness.run_child``); the backend's import cost
  is the same for all.

Usage::

    python benchmarks/bench_memory.py                 # both parts
    KERAS_BACKEND=jax python benchmarks/bench_memory.py --parts rss
"""

from __future__ import annotations

import argparse
import os

import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DENSITIES = (0.001, 0.01, 0.1, 1.0)


def _nbytes(variables) -> int:
    import numpy as np

    return sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in variables)


def bytes_part(size: int = 2048) -> list[str]:
    import keras
    import numpy as np

    from masked_opt import MaskedOptimizer

    rows = [
        "| density | trainable | bare Adam | masked, dense state | masked, compact state | "
        "compact / bare | compact scratch proxy | whole-variable floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for density in DENSITIES:
        mask = rng.random((size, size)) < density
        count = int(mask.sum())
        sizes = {}
        for name, make in [
            ("bare", lambda: keras.optimizers.Adam(1e-3)),
            ("dense", lambda: MaskedOptimizer(keras.optimizers.Adam(1e-3), {"k": mask})),
            (
                "compact",
                lambda: MaskedOptimizer(keras.optimizers.Adam(1e-3), {"k": mask}, compact_state=True),
            ),
        ]:
            k = keras.Variable(np.zeros((size, size), "float32"), name="k")
            opt = make()
            opt.build([k])
            sizes[name] = _nbytes(opt.variables)
            if name == "compact":  # the proxies: scratch, one float32 per element of capacity
                sizes["proxy"] = sum(4 * (v.compact_capacity or 0) for v in opt.inspect().variables)
            del opt, k
            keras.backend.clear_session()
        floor = 2 * 4 * count  # Adam: m and v for exactly the trainable elements
        rows.append(
            f"| {density:.1%} | {count:,} | {sizes['bare'] / 2**20:.2f} MiB | "
            f"{sizes['dense'] / 2**20:.2f} MiB | {sizes['compact'] / 2**20:.3f} MiB | "
            f"**{sizes['compact'] / sizes['bare']:.2%}** | {sizes['proxy'] / 2**20:.3f} MiB | "
            f"{floor / 2**20:.3f} MiB |"
        )
    return rows


def rss_child(variant: str, size: int, density: float) -> dict:
    """One variant's process: builds, takes 3 Adam steps; its peak RSS."""
    import keras
    import numpy as np

    from masked_opt import MaskedOptimizer

    base = harness.peak_rss_mib()
    rng = np.random.default_rng(0)
    k = keras.Variable(rng.standard_normal((size, size), dtype=np.float32), name="k")
    masks = {"k": rng.random((size, size)) < density}
    inner = keras.optimizers.Adam(1e-3)
    opt = inner if variant == "bare" else MaskedOptimizer(inner, masks, compact_state=variant == "compact")
    del masks
    g = keras.ops.convert_to_tensor(rng.standard_normal((size, size), dtype=np.float32))
    for _ in range(3):
        opt.apply([g], [k])
    float(keras.ops.convert_to_numpy(keras.ops.sum(k.value)))
    return {"peak_mib": harness.peak_rss_mib(), "after_import_mib": base}


def rss_part(size: int = 4096, density: float = 0.01) -> list[str]:
    peaks = {}
    for variant in ("bare", "dense", "compact"):
        peaks[variant] = harness.run_child(
            [os.path.abspath(__file__), "--child", variant, str(size), str(density)], what=f"rss {variant}"
        )["peak_mib"]
    return harness.table(
        ["variant", "peak RSS", "peak RSS minus bare"], "lrr",
        [(variant, f"{mib:,.0f} MiB", f"{mib - peaks['bare']:+,.0f} MiB") for variant, mib in peaks.items()],
    )


def speed_part(size: int = 4096, density: float = 0.01, rounds: int = 7, steps: int = 5) -> list[str]:
    import keras
    import numpy as np

    from masked_opt import MaskedOptimizer

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    mask = rng.random((size, size)) < density
    grad = keras.ops.convert_to_tensor(rng.standard_normal((size, size), dtype=np.float32))
    runners = {}
    for name in ("bare", "dense", "compact"):
        k = keras.Variable(rng.standard_normal((size, size), dtype=np.float32) * 0.05, name="k")
        inner = keras.optimizers.Adam(1e-3)
        opt = {
            "bare": lambda: inner,
            "dense": lambda: MaskedOptimizer(inner, [(k, mask)]),
            "compact": lambda: MaskedOptimizer(inner, [(k, mask)], compact_state=True),
        }[name]()
        opt.build([k])
        runners[name] = _compiled_step(backend, opt, k, grad)
        for _ in range(2):
            runners[name](1)
    # Interleaved rounds, an unseeded order; wall time, the ratio of the medians.
    samples = harness.time_rounds(runners, rounds, steps, seed=None, progress=False)
    bare = harness.median(samples["bare"].wall)
    meds = {n: harness.median(s.wall) for n, s in samples.items()}
    return harness.table(["variant", "ms/step", "ratio vs bare"], "lrr",
                         [(n, f"{med * 1e3:.1f}", f"**{med / bare:.2f}**") for n, med in meds.items()])


def _compiled_step(backend, opt, k, grad):
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda: opt.apply([grad], [k]), autograph=False)

        def run(n):
            for _ in range(n):
                step()
            k.value.numpy()

        return run
    if backend == "jax":
        import jax

        fn = jax.jit(lambda ov, tv, g: opt.stateless_apply(ov, g, tv), donate_argnums=(0, 1))
        state = {"opt": [v.value for v in opt.variables], "vars": [k.value]}

        def run(n):
            for _ in range(n):
                state["vars"], state["opt"] = fn(state["opt"], state["vars"], [grad])
            jax.block_until_ready(state["vars"])

        return run

    def run(n):
        import torch

        with torch.no_grad():
            for _ in range(n):
                opt.apply([grad], [k])

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="bytes,speed,rss")
    p.add_argument("--density", type=float, default=0.01, help="trainable fraction, speed and rss parts")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "SIZE", "DENSITY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, size, density = args.child
        harness.emit(rss_child(variant, int(size), float(density)))
        return
    import keras

    parts = [s.strip() for s in args.parts.split(",")]
    print(f"- backend: {keras.backend.backend()}, keras {keras.__version__}")
    print(f"- command: `{harness.command(__file__, keras.backend.backend())}`")
    if "bytes" in parts:
        print("\n### Optimizer variable bytes, one 2048 x 2048 kernel, Adam\n")
        print("\n".join(bytes_part()))
    if "speed" in parts:
        print(f"\n### Optimizer step alone, one 4096 x 4096 kernel, Adam, {args.density * 100:g} % density\n")
        print("\n".join(speed_part(density=args.density)))
    if "rss" in parts:
        print(f"\n### Peak RSS of a process training a 4096 x 4096 kernel with Adam, {args.density * 100:g} % density\n")
        print("\n".join(rss_part(density=args.density)))


if __name__ == "__main__":
    main()
