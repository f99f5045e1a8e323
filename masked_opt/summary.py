"""Inspecting masks: what each variable trains, as counts, tables and plots.

* `mask_summary(optimizer)` -> `MaskSummary` (per-variable `MaskRow`s and
  totals); `print_mask_summary` formats it PEFT-style. `masked_only=True`
  keeps the rows with a frozen element, `by="layer"` gives one row per layer.
* `plot_masks(optimizer, path)` writes one heatmap per masked variable to a
  PNG (needs the `plot` extra: `pip install "masked_opt[plot]"`).

Checks that frozen elements stay put (`snapshot_frozen`, `verify_frozen`,
`VerifyFrozen`) live in `masked_opt.verify`.

Every function takes a built `MaskedOptimizer`, or a `LossScaleOptimizer`
wrapping one (as `model.compile` makes under a "mixed_float16" policy).
They work on TensorFlow, JAX and torch. Masks are read with `get_mask`,
which on JAX, during `fit`, first syncs the trainer's state into the
variables once the optimizer has run a step, so these can be called from any
callback, also between batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

import keras

from masked_opt.optimizer import MaskedOptimizer, unwrap

__all__ = [
    "MaskRow",
    "MaskSummary",
    "format_mask_summary",
    "mask_summary",
    "plot_masks",
    "print_mask_summary",
]

PLOT_EXTRA_HINT = 'pip install "masked_opt[plot]"'


def _built_variables(optimizer: MaskedOptimizer) -> list[keras.Variable]:
    return optimizer.built_variables


def _masked(optimizer: MaskedOptimizer) -> list[keras.Variable]:
    return list(optimizer.masked_variables)


def _is_in(variable: keras.Variable, variables: list[keras.Variable]) -> bool:
    return any(variable is v for v in variables)


# -------------------------------------------------------------------- summary


@dataclass(frozen=True)
class MaskRow:
    """One variable (or, in a per-layer summary, one layer): element counts
    under its mask (unmasked: all trainable).

    In a per-layer summary (`by="layer"`) `path` is the layer's path (the
    variable paths without their last part), `shape` is None and `variables`
    counts the layer's variables the optimizer was built on. `multiplier` is
    the (min, max) update multiplier over the row's elements when the
    optimizer has multipliers, else None.
    """

    path: str
    shape: tuple[int, ...] | None
    trainable: int
    frozen: int
    trainable_pct: float
    masked: bool
    variables: int = 1
    multiplier: tuple[float, float] | None = None

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


SummaryBy = Literal["variable", "layer"]
"""What one row of a `MaskSummary` counts: a variable, or a layer's variables together."""


@dataclass(frozen=True)
class MaskSummary:
    """Rows and totals over every variable the optimizer was built on.

    The totals always count every variable; `rows` may leave some out
    (`masked_only=True`): `hidden` says how many rows were left out.
    """

    rows: tuple[MaskRow, ...]
    trainable: int
    frozen: int
    total: int
    trainable_pct: float
    by: SummaryBy = "variable"
    masked_only: bool = False
    hidden: int = 0


def _pct(part: int, total: int) -> float:
    return 100.0 * part / total if total else 0.0


def _multipliers(opt: MaskedOptimizer) -> list[keras.Variable]:
    # Update multipliers (`opt.get_multiplier`), when this MaskedOptimizer has them.
    return list(getattr(opt, "multiplied_variables", None) or ())


def _layer_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def _by_layer(rows: list[MaskRow]) -> list[MaskRow]:
    groups: dict[str, list[MaskRow]] = {}
    for r in rows:  # in order of first appearance
        groups.setdefault(_layer_path(r.path), []).append(r)
    out = []
    for path, group in groups.items():
        trainable = sum(r.trainable for r in group)
        total = sum(r.total for r in group)
        mults = [r.multiplier for r in group if r.multiplier is not None]
        out.append(
            MaskRow(
                path=path,
                shape=None,
                trainable=trainable,
                frozen=total - trainable,
                trainable_pct=_pct(trainable, total),
                masked=any(r.masked for r in group),
                variables=len(group),
                multiplier=(min(m[0] for m in mults), max(m[1] for m in mults)) if mults else None,
            )
        )
    return out


def mask_summary(
    optimizer: keras.optimizers.Optimizer,
    *,
    masked_only: bool = False,
    by: SummaryBy = "variable",
) -> MaskSummary:
    """Counts trainable and frozen elements per variable (or per layer) and in total.

    Args:
        optimizer: a built `MaskedOptimizer` (or a `LossScaleOptimizer` wrapping one).
        masked_only: keep only the rows with at least one frozen element or
            an update multiplier other than 1 (the totals still count every
            variable).
        by: `"variable"` (default): one row per variable; `"layer"`: one row
            per layer, summing its variables (a layer is a variable's path
            without its last part, e.g. `"sequential/dense_1"`).
    """
    if by not in ("variable", "layer"):
        raise ValueError(
            f'`mask_summary`: `by` must be "variable" or "layer". Received: by={by!r}.'
        )
    if not isinstance(masked_only, bool):
        raise TypeError(
            f"`mask_summary`: `masked_only` must be a bool. Received: {masked_only!r}."
        )
    opt = unwrap(optimizer, caller="mask_summary")
    masked = _masked(opt)
    multiplied = _multipliers(opt)
    rows = []
    for variable in _built_variables(opt):
        shape = tuple(int(d) for d in variable.shape)
        size = math.prod(shape)
        is_masked = _is_in(variable, masked)
        trainable = int(np.count_nonzero(opt.get_mask(variable))) if is_masked else size
        multiplier = None
        if multiplied:
            m = np.asarray(opt.get_multiplier(variable)) if _is_in(variable, multiplied) else None
            multiplier = (float(m.min()), float(m.max())) if m is not None and m.size else (1.0, 1.0)
        rows.append(
            MaskRow(
                path=variable.path,
                shape=shape,
                trainable=trainable,
                frozen=size - trainable,
                trainable_pct=_pct(trainable, size),
                masked=is_masked,
                multiplier=multiplier,
            )
        )
    trainable = sum(r.trainable for r in rows)
    total = sum(r.total for r in rows)
    if by == "layer":
        rows = _by_layer(rows)
    shown = [r for r in rows if _constrained(r)] if masked_only else rows
    return MaskSummary(
        rows=tuple(shown),
        trainable=trainable,
        frozen=total - trainable,
        total=total,
        trainable_pct=_pct(trainable, total),
        by=by,
        masked_only=masked_only,
        hidden=len(rows) - len(shown),
    )


def _constrained(row: MaskRow) -> bool:
    """A frozen element, or an update multiplier other than 1 somewhere."""
    return bool(row.frozen) or (row.multiplier is not None and row.multiplier != (1.0, 1.0))


def _format_multiplier(multiplier: tuple[float, float] | None) -> str:
    if multiplier is None:
        return "-"
    low, high = multiplier
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def format_mask_summary(summary: MaskSummary) -> str:
    """A table of rows (unmasked variables marked '-') and the PEFT-style total line.

    A per-layer summary has a `layer` and a `variables` column instead of
    `variable` and `shape`; a summary whose optimizer has update multipliers
    gets a `mult` column (the value, or min–max where it varies). With
    `masked_only`, a line before the totals says how many rows are shown.
    """
    per_layer = summary.by == "layer"
    with_mult = any(r.multiplier is not None for r in summary.rows)
    header = ("layer", "variables") if per_layer else ("variable", "shape")
    header += ("mask", "trainable", "frozen", "trainable%") + (("mult",) if with_mult else ())
    lines = [
        (
            r.path,
            str(r.variables) if per_layer else str(r.shape),
            "yes" if r.masked else "-",
            f"{r.trainable:,}",
            f"{r.frozen:,}",
            f"{r.trainable_pct:.2f}",
        )
        + ((_format_multiplier(r.multiplier),) if with_mult else ())
        for r in summary.rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    left = (True, not per_layer, True, False, False, False, False)

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)
        ).rstrip()

    rule = "-" * len(fmt(header))
    footer = []
    if summary.masked_only:
        shown = len(summary.rows)
        kind = "layers" if per_layer else "variables"
        which = "a frozen element or a multiplier other than 1" if with_mult else "a frozen element"
        footer.append(f"{shown:,} of {shown + summary.hidden:,} {kind} shown (those with {which})")
    total = (
        f"trainable: {summary.trainable:,} || frozen: {summary.frozen:,} || "
        f"total: {summary.total:,} || trainable%: {summary.trainable_pct:.2f}"
    )
    return "\n".join([fmt(header), rule, *map(fmt, lines), rule, *footer, total])


def print_mask_summary(
    optimizer_or_summary: keras.optimizers.Optimizer | MaskSummary,
    print_fn: Callable[[str], Any] = print,
    *,
    masked_only: bool = False,
    by: SummaryBy = "variable",
) -> None:
    """Prints the table and `trainable: ... || frozen: ... || total: ... || trainable%: ...`.

    `masked_only` and `by` are `mask_summary`'s: e.g.
    `print_mask_summary(opt, masked_only=True, by="layer")` prints one row
    per layer that has a frozen element. Given a `MaskSummary`, prints it as
    it is (make it with those arguments instead).
    """
    summary = optimizer_or_summary
    if isinstance(summary, MaskSummary):
        if masked_only or by != "variable":
            raise ValueError(
                "`print_mask_summary`: `masked_only` and `by` apply when it is "
                "given an optimizer; a MaskSummary is printed as it is. Pass the "
                "optimizer, or make the summary with "
                f"`mask_summary(optimizer, masked_only={masked_only}, by={by!r})`."
            )
    else:
        summary = mask_summary(summary, masked_only=masked_only, by=by)
    print_fn(format_mask_summary(summary))


# ----------------------------------------------------------------------- plot


def _require_matplotlib() -> tuple[Any, Any, Any]:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(
            f"`plot_masks` needs matplotlib, an optional extra: {PLOT_EXTRA_HINT}."
        ) from e
    return Figure, FigureCanvasAgg, MaxNLocator


def as_2d(mask: np.ndarray) -> np.ndarray:
    """The 2-D view a heatmap shows: a scalar as (1, 1), a vector as one row,
    rank > 2 as (product of all axes but the last, last axis), so columns are
    always the last axis (the output units of a Dense or Conv kernel)."""
    if mask.ndim == 0:
        return mask.reshape(1, 1)
    if mask.ndim == 1:
        return mask.reshape(1, -1)
    return mask.reshape(-1, mask.shape[-1])


def _downsample(grid: np.ndarray, max_side: int) -> np.ndarray:
    """Block means (the trainable share per block) so no side exceeds `max_side`."""
    out = grid.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        if n <= max_side:
            continue
        f = math.ceil(n / max_side)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, (-n) % f)
        out = np.pad(out, pad, constant_values=np.nan)
        shape = list(out.shape)
        shape[axis : axis + 1] = [shape[axis] // f, f]
        out = np.nanmean(out.reshape(shape), axis=axis + 1)
    return out


def plot_masks(
    optimizer: keras.optimizers.Optimizer,
    path: str,
    *,
    max_side: int = 512,
    dpi: int = 100,
) -> str:
    """Writes a PNG with one heatmap per masked variable to `path`; returns it.

    Dark = trainable, light = frozen. Variables of rank > 2 are shown as
    (product of leading axes, last axis) (see `as_2d`); a side longer than
    `max_side` is averaged in blocks, so a cell shows the trainable share.
    Renders with the Agg backend without touching pyplot's global state.
    Needs matplotlib: `pip install "masked_opt[plot]"`.
    """
    Figure, FigureCanvasAgg, MaxNLocator = _require_matplotlib()
    opt = unwrap(optimizer, caller="plot_masks")
    masked = _masked(opt)
    if not masked:
        raise ValueError(
            f"`plot_masks`: optimizer '{opt.name}' has no masked variables; nothing to plot."
        )
    ncols = min(3, len(masked))
    nrows = math.ceil(len(masked) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    for i, variable in enumerate(masked):
        mask = opt.get_mask(variable)
        ax = fig.add_subplot(nrows, ncols, i + 1)
        grid = as_2d(mask)
        n_rows, n_cols = grid.shape
        image = ax.imshow(
            _downsample(grid, max_side),
            cmap="Blues",
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, n_cols - 0.5, n_rows - 0.5, -0.5),  # element indices
        )
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if mask.ndim < 2:
            ax.set_yticks([])
        pct = _pct(int(np.count_nonzero(mask)), mask.size)
        ax.set_title(f"{variable.path}\n{tuple(mask.shape)}  trainable {pct:.2f}%", fontsize=9)
        ax.set_xlabel("last axis")
        if mask.ndim >= 2:
            ax.set_ylabel("leading axes (flattened)" if mask.ndim > 2 else "first axis")
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="trainable share")
    fig.savefig(path, format="png")
    return path
