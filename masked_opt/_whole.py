"""Wholly frozen variables: left out of the steps Keras's trainer runs.

A variable whose mask is stored as a scalar False (`masks={"backbone":
False}`, `freeze("layer")`) is *wholly frozen*. A step that the owner model's
`train_step` runs (`fit`, `train_on_batch`, a custom `train_step`) leaves it
out: no gradient masking, no inner update, no snapshot or restore, and
nothing reads the trainer's gradient of it, so XLA (JAX, TF) and
TensorFlow's graph pruning drop its computation and the backward pass only
it needs. Its optimizer state is held meanwhile. The table bakes the set into
such steps; `_values` rebuilds the owner's train function when an edit
changes it (one retrace), and gives a variable that leaves the set a fresh
optimizer state, so `fit` and a custom loop (which keeps the masked path and
needs no retrace) continue identically. Masks stored at any other shape
(element, row, column masks) keep the masked path even when all False: their
edits never retrace.
"""

from __future__ import annotations

from typing import Any

import keras

from masked_opt import _backend, _inner
from masked_opt._owner import Owner
from masked_opt._table import VariableTable


def leave_out(table: VariableTable, owner: Owner, inner: Any, grads: list, variables: list) -> tuple[list, list]:
    """(grads, variables) for the step: without the wholly frozen variables
    in a step of the owner's `train_step`; unchanged elsewhere. With an EMA or
    a MultiOptimizer inner (whose bookkeeping covers every variable) a traced
    step gives them a zero gradient instead, what masking gives."""
    at = table.wholly_frozen_at(grads, variables)
    if not at or _dynamo_traces(grads[at[0]]) or not owner.in_train_step():
        return grads, variables
    if _inner.uses_ema(inner) or len(_inner.leaf_optimizers(inner)) > 1:
        if _backend.runs_eagerly(grads[at[0]]):
            return grads, variables  # computed already: the masked path
        grads = list(grads)
        for i in at:
            grads[i] = keras.ops.zeros(tuple(variables[i].shape), dtype=keras.backend.standardize_dtype(grads[i].dtype))
        return grads, variables
    keep = sorted(set(range(len(grads))) - set(at))
    if not any(grads[i] is not None for i in keep):
        return grads, variables  # nothing else to update: the masked path keeps the step count
    return [grads[i] for i in keep], [variables[i] for i in keep]


def _dynamo_traces(x: Any) -> bool:
    """Whether torch.compile traces the step: its frame walk would break the
    graph, and torch's backward has computed the gradient already."""
    return keras.backend.backend() == "torch" and _backend.is_compiling(x)
