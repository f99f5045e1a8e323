"""masked_opt: exact element-wise freezing for any Keras 3 optimizer.

The public surface is what this module exports; mask builders live in
`masked_opt.masks` (``from masked_opt import masks; masks.rows([0, 1])``).
"""

import os
import sys
from importlib.metadata import PackageNotFoundError, version

if sys.argv[:1] == ["-m"]:  # `python -m masked_opt ...`: quiet TF's C++ log before TF loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
