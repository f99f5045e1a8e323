"""torch: in-place scatters for compact state, torch.compile detection, and
per-example gradients with `torch.func.vmap` (a per-example loop where it
cannot batch a layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch

from masked_opt._backend import common


def check_jit_compile(jit_compile: Any) -> None:
    common.check_jit_compile(
        jit_compile,
        "On torch use `model.compile(jit_compile=True)` (torch.compile), which "
        "compiles the masked update with the train step: drop the argument.",
    )


def is_compiling(x: Any) -> bool:
    """Whether torch.compile (dynamo) is tracing the update."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def can_inspect_frames(x: Any) -> bool:
    """Not while torch.compile traces: a frame walk breaks the graph (and
    torch's backward has computed every gradient already)."""
    return not is_compiling(x)


def counts_in_trace(x: Any) -> bool:
    """Not while torch.compile traces: dynamo guards on a Python int that the
    step changes, and would compile every graph twice."""
    return not is_compiling(x)


def skip_in_backward(model: Any, frozen: Callable[[], list]) -> None:
    """Wraps `model.train_function` (Keras's own `train_step` only: a custom
    one may read every gradient) so that each step runs with the parameters
    of the variables `frozen()` returns out of autograd, restored after the
    step: torch computes no gradient for them and no backward through what
    only they need, as with `trainable=False`, and their gradients reach the
    optimizer as None. `make_train_function(force=True)` (a recompile, a
    retrace) drops the wrapper; the next step installs it again."""
    if model is None or getattr(model, "jit_compile", False) or getattr(model, "steps_per_execution", 1) != 1:
        return  # torch.compile traces the step: left as it is
    if getattr(type(model), "train_step", None) is not keras.Model.train_step:
        return
    model.make_train_function()  # at build: the function `fit` calls next
    function = model.train_function
    if getattr(function, "skips_frozen", False):
        return

    def train_function(data: Any) -> Any:
        params = [v.value for v in frozen() if v.value.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return function(data)
        finally:
            for p in params:
                p.requires_grad_(True)

    train_function.skips_frozen = True
    model.train_function = train_function


# Eager masking is integer arithmetic on the same-width integer view of the
# floats: torch's CPU `where` is a scalar loop (~2 ns per element, 20x an
# `add`), while multiplying the bits by the mask as 0/1 integers and XOR are
# vectorised and as exact (a zeroed element is +0.0; NaN/inf bits are cleared
# like any others). The 0/1 integers are a temporary converted where they are
# used (an `int * bool` operand is a slow mixed-dtype loop). Each new tensor
# the size of a variable costs page faults on CPU (the allocator returns large
# blocks to the OS), so the restore works in the variable's own storage: the
# masked gradient and the snapshot are the new tensors held across the inner
# update. torch.compile gets the `where` forms.
_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _ints(dtype: Any) -> Any:
    return _SAME_WIDTH[torch.empty((), dtype=dtype).element_size()]


def _as(mask: Any, ints: Any) -> Any:
    return mask if mask.dtype == ints else mask.to(ints)


class FrozenAt:
    """A mask with few frozen elements, as their flat positions: the step
    masks, snapshots and restores just those (index ops)."""

    __slots__ = ("positions",)

    def __init__(self, positions: Any):
        self.positions = positions


ALL_TRAINABLE = FrozenAt(None)
"""A mask with no frozen element: the variable's update is the bare one."""

_FEW_FROZEN = 1 / 8
"""At most this fraction of elements frozen: `FrozenAt` (8-byte positions,
at most one byte per element, less than the bool mask)."""


def step_mask(mask: Any, variable: keras.Variable) -> Any:
    """The mask as this step's eager kernels read it. A full-shape mask is
    looked at on the host once per edit (torch counts in-place writes to a
    tensor: `_version`): with few frozen elements it is their positions
    (`FrozenAt`), with none `ALL_TRAINABLE`; otherwise, as any broadcast
    mask, the bool mask itself, which the gradient's masking and the restore
    each convert to 0/1 at the integer width of the variable's dtype: a
    temporary freed at once, not one held across the inner update for every
    variable (4 bytes per element at the step's peak, and fresh pages each
    step: benchmarks/README.md, "held int masks")."""
    value = variable.value
    if is_compiling(value) or not value.dtype.is_floating_point:
        return mask
    if tuple(mask.shape) != tuple(value.shape) or not value.is_contiguous():
        return mask
    cached = getattr(mask, "_masked_opt_form", None)
    if cached is None or cached[0] != mask._version:
        flat = mask.reshape(-1)
        frozen = flat.numel() - int(torch.count_nonzero(flat))
        if frozen == 0:
            form = ALL_TRAINABLE
        elif frozen <= flat.numel() * _FEW_FROZEN:
            form = FrozenAt(torch.nonzero(torch.logical_not(flat)).reshape(-1))
        else:
            form = None
        cached = mask._masked_opt_form = (mask._version, form)
    return mask if cached[1] is None else cached[1]


# torch.compile's CPU kernels read a bool tensor one element at a time (a
# scalar loop per vector of 16 floats: ~2 ns per element, 10x the fused Adam
# update it sits in). Compiled steps read a bit-packed copy instead, as int32
# words of 32 elements each (the bytes of `np.packbits(mask.ravel(),
# bitorder="little")`), unpacked by vector shifts at the bare update's cost
# (benchmarks/README.md, "torch.compile").
PACK_MIN_SIZE = 1 << 12


def packs_mask(variable_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """A full-shape mask of at least `PACK_MIN_SIZE` elements, a multiple of 32."""
    size = common.full_shape_size(variable_shape, mask_shape)
    return size >= PACK_MIN_SIZE and size % 32 == 0 and common.no_distribution()


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """The mask's elements in C order, 32 per int32 word (element 32j + i is
    bit i of word j)."""
    packed = np.packbits(np.asarray(mask, bool).reshape(-1), bitorder="little")
    return packed.view("<i4").astype(np.int32)


def unpack_bits(packed: Any, shape: tuple[int, ...]) -> Any:
    """The bool mask of `shape` that `pack_bits` packed (inside a compiled step)."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    return (torch.bitwise_and(torch.bitwise_right_shift(packed[:, None], shifts), 1) != 0).reshape(shape)


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    if isinstance(mask, FrozenAt):
        if mask is ALL_TRAINABLE:
            return grad
        return grad.reshape(-1).index_fill(0, mask.positions, 0).reshape(grad.shape)
    if is_compiling(grad) or not grad.dtype.is_floating_point:
        return common.mask_gradient(grad, mask, variable_shape)
    ints = _ints(grad.dtype)
    return torch.mul(grad.view(ints), _as(mask, ints)).view(grad.dtype)


def _where_into(out: Any, condition: Any, x: Any, y: Any) -> Any:
    """`out = where(condition, x, y)` on same-width integer views (`out` may
    be `x`): `out = x ^ y; out *= condition; out ^= y`, vectorised and exact,
    with `condition` 0/1 integers broadcastable to `out`."""
    return torch.bitwise_xor(x, y, out=out).mul_(condition).bitwise_xor_(y)


def _eager_floats(a: Any, b: Any) -> bool:
    """Two torch float tensors of one dtype and shape, outside torch.compile."""
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        and a.shape == b.shape and a.dtype.is_floating_point and not is_compiling(a)
    )


def select(condition: Any, x: Any, y: Any) -> Any:
    """`where(condition, x, y)`; eagerly, for float tensors of one dtype and
    shape and a condition broadcastable to it, on their integer views (the same
    bits, vectorised; `where` is the scalar loop)."""
    if not _eager_floats(x, y):
        return common.select(condition, x, y)
    with torch.no_grad():
        condition = torch.as_tensor(condition, device=x.device)
        if torch.broadcast_shapes(condition.shape, x.shape) != x.shape:
            return common.select(condition, x, y)
        ints = _ints(x.dtype)
        out = torch.empty_like(x)
        _where_into(out.view(ints), _as(condition, ints), x.view(ints), y.view(ints))
        return out


def blend(old: Any, current: Any, m: Any, moving: Any) -> Any:
    """`where(moving, old + m * (current - old), old)`; eagerly in one new
    tensor: the difference, scaled and added to in place (`out=` keeps each
    operation's operand order, so NaN payloads follow too), then selected on
    its integer view."""
    if not _eager_floats(old, current):
        return common.blend(old, current, m, moving)
    with torch.no_grad():
        m = torch.as_tensor(m, dtype=old.dtype, device=old.device)
        moving = torch.as_tensor(moving, device=old.device)
        if torch.broadcast_shapes(m.shape, moving.shape, old.shape) != old.shape:
            return common.blend(old, current, m, moving)
        out = torch.sub(current, old)
        torch.mul(m, out, out=out)
        torch.add(old, out, out=out)
        ints = _ints(old.dtype)
        _where_into(out.view(ints), _as(moving, ints), out.view(ints), old.view(ints))
        return out


def snapshot(variable: keras.Variable, grad: Any = None, opt: Any = None, mask: Any = None) -> Any:
    """What the restore needs: the frozen elements' values for `FrozenAt`,
    nothing for `ALL_TRAINABLE`, else a copy of the variable's value."""
    if isinstance(mask, FrozenAt):
        if mask is ALL_TRAINABLE:
            return None
        return variable.value.reshape(-1).index_select(0, mask.positions)
    return common.snapshot(variable)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """`variable = where(mask, variable, old)`, in the variable's own storage
    (`_where_into` on the integer views), no new tensor; for `FrozenAt`,
    `index_copy_`."""
    if any(is_compiling(variable) for variable, _, _ in items):
        return common.restore_frozen(items)
    with torch.no_grad():
        for variable, mask, old in items:
            value = variable.value
            if isinstance(mask, FrozenAt):
                if mask is not ALL_TRAINABLE:
                    value.view(-1).index_copy_(0, mask.positions, old)
                continue
            ints = _ints(value.dtype)
            _where_into(value.view(ints), _as(mask, ints), value.view(ints), old.view(ints))


def scatter_flat(variable: Any, indices: Any, values: Any) -> None:
    """`variable.flat[indices] = values`, in place (`index_copy_`)."""
    with torch.no_grad():
        flat = variable.value.view(-1)
        flat.index_copy_(0, indices.long(), values.to(flat.dtype))


def loss_gradients(model: keras.Model, loss_fn: Callable, variables: list) -> Callable:
    """One `torch.autograd.grad` of the batch loss."""

    def step(x, y):
        x, y = common.as_tensors(x), common.as_tensors(y)
        targets = [v.value for v in variables]
        with torch.enable_grad():
            value = keras.ops.mean(loss_fn(y, model(x, training=False)))
            grads = torch.autograd.grad(value, targets, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(targets, grads)]

    return step


class squared_grad_sums:  # noqa: N801  (the interface's name for a step factory)
    """`torch.func.vmap(torch.func.grad(loss))` over the examples of a batch.

    Where `torch.func` cannot batch a layer's kernels (it raises a
    `RuntimeError` or `NotImplementedError`, e.g. for the channels-last copy
    in `Conv2D`), this falls back, for this and every later batch, to a loop
    with one `torch.autograd.grad` per example; a genuine error is raised
    again by the loop. `vectorised` says which path is in use.
    """

    def __init__(self, model: keras.Model, loss_fn: Callable, variables: list):
        self.model, self.loss_fn, self.variables = model, loss_fn, variables
        self.vectorised = True
        loss = common.stateless_loss(model, loss_fn, variables)
        self._per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, None, 0, 0))

    def __call__(self, x: Any, y: Any) -> list:
        x, y = common.as_tensors(x), common.as_tensors(y)
        if self.vectorised:
            try:
                return self._batched(x, y)
            except (RuntimeError, NotImplementedError):
                self.vectorised = False
        return self._looped(x, y)

    def _batched(self, x: Any, y: Any) -> list:
        def values(variables):
            return [v.value.detach() for v in variables]

        grads = self._per_example(
            values(self.variables),
            values(self.model.trainable_variables),
            values(self.model.non_trainable_variables),
            x,
            y,
        )
        return [torch.sum(torch.square(g), dim=0) for g in grads]

    def _looped(self, x: Any, y: Any) -> list:
        targets = [v.value for v in self.variables]
        sums = [torch.zeros_like(t.detach()) for t in targets]
        n = int(keras.tree.flatten(x)[0].shape[0])
        with torch.enable_grad():
            for i in range(n):
                xi = keras.tree.map_structure(lambda t: t[i], x)
                yi = keras.tree.map_structure(lambda t: t[i], y)
                y_pred = self.model(common.one_example(xi), training=False)
                value = keras.ops.mean(self.loss_fn(common.one_example(yi), y_pred))
                grads = torch.autograd.grad(value, targets, allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc += torch.square(g.detach())
        return sums


def requires_grad(x: Any) -> bool:
    return bool(getattr(x, "requires_grad", True))


def release_grad(variable: Any) -> None:
    value = getattr(variable, "value", None)
    if value is not None and getattr(value, "grad", None) is not None:
        value.grad = None
