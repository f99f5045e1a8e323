"""The masked optimizer step under XLA against the bare XLA step (issue 8, target <= 1.05x).

The optimizer step alone, on the ~7.3 M parameters of ``bench_step.py --parts
opt`` (random 50 % element masks on the kernels, biases frozen whole), fixed
gradients, as each backend compiles it:

* TensorFlow: the bare inner ``apply`` in ``tf.function(jit_compile=True)``
  (the reference) against ``MaskedOptimizer(..., jit_compile=True).apply`` in
  a ``tf.function`` (its masked update is one XLA function: what the default
  ``jit_compile="auto"`` runs in ``fit`` once an element is frozen);
* JAX: ``stateless_apply`` in ``jax.jit`` with the state donated (what the
  JAX trainer does), bare and masked.

Variants:

* ``bare XLA``: the reference;
* ``masked``: the library as it is;
* ``masked, select grad mask``: the same, with the gradient masked by
  ``where(mask, grad, 0)`` under XLA as before (``_backend.common.mask_gradient``
  patched to False while the step is traced): what the bitwise AND replaced;
* ``masked, no grad mask`` (diagnostic, not exact): the gradient is not
  masked at all; the cost of the snapshot/restore alone;
* ``masked, in an XLA step`` (TensorFlow): ``MaskedOptimizer(jit_compile=False)``
  inside ``tf.function(jit_compile=True)``, the whole step one XLA program
  as the bare reference is (what ``model.compile(jit_compile=True)`` runs):
  the masked work without the cost of calling a nested XLA function from a
  graph-mode step;
* ``bare XLA, nested call`` (TensorFlow): the bare update in a nested
  ``tf.function(jit_compile=True)`` called from a graph-mode ``tf.function``,
  the calling structure of ``masked`` (``fit``'s default step on a CPU-only
  TensorFlow is graph mode): "masked" against it is printed too.

One process, interleaved rounds in a fresh random order, medians; the ratio is
paired (variant / bare in the same round), with its IQR, for wall and process
CPU time. After timing, the frozen elements of every exact variant are checked
bit for bit. Also prints the number of elementwise loop fusions XLA made of
each JAX step (``--hlo``), the structural evidence.

Usage::

    python benchmarks/bench_xla_step.py --rounds 15
    KERAS_BACKEND=jax python benchmarks/bench_xla_step.py --rounds 15 --hlo
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from unittest.mock import patch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import harness  # noqa: E402
from workloads import (  # noqa: E402
    BACKEND,
    INNERS,
    IS_JAX,
    IS_TF,
    OPT_SHAPES,
    FrozenCheck,
    frozen_report,
    make_masks,
    opt_variables,
    to_numpy,
)

from masked_opt import MaskedOptimizer, _backend  # noqa: E402

if IS_TF:
    import tensorflow as tf
elif IS_JAX:
    import jax
else:
    raise SystemExit("bench_xla_step.py: TensorFlow or JAX only (torch has no XLA step here)")


@contextlib.contextmanager
def _select_grad_mask():
    # The `keras.ops.where` mask (a `select` under XLA) instead of the bitwise AND.
    with patch.object(_backend, "mask_gradient", _backend.common.mask_gradient):
        yield


@contextlib.contextmanager
def _no_grad_mask():
    with patch.object(_backend, "mask_gradient", lambda grad, mask, shape: grad):
        yield


VARIANTS = {
    "bare XLA": (False, contextlib.nullcontext),
    "masked": (True, contextlib.nullcontext),
    "masked, select grad mask": (True, _select_grad_mask),
    "masked, no grad mask (not exact)": (True, _no_grad_mask),
}
# TensorFlow only: `MaskedOptimizer(jit_compile=False)` inside a step compiled
# whole with XLA (as under `model.compile(jit_compile=True)`): the masked work
# without the cost of calling a nested XLA function from a graph-mode step.
IN_XLA_STEP = "masked, in an XLA step"
# TensorFlow only: the bare XLA update called from a graph-mode `tf.function`,
# the calling structure of "masked" (a graph-mode step, as `fit` runs on a
# CPU-only TensorFlow, calling a nested XLA function): what nesting costs.
BARE_NESTED = "bare XLA, nested call"
if IS_TF:
    VARIANTS[IN_XLA_STEP] = (True, contextlib.nullcontext)
    VARIANTS[BARE_NESTED] = (False, contextlib.nullcontext)


HLO: dict[str, str] = {}


def _runner(inner_name: str, masked: bool, trace_ctx, warmup: int, variant: str):
    name = f"{inner_name}: {variant}"  # the HLO label
    variables, grads = opt_variables()
    masks = make_masks("realistic", OPT_SHAPES)
    inner = INNERS[inner_name]()
    if masked:
        opt = MaskedOptimizer(
            inner, masks, jit_compile=(variant != IN_XLA_STEP) if IS_TF else "auto"
        )
    else:
        opt = inner
    opt.build(variables)
    before = [to_numpy(v) for v in variables]
    if IS_TF:

        if variant == BARE_NESTED:
            update = tf.function(lambda: opt.apply(grads, variables), jit_compile=True)

            @tf.function(jit_compile=False)
            def step():
                update()
                return opt.iterations

        else:

            @tf.function(jit_compile=not masked or variant == IN_XLA_STEP)
            def step():
                opt.apply(grads, variables)
                return opt.iterations

        def run(k: int) -> None:
            for _ in range(k):
                it = step()
            it.numpy()

        now = lambda: [to_numpy(v) for v in variables]  # noqa: E731
    else:

        def pure(opt_values, var_values, grads):
            new_vars, new_opt = opt.stateless_apply(opt_values, grads, var_values)
            return new_opt, new_vars

        step = jax.jit(pure, donate_argnums=(0, 1))
        state = [
            [jax.numpy.array(v.value, copy=True) for v in opt.variables],
            [jax.numpy.array(v.value, copy=True) for v in variables],
        ]
        with trace_ctx():
            HLO[name] = step.lower(*state, grads).compile().as_text()

        def run(k: int) -> None:
            a, b = state
            for _ in range(k):
                a, b = step(a, b, grads)
            jax.block_until_ready((a, b))
            state[:] = [a, b]

        now = lambda: [to_numpy(x) for x in state[1]]  # noqa: E731
    with trace_ctx():
        run(warmup)  # traces (and compiles) inside the patch
    if IS_TF and masked:
        # What each TF variant measures: a nested XLA function called from
        # the graph-mode step, or none (the whole step is one XLA program).
        nested = opt.inspect().xla_functions > 0
        if nested != (variant != IN_XLA_STEP):
            raise AssertionError(f"{name}: nested XLA function made: {nested}")
    return run, FrozenCheck(masks if masked else {}, list(OPT_SHAPES), before, now)


def _loop_fusions(hlo: str) -> str:
    entry = hlo[hlo.index("\nENTRY") :]
    big = [
        line
        for line in entry.splitlines()
        if " fusion(" in line and re.search(r"= f32\[\d+,\d+\]", line)
    ]
    selects = len(re.findall(r"select\(", hlo))
    return f"{len(big)} full-size loop fusions, {selects} selects in all fused computations"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inners", default="Adam,AdamW")
    p.add_argument("--variants", default="", help="regex: only matching variants (and bare XLA)")
    p.add_argument("--hlo", action="store_true", help="JAX: print the fusion counts")
    args = p.parse_args(argv)
    print("## Environment\n")
    for line in harness.environment():
        print(f"- {line}")
    print(f"- command: `{harness.command(__file__, BACKEND)}`")
    n = sum(int(np.prod(s)) for s in OPT_SHAPES.values())
    print(f"\n## Optimizer step under XLA ({BACKEND}), {n:,} parameters, 50 % kernel masks "
          "+ frozen biases\n")
    print("\n".join(harness.table(
        ["inner", "variant", "wall ms", "wall vs bare XLA (IQR)", "CPU ms", "CPU vs bare XLA (IQR)"], "llrrrr")))
    frozen, same_call = [], []
    for inner_name in [s.strip() for s in args.inners.split(",") if s.strip()]:
        runners, checks = {}, {}
        for name, (masked, ctx) in VARIANTS.items():
            if name != "bare XLA" and not re.search(args.variants, name):
                continue
            runners[name], checks[name] = _runner(inner_name, masked, ctx, args.warmup, name)
        samples = harness.time_rounds(runners, args.rounds, args.steps)
        print("\n".join(harness.timing_rows(samples, "bare XLA", prefix=[inner_name], digits=2)))
        if "masked" in samples and BARE_NESTED in samples:
            same_call.append(
                f"{inner_name}: masked vs {BARE_NESTED}: wall "
                f"{harness.ratio_cell(samples['masked'].wall, samples[BARE_NESTED].wall)}, CPU "
                f"{harness.ratio_cell(samples['masked'].cpu, samples[BARE_NESTED].cpu)}"
            )
        exact = {k: v for k, v in checks.items() if "not exact" not in k}
        frozen += [f"{inner_name}, {line}" for line in frozen_report(exact)]
    if same_call:
        print("\nThe same calling structure (a graph-mode step calling a nested XLA function):\n")
        for line in same_call:
            print(f"- {line}")
    print("\nFrozen elements after all timed steps (bit-identical check):\n")
    for line in frozen:
        print(f"- {line}")
    if args.hlo and HLO:
        print("\nXLA (JAX) optimized HLO:\n")
        for name, text in HLO.items():
            print(f"- {name}: {_loop_fusions(text)}")
    print(f"\n- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
