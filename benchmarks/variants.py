"""The contenders of ``bench_step.py``: how each builds its optimizer from an
inner-optimizer factory and masks, and which library internal it patches.

``variants(part, pattern)`` gives the table in order (add a line there to
add one); the first is the reference:

* ``bare``: the inner optimizer alone (the reference, ratio 1.00 by definition);
* ``masked, no masks``: ``MaskedOptimizer(inner)``; should cost nothing;
* ``masked, all-True``: every variable registered with a full-shape all-True
  mask (e.g. to edit single elements later). On TensorFlow the core skips the
  masking work while no element is frozen (one ``cond``), so this is the cost
  of the check; on JAX and torch there is no such shortcut (see
  ``masked_opt/_backend/``) and this costs what ``1 frozen`` costs;
* ``masked, 1 frozen``: the same masks with one kernel element frozen: the
  full cost of the machinery (mask the gradients, snapshot, restore), all masks
  full-shape;
* ``masked, 50% + bias``: a random 50% element mask on every kernel, biases
  frozen (scalar ``False``): a realistic setup;
* ``grad-only, 50% + bias``: the naive approach: the bare optimizer, gradients
  multiplied by the same masks (full part: the backend trainer's own
  ``train_step`` plus that one line). Not exact: weight decay and momentum
  still move "frozen" elements;
* ``compact, 50% + bias``: the same masks with ``compact_state=True`` (the
  inner optimizer updates a 1-D proxy of the trainable elements);
* ``multipliers 0.5`` and ``masked, 50% + bias, multipliers 0.5``: update
  multipliers on every variable (the cost of an LLRD step), without and with
  the masks;
* ``masked, 50% + bias, bool masks``: the same with no bit-packed mask copies,
  so compiled steps read the bool masks (torch.compile: one element at a time);
* ``masked, 50% + bias, held int masks`` (torch only): eager masks converted
  to 0/1 integers once per step and held across the inner update, as before
  they became temporaries;
* ``masked, 50% + bias, multipliers 0.5, where blend`` (torch only): the
  multiplier blends by ``keras.ops`` (four new tensors, torch's scalar-loop
  ``where``) instead of the library's in-place blend and integer-bit
  ``select``: the before/after in one process;
* ``bare, XLA step`` (opt part, TensorFlow only): the bare optimizer's step
  traced with ``tf.function(jit_compile=True)``: the yardstick for a
  jit-compiled masked step (on JAX every step is an XLA step already);
* ``masked jit, 50% + bias`` (TensorFlow only):
  ``MaskedOptimizer(..., jit_compile=True)``, which other backends refuse.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from unittest.mock import patch

import keras

from harness import masked_accepts_jit
from masked_opt import MaskedOptimizer
from workloads import BACKEND, InnerFactory, Masks

TF_ONLY = ("tensorflow",)
ALL_BACKENDS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class Variant:
    """How to build one contender from an inner-optimizer factory and the masks.

    ``make(inner, masks)`` returns the optimizer. ``grad_only`` variants get the
    bare optimizer and multiply the gradients by ``masks`` before ``apply``.
    ``masks`` is "realistic" (50% kernels, frozen biases), "all_true",
    "one_frozen" (all-True but one kernel element) or "none".
    ``parts`` names the benchmark parts ("full", "opt") the variant runs in,
    ``backends`` the Keras backends it runs on (``why_not`` says why not on
    the others).
    """

    make: Callable[[InnerFactory, Masks], keras.optimizers.Optimizer]
    masks: str = "none"
    grad_only: bool = False
    xla_step: bool = False  # opt part: trace the step with tf.function(jit_compile=True)
    # Around the build, the warm-up and every timed run: a library internal
    # swapped for what it was before a change (the before/after in one process).
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    parts: tuple[str, ...] = ("full", "opt")
    backends: tuple[str, ...] = ALL_BACKENDS
    why_not: str = ""


@contextlib.contextmanager
def unpacked():
    """No bit-packed mask copies (set at build): compiled steps read the bool masks."""
    from masked_opt import _backend

    with contextlib.ExitStack() as stack:
        for m in (_backend.common, _backend._impl):
            if hasattr(m, "PACK_MIN_SIZE"):
                stack.enter_context(patch.object(m, "PACK_MIN_SIZE", 1 << 62))
        yield


@contextlib.contextmanager
def where_blend():
    """Multiplier blends by `keras.ops` (subtract, multiply, add, `where`:
    torch's scalar loop on CPU), as before the eager torch blend."""
    from masked_opt import _backend

    with patch.object(_backend, "select", _backend.common.select), patch.object(_backend, "blend", _backend.common.blend):
        yield


def held_int_masks():
    """Eager torch: each half-frozen mask converted to 0/1 integers once per
    step and held across the inner update (the masking and the restore read
    that copy), instead of a temporary where each is used."""
    import torch

    from masked_opt import _backend

    step_mask = _backend.step_mask

    def converted(mask, variable):
        form = step_mask(mask, variable)
        if getattr(form, "dtype", None) is torch.bool and variable.value.dtype.is_floating_point:
            return form.to(_backend._impl._ints(variable.value.dtype))
        return form

    return patch.object(_backend, "step_mask", converted)


def patched_run(variant: Variant, run: Callable[[int], None]) -> Callable[[int], None]:
    """`run` under the variant's `patch`."""

    def patched(k: int) -> None:
        with variant.patch():
            run(k)

    return patched


def variants(part: str, pattern: str = "") -> tuple[dict[str, Variant], dict[str, str]]:
    """The contenders of `part` on this backend whose names match `pattern`
    ("bare" always), in table order, and those that do not run here:
    ``{"part: name": why}``."""
    table = {
        "bare": Variant(lambda inner, m: inner()),
        "masked, no masks": Variant(lambda inner, m: MaskedOptimizer(inner())),
        "masked, all-True": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "all_true"),
        "masked, 1 frozen": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "one_frozen"),
        "masked, 50% + bias": Variant(lambda inner, m: MaskedOptimizer(inner(), m), "realistic"),
        "grad-only, 50% + bias": Variant(lambda inner, m: inner(), "realistic", grad_only=True),
        # The same masks with state for the trainable elements only.
        "compact, 50% + bias": Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, compact_state=True), "realistic"
        ),
        # Update multipliers (0.5 on every variable: the cost of an LLRD step).
        "multipliers 0.5": Variant(lambda inner, m: MaskedOptimizer(inner(), multipliers={".*": 0.5})),
        "masked, 50% + bias, multipliers 0.5": Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, multipliers={".*": 0.5}), "realistic"
        ),
    }
    # What a compiled step costs reading the bool masks instead of their
    # bit-packed copies (the state before issue 16's torch.compile change).
    table["masked, 50% + bias, bool masks"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m), "realistic", patch=unpacked
    )
    # Multiplier blends by keras.ops (torch's scalar-loop `where`), as before
    # the eager torch blend: the before/after in one process.
    table["masked, 50% + bias, multipliers 0.5, where blend"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m, multipliers={".*": 0.5}),
        "realistic",
        patch=where_blend,
        backends=("torch",),
        why_not="only torch has a blend other than `keras.ops.where`",
    )
    table["masked, 50% + bias, held int masks"] = Variant(
        lambda inner, m: MaskedOptimizer(inner(), m),
        "realistic",
        patch=held_int_masks,
        backends=("torch",),
        why_not="eager torch's integer masking only",
    )
    # What XLA does for the bare optimizer: the yardstick for a jit-compiled masked step.
    table["bare, XLA step"] = Variant(
        lambda inner, m: inner(),
        xla_step=True,
        parts=("opt",),
        backends=TF_ONLY,
        why_not="TensorFlow only (`tf.function(jit_compile=True)`); on JAX every "
        "step is an XLA step already, torch.compile is not benchmarked here",
    )
    if masked_accepts_jit():
        table["masked jit, 50% + bias"] = Variant(
            lambda inner, m: MaskedOptimizer(inner(), m, jit_compile=True),
            "realistic",
            backends=TF_ONLY,
            why_not="`MaskedOptimizer(jit_compile=True)` is TensorFlow only "
            "(ValueError on other backends)",
        )
    selected, skipped = {}, {}
    for name, v in table.items():
        if part not in v.parts or not (name == "bare" or re.search(pattern, name)):
            continue
        if BACKEND not in v.backends:
            skipped[f"{part}: {name}"] = v.why_not
            continue
        selected[name] = v
    return selected, skipped
