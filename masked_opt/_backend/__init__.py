"""Backend-specific code: one module per Keras backend, one interface.

`common` holds the `keras.ops` implementation of every function in
`INTERFACE`; `tensorflow`, `jax` and `torch` start from it and replace what
their backend does differently (TensorFlow: sparse `IndexedSlices`
gradients, XLA compilation of the masked update, `tf.distribute`-aware
restores; JAX: the trainer's detached state, bitwise masking inside XLA;
torch: in-place scatters; each: per-example gradients for Fisher scores).
This package is the only place in masked_opt that asks which backend is
active; everything else calls the functions re-exported here.

No backend uses a stateful conditional: JAX's trainer runs `stateless_apply`
inside `jax.jit`, where a `cond` whose branches assign variables leaks
tracers; on torch a `cond` is a Python `if` (a host sync each step, a graph
break under torch.compile); on TensorFlow it traces the update twice.
"""

from __future__ import annotations

import keras

from masked_opt._backend import common

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from masked_opt._backend import tensorflow as _impl
elif BACKEND == "jax":
    from masked_opt._backend import jax as _impl
elif BACKEND == "torch":
    from masked_opt._backend import torch as _impl
else:  # numpy, openvino: the keras.ops defaults
    _impl = common

INTERFACE = (
    "RowSnapshot",
    "blend",
    "can_inspect_frames",
    "can_jit",
    "check_jit_compile",
    "check_strategy_support",
    "counts_in_trace",
    "densify",
    "distributed",
    "frozen_guard",
    "if_frozen",
    "in_traced_function",
    "is_compiling",
    "is_purged",
    "is_sparse",
    "jit_compile_from_config",
    "jit_function",
    "loss_gradients",
    "mask_gradient",
    "moves_only_gradient_rows",
    "no_autograph",
    "no_snapshot",
    "pack_bits",
    "packs_mask",
    "release_grad",
    "requires_grad",
    "restore_frozen",
    "scatter_flat",
    "select",
    "skip_in_backward",
    "snapshot",
    "squared_grad_sums",
    "state_scope",
    "step_mask",
    "step_while_detached",
    "sync_model",
    "to_numpy",
    "traced_into_xla",
    "unpack_bits",
    "unsynced_model",
)
"""What every backend provides: the active backend's module where it defines
the name, else `common`'s `keras.ops` implementation."""


def _pick(name: str):
    return getattr(_impl, name, getattr(common, name))


RowSnapshot = _pick("RowSnapshot")
blend = _pick("blend")
can_jit = _pick("can_jit")
check_jit_compile = _pick("check_jit_compile")
can_inspect_frames = _pick("can_inspect_frames")
check_strategy_support = _pick("check_strategy_support")
counts_in_trace = _pick("counts_in_trace")
densify = _pick("densify")
distributed = _pick("distributed")
frozen_guard = _pick("frozen_guard")
if_frozen = _pick("if_frozen")
in_traced_function = _pick("in_traced_function")
is_compiling = _pick("is_compiling")
is_purged = _pick("is_purged")
is_sparse = _pick("is_sparse")
jit_compile_from_config = _pick("jit_compile_from_config")
jit_function = _pick("jit_function")
loss_gradients = _pick("loss_gradients")
mask_gradient = _pick("mask_gradient")
moves_only_gradient_rows = _pick("moves_only_gradient_rows")
no_autograph = _pick("no_autograph")
no_snapshot = _pick("no_snapshot")
pack_bits = _pick("pack_bits")
packs_mask = _pick("packs_mask")
release_grad = _pick("release_grad")
requires_grad = _pick("requires_grad")
restore_frozen = _pick("restore_frozen")
scatter_flat = _pick("scatter_flat")
select = _pick("select")
skip_in_backward = _pick("skip_in_backward")
snapshot = _pick("snapshot")
squared_grad_sums = _pick("squared_grad_sums")
state_scope = _pick("state_scope")
step_mask = _pick("step_mask")
step_while_detached = _pick("step_while_detached")
sync_model = _pick("sync_model")
to_numpy = _pick("to_numpy")
traced_into_xla = _pick("traced_into_xla")
unpack_bits = _pick("unpack_bits")
unsynced_model = _pick("unsynced_model")


def runs_eagerly(x) -> bool:
    """Whether the update reading `x` runs op by op (no trace that later calls
    replay), so a host-side flag may decide what it does."""
    return not (in_traced_function() or is_compiling(x))
