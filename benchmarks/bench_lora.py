"""Sparse fine-tuning side by side with LoRA on a KerasHub causal LM.

A Gemma-style backbone built from config (random weights, nothing
downloaded): 6 decoder blocks, hidden 512, 8 query heads and 1 key/value
head of 64, intermediate 8192, vocabulary 32,000 (about 58 M parameters),
`GemmaCausalLM` on a batch of 4 x 128 tokens, AdamW, `model.compile()`'s
defaults (the trainer's `jax.jit` on JAX, `tf.function` on TensorFlow).

Variants, each in its own process (peak RSS is per process):

* ``full``: full fine-tuning, every weight trainable.
* ``lora``: `backbone.enable_lora(rank)` (KerasHub: rank-r adapters on the
  query and value kernels; everything else frozen).
* ``dense``: masked_opt with default (dense) optimizer state: the query and
  value kernels trainable, at random elements, as many as LoRA trains;
  every other weight frozen (``trainable=False``, as a user freezes whole
  layers).
* ``compact``: the same with ``compact_state=True``.
* ``compact-all``: compact state, the same number of trainable elements
  spread over every decoder kernel (attention and MLP), all else frozen.
* ``side-all``: ``side_path=True``: the same count as whole slices (rows,
  columns or heads, the finest the side path takes for each kernel) spread
  over every decoder kernel; the kernels' weight gradients are never formed.
* ``side-all-built``: the same, with the optimizer built before the first
  step (`masked_opt.masked_optimizer(model)`): TensorFlow's `fit` otherwise
  builds it inside its first trace, whose step then takes the full gradients.
* ``side-elements``, ``side-elements-built``: ``compact-all``'s random
  element masks with ``side_path=True``: each kernel's weight gradient is
  formed in its layer's backward step and gathered there at once.

Reported: time to the first step (the first `train_on_batch`: tracing,
compiling and one step), median step time over the timed steps (wall and
process CPU time), peak RSS of the process (``ru_maxrss``), the peak over
the steps after the first alone (``VmHWM`` reset after step 1; with
``--trim`` glibc first hands freed heap pages back, so it counts training,
not what the build and the compiler used and freed) and its RSS before the first step (model
and data built), the ratio of each to LoRA,
and on JAX the temporary buffers XLA allocates for the compiled train step
(`memory_analysis()`: activations, gradients, scratch), measured after the
timings so they do not count in the peak. Run:

    python benchmarks/bench_lora.py --backends jax,tensorflow --steps 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("full", "lora", "dense", "compact", "compact-all", "side-all", "side-all-built", "side-elements",
            "side-elements-built")
SIDE = ("side-all", "side-all-built", "side-elements", "side-elements-built")
CONFIG = dict(vocabulary_size=32000, num_layers=6, num_query_heads=8, num_key_value_heads=1,
              hidden_dim=512, intermediate_dim=8192, head_dim=64)
BATCH, SEQ = 4, 128


def slice_masks(model, chosen_ids: set, density: float, rng) -> dict:
    """Per chosen EinsumDense kernel, random whole slices along its finest axis
    the side path takes (a letter of the equation in the input only or the
    output only), as many as `density` of the kernel."""
    import numpy as np

    out = {}
    for layer in model._flatten_layers():
        kernel = getattr(layer, "kernel", None)
        if kernel is None or id(kernel) not in chosen_ids:
            continue
        x, k, o = layer.equation.replace("->", ",").split(",")
        axes = [a for a, letter in enumerate(k) if (letter in x) != (letter in o)]
        axis = max(axes, key=lambda a: kernel.shape[a])
        n = int(kernel.shape[axis])
        take = rng.choice(n, size=max(1, round(density * n)), replace=False)
        mask = np.zeros([n if a == axis else 1 for a in range(len(kernel.shape))], bool)
        np.put_along_axis(mask, np.expand_dims(take, [a for a in range(mask.ndim) if a != axis]), True, axis)
        out[kernel.path] = mask
    return out


def child(variant: str, steps: int, rank: int, jit_compile: str = "auto", trim: bool = False) -> dict:
    import keras
    import keras_hub
    import numpy as np

    from masked_opt import MaskedOptimizer

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    lora_targets = ("attention/query/kernel", "attention/value/kernel")
    # The number LoRA trains (KerasHub's EinsumDense LoRA): A of shape kernel.shape[:-1] + (r,), B (r, last).
    lora_count = sum(int(np.prod(v.shape[:-1])) * rank + rank * int(v.shape[-1])
                     for v in backbone.trainable_variables if v.path.endswith(lora_targets))
    optimizer = keras.optimizers.AdamW(1e-4)
    if variant == "lora":
        backbone.enable_lora(rank)
    elif variant != "full":
        every_kernel = variant in ("compact-all",) + SIDE
        kernels = [v for v in model.trainable_variables if len(v.shape) >= 2 and "decoder_block" in v.path]
        chosen = [v for v in kernels if every_kernel or v.path.endswith(lora_targets)]
        chosen_ids = {id(v) for v in chosen}
        for v in model.trainable_variables:
            if id(v) not in chosen_ids:
                v.trainable = False
        size = sum(int(np.prod(v.shape)) for v in chosen)
        density = lora_count / size
        rng = np.random.default_rng(0)
        if variant.startswith("side-all"):
            masks = slice_masks(model, chosen_ids, density, rng)
        else:
            masks = {v.path: rng.random(tuple(v.shape)) < density for v in chosen}
        optimizer = MaskedOptimizer(optimizer, masks=masks, compact_state=variant != "dense",
                                    side_path=variant in SIDE,
                                    jit_compile={"auto": "auto", "false": False}[jit_compile])
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    if variant in ("dense", "compact", "compact-all") + SIDE:
        trainable_elements = sum(int(np.broadcast_to(m, s).sum()) for m, s in
                                 ((masks[v.path], tuple(v.shape)) for v in model.trainable_variables if v.path in masks))
    else:
        trainable_elements = trainable
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if variant.endswith("-built"):
        from masked_opt import masked_optimizer

        masked_optimizer(model)  # builds it: before the first step, so the first trace has the side path
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG["vocabulary_size"], (BATCH, SEQ + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((BATCH, SEQ), bool)}
    y = tokens[:, 1:]
    rss_before = harness.rss_mib()
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    peak_first = harness.peak_rss_mib()  # ru_maxrss: the lifetime peak, so far (build, compile, step 1)
    reset = harness.reset_peak_rss(trim=trim)  # --trim: freed compiler memory back to the system first
    timed = harness.time_steps(lambda: model.train_on_batch(x, y), steps)
    peak = harness.peak_rss_mib()
    steady = harness.peak_rss_since_reset_mib() if reset else float("nan")  # the later steps alone
    xla = {}
    if keras.backend.backend() == "jax":  # the compiled step's buffers, from XLA itself
        import jax

        state = model._get_jax_state(True, True, True, True)
        data = jax.tree_util.tree_map(jax.numpy.asarray, (x, y))
        memory = jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile().memory_analysis()
        xla = {"xla_temp_mb": memory.temp_size_in_bytes / 2**20,
               "xla_argument_mb": memory.argument_size_in_bytes / 2**20}
    return {
        **xla,
        "variant": variant, "backend": keras.backend.backend(), "parameters": total,
        "trainable_variables_elements": trainable, "trained_elements": trainable_elements,
        "first_step_s": first, "step_s": float(np.median(timed.wall)), "step_cpu_s": float(np.median(timed.cpu)),
        "rss_before_mb": rss_before, "peak_rss_mb": peak, "peak_first_step_mb": peak_first,
        "peak_later_steps_mb": steady,
        "optimizer_variables_mb": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                                      for v in model.optimizer.variables) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--jit-compile", choices=("auto", "false"), default="auto",
                        help="MaskedOptimizer(jit_compile=...): TensorFlow's XLA update of the masked variants")
    parser.add_argument("--trim", action="store_true",
                        help="after step 1, hand freed heap pages back (malloc_trim) before the later steps' peak")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        harness.emit(child(args.child, args.steps, args.rank, args.jit_compile, args.trim))
        return
    rows = []
    for backend in args.backends.split(","):
        for variant in args.variants.split(","):
            try:
                rows.append(harness.run_child(
                    [os.path.abspath(__file__), "--child", variant, "--steps", str(args.steps), "--rank", str(args.rank),
                     "--jit-compile", args.jit_compile] + (["--trim"] if args.trim else []),
                    {"KERAS_BACKEND": backend}))
            except harness.ChildFailed as e:
                print(e.stdout[-2000:], e.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{backend} {variant} failed (exit {e.returncode})") from None
            print(f"  {backend} {variant}: {rows[-1]}", flush=True)
    print(f"\n- command: `python benchmarks/bench_lora.py --backends {args.backends} --steps {args.steps} "
          f"--rank {args.rank} --jit-compile {args.jit_compile}{' --trim' if args.trim else ''}`; {rows[0]['parameters']:,} parameters, batch {BATCH} x {SEQ}\n")
    print("\n".join(harness.table(
        ["backend", "variant", "trained elements", "first step (s)", "vs LoRA", "step wall (s)", "vs LoRA",
         "step CPU (s)", "vs LoRA", "peak RSS (MB)", "vs LoRA", "peak, steps 2+ (MB)", "vs LoRA",
         "RSS before step 1 (MB)", "optimizer variables (MB)", "XLA temp buffers (MB, JAX)"], "llrrrrrrrrrrrrrr")))
    for r in rows:
        lora = next((q for q in rows if q["backend"] == r["backend"] and q["variant"] == "lora"), r)
        print(
            f"| {r['backend']} | {r['variant']} | {r['trained_elements']:,} | {r['first_step_s']:.1f} | "
            f"{r['first_step_s'] / lora['first_step_s']:.2f} | {r['step_s']:.2f} | {r['step_s'] / lora['step_s']:.2f} | "
            f"{r['step_cpu_s']:.2f} | {r['step_cpu_s'] / lora['step_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / lora['peak_rss_mb']:.2f} | {r['peak_later_steps_mb']:.0f} | "
            f"{r['peak_later_steps_mb'] / lora['peak_later_steps_mb']:.2f} | "
            f"{r['rss_before_mb']:.0f} | {r['optimizer_variables_mb']:.1f} | "
            f"{r.get('xla_temp_mb', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
