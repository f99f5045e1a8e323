"""What the masked JAX train step does beyond the bare one, read from XLA.

Compiles the JAX trainer's train step (`jax.jit(model.train_step,
donate_argnums=0)`, as `model.fit` does) of the `bench_step.py` MLP
(784-1024-1024-10, batch 256) for the bare optimizer and for masked
variants, and prints, per variant, XLA's own cost analysis of the compiled
program (flops, bytes accessed), its memory analysis (temporaries,
arguments, outputs) and the HLO instructions it has that the bare program
has not. Nothing is timed: this is the work the compiled program does.

Usage::

    KERAS_BACKEND=jax python benchmarks/hlo_train_step.py
    KERAS_BACKEND=jax python benchmarks/hlo_train_step.py --inner AdamW --dump /tmp/hlo
"""

from __future__ import annotations

import argparse
import collections
import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402

import harness  # noqa: E402
import workloads  # noqa: E402
from masked_opt import MaskedOptimizer  # noqa: E402

VARIANTS = {"no masks": None, "all-True": "all_true", "1 frozen": "one_frozen", "50% + bias": "realistic"}


def compiled_step(variant: str | None, inner_name: str):
    import jax

    model = workloads.build_mlp(False)
    inner = workloads.INNERS[inner_name]()
    if variant == "bare":
        opt = inner
    else:
        shapes = {workloads.short_path(v.path): tuple(v.shape) for v in model.trainable_variables}
        kind = VARIANTS[variant]
        opt = MaskedOptimizer(inner) if kind is None else MaskedOptimizer(inner, workloads.make_masks(kind, shapes))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(256,)).astype(np.int32)
    model.train_on_batch(x, y)  # builds everything
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    return jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()


def instructions(hlo: str) -> collections.Counter:
    return collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", hlo))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inner", default="Adam", choices=list(workloads.INNERS))
    p.add_argument("--dump", help="write each variant's optimized HLO text into this folder")
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit("hlo_train_step.py reads XLA's programs of the JAX trainer: run with KERAS_BACKEND=jax")
    print(f"## JAX train step, MLP 784-1024-1024-10, batch 256, {args.inner}: the compiled programs\n")
    print("\n".join(harness.table(
        ["variant", "flops", "bytes accessed", "ratio vs bare", "temporaries (MB)", "HLO instructions beyond bare"],
        "lrrrrl")))
    bare = None
    for variant in ["bare", *VARIANTS]:
        compiled = compiled_step(variant, args.inner)
        hlo = compiled.as_text()
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{args.inner}_{variant.replace(' ', '_')}.hlo.txt"), "w") as f:
                f.write(hlo)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        ops = instructions(hlo)
        if bare is None:
            bare = (cost, ops)
        extra = {k: ops[k] - bare[1].get(k, 0) for k in ops if ops[k] > bare[1].get(k, 0)}
        ratio = cost["bytes accessed"] / bare[0]["bytes accessed"]
        print(
            f"| {variant} | {cost['flops']:.4g} | {cost['bytes accessed'] / 1e6:.1f} MB | {ratio:.3f} | "
            f"{memory.temp_size_in_bytes / 1e6:.1f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(extra.items())) or '-'} |"
        )
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
