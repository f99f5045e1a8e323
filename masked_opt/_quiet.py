"""A quiet TensorFlow start-up for `python -m masked_opt` (the CLI) only.

Importing masked_opt as a library changes nothing in the process. When the
package is being launched as `python -m masked_opt ...`, the CLI's own
process gets a quiet start-up: `TF_CPP_MIN_LOG_LEVEL=3` unless set, and,
while `keras` (hence TensorFlow) loads, fd 2 is captured and written back
without the C++ log lines below that level (TF >= 2.20 logs some through
absl before the level applies: "WARNING: All log messages before
absl::InitializeLog() ..." and `I0000 ...` lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NATIVE_LOG = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def launched_as_cli() -> bool:
    """Whether this process is `python -m masked_opt ...`, and the package is
    being imported to locate its `__main__` (sys.argv[0] is "-m" then)."""
    argv = getattr(sys, "orig_argv", [])
    try:
        launched = argv[argv.index("-m") + 1] == "masked_opt"
    except (ValueError, IndexError):
        return False
    return launched and sys.argv[:1] == ["-m"]


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def native_logs_filtered() -> Iterator[None]:
    """Captures fd 2 and writes it back without C++ log lines below TF_CPP_MIN_LOG_LEVEL."""
    level = _min_log_level()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 (an embedded interpreter)
        saved = None
    if level <= 0 or saved is None:
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = []
            for line in captured.read().splitlines(keepends=True):
                text = line.decode(errors="replace")
                m = _NATIVE_LOG.match(text)
                if text.rstrip("\r\n") == _ABSL_PREINIT or (m and "IWEF".index(m.group(1)) < level):
                    continue
                kept.append(line)
            if kept:  # back where it was going, byte for byte
                os.write(2, b"".join(kept))


def quiet_cli_startup() -> None:
    """For the CLI's own process: load keras with TensorFlow's start-up log quieted."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" not in sys.modules:
        with native_logs_filtered():
            import keras  # noqa: F401  (loads the backend)
