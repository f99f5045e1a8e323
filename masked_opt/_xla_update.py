"""When the masked update runs as its own XLA program (`jit_compile`).

TensorFlow only: JAX's trainer and torch.compile compile the whole train
step, the masked update included. With `jit_compile="auto"` (the default) a
traced TensorFlow step compiles the masked update with XLA when some element
is frozen (or multiplied) at trace time and the compile pays back soon; with
nothing frozen the update runs as the bare optimizer's would (the identity
law). `True`: always; `False`: never.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from masked_opt import _backend

# XLA's compile time grows with the number of variables in the update (about
# 15 ms of CPU time each, measured on 2 AVX-512 cores: 128 variables cost
# +1.8-2.4 s at the first step), its gain per step with their elements (about
# 2.5 ns each against graph mode): the compile pays back after about
# 6e6 / (mean elements per variable) steps. Many small variables (a CNN such
# as MobileNetV2: 158 variables of 14 k elements on average) would wait ~400
# steps; large ones (an MLP, 300 k+) a few dozen. A small update (few
# variables) compiles quickly whatever their size.
FEW_VARIABLES = 16
MIN_MEAN_SIZE = 1 << 15  # elements per variable: pays back within ~200 steps


def xla_pays(grads: Sequence[Any]) -> bool:
    """Whether compiling an update of these (dense) gradients with XLA pays
    back soon enough for `jit_compile="auto"`: few variables, or variables of
    `MIN_MEAN_SIZE` elements or more on average (static shapes)."""
    sizes = []
    for g in grads:
        if g is None:
            continue
        shape = tuple(g.shape)
        if any(d is None for d in shape):
            return True  # unknown size
        size = 1
        for d in shape:
            size *= int(d)
        sizes.append(size)
    return len(sizes) <= FEW_VARIABLES or sum(sizes) >= MIN_MEAN_SIZE * len(sizes)


def check(jit_compile: Any) -> None:
    if not (isinstance(jit_compile, bool) or jit_compile == "auto"):
        raise TypeError(f"`jit_compile` must be True, False or 'auto'. Received: {jit_compile!r}.")
    _backend.check_jit_compile(jit_compile)


class Compilation:
    """How the masked update is compiled: decides, per traced update, whether
    to run it as an XLA function (keeping one per list of variables), and
    counts what ran (`MaskedOptimizer.inspect()`)."""

    def __init__(self, jit_compile: bool | str):
        check(jit_compile)
        self.jit_compile = jit_compile
        self._functions: dict[tuple, Callable] = {}
        self.traces = 0  # Python executions of the masked update
        self.last_compiled: bool | None = None

    @property
    def functions(self) -> int:
        """How many XLA functions of the masked update were made."""
        return len(self._functions)

    def wants_xla(self, grads: list, identity: bool) -> bool:
        """`identity`: no element frozen and every multiplier 1 right now (read
        on the host: at the first trace the optimizer's variables may not be
        initialized yet, they are created inside the trace)."""
        if self.jit_compile is False or not _backend.can_jit(grads):
            return False
        if self.jit_compile is True:
            return True
        return _backend.in_traced_function() and not identity and xla_pays(grads)

    def run(self, update: Callable, table: Any, grads: list, variables: list, key: tuple | None) -> None:
        """`update(grads, variables, table)`, each Python execution of it
        recorded; as an XLA function made once per `key` where one is given."""

        def recorded(grads: list, variables: list) -> None:
            self.record(grads)
            update(grads, variables, table)

        if key is None:
            recorded(grads, variables)
            return
        compiled = self._functions.get(key)
        if compiled is None:
            compiled = self._functions[key] = _backend.jit_function(recorded, list(variables))
        compiled(grads)

    def record(self, grads: list) -> None:
        """Called by the update each time it runs in Python (trace or eager call)."""
        first = next((g for g in grads if g is not None), None)
        self.last_compiled = first is not None and _backend.is_compiling(first)
        if first is None or _backend.counts_in_trace(first):
            self.traces += 1
