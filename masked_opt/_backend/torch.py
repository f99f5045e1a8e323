"""torch: in-place scatters for compact state, torch.compile detection, and
per-example gradients with `torch.func.vmap` (a per-example loop where it
cannot batch a layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
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


def counts_in_trace(x: Any) -> bool:
    """Not while torch.compile traces: dynamo guards on a Python int that the
    step changes, and would compile every graph twice."""
    return not is_compiling(x)


# Eager masking is bitwise: torch's CPU `where` is a scalar loop (~2 ns per
# element, 20x an `add`), while AND/OR on the same-width integer view of the
# floats are vectorised, and as exact (a zeroed element is +0.0; NaN/inf
# bits are cleared like any others). torch.compile gets the `where` forms.
_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_mask(mask: Any, dtype: Any) -> tuple[Any, Any]:
    """(integer view dtype, all-ones where `mask` is True, else zeros)."""
    ints = _SAME_WIDTH[torch.empty((), dtype=dtype).element_size()]
    return ints, mask.to(ints).neg_()


def mask_gradient(grad: Any, mask: Any, variable_shape: tuple[int, ...]) -> Any:
    if is_compiling(grad) or not grad.dtype.is_floating_point:
        return common.mask_gradient(grad, mask, variable_shape)
    ints, ones = _bits_mask(mask, grad.dtype)
    return torch.bitwise_and(grad.view(ints), ones).view(grad.dtype)


def restore_frozen(items: list[tuple[keras.Variable, Any, Any]]) -> None:
    """`variable = where(mask, variable, old)`, in the variable's own storage."""
    if any(is_compiling(variable) for variable, _, _ in items):
        return common.restore_frozen(items)
    with torch.no_grad():
        for variable, mask, old in items:
            value = variable.value
            ints, ones = _bits_mask(mask, value.dtype)
            # `ones` is flipped in place twice (no second mask-sized buffer): first to the
            # frozen elements, for the old bits kept there; then back, to clear them in `value`.
            kept_old = torch.bitwise_and(old.view(ints), ones.bitwise_not_())
            value.view(ints).bitwise_and_(ones.bitwise_not_()).bitwise_or_(kept_old)


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
