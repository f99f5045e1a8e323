"""Quality at equal trainable count (issue 25, item 5): full fine-tuning,
LoRA, structured slices, random elements and SpIEL on a small causal LM.

What: a KerasHub Gemma causal LM built from config (nothing downloaded),
pre-trained once per run on a synthetic language A, then fine-tuned from the
same pretrained weights on a shifted language B; the held-out loss on B
(mean token cross-entropy, nats) of each variant over seeds, mean ± std.

Corpus (NumPy, fixed seed): sequences of 65 tokens over a vocabulary of 128.
The first 32 tokens follow a sparse first-order Markov chain (every token has
6 possible successors, Dirichlet(0.7) weights); the rest, with probability
1/2, repeat the first 32 (language A: a plain copy; language B: each token
mapped through a fixed random permutation of the vocabulary), else continue
the chain. B's chain is A's with half of the rows (successor sets) drawn
afresh. So B shares A's structure (chain, long-range copying) and shifts
both the statistics and the copy rule.

Variants (each from the same pretrained weights, same batches, steps and
constant-learning-rate AdamW without weight decay; a seed sets the data
order, the LoRA initialisation and the random masks):

* ``full``: every weight trainable.
* ``lora``: `backbone.enable_lora(8, target_layer_names=...)` on every
  decoder kernel (attention query/key/value/output, the three FFN kernels);
  embeddings and norms frozen. The reference trainable count.
* ``lora-qv``: KerasHub's default `backbone.enable_lora(8)` (query and value
  kernels only: fewer parameters than the others).
* ``rows``: `masks.lora_budget(8, axis=...)` on every decoder kernel, whole
  input slices: axis 0 (rows) of the FFN kernels; axis 1 of the attention
  kernels (the hidden-input axis of query/key/value, the head_dim axis,
  across heads, of the output). Axis 0 there would be whole heads, which at
  this size overshoot LoRA's count by up to 3x. Everything else frozen.
* ``elements``: `masks.lora_budget(8)` (random single elements, exactly
  LoRA's count per kernel), same keys.
* ``rows-side``, ``elements-side``: ``rows`` and ``elements`` with
  ``side_path=True`` (the same update; the weight gradients are formed in
  each layer's backward step: slices only, or gathered at once).
* ``spiel``: the ``elements`` masks to start with, moved by `SpIEL`
  callbacks (drop the active elements that moved least, back to their
  pretrained values; grow by gradient magnitude on a batch of B), one per
  kernel shape with ``distribution="uniform"`` and ``sparsity = 1 - count /
  size`` so each kernel keeps exactly LoRA's count.

The masked variants run `MaskedOptimizer(AdamW, masks, compact_state=True)`
and are checked: no frozen element may change (bit for bit). The table also
gives the loss on held-out A after fine-tuning (forgetting). Run (default,
8.4 minutes on 2 shared CPU cores):

    KERAS_BACKEND=jax python benchmarks/bench_quality.py --out /tmp/quality.md

``--quick`` (1 seed, 40 steps, short pre-training) checks that it runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VOCAB, SEQ, HALF = 128, 64, 32
CONFIG = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=1,
              hidden_dim=128, intermediate_dim=256, head_dim=32)
KERNELS = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]
ROW_AXIS = {"query": 1, "key": 1, "value": 1, "attention_output": 1}  # FFN kernels: 0
VARIANTS = ("full", "lora", "lora-qv", "rows", "elements", "spiel", "rows-side", "elements-side")
FAMILY = {"full": "full", "lora": "lora", "lora-qv": "lora", "rows": "sparse", "elements": "sparse", "spiel": "sparse",
          "rows-side": "sparse", "elements-side": "sparse"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", help="Keras backend (default: KERAS_BACKEND, else jax)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--train-b", type=int, default=1024, help="fine-tuning sequences of B")
    p.add_argument("--lr-full", type=float, default=3e-3)
    p.add_argument("--lr-lora", type=float, default=1e-2)
    p.add_argument("--lr-sparse", type=float, default=3e-2)
    p.add_argument("--spiel-every", type=int, default=25, help="SpIEL update_every (end_step: 3/4 of --steps)")
    p.add_argument("--spiel-drop", type=float, default=0.3, help="SpIEL drop_fraction (cosine-annealed)")
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 150 pre-training steps")
    p.add_argument("--out", help="also write the report to this file")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.steps, a.pretrain_steps, a.spiel_every = 1, 40, 150, 10
    return a


# ------------------------------------------------------------------ corpus


def corpus(n_train_a: int, n_train_b: int, n_test: int = 512, seed: int = 1234) -> dict:
    """Token arrays (n, SEQ + 1) of A and B, train and held-out."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def chain(rows):
        t = np.zeros((VOCAB, VOCAB))
        for i in rows:
            t[i, rng.choice(VOCAB, 6, replace=False)] = rng.dirichlet(np.full(6, 0.7))
        return t

    t_a = chain(range(VOCAB))
    t_b = t_a.copy()
    shifted = rng.choice(VOCAB, VOCAB // 2, replace=False)
    t_b[shifted] = 0
    t_b += chain(shifted)
    perm = rng.permutation(VOCAB)  # B's copy rule: token -> perm[token]

    def sample(t, copy_map, n):
        cum = np.cumsum(t, axis=1)
        seqs = np.zeros((n, SEQ + 1), np.int32)
        seqs[:, 0] = rng.integers(0, VOCAB, n)
        for j in range(1, SEQ + 1):
            u = rng.random(n)[:, None]
            seqs[:, j] = np.minimum((u > cum[seqs[:, j - 1]]).sum(1), VOCAB - 1)
        copy = rng.random(n) < 0.5
        seqs[copy, HALF + 1:2 * HALF + 1] = copy_map[seqs[copy, 1:HALF + 1]]
        return seqs

    ident = np.arange(VOCAB)
    return {"a_train": sample(t_a, ident, n_train_a), "a_test": sample(t_a, ident, n_test),
            "b_train": sample(t_b, perm, n_train_b), "b_test": sample(t_b, perm, n_test)}


def xy(seqs):
    import numpy as np

    return {"token_ids": seqs[:, :-1], "padding_mask": np.ones((len(seqs), SEQ), bool)}, seqs[:, 1:]


def ordered(seqs, steps: int, batch: int, seed: int):
    """steps * batch sequences: shuffled epochs (order set by `seed`), for fit(shuffle=False)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    need = steps * batch
    idx = np.concatenate([rng.permutation(len(seqs)) for _ in range(-(-need // len(seqs)))])[:need]
    return xy(seqs[idx])


# ------------------------------------------------------------------- model


def build(weights=None):
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if weights is not None:
        model.set_weights(weights)
    return model


def compile_model(model, optimizer):
    import keras

    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])


def loss_on(model, seqs) -> float:
    x, y = xy(seqs)
    return float(model.evaluate(x, y, batch_size=128, verbose=0, return_dict=True)["loss"])


def kernel_name(path: str) -> str | None:
    parts = path.split("/")
    return parts[-2] if path.startswith("decoder_block") and parts[-1] == "kernel" and parts[-2] in KERNELS else None


def sparse_masks(model, variant: str, rank: int, seed: int) -> dict:
    """{path: mask}: LoRA's count on every decoder kernel, everything else frozen."""
    from masked_opt import masks

    out = {}
    for v in model.trainable_variables:
        name = kernel_name(v.path)
        if name is None:
            out[v.path] = False
        elif variant.startswith("rows"):
            out[v.path] = masks.lora_budget(rank, axis=ROW_AXIS.get(name, 0), seed=seed)
        else:
            out[v.path] = masks.lora_budget(rank, seed=seed)
    return out


def spiel_callbacks(model, args, seed: int, batch) -> list:
    """One SpIEL per kernel shape, each keeping exactly lora_count(shape) elements per kernel."""
    import math

    from masked_opt import SpIEL
    from masked_opt.masks import lora_count

    groups: dict[tuple, list[str]] = {}
    for v in model.trainable_variables:
        if kernel_name(v.path):
            groups.setdefault(tuple(v.shape), []).append(v.path)
    return [SpIEL(model, sparsity=1 - lora_count(shape, args.rank) / math.prod(shape),
                  update_every=args.spiel_every, end_step=max(1, args.steps * 3 // 4),
                  drop_fraction=args.spiel_drop, distribution="uniform", variables=paths,
                  data=batch, seed=seed)
            for shape, paths in groups.items()]


# --------------------------------------------------------------- fine-tune


def finetune(variant: str, seed: int, pretrained, data: dict, args) -> dict:
    import keras
    import numpy as np

    import harness
    from masked_opt import MaskedOptimizer

    keras.utils.set_random_seed(seed)
    model = build(pretrained)
    lr = {"full": args.lr_full, "lora": args.lr_lora, "sparse": args.lr_sparse}[FAMILY[variant]]
    optimizer = keras.optimizers.AdamW(lr, weight_decay=0.0)
    callbacks = []
    if variant == "lora":
        model.backbone.enable_lora(args.rank, target_layer_names=KERNELS)
    elif variant == "lora-qv":
        model.backbone.enable_lora(args.rank)
    elif variant != "full":
        optimizer = MaskedOptimizer(optimizer, masks=sparse_masks(model, variant, args.rank, seed),
                                    compact_state=True, side_path=variant.endswith("-side"))
        if variant == "spiel":
            callbacks = spiel_callbacks(model, args, seed, xy(data["b_train"][:64]))
    compile_model(model, optimizer)
    if variant.endswith("-side"):
        from masked_opt import masked_optimizer

        masked_optimizer(model)  # built before the first step: its trace has the side path
    x, y = ordered(data["b_train"], args.steps, args.batch, seed)
    clock = harness.stopwatch()
    model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    wall = clock()[0]
    if variant in ("full", "lora", "lora-qv"):
        trainable, changed = sum(int(np.prod(v.shape)) for v in model.trainable_variables), None
    else:  # the masks' count, and the elements that moved: never a frozen one
        trainable = changed = 0
        weights = [v for v in model.weights if "masked_compact_" not in v.path]  # not the side path's proxies
        for v, base in zip(weights, pretrained):
            now = np.asarray(keras.ops.convert_to_numpy(v.value))
            moved = now.view(np.uint32) != np.asarray(base).view(np.uint32)
            mask = model.optimizer.get_mask(v) if v.trainable else np.zeros(v.shape, bool)
            if np.any(moved & ~mask):
                raise SystemExit(f"{variant}: a frozen element of {v.path} changed")
            trainable += int(np.count_nonzero(mask))
            changed += int(np.count_nonzero(moved))
    moves = sum(sum(h["moved"] for h in cb.history) for cb in callbacks)
    return {"loss_b": loss_on(model, data["b_test"]), "loss_a": loss_on(model, data["a_test"]),
            "trainable": trainable, "changed": changed, "wall": wall, "lr": lr, "moves": moves}


# -------------------------------------------------------------------- main


def main() -> None:
    args = parse()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    import numpy as np

    import harness

    total = harness.stopwatch()
    keras.utils.set_random_seed(0)
    data = corpus(n_train_a=min(args.pretrain_steps * args.batch, 16384), n_train_b=args.train_b)
    model = build()
    params = sum(int(np.prod(v.shape)) for v in model.weights)
    warmup = max(1, args.pretrain_steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, args.pretrain_steps - warmup, warmup_target=args.pretrain_lr,
                                                      warmup_steps=warmup)
    compile_model(model, keras.optimizers.AdamW(schedule, weight_decay=0.0))
    x, y = ordered(data["a_train"], args.pretrain_steps, args.batch, 0)
    clock = harness.stopwatch()
    hist = model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    pre_wall = clock()[0]
    pre = {"train": hist.history["loss"][-1], "a": loss_on(model, data["a_test"]), "b": loss_on(model, data["b_test"])}
    pretrained = [np.array(w) for w in model.get_weights()]
    print(f"pre-trained {args.pretrain_steps} steps in {pre_wall:.0f} s: held-out A {pre['a']:.4f}, "
          f"B (no fine-tuning) {pre['b']:.4f}", flush=True)

    results: dict[str, list[dict]] = {}
    for variant in args.variants.split(","):
        for seed in range(args.seeds):
            r = finetune(variant, seed, pretrained, data, args)
            results.setdefault(variant, []).append(r)
            print(f"  {variant} seed {seed}: B {r['loss_b']:.4f}  A {r['loss_a']:.4f}  trainable {r['trainable']:,}"
                  f"  changed {r['changed']}  moved {r['moves']}  {r['wall']:.1f} s", flush=True)

    def cell(vals, d=4):
        return f"{statistics.mean(vals):.{d}f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.{d}f}"

    rows = [["pretrained, no fine-tuning", "-", "0", f"{pre['b']:.4f}", "-", f"{pre['a']:.4f}", "-"]]
    for variant, rs in results.items():
        counts = sorted({r["trainable"] for r in rs})
        rows.append([f"`{variant}`", f"{rs[0]['lr']:g}", "/".join(f"{c:,}" for c in counts),
                     f"**{cell([r['loss_b'] for r in rs])}**", ", ".join(f"{r['loss_b']:.4f}" for r in rs),
                     cell([r["loss_a"] for r in rs], 3), f"{statistics.mean(r['wall'] for r in rs):.1f}"])
    backend = keras.backend.backend()
    lines = [
        f"- command: `{harness.command(__file__, backend)}`",
        f"- model: GemmaCausalLM from config {CONFIG} ({params:,} parameters), sequences of {SEQ} tokens, "
        f"batch {args.batch}",
        f"- corpus: synthetic (see the script's docstring), pre-training on A {len(data['a_train']):,} sequences, "
        f"fine-tuning on B {args.train_b:,} sequences, held-out 512 + 512",
        f"- pre-training: {args.pretrain_steps} steps, AdamW (no weight decay), {warmup} warm-up steps to "
        f"{args.pretrain_lr:g} then cosine to 0; final train loss {pre['train']:.4f}, held-out A {pre['a']:.4f}, "
        f"{pre_wall:.0f} s",
        f"- fine-tuning: {args.steps} steps, AdamW (constant LR, no weight decay), LoRA rank {args.rank}, "
        f"{args.seeds} seed(s); SpIEL update_every={args.spiel_every}, end_step={max(1, args.steps * 3 // 4)}, "
        f"drop_fraction={args.spiel_drop:g} (cosine), growth gradient on 64 B sequences; masked: compact_state=True",
        f"- total wall time {total()[0] / 60:.1f} min",
        "",
        *harness.table(["variant", "LR", "trainable params", "held-out loss on B (mean ± std)", "per seed",
                        "held-out loss on A after", "fine-tune wall s"], "lrrrrrr", rows),
        "",
        "Environment: " + "; ".join(harness.environment()),
    ]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
