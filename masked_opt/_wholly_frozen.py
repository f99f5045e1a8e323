"""Wholly frozen variables: left out of the steps Keras's trainer runs.

A variable whose mask is stored as a scalar False (`masks={"backbone":
False}`, `freeze("layer")`) is *wholly frozen*. A step that the owner model's
`train_step` runs (`fit`, `train_on_batch`, a custom `train_step`) leaves it
out: no gradient masking, no inner update, no snapshot or restore, and
nothing reads the trainer's gradient of it, so XLA (JAX, TF) and
TensorFlow's graph pruning drop its computation and the backward pass only
it needs. Its optimizer state is held meanwhile. The table bakes the set into
such steps; `_mask_store` rebuilds the owner's train function when an edit
changes it (one retrace), and gives a variable that leaves the set a fresh
optimizer state, so `fit` and a custom loop (which keeps the masked path and
needs no retrace) continue identically. Masks stored at any other shape
(element, row, column masks) keep the masked path even when all False: their
edits never retrace.
"""

from __future__ import annotations

from typing import Any

import keras

from masked_opt import _backend, _inner_optimizer
from masked_opt._owner_model import Owner
from masked_opt._variable_table import VariableTable


def leave_out(table: VariableTable, owner: Owner, inner: Any, grads: list, variables: list) -> tuple[list, list]:
    """(grads, variables) for the step: without the wholly frozen variables
    in a step of the owner's `train_step`; unchanged elsewhere. With an EMA or
    a MultiOptimizer inner (whose bookkeeping covers every variable) a traced
    step gives them a zero gradient instead, what masking gives. Wholly
    frozen variables given a None gradient (a custom loop that differentiated
    only `trained_variables`) are left out quietly in any step."""
    _check_not_stale(table, grads, variables)
    grads, variables = _without_absent(table, grads, variables)
    at = table.wholly_frozen_at(grads, variables)
    if not at or not _backend.can_inspect_frames(grads[at[0]]) or not owner.in_train_step():
        return grads, variables
    if _inner_optimizer.uses_ema(inner) or len(_inner_optimizer.leaf_optimizers(inner)) > 1:
        if _backend.runs_eagerly(grads[at[0]]):
            return grads, variables  # computed already: the masked path
        grads = list(grads)
        for i in at:
            grads[i] = keras.ops.zeros(tuple(variables[i].shape), dtype=keras.backend.standardize_dtype(grads[i].dtype))
        return grads, variables
    keep = sorted(set(range(len(grads))) - set(at))
    if not any(grads[i] is not None for i in keep):
        return grads, variables  # nothing else to update: the masked path keeps the step count
    if owner.rewrap is not None and _backend.runs_eagerly(grads[at[0]]):
        owner.rewrap()  # a train function rebuilt without the wrapper (a recompile): install it again
    return [grads[i] for i in keep], [variables[i] for i in keep]


class _Frozen:
    """The wholly frozen ones of a step's variables while another of them
    trains (else none: a backward pass needs something to differentiate)."""

    def __init__(self, table: VariableTable, variables: list):
        self._table, self._variables = table, list(variables)
        self._seen: Any = None
        self._frozen: list = []

    def __call__(self) -> list:
        if self._seen is not self._table.wholly_frozen:
            self._seen = self._table.wholly_frozen
            key = self._table.key
            self._frozen = [v for v in self._variables if key(v) in self._seen]
            if len(self._frozen) == sum(v.trainable for v in self._variables):
                self._frozen = []
        return self._frozen


def skip_in_backward(table: VariableTable, owner: Owner, inner: Any, variables: list) -> None:
    """Has the owner's eager trainer (torch) leave the wholly frozen variables
    out of autograd from its next step on; called at build (so the first step
    saves too); `Owner.rewrap` installs it again after every rebuild of the
    train function, and from an eager step that still finds some."""
    if _inner_optimizer.uses_ema(inner) or len(_inner_optimizer.leaf_optimizers(inner)) > 1:
        return
    frozen = _Frozen(table, variables)
    owner.rewrap = lambda: _backend.skip_in_backward(owner.model(), frozen)  # after each retrace too
    if table.wholly_frozen:
        owner.rewrap()


def trained(table: VariableTable, variables: list) -> list:
    """`variables` without the wholly frozen ones, in their order; remembers
    what it left out, so a step after an edit that unfroze one of them, given
    the old list, raises instead of silently not training it."""
    table.handed_out = {table.key(v): v.path for v in variables if table.key(v) in table.wholly_frozen}
    return [v for v in variables if table.key(v) not in table.wholly_frozen]


def _check_not_stale(table: VariableTable, grads: list, variables: list) -> None:
    unfrozen = set(table.handed_out) - table.wholly_frozen
    if not unfrozen:
        return
    given = {table.key(v) for g, v in zip(grads, variables) if g is not None}
    if not given:
        return
    missing = sorted(table.handed_out[k] for k in unfrozen if k not in given)
    if missing:
        raise ValueError(
            f"Variables {missing} were made trainable after `trained_variables()` left them out, and this "
            "step has no gradient for them: call `optimizer.trained_variables(...)` again and differentiate "
            "what it returns (rebuild a compiled step that captured the old list)."
        )
    table.handed_out = {k: p for k, p in table.handed_out.items() if k not in unfrozen}


def _without_absent(table: VariableTable, grads: list, variables: list) -> tuple[list, list]:
    if not table.wholly_frozen or all(g is not None for g in grads):
        return grads, variables
    keep = [i for i, (g, v) in enumerate(zip(grads, variables)) if g is not None or table.key(v) not in table.wholly_frozen]
    if len(keep) == len(grads) or not any(grads[i] is not None for i in keep):
        return grads, variables  # nothing to give the inner optimizer: Keras's error or warning
    return [grads[i] for i in keep], [variables[i] for i in keep]

