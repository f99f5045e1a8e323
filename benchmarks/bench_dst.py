"""Dynamic sparse training on built-in data: RigL and SET at 90 % sparsity
against a static random sparse network and the dense network.

scikit-learn's digits (1,797 8x8 images, 10 classes; a fixed 70/30 split),
an MLP 64-256-256-10 (ReLU), Adam 3e-3, batch 32. Sparse runs sparsify the
three kernels (ERK densities, 10 % of the kernel weights overall; biases
dense) with `compact_state=True`; "static" is RigL's initial random masks
with no updates. Each configuration runs for several seeds; the table gives
the mean and standard deviation of the test accuracy.

    python benchmarks/bench_dst.py --seeds 5 --epochs 60
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from masked_opt import SET, MaskedOptimizer, RigL  # noqa: E402


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.7 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def model_for(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),
    ])


def run(kind: str, seed: int, epochs: int, sparsity: float, train, test) -> tuple[float, float, int]:
    model = model_for(seed)
    steps = epochs * int(np.ceil(len(train[0]) / 32))
    callbacks, masks = [], None
    batch = (train[0][:256], train[1][:256])
    if kind != "dense":
        cls = SET if kind == "SET" else RigL
        every = 10**9 if kind == "static" else 50
        end = 1 if kind == "static" else int(0.75 * steps)
        kwargs = {} if cls is SET else {"data": batch}
        callback = cls(model, sparsity, update_every=every, end_step=end, seed=seed, **kwargs)
        callbacks, masks = [callback], callback.masks()
    inner = keras.optimizers.Adam(3e-3)
    optimizer = inner if masks is None else MaskedOptimizer(inner, masks=masks, compact_state=True)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    elapsed = harness.stopwatch()
    model.fit(*train, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=True)
    seconds = elapsed()[0]
    if masks is not None:  # the target density holds after training
        kernels = [v for v in model.trainable_variables if len(v.shape) == 2]
        active = sum(int(optimizer.get_mask(v).sum()) for v in kernels)
        zeros = sum(int(np.sum(keras.ops.convert_to_numpy(v) == 0)) for v in kernels)
        total = sum(int(np.prod(v.shape)) for v in kernels)
        assert active == sum(callbacks[0].counts) and zeros >= total - active, (active, zeros, total)
    moved = sum(h["moved"] for h in callbacks[0].history) if callbacks else 0
    return float(model.evaluate(*test, verbose=0)[1]), seconds, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    train, test = digits()
    kinds = ["dense", "static", "SET", "RigL"]
    results = {k: [] for k in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            results[kind].append(run(kind, seed, args.epochs, args.sparsity, train, test))
            acc, secs, moved = results[kind][-1]
            print(f"  seed {seed} {kind}: accuracy {acc:.4f} ({secs:.1f} s, {moved} elements moved)", flush=True)
    print(f"\n- keras {keras.__version__}, backend {keras.backend.backend()}, python {platform.python_version()}")
    print(f"- command: `python benchmarks/bench_dst.py --seeds {args.seeds} --epochs {args.epochs} "
          f"--sparsity {args.sparsity}`\n")
    print("\n".join(harness.table(
        ["network", "kernel density", "test accuracy, mean ± std", "seeds", "elements moved per run",
         "fit time (s, median)"], "lrrrrr")))
    for kind in kinds:
        acc = np.array([r[0] for r in results[kind]])
        secs = harness.median([r[1] for r in results[kind]])
        moved = int(np.median([r[2] for r in results[kind]]))
        density = "100 %" if kind == "dense" else f"{100 * (1 - args.sparsity):.0f} %"
        print(f"| {kind} | {density} | {acc.mean():.4f} ± {acc.std():.4f} | {len(acc)} | {moved:,} | {secs:.1f} |")


if __name__ == "__main__":
    main()
