"""Sparse-gradient benchmark: a row-masked 1,000,000 x 64 Embedding.

Each batch looks up a few hundred random ids, so the gradient is a
`tf.IndexedSlices` with a few hundred rows. The row mask (vocab, 1) marks the
last 1% of the vocabulary as trainable ("new tokens"); the rest is frozen.

Two parts:

* ``step``: a whole training step on a stock ``keras.layers.Embedding``
  (lookup, loss, gradient, ``apply_gradients``) in a ``tf.function``. Note
  that the stock layer reads the whole table (``ReadVariableOp``), so even the
  bare SGD step pays for a copy of the table when it scatters into it while
  that read is alive (TensorFlow's copy-on-write);
* ``apply``: ``apply_gradients`` alone, with a fixed ``tf.IndexedSlices``
  gradient of a few hundred rows.

For each part, inner optimizer (SGD, which applies IndexedSlices by scatter,
and Adam, which densifies them itself) and variant (the bare optimizer, or
`MaskedOptimizer` around it), one fresh subprocess builds the embedding and the
optimizer, traces the step (`tf.function`), runs warm-up steps, resets the
peak-RSS counter (Linux `/proc/self/clear_refs`), then times `--steps` steps
(``harness.time_steps``; the process is this script, run by ``harness.run_child``).
Columns:

* ``ms/step``: median wall time of one step;
* ``cpu ms``: median CPU time of the process per step (all threads; less
  sensitive than wall time to other load on the machine);
* ``peak MB``: peak resident memory during the timed steps above the resident
  memory before them (transient allocations of a step);
* ``dense [V,D]``: number of ops in the traced step (``cond`` branches
  included) that output a float tensor of the full embedding shape: a read of
  the whole table, a dense gradient, a snapshot, a ``where`` result.

Usage::

    python benchmarks/bench_sparse.py                 # ~5 min on 2 cores
    python benchmarks/bench_sparse.py --vocab 100000 --steps 3   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_one(
    part: str, optimizer: str, variant: str, vocab: int, dim: int, rows: int, steps: int
) -> dict:
    import numpy as np
    import tensorflow as tf

    import keras
    from masked_opt import MaskedOptimizer
    harness.use_test_support()
    from tf_graphs import graph_ops

    keras.utils.set_random_seed(0)
    emb = keras.layers.Embedding(vocab, dim, embeddings_initializer="zeros", name="emb")
    emb.build((None,))
    inner = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(1e-3)}[
        optimizer
    ]()
    if variant == "bare":
        opt = inner
    else:
        row_mask = np.zeros((vocab, 1), bool)
        row_mask[-max(1, vocab // 100) :] = True  # the last 1% are new tokens
        opt = MaskedOptimizer(inner, masks={"emb/embeddings": row_mask})
    opt.build(emb.trainable_variables)
    variables = emb.trainable_variables

    if part == "step":

        @tf.function
        def step(ids, target):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(emb(ids) - target))
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))

    else:

        @tf.function
        def step(ids, values):
            grad = tf.IndexedSlices(values, ids, tf.constant([vocab, dim]))
            opt.apply_gradients([(grad, variables[0])])

    rng = np.random.default_rng(0)
    batches = [
        (
            tf.constant(rng.integers(0, vocab, size=rows), tf.int32),
            tf.constant(rng.normal(size=(rows, dim)), tf.float32),
        )
        for _ in range(steps + 3)
    ]
    graph = step.get_concrete_function(*batches[0]).graph
    full = sum(
        1
        for op in graph_ops(graph)
        for out in op.outputs
        if out.dtype.is_floating and out.shape.as_list() == [vocab, dim]
    )
    for batch in batches[:3]:  # warm-up
        step(*batch)
    rss_before = harness.rss_mib()
    reset = harness.reset_peak_rss()
    timed_batches = iter(batches[3:])
    timed = harness.time_steps(lambda: step(*next(timed_batches)), steps)
    return {
        "ms": 1e3 * statistics.median(timed.wall),
        "cpu_ms": 1e3 * statistics.median(timed.cpu),
        "peak_mb": harness.peak_rss_since_reset_mib() - rss_before if reset else float("nan"),
        "dense_full": full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=300, help="ids looked up per batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["step", "apply"], choices=["step", "apply"])
    parser.add_argument("--one", nargs=3, metavar=("PART", "OPTIMIZER", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        harness.emit(run_one(*args.one, args.vocab, args.dim, args.rows, args.steps))
        return
    size_mb = args.vocab * args.dim * 4 / 2**20
    print(
        f"Embedding {args.vocab:,} x {args.dim} float32 ({size_mb:.0f} MB), "
        f"{args.rows} ids per batch, row mask: last 1% trainable; median of {args.steps} steps"
    )
    header = (
        f"{'part':<6} {'optimizer':<9} {'variant':<7} {'ms/step':>9} {'cpu ms':>9} "
        f"{'peak MB':>8} {'dense [V,D]':>12}"
    )
    print(header)
    print("-" * len(header))
    for part in args.parts:
        for optimizer in ("sgd", "adam"):
            for variant in ("bare", "masked"):
                cmd = [os.path.abspath(__file__), "--one", part, optimizer, variant]
                cmd += ["--vocab", str(args.vocab), "--dim", str(args.dim)]
                cmd += ["--rows", str(args.rows), "--steps", str(args.steps)]
                label = f"{part:<6} {optimizer:<9} {variant:<7}"
                try:
                    r = harness.run_child(cmd)
                except harness.ChildFailed as e:
                    print(f"{label} failed:\n{e.stderr[-2000:]}")
                    continue
                print(
                    f"{label} {r['ms']:>9.1f} {r['cpu_ms']:>9.1f} {r['peak_mb']:>8.0f} "
                    f"{r['dense_full']:>12d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
