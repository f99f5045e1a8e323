"""Where the time of a masked optimizer step goes (CPU, graph mode).

Times, side by side in one process (interleaved rounds, medians), each piece
that `MaskedOptimizer` adds around the inner update, on the same ~7.3 M
parameters as `bench_step.py --parts opt` (random 50% kernel masks, frozen
biases), each piece as its own `tf.function`:

* ``inner apply``: the bare inner optimizer's ``apply`` (the reference);
* ``mask grads``: ``where(mask, grad, 0)`` over all masked gradients;
* ``snapshot``: the copy of every masked variable taken before the step;
* ``snapshot + inner apply``: the snapshot kept alive across the inner update
  (the snapshot alone is nearly free: it shares the variable's buffer, and the
  copy is paid by the first in-place write after it);
* ``restore``: ``variable.assign(where(mask, variable, snapshot))``;
* ``any-frozen check``: the reduction deciding whether any mask is not all-True;
* ``grad * float mask``: what gradient-only masking pays instead of the above;
* ``masked apply``: the whole ``MaskedOptimizer.apply`` (all of the above);
* ``inner apply, XLA``: the bare update traced with ``jit_compile=True``;
* ``hand-written masked update, XLA, no cond``: mask, snapshot, inner update
  and restore written out in one XLA function, without the library's
  any-frozen ``cond``: a lower bound for a jit-compiled masked step;
* ``masked apply, jit_compile=True``: ``MaskedOptimizer(..., jit_compile=True)``
  (if the installed version has it).

The pieces call the library's own backend helpers, so they time the code that
runs. Usage::

    python benchmarks/profile_masked_step.py [--rounds 15] [--steps 5] [--inner AdamW]
"""

from __future__ import annotations

import argparse
import inspect
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras import ops  # noqa: E402

from masked_opt import MaskedOptimizer, _backend  # noqa: E402

import harness  # noqa: E402
from workloads import INNERS, OPT_SHAPES, make_masks, opt_variables  # noqa: E402


def pieces(inner_name: str, warmup: int) -> dict:
    """name -> run(k): each piece as its own traced function, warmed up."""
    masks_np = make_masks("realistic", OPT_SHAPES)
    bool_masks = [tf.constant(np.asarray(masks_np[p], bool)) for p in OPT_SHAPES]
    float_masks = [
        tf.constant(np.broadcast_to(np.asarray(masks_np[p], np.float32), s))
        for p, s in OPT_SHAPES.items()
    ]

    # Each set of variables the same values (seed 1), as the grads.
    bare_vars, grads = opt_variables()
    bare = INNERS[inner_name]()
    bare.build(bare_vars)

    masked_vars, _ = opt_variables()
    masked = MaskedOptimizer(INNERS[inner_name](), masks_np)
    masked.build(masked_vars)

    shapes = [tuple(s) for s in OPT_SHAPES.values()]

    def inner_apply():
        bare.apply(grads, bare_vars)
        return [bare.iterations]

    def mask_grads():
        out = [_backend.mask_gradient(g, m, s) for g, m, s in zip(grads, bool_masks, shapes)]
        return out

    def snapshot():
        out = [_backend.snapshot(v) for v in bare_vars]
        return out

    snap = [tf.constant(v.numpy()) for v in bare_vars]

    def snapshot_then_inner_apply():
        # The snapshot shares the variable's buffer; the inner update's
        # in-place assign must then copy it first (TF copy-on-write).
        out = [_backend.snapshot(v) for v in bare_vars]
        bare.apply(grads, bare_vars)
        return out

    def restore():
        _backend.restore_frozen(list(zip(bare_vars, bool_masks, snap)))
        return [bare.iterations]

    def any_frozen():
        return [ops.any(ops.stack([ops.logical_not(ops.all(m)) for m in bool_masks]))]

    def grad_times_mask():
        out = [g * m for g, m in zip(grads, float_masks)]
        return out

    def masked_apply():
        masked.apply(grads, masked_vars)
        return [masked.iterations]

    xla_vars, _ = opt_variables()
    xla_bare = INNERS[inner_name]()
    xla_bare.build(xla_vars)
    jit_vars, _ = opt_variables()
    jit_masked = None
    if "jit_compile" in inspect.signature(MaskedOptimizer).parameters:
        jit_masked = MaskedOptimizer(INNERS[inner_name](), masks_np, jit_compile=True)
        jit_masked.build(jit_vars)

    hand_vars, _ = opt_variables()
    hand_bare = INNERS[inner_name]()
    hand_bare.build(hand_vars)

    def hand_masked_xla():
        # The same math as the masked update, written out without the
        # any-frozen `cond`: what XLA makes of mask + snapshot + apply + restore.
        masked_grads = [tf.where(m, g, 0.0) for m, g in zip(bool_masks, grads)]
        snaps = [tf.identity(v.value) for v in hand_vars]
        hand_bare.apply(masked_grads, hand_vars)
        for v, m, old in zip(hand_vars, bool_masks, snaps):
            v.assign(tf.where(m, v.value, old))
        return [hand_bare.iterations]

    def bare_apply_xla():
        xla_bare.apply(grads, xla_vars)
        return [xla_bare.iterations]

    def masked_apply_jit():
        jit_masked.apply(grads, jit_vars)
        return [jit_masked.iterations]

    fns = {
        "inner apply": inner_apply,
        "mask grads": mask_grads,
        "snapshot": snapshot,
        "snapshot + inner apply": snapshot_then_inner_apply,
        "restore": restore,
        "any-frozen check": any_frozen,
        "grad * float mask": grad_times_mask,
        "masked apply": masked_apply,
        "inner apply, XLA": bare_apply_xla,
        "hand-written masked update, XLA, no cond": hand_masked_xla,
    }
    if jit_masked is not None:
        fns["masked apply, jit_compile=True"] = masked_apply_jit
    runners = {}
    for name, fn in fns.items():
        traced = tf.function(fn, jit_compile="XLA" in name, autograph=False)
        for _ in range(warmup):
            traced()[-1].numpy()

        def run(k: int, traced=traced) -> None:
            for _ in range(k):
                out = traced()  # whole tensors out: nothing is pruned from the graph
            out[-1].numpy()

        runners[name] = run
    return runners


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inner", default="AdamW", choices=list(INNERS))
    args = p.parse_args(argv)
    n = sum(int(np.prod(s)) for s in OPT_SHAPES.values())
    print("## Environment\n")
    for line in harness.environment():
        print(f"- {line}")
    print(f"- command: `{harness.command(__file__)}`")
    print(
        f"\n## Pieces of a masked {args.inner} step, {n:,} parameters "
        f"(50% kernel masks, frozen biases)\n"
    )
    samples = harness.time_rounds(pieces(args.inner, args.warmup), args.rounds, args.steps)
    print("\n".join(harness.table(
        ["piece", "wall ms", "wall vs inner apply (IQR)", "CPU ms", "CPU vs inner apply (IQR)"], "lrrrr")))
    print("\n".join(harness.timing_rows(samples, "inner apply")))
    print(f"\n- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
