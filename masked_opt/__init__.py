"""masked_opt: exact element-wise freezing for any Keras 3 optimizer.

The public surface is what this module exports; mask builders live in
`masked_opt.masks` (``from masked_opt import masks; masks.rows([0, 1])``).
"""

from importlib.metadata import PackageNotFoundError, version

from masked_opt import masks
from masked_opt.optimizer import MaskedOptimizer
from masked_opt.registry import Key, MaskValue, Where
from masked_opt.summary import (
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

__all__ = sorted(
    [
        "FrozenSnapshot",
        "FrozenWeightsChangedError",
        "Key",
        "MaskRow",
        "MaskSummary",
        "MaskValue",
        "MaskedOptimizer",
        "VerifyFrozen",
        "Where",
        "__version__",
        "format_mask_summary",
        "mask_summary",
        "masks",
        "plot_masks",
        "print_mask_summary",
        "snapshot_frozen",
        "verify_frozen",
    ]
)
