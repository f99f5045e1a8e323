"""What `MaskedOptimizer.inspect()` returns: `OptimizerInfo` and its `VariableInfo` rows.

`OptimizerInfo` is a read-only view of the optimizer's bookkeeping, with a
`VariableInfo` row per masked or multiplied variable; both are exported as
`masked_opt.OptimizerInfo` and `masked_opt.VariableInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariableInfo:
    """What a `MaskedOptimizer` keeps for one variable (see `inspect()`)."""

    path: str
    shape: tuple[int, ...]
    mask_shape: tuple[int, ...] | None  # the mask's storage shape, None: no mask
    multiplier_shape: tuple[int, ...] | None  # None: no multiplier
    compact_capacity: int | None  # compact_state: elements its state can hold
    packed_mask: bool  # a bit-packed copy of the mask is read by compiled steps


@dataclass(frozen=True)
class OptimizerInfo:
    """A read-only view of a `MaskedOptimizer`'s bookkeeping (see `inspect()`).

    `update_traces` counts the Python executions of the masked update (one
    per trace in a TensorFlow or JAX compiled step, one per call in eager
    mode; torch.compile's traces are not counted);
    `xla_functions` the masked updates compiled by `jit_compile` on
    TensorFlow; `last_update_compiled` whether the last of those executions
    was traced into a compiled program (XLA, or torch.compile), None before
    the first.
    """

    built: bool
    compact_state: bool
    variables: tuple[VariableInfo, ...]  # masked or multiplied, in build order
    update_traces: int
    xla_functions: int
    last_update_compiled: bool | None

    def variable(self, path: str) -> VariableInfo:
        """The row of the variable whose path is (or ends with "/") `path`."""
        hits = [v for v in self.variables if v.path == path or v.path.endswith("/" + path)]
        if len(hits) != 1:
            known = [v.path for v in self.variables]
            raise KeyError(f"{path!r} selects {len(hits)} of the optimizer's variables {known}")
        return hits[0]
