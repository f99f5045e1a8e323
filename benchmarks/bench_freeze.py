"""What freezing costs: a frozen backbone by masks against Keras's own
`backbone.trainable = False` and against full fine-tuning (issue 24).

    python benchmarks/bench_freeze.py                                  # every backend, MobileNetV2
    python benchmarks/bench_freeze.py --backends jax --steps 20 --rounds 2
    python benchmarks/bench_freeze.py --model gemma --variants "trainable=False,masks,full"

keras.applications.MobileNetV2 (weights=None, 96x96, batch 32, Adam 1e-3)
as a frozen backbone under a new Dense(10) head. Each variant runs in a
process of its own (so peak RSS is its own), `--rounds` times in a rotating
order; reported: the median step time after `--warmup` steps, the first
step (build, trace/compile, first step: wall time from the first
`train_on_batch` call), and the peak RSS of the process, each as a ratio to
`trainable=False` measured in the same round.

`--model gemma`: a KerasHub GemmaCausalLM built from config (4 blocks,
hidden 256, vocabulary 8,000, batch 4 x 128 tokens, AdamW), everything but
the last decoder block and the final norm frozen by layer keys (the token
embedding, which the output projection shares, included).

Variants:
- `trainable=False`: `backbone.trainable = False` (what a Keras user writes);
- `masks`: `masks={v.path: False for v in backbone.trainable_variables}`;
- `masks+compact`: the same with `compact_state=True`;
- `masks+BN trainable=False`: the BatchNorm layers set `trainable = False` (Keras's switch for
  their inference-mode behaviour, which masks do not change), every other backbone variable
  masked: the like-for-like comparison with `trainable=False`;
- `full`: nothing frozen (full fine-tuning).

`--matrix` (issue 24 item 2, "no mask costs more than no freezing"): every
mask kind over every backbone variable, dense and compact state, as ratios to
`full` in the same round: `elements` (a random half of each variable),
`rows` (the first half of axis 0, stored `(n, 1, ..)`; rank-1 variables: half
their elements), `columns` (the first half of the last axis, stored
`(1, .., n)`), `whole` (`False`), `mixed` (the four kinds in turn over the
variables); `+compact` adds `compact_state=True`; `+nojit` (name it in
`--variants`) adds `jit_compile=False` (TensorFlow: no XLA call of its own
for the masked update).
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness

VARIANTS = ("trainable=False", "masks", "masks+compact", "masks+BN trainable=False", "full")
KINDS = ("elements", "rows", "columns", "whole", "mixed")
MATRIX = ("full",) + tuple(f"{k}{c}" for k in KINDS for c in ("", "+compact"))
BACKENDS = ("tensorflow", "jax", "torch")


def mobilenet(variant: str):
    """(model, frozen layers, inputs, targets) of the MobileNetV2 case."""
    import keras
    import numpy as np

    backbone = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(96, 96, 3), pooling="avg")
    model = keras.Sequential([keras.Input((96, 96, 3)), backbone, keras.layers.Dense(10, name="head")])
    if variant.endswith("BN trainable=False"):  # BatchNorm in inference mode, as trainable=False runs it
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    rng = np.random.default_rng(0)
    return model, [backbone], rng.normal(size=(32, 96, 96, 3)).astype("float32"), rng.integers(0, 10, size=(32,))


def gemma(variant: str):
    """(model, frozen layers, inputs, targets) of the KerasHub Gemma case."""
    import keras_hub
    import numpy as np

    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=8000, num_layers=4, num_query_heads=4, num_key_value_heads=1,
                                             hidden_dim=256, intermediate_dim=1024, head_dim=64)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    frozen = [backbone.get_layer("token_embedding")] + [backbone.get_layer(f"decoder_block_{i}") for i in range(3)]
    tokens = np.random.default_rng(0).integers(0, 8000, (4, 129)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((4, 128), bool)}
    return model, frozen, x, tokens[:, 1:]


def kind_mask(kind: str, variable, i: int):
    """The mask of `kind` for one variable (the `i`-th masked one)."""
    import numpy as np

    shape = tuple(variable.shape)
    if kind == "mixed":
        kind = KINDS[i % 4]
    if kind == "whole":
        return False
    if kind == "elements" or len(shape) == 1:
        return np.random.default_rng(i).random(shape) < 0.5
    axis = 0 if kind == "rows" else len(shape) - 1
    stored = [1] * len(shape)
    stored[axis] = shape[axis]
    mask = np.zeros(stored, bool)
    np.moveaxis(mask, axis, 0)[: max(1, shape[axis] // 2)] = True
    return mask


def measure(variant: str, steps: int, warmup: int, kind: str = "mobilenet") -> dict:
    """One variant in this process: step times, first step, peak RSS."""
    import keras
    import numpy as np

    from masked_opt import MaskedOptimizer

    keras.utils.set_random_seed(0)
    model, frozen, x, y = (gemma if kind == "gemma" else mobilenet)(variant)
    inner = keras.optimizers.AdamW(1e-4) if kind == "gemma" else keras.optimizers.Adam(1e-3)
    frozen_variables = [v for layer in frozen for v in layer.trainable_variables]
    masks = {}
    if variant == "trainable=False":
        for layer in frozen:
            layer.trainable = False
        optimizer = inner
    elif variant.startswith("masks"):
        masks = {v.path: False for v in frozen_variables}
        optimizer = MaskedOptimizer(inner, masks=masks, compact_state=variant.endswith("compact"))
    elif variant.split("+")[0] in KINDS:
        masks = {v.path: kind_mask(variant.split("+")[0], v, i) for i, v in enumerate(frozen_variables)}
        optimizer = MaskedOptimizer(inner, masks=masks, compact_state="+compact" in variant,
                                    jit_compile=False if variant.endswith("+nojit") else "auto")
    else:
        optimizer = inner
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    watch = [(v, ~np.broadcast_to(np.asarray(optimizer.get_mask(v)), tuple(v.shape))) for v in frozen_variables
             if isinstance(optimizer, MaskedOptimizer) and v.path in masks]
    frozen_before = [np.array(keras.ops.convert_to_numpy(v.value)) for v, _ in watch]
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    times = harness.time_steps(lambda: model.train_on_batch(x, y), steps, warmup).wall
    moved = sum(not np.array_equal(b[f], keras.ops.convert_to_numpy(v.value)[f]) for b, (v, f) in zip(frozen_before, watch))
    return {
        "variant": variant, "backend": keras.backend.backend(), "step": statistics.median(times), "first": first,
        "rss_mib": harness.peak_rss_mib(), "frozen_moved": moved,
    }


def run_child(backend: str, variant: str, steps: int, warmup: int, kind: str) -> dict:
    return harness.run_child(
        [__file__, "--child", variant, "--steps", str(steps), "--warmup", str(warmup), "--model", kind],
        {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}, what=f"{backend} / {variant}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--variants", default=None, help=f"names, comma-separated: {','.join(VARIANTS)}")
    parser.add_argument("--matrix", action="store_true", help="every mask kind vs full fine-tuning")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", choices=("mobilenet", "gemma"), default="mobilenet")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        harness.emit(measure(args.child, args.steps, args.warmup, args.model))
        return
    names, baseline = (MATRIX, "full") if args.matrix else (VARIANTS, "trainable=False")
    variants = list(names) if args.variants is None else [v for v in args.variants.split(",")]
    what = ("KerasHub GemmaCausalLM from config (4 blocks), all but the last block frozen" if args.model == "gemma"
            else "MobileNetV2 (weights=None, 96x96, batch 32, Adam), frozen backbone + Dense(10) head")
    print(f"{what}; "
          f"{args.rounds} rounds, {args.steps} timed steps after {args.warmup}; ratios to {baseline} "
          "in the same round (median over rounds)\n")
    print("\n".join(harness.table(
        ["backend", "variant", "step", "first step", "peak RSS", "step s", "first s", "RSS MiB", "frozen moved"],
        "llrrrrrrr")))
    for backend in args.backends.split(","):
        rows: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            results = {v: run_child(backend, v, args.steps, args.warmup, args.model) for v in order}
            base = results.get(baseline)
            for v, res in results.items():
                res["ratios"] = {k: res[k] / base[k] for k in ("step", "first", "rss_mib")} if base else {}
                rows[v].append(res)
        for v in variants:
            rs = rows[v]
            med = {k: statistics.median(r[k] for r in rs) for k in ("step", "first", "rss_mib")}
            ratio = {k: statistics.median(r["ratios"][k] for r in rs) if rs[0]["ratios"] else float("nan")
                     for k in ("step", "first", "rss_mib")}
            moved = max(r["frozen_moved"] for r in rs)
            print(f"| {backend} | {v} | {ratio['step']:.2f}x | {ratio['first']:.2f}x | {ratio['rss_mib']:.2f}x | "
                  f"{med['step']:.3f} | {med['first']:.1f} | {med['rss_mib']:.0f} | {moved} |", flush=True)


if __name__ == "__main__":
    main()
