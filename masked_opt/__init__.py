"""masked_opt: exact element-wise freezing for any Keras 3 optimizer.

The public surface is what this module exports; mask builders live in
`masked_opt.masks` (``from masked_opt import masks; masks.rows([0, 1])``).
"""

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

# ---- environment: a quiet TensorFlow start-up (before keras, hence TF, loads)
#
# TensorFlow's C++ log honours TF_CPP_MIN_LOG_LEVEL (0 all, 1 no INFO, 2 no
# WARNING, 3 no ERROR) read when TF loads. If the user has not set it and
# TF is not loaded yet, default it to 3. Since TF 2.20 some libraries it loads
# log through absl before that level applies ("WARNING: All log messages
# before absl::InitializeLog() ..." and `I0000 ...` lines, which no
# environment variable silences), so `import keras` runs with the C++
# stderr (fd 2) captured and written back without log lines below the level.
_NATIVE_LOG = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def _native_logs_filtered() -> Iterator[None]:
    """Captures fd 2 and writes it back without C++ log lines below TF_CPP_MIN_LOG_LEVEL."""
    level = _min_log_level()
    if level <= 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
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


if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "keras" not in sys.modules:
    with _native_logs_filtered():
        import keras  # noqa: F401  (loads the backend)

from masked_opt import callbacks, masks, pruning  # noqa: E402
from masked_opt.callbacks import DynamicMask, GradualUnfreezing, masked_optimizer  # noqa: E402
from masked_opt.layerwise import layerwise_decay  # noqa: E402
from masked_opt.optimizer import MaskedOptimizer  # noqa: E402
from masked_opt.pruning import (  # noqa: E402
    ConstantSparsity,
    MagnitudePruning,
    PolynomialSparsity,
    prunable_masks,
)
from masked_opt.registry import Key, MaskValue, Where  # noqa: E402
from masked_opt.summary import (  # noqa: E402
    FrozenSnapshot,
    FrozenWeightsChangedError,
    MaskRow,
    MaskSummary,
    VerifyFrozen,
    format_mask_summary,
    mask_summary,
    plot_masks,
    print_mask_summary,
    snapshot_frozen,
    verify_frozen,
)

try:
    __version__ = version("masked_opt")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConstantSparsity",
    "DynamicMask",
    "FrozenSnapshot",
    "FrozenWeightsChangedError",
    "GradualUnfreezing",
    "Key",
    "MagnitudePruning",
    "MaskRow",
    "MaskSummary",
    "MaskValue",
    "MaskedOptimizer",
    "PolynomialSparsity",
    "VerifyFrozen",
    "Where",
    "__version__",
    "callbacks",
    "format_mask_summary",
    "layerwise_decay",
    "mask_summary",
    "masked_optimizer",
    "masks",
    "plot_masks",
    "print_mask_summary",
    "prunable_masks",
    "pruning",
    "snapshot_frozen",
    "verify_frozen",
]
