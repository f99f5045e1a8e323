"""The measuring half of every benchmark script: timing, statistics, tables,
the environment lines, own-process runs and peak RSS.

Nothing here knows a model, a mask or an optimizer (those are in
``workloads.py`` and ``variants.py``); Keras and the backend are imported
only by ``environment()``. Scripts import it as ``import harness`` (a
script's own folder is first on ``sys.path``).

* Timing: ``time_rounds`` (interleaved rounds in one process: every round
  times every runner once, in a fresh random order; wall and process CPU
  seconds per step) and ``time_steps`` (each call of one step timed on its
  own: wall, CPU and minor page faults).
* Statistics: ``paired`` (ratio per round), ``quartiles``, ``spread_cell``
  and ``ratio_cell`` (``**median** (q1-q3)``, the bold figure that
  ``run_all.py`` collects).
* Tables: ``table`` (a markdown table) and ``timing_rows`` (the rows of
  ``time_rounds`` samples against a reference).
* Environment: ``environment()`` (the lines of a report's Environment
  section) and ``command(script)`` (the command that made the report).
* Own-process runs: ``run_child`` runs a script (usually the caller, with a
  child flag) in a fresh interpreter and returns the JSON its child side
  wrote with ``emit``.
* RSS: ``peak_rss_mib`` (``ru_maxrss``), ``rss_mib`` (now),
  ``reset_peak_rss`` and ``peak_rss_since_reset_mib`` (Linux ``clear_refs``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = "RESULT "  # the prefix of a child's JSON line

# ------------------------------------------------------------------ timing


@dataclass
class Samples:
    """Per-round seconds per step of one variant: wall clock and process CPU."""

    wall: list[float]
    cpu: list[float]


def time_rounds(
    runners: dict[Hashable, Callable[[int], None]],
    rounds: int,
    steps: int,
    seed: int | None = 0,
    progress: bool = True,
) -> dict[Hashable, Samples]:
    """Seconds per step of each runner, one sample per round; order shuffled per round.

    ``runners[name](steps)`` runs ``steps`` steps and returns when their work
    is done. Garbage is collected before, and collection is off during, each
    timed call. Wall time is what a user waits; process CPU time (all
    threads, user+sys) is the work done, and is much less sensitive to other
    processes on the machine. ``seed=None``: an unseeded order.
    """
    rng = random.Random(seed)
    names = list(runners)
    samples = {n: Samples([], []) for n in names}
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            gc.collect()
            gc.disable()
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                runners[name](steps)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            finally:
                gc.enable()
            samples[name].wall.append(dt / steps)
            samples[name].cpu.append(dc / steps)
        if progress:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return samples


@dataclass
class Steps:
    """Each timed call of ``time_steps``: wall and CPU seconds, minor page faults."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def time_steps(step: Callable[[], object], steps: int, warmup: int = 0) -> Steps:
    """Calls ``step()`` ``warmup`` times untimed, then ``steps`` times, each
    timed on its own (the page-fault count is read outside the clocks)."""
    for _ in range(warmup):
        step()
    out = Steps()
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        out.wall.append(time.perf_counter() - t0)
        out.cpu.append(time.process_time() - c0)
        out.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


def stopwatch() -> Callable[[], tuple[float, float]]:
    """Starts a clock; calling the result gives (wall, CPU) seconds since."""
    t0, c0 = time.perf_counter(), time.process_time()
    return lambda: (time.perf_counter() - t0, time.process_time() - c0)


# -------------------------------------------------------------- statistics

median = statistics.median


def paired(xs: Sequence[float], ref: Sequence[float]) -> list[float]:
    """The ratio of each sample to the reference's sample of the same round."""
    return [x / b for x, b in zip(xs, ref)]


def quartiles(xs: Sequence[float], method: str = "inclusive") -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method=method) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def spread_cell(values: Sequence[float], digits: int = 2, spread: str = "iqr", method: str = "inclusive") -> str:
    """``**median** (low-high)``: the interquartile range (``spread="iqr"``,
    ``statistics.quantiles`` ``method``) or the whole range (``"range"``)."""
    if spread == "range":
        lo, mid, hi = min(values), median(values), max(values)
    else:
        lo, mid, hi = quartiles(values, method)
    return f"**{mid:.{digits}f}** ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio_cell(xs: Sequence[float], ref: Sequence[float], **kw) -> str:
    """The median (IQR) over rounds of the paired ratio xs/ref."""
    return spread_cell(paired(xs, ref), **kw)


# ------------------------------------------------------------------ tables


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[object]] = ()) -> list[str]:
    """A markdown table: ``align`` has one letter per column, ``l`` or ``r``."""
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def timing_rows(samples: dict, ref: Hashable, prefix: Sequence[str] = (), digits: int = 1) -> list[str]:
    """One row per variant: ``prefix``, name, wall ms, wall ratio (IQR), CPU ms,
    CPU ratio (IQR), the ratios paired with ``samples[ref]``."""
    r = samples[ref]
    return [
        "| " + " | ".join([
            *prefix, str(name),
            f"{median(s.wall) * 1e3:.{digits}f}", ratio_cell(s.wall, r.wall),
            f"{median(s.cpu) * 1e3:.{digits}f}", ratio_cell(s.cpu, r.cpu),
        ]) + " |"
        for name, s in samples.items()
    ]


# ------------------------------------------------------------- environment


def _git_state() -> str:
    """The commit of the checkout, '+dirty' if masked_opt/ has uncommitted edits."""
    root = os.path.dirname(HERE)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "masked_opt"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {rev or 'unknown'}{' +dirty' if dirty else ''}"


def _backend_lines(backend: str) -> list[str]:
    """The backend library's version, devices and thread settings."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [
            f"tensorflow {tf.__version__}, devices: "
            f"{[d.device_type for d in tf.config.list_logical_devices()]}",
            f"tf threads: intra_op={tf.config.threading.get_intra_op_parallelism_threads()} "
            f"inter_op={tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF default)",
        ]
    if backend == "jax":
        import jax
        import jaxlib

        return [
            f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, devices: {jax.devices()}",
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!r}",
        ]
    import torch

    return [
        f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()} (CPU used)",
        f"torch threads: intra_op={torch.get_num_threads()} "
        f"inter_op={torch.get_num_interop_threads()}",
    ]


def masked_accepts_jit() -> bool:
    import inspect

    from masked_opt import MaskedOptimizer

    return "jit_compile" in inspect.signature(MaskedOptimizer).parameters


def environment() -> list[str]:
    """The lines of a report's Environment section (Keras backend, Python,
    CPUs, versions, devices and threads, masked_opt's commit, load)."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = "n/a"
    return [
        f"**Keras backend: {backend}** (KERAS_BACKEND="
        f"{os.environ.get('KERAS_BACKEND', '(unset: keras.json)')})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"cpu: os.cpu_count()={os.cpu_count()}, usable={affinity}, "
        f"processor={platform.processor() or 'n/a'}",
        f"keras {keras.__version__}, numpy {np.__version__}",
        *_backend_lines(backend),
        f"masked_opt at {_git_state()}; MaskedOptimizer accepts jit_compile: "
        f"{masked_accepts_jit()}",
        f"load average at start: {os.getloadavg()}",
    ]


def command(script: str, backend: str | None = None, argv: Sequence[str] | None = None) -> str:
    """``KERAS_BACKEND=<backend> python benchmarks/<script> <argv>`` (no
    prefix when ``backend`` is None; ``argv`` defaults to this process's)."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    prefix = f"KERAS_BACKEND={backend} " if backend else ""
    return f"{prefix}python benchmarks/{os.path.basename(script)} {args}"


# --------------------------------------------------------- own-process runs


class ChildFailed(RuntimeError):
    """A child process exited non-zero or wrote no result line."""

    def __init__(self, what: str, returncode: int, stdout: str, stderr: str):
        super().__init__(f"{what} failed (exit {returncode}):\n{stderr[-3000:]}")
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def emit(result: dict) -> None:
    """The child side of ``run_child``: the result as one JSON line."""
    print(RESULT + json.dumps(result), flush=True)


def use_test_support() -> None:
    """Makes the test suite's support modules (``tests/tf_graphs.py``,
    ``tests/delta_v1.py``: no pytest in them) importable, so a script shares
    a helper with the tests instead of copying it."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.append(tests)


def run_child(args: Sequence[str], env: dict[str, str] | None = None, what: str | None = None) -> dict:
    """Runs ``python <args>`` in a fresh process (``env`` added to this
    process's environment) and returns the dict its last ``emit`` line holds.
    Raises ``ChildFailed`` (with the tail of its stderr) otherwise."""
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)]
    if out.returncode or not lines:
        raise ChildFailed(what or " ".join(args), out.returncode, out.stdout, out.stderr)
    return json.loads(lines[-1][len(RESULT):])


# --------------------------------------------------------------------- RSS


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def rss_mib() -> float:
    """Resident memory now (``VmRSS``), MiB."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss(trim: bool = False) -> bool:
    """Resets the kernel's peak-RSS counter (``VmHWM``; Linux only). Not
    ``ru_maxrss``, which keeps the lifetime peak. ``trim``: first hand the
    heap's freed pages back to the system (glibc ``malloc_trim``), so the
    counter starts from what is in use, not from what a compiler freed."""
    if trim:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float:
    """Peak resident memory since ``reset_peak_rss`` (``VmHWM``), MiB."""
    return _status_kib("VmHWM") / 1024
