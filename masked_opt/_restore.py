"""The restore after the inner optimizer's step: frozen elements, multiplied updates, their EMA.

What goes back once the inner optimizer has stepped: frozen elements
restored, multiplied updates blended, and the EMA of both kept consistent.

Each function returns `(target, keep, new)` items for
`_backend.restore_frozen`, which writes `where(keep, target, new)`
(`_backend.select` is `where`, vectorised on eager torch).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from masked_opt import _backend, _inner_optimizer


def frozen_items(variable: keras.Variable, ema: Any, mask: Any, old: Any) -> list[tuple]:
    """Frozen elements of `variable` back to `old`; its EMA too (the EMA of a
    frozen element is the element itself, or `SwapEMAWeights`/`finalize`
    would swap a drifted value in)."""
    items = [(variable, mask, old)]
    if ema is not None:
        items.append((ema, mask, old))
    return items


def ema_before(inner: Any, target: keras.Variable) -> tuple:
    """(EMA variable, its value before the step, the momentum of this step's
    EMA update) of a multiplied `target`, or three Nones without EMA."""
    opt, average = _inner_optimizer.ema_owner(inner, target)
    if average is None:
        return None, None, None
    # Keras's EMA momentum: zero at the first step (the average starts at the
    # weight), read before the step increments `iterations`.
    first = ops.not_equal(ops.copy(opt.iterations.value), 0)
    momentum = ops.multiply(ops.cast(first, target.dtype), opt.ema_momentum)
    return average, ops.copy(average.value), momentum


def multiplied_items(target, mask, m, old, ema=None, old_ema=None, momentum=None) -> list[tuple]:
    """Items that give `target` (a weight, or a compact proxy)
    `old + m * (current - old)` where `mask` (None: everywhere) is True, and
    its EMA the average of that stored value.

    Exactness: where `m == 1` the current value (the inner optimizer's) is kept
    as is, and the EMA as the inner optimizer computed it; where `m == 0` or
    the mask is False, the old value is written back, and the EMA is held at
    it (as for frozen elements). In between, the EMA is recomputed with Keras's
    own formula on the value actually stored.
    """
    m = ops.cast(m, target.dtype)
    moving = ops.not_equal(m, 0)
    keep = ops.equal(m, 1)
    if mask is not None:
        moving = ops.logical_and(mask, moving)
        keep = ops.logical_and(mask, keep)
    current = target.value
    new = _backend.blend(old, current, m, moving)
    items = [(target, keep, new)]
    if ema is not None:
        stored = _backend.select(keep, current, new)
        average = ops.add(ops.multiply(momentum, old_ema), ops.multiply(ops.subtract(1, momentum), stored))
        items.append((ema, keep, _backend.select(moving, average, old)))
    return items


def multiplied_only(inner: Any, variable: keras.Variable, multiplier: keras.Variable):
    """(snapshot, restore items after the step) of a variable with a multiplier
    and no mask, the same in both layouts."""
    old = _backend.snapshot(variable)
    ema = ema_before(inner, variable)

    def items() -> list[tuple]:
        return multiplied_items(variable, None, multiplier.value, old, *ema)

    return items
