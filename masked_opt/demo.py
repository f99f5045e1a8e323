"""`python -m masked_opt demo`: continual learning on scikit-learn's digits.

A stock MLP (Dense 64-128-128-10) learns digits 0-4 (task A), then digits
5-9 (task B) three ways:

(a) full fine-tuning: every weight trains on B;
(b) Fisher freeze: the weights with the largest Fisher information for task A
    (`masks.fisher` on A's training data) are frozen, the rest train on B;
(c) PackNet (Mallya & Lazebnik, 2018): A's kernels are pruned by magnitude
    (`pruning.prune_variable`), A is retrained briefly on the survivors, the
    survivors and all biases are frozen, and B trains only on the freed
    (pruned) weights. As in PackNet, A is then evaluated on A's own weights:
    the weights B learned are masked out (set to 0) for A's predictions.

Heads: one shared 10-way output layer, trained with a 10-way softmax on each
task's own labels. Evaluation is task-aware (the task-incremental protocol):
a task's accuracy is the argmax over its own 5 classes.

The frozen weights of (b) and (c) are checked with `np.array_equal` against
copies taken before task B. Runs on the CPU in well under two minutes, with
the Keras backend `KERAS_BACKEND` selects (TensorFlow, JAX or torch).

All randomness comes from NumPy and `seed` (the train/test split, the initial
weights, the batch order), so every backend trains the same model on the same
batches. The backends' kernels round some sums differently in the last bits,
which over many epochs moves accuracies by up to a few percent; the proof
(frozen weights bit-identical) holds on every backend.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEMO_EXTRA_HINT = 'pip install "masked_opt[demo]"'
TASK_A = (0, 1, 2, 3, 4)
TASK_B = (5, 6, 7, 8, 9)


@dataclass
class MethodResult:
    """One way of learning task B after task A."""

    name: str
    acc_a_before: float  # on A's test set, just before training on B
    acc_a_after: float  # on A's test set, after training on B
    acc_b: float  # on B's test set, after training on B
    frozen_fraction: float  # share of all weights frozen while training on B
    frozen_unchanged: bool | None  # frozen elements bit-identical after B (None: none frozen)
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # True = trainable on B

    @property
    def forgetting(self) -> float:
        """Drop of task A accuracy caused by training on B."""
        return self.acc_a_before - self.acc_a_after


@dataclass
class DemoResult:
    """What `run` returns: the pretrained accuracy and one row per method."""

    acc_a_pretrained: float
    methods: list[MethodResult]
    png: str | None
    seconds: float

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name.startswith(name):
                return m
        raise KeyError(name)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the run; `quick()` is the reduced run the tests use."""

    pretrain_epochs: int = 10
    task_b_epochs: int = 10
    packnet_retrain_epochs: int = 3
    fisher_frozen: float = 0.5  # share of weights frozen by (b)
    packnet_sparsity: float = 0.6  # share of A's kernel weights pruned (freed for B) by (c)
    hidden: tuple[int, ...] = (128, 128)
    batch_size: int = 32
    learning_rate: float = 5e-3  # Adam, every phase: large enough that (a) forgets A
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(pretrain_epochs=8, task_b_epochs=4, packnet_retrain_epochs=2)


def _require_extras() -> None:
    missing = []
    for module in ("sklearn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(module, module))
    if missing:
        raise ImportError(
            f"The demo needs {' and '.join(missing)}, in the optional extra 'demo': "
            f"{DEMO_EXTRA_HINT}."
        )


def load_tasks(seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    """Digits split into task A (0-4) and B (5-9), each into 70% train / 30% test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    tasks = {}
    for name, classes in (("A", TASK_A), ("B", TASK_B)):
        keep = np.isin(y, classes)
        tasks[name] = tuple(
            train_test_split(x[keep], y[keep], test_size=0.3, random_state=seed, stratify=y[keep])
        )  # x_train, x_test, y_train, y_test
    return tasks


def shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Full batches of `(x, y)` in a new random order each epoch, drawn from
    `seed`: a `keras.utils.PyDataset`, the same on every backend. A last,
    smaller batch is dropped: it would compile the train step a second time."""
    import keras

    class ShuffledBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self._rng = np.random.default_rng(seed)
            self._order = self._rng.permutation(len(x))

        def __len__(self) -> int:
            return len(x) // batch_size

        def __getitem__(self, index: int):
            rows = self._order[index * batch_size : (index + 1) * batch_size]
            return x[rows], y[rows]

        def on_epoch_end(self) -> None:
            self._order = self._rng.permutation(len(x))

    return ShuffledBatches()


def _build_model(config: DemoConfig):
    """The MLP, with initial weights drawn by NumPy from `config.seed` (Glorot
    uniform kernels, zero biases: Keras's defaults), so that every backend
    starts from the same weights."""
    import keras

    layers = [keras.Input((64,))]
    for i, units in enumerate(config.hidden):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"hidden_{i}"))
    layers.append(keras.layers.Dense(10, name="logits"))
    model = keras.Sequential(layers, name="mlp")
    rng = np.random.default_rng(config.seed)
    for layer in model.layers:
        fan_in, fan_out = (int(d) for d in layer.kernel.shape)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        layer.kernel.assign(rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32"))
        layer.bias.assign(np.zeros(fan_out, "float32"))
    return model


def _compile(model, optimizer) -> None:
    import keras

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def task_accuracy(model, x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> float:
    """Accuracy with the argmax taken over the task's own classes only."""
    import keras

    logits = keras.ops.convert_to_numpy(model(x, training=False))  # eager: no predict retraces
    cls = np.asarray(classes)
    return float(np.mean(cls[np.argmax(logits[:, cls], axis=1)] == y))


def _weights(model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in model.trainable_variables}


def _frozen_unchanged(before: dict, after: dict, masks: dict[str, np.ndarray]) -> bool:
    return all(
        np.array_equal(after[path][~np.broadcast_to(m, after[path].shape)],
                       before[path][~np.broadcast_to(m, before[path].shape)])
        for path, m in masks.items()
    )


def _frozen_share(model, masks: dict[str, np.ndarray]) -> float:
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    frozen = sum(int(np.size(m) - np.count_nonzero(m)) for m in masks.values())
    return frozen / total


def _mask_table(optimizer) -> str:
    """The per-variable trainable/frozen table and the PEFT-style total line."""
    from masked_opt.summary import format_mask_summary, mask_summary

    return "\n".join("   " + line for line in format_mask_summary(mask_summary(optimizer)).splitlines())


def _run_progress(epochs: int):
    """A callback showing one `keras.utils.Progbar` over a whole `fit` run,
    advanced per epoch (Keras is imported on first use, as elsewhere here)."""
    import keras

    class RunProgress(keras.callbacks.Callback):
        def __init__(self, epochs: int):
            super().__init__()
            self.bar = keras.utils.Progbar(epochs, unit_name="epoch")

        def on_epoch_end(self, epoch, logs=None):
            self.bar.update(epoch + 1, [(k, v) for k, v in (logs or {}).items() if k == "loss"])

    return RunProgress(epochs)


def _say(verbose: int, text: str) -> None:
    if verbose:
        print(text, flush=True)


@dataclass
class _Run:
    """One demo run: the data, the settings, and the helpers its steps share."""

    config: DemoConfig
    verbose: int
    tasks: dict

    def batches(self, x, y, seed):
        return shuffled_batches(x, y, self.config.batch_size, seed)

    def fit(self, model, task: str, seed: int, epochs: int) -> None:
        """Trains; with verbose=1 one progress bar for the whole run (an epoch a
        step), with 2 Keras's line per epoch."""
        x, _, y, _ = self.tasks[task]
        callbacks = [_run_progress(epochs)] if self.verbose == 1 else []
        model.fit(self.batches(x, y, seed), epochs=epochs, verbose=2 if self.verbose == 2 else 0,
                  shuffle=False, callbacks=callbacks)

    def adam(self):
        import keras

        return keras.optimizers.Adam(self.config.learning_rate)

    def accuracy(self, model, task: str) -> float:
        _, x_test, _, y_test = self.tasks[task]
        return task_accuracy(model, x_test, y_test, TASK_A if task == "A" else TASK_B)

    def say(self, text: str) -> None:
        _say(self.verbose, text)


def run(
    config: DemoConfig | None = None,
    *,
    out: str | None = "masked_opt_demo.png",
    verbose: int = 1,
) -> DemoResult:
    """Runs the demo; returns the numbers (and writes the PNG when `out` is set)."""
    _require_extras()
    config = config or DemoConfig()
    start = time.perf_counter()
    r = _Run(config, verbose, load_tasks(config.seed))
    xa, xa_test = r.tasks["A"][:2]
    r.say(f"== Task A: pretraining a {64}-{'-'.join(map(str, config.hidden))}-10 MLP "
          f"on digits 0-4 ({len(xa)} train / {len(xa_test)} test)")
    model = _build_model(config)
    _compile(model, r.adam())
    r.fit(model, "A", config.seed, config.pretrain_epochs)
    pretrained = model.get_weights()
    acc_pre = r.accuracy(model, "A")
    r.say(f"   task A test accuracy: {acc_pre:.3f}")
    results = [_full_fine_tuning(r, model, acc_pre)]
    model.set_weights(pretrained)
    results.append(_fisher_freeze(r, model, acc_pre))
    model.set_weights(pretrained)
    results.append(_packnet(r, model))
    png = plot(results, out) if out else None
    return DemoResult(acc_pre, results, png, time.perf_counter() - start)


def _full_fine_tuning(r: _Run, model, acc_pre: float) -> MethodResult:
    r.say("\n== (a) full fine-tuning on digits 5-9")
    _compile(model, r.adam())
    r.fit(model, "B", r.config.seed + 10, r.config.task_b_epochs)
    return MethodResult("(a) full fine-tuning", acc_pre, r.accuracy(model, "A"), r.accuracy(model, "B"), 0.0, None)


def _fisher_freeze(r: _Run, model, acc_pre: float) -> MethodResult:
    """Freezes the weights with the largest Fisher information for task A."""
    from masked_opt import masks as mask_builders
    from masked_opt.optimizer import MaskedOptimizer

    r.say(f"\n== (b) freezing the {r.config.fisher_frozen:.0%} of weights with the "
          "largest Fisher information for task A, training the rest on 5-9")
    xa, _, ya, _ = r.tasks["A"]
    important = mask_builders.fisher(model, (xa, ya), fraction=r.config.fisher_frozen, verbose=r.verbose)
    masks_b = {path: ~top for path, top in important.items()}  # True = trainable
    opt_b = MaskedOptimizer(r.adam(), masks=masks_b)
    _compile(model, opt_b)
    before = _weights(model)
    r.fit(model, "B", r.config.seed + 10, r.config.task_b_epochs)
    r.say(_mask_table(opt_b))
    return MethodResult(
        "(b) Fisher freeze", acc_pre, r.accuracy(model, "A"), r.accuracy(model, "B"),
        _frozen_share(model, masks_b), _frozen_unchanged(before, _weights(model), masks_b), masks_b,
    )


def _packnet(r: _Run, model) -> MethodResult:
    """PackNet: prune A, retrain A, freeze the survivors, train B on the freed weights."""
    from masked_opt.optimizer import MaskedOptimizer
    from masked_opt.pruning import prunable_masks, prune_variable

    config = r.config
    r.say(f"\n== (c) PackNet: pruning {config.packnet_sparsity:.0%} of each kernel by "
          "magnitude, retraining task A on the survivors")
    opt = MaskedOptimizer(r.adam(), masks=prunable_masks(".*kernel"))
    _compile(model, opt)
    opt.build(model.trainable_variables)
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    freed = {v.path: prune_variable(opt, v, config.packnet_sparsity) for v in kernels}
    r.fit(model, "A", config.seed + 3, config.packnet_retrain_epochs)
    acc_a_packnet = r.accuracy(model, "A")
    r.say(f"   task A test accuracy after pruning + retraining: {acc_a_packnet:.3f}")
    r.say("   freezing A's surviving weights and all biases; training 5-9 on the freed weights")
    masks_c = {v.path: (freed[v.path] if v.path in freed else np.zeros(tuple(v.shape), bool))
               for v in model.trainable_variables}
    opt_c = MaskedOptimizer(r.adam(), masks=masks_c)
    _compile(model, opt_c)
    before = _weights(model)
    r.fit(model, "B", config.seed + 10, config.task_b_epochs)
    r.say(_mask_table(opt_c))
    after = _weights(model)
    acc_b_packnet = r.accuracy(model, "B")
    for v in kernels:  # A's inference uses A's weights only: B's are masked out.
        v.assign(np.where(freed[v.path], 0.0, after[v.path]).astype(after[v.path].dtype))
    acc_a_after = r.accuracy(model, "A")
    for v in kernels:
        v.assign(after[v.path])
    return MethodResult(
        "(c) PackNet", acc_a_packnet, acc_a_after, acc_b_packnet,
        _frozen_share(model, masks_c), _frozen_unchanged(before, after, masks_c), masks_c,
    )


def format_table(result: DemoResult) -> str:
    """The results as a fixed-width text table."""
    header = ("method", "A before", "A after", "forgetting", "B", "frozen", "frozen weights unchanged")
    rows = [header]
    for m in result.methods:
        unchanged = "n/a (none frozen)" if m.frozen_unchanged is None else (
            "yes" if m.frozen_unchanged else "NO")
        rows.append((
            m.name, f"{m.acc_a_before:.3f}", f"{m.acc_a_after:.3f}", f"{m.forgetting:+.3f}",
            f"{m.acc_b:.3f}", f"{m.frozen_fraction:.1%}", unchanged,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])]
        lines.append("  ".join(cells + [r[-1]]))
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def figure(methods: list[MethodResult]):
    """The masks of (b) and (c) and the accuracy bars, as a matplotlib `Figure`
    (Agg canvas, no pyplot). Both keys sit above the panels, outside them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    masked = [m for m in methods if m.masks]
    kernel_paths = [p for p in masked[0].masks if p.endswith("kernel")]
    fig = Figure(figsize=(3.2 * len(kernel_paths) + 4.5, 2.9 * len(masked) + 0.9),
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(masked), len(kernel_paths) + 1, width_ratios=[1] * len(kernel_paths) + [1.6])
    cmap = "Blues"
    for i, m in enumerate(masked):
        for j, p in enumerate(kernel_paths):
            ax = fig.add_subplot(grid[i, j])
            mask = m.masks[p]
            ax.imshow(mask, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_title(f"{m.name}\n{p.split('/', 1)[-1]} {mask.shape}: "
                         f"{1 - mask.mean():.0%} frozen", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    blues = fig.axes[0].images[0].cmap
    fig.legend(handles=[Patch(color=blues(1.0), label="trained on B"),
                        Patch(facecolor=blues(0.0), edgecolor="gray", label="frozen")],
               loc="outside upper left", ncol=2, fontsize=8, title="masks (kernels)",
               title_fontsize=8, frameon=False)
    ax = fig.add_subplot(grid[:, -1])
    x = np.arange(len(methods))
    w = 0.27
    bars = [("A before B", [m.acc_a_before for m in methods], "#9ecae1"),
            ("A after B", [m.acc_a_after for m in methods], "#3182bd"),
            ("B", [m.acc_b for m in methods], "#fd8d3c")]
    for k, (label, values, color) in enumerate(bars):
        container = ax.bar(x + (k - 1) * w, values, w, label=label, color=color)
        ax.bar_label(container, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, [f"{m.name}\nforgetting {m.forgetting:+.3f}".replace(" ", "\n", 1)
                      for m in methods], fontsize=8)
    ax.set_ylim(0, 1.18)  # room for the value labels above 1.0
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test accuracy (task-aware)")
    ax.set_title("digits: A = 0-4, then B = 5-9", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncol=3, fontsize=8, frameon=False)
    return fig


def plot(methods: list[MethodResult], path: str) -> str:
    """Writes `figure(methods)` to a PNG at `path`; returns it."""
    figure(methods).savefig(path, format="png", dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    """The `demo` command line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m masked_opt demo",
        description=(
            "Continual learning on scikit-learn's digits with exact freezing: learn "
            "digits 0-4, then 5-9 by (a) full fine-tuning, (b) freezing the Fisher-top "
            "weights of 0-4, (c) PackNet (prune, freeze survivors, train on freed weights). "
            f"Needs the 'demo' extra: {DEMO_EXTRA_HINT}."
        ),
    )
    parser.add_argument("--out", default="masked_opt_demo.png",
                        help="where to write the PNG (default: %(default)s); '' for none")
    parser.add_argument("--quick", action="store_true", help="a reduced run (fewer epochs)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs on task B (default: 10, or 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                        help="progress: 0 silent, 1 one bar per training run (default), 2 one line per epoch")
    args = parser.parse_args(argv)
    try:
        _require_extras()
    except ImportError as e:
        parser.exit(2, f"error: {e}\n")
    config = DemoConfig.quick() if args.quick else DemoConfig()
    changes: dict[str, Any] = {"seed": args.seed}
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        changes["task_b_epochs"] = args.epochs
    config = DemoConfig(**{**config.__dict__, **changes})
    result = run(config, out=args.out or None, verbose=args.verbose)
    print()
    print(format_table(result))
    print()
    print(f"task A accuracy after pretraining: {result.acc_a_pretrained:.3f}; accuracies are "
          "on held-out test digits, argmax over the task's own 5 classes.")
    print("forgetting = A before - A after. (c) evaluates A on A's weights only (PackNet inference).")
    if result.png:
        print(f"wrote {os.path.abspath(result.png)}")
    print(f"done in {result.seconds:.1f} s")
    return 0
