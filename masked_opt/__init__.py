"""masked_opt: exact element-wise freezing for any Keras 3 optimizer.

The public surface is what this module exports; mask builders live in
`masked_opt.masks` (``from masked_opt import masks; masks.rows([0, 1])``).
Importing masked_opt changes nothing in the process: no environment
variables, no redirected output (`python -m masked_opt` quiets TensorFlow's
start-up log for its own process only).
"""

import importlib.metadata as _metadata

from masked_opt import _quiet

if _quiet.launched_as_cli():  # `python -m masked_opt`: a quiet start-up, for the CLI's process only
    _quiet.quiet_cli_startup()

from masked_opt import callbacks, delta, masks, pruning, sparse_training  # noqa: E402
from masked_opt._info import OptimizerInfo, VariableInfo  # noqa: E402
from masked_opt.delta import BaseRecord, DeltaFileError, SparseDelta  # noqa: E402
from masked_opt.callbacks import DynamicMask, GradualUnfreezing, masked_optimizer  # noqa: E402
from masked_opt.keys import Key  # noqa: E402
from masked_opt.layerwise import layerwise_decay  # noqa: E402
from masked_opt.optimizer import MaskedOptimizer  # noqa: E402
from masked_opt.pruning import ConstantSparsity, MagnitudePruning, PolynomialSparsity, prunable_masks  # noqa: E402
from masked_opt.sparse_training import SET, RigL, SpIEL, layer_densities  # noqa: E402
from masked_opt.registry import MaskValue, MultiplierValue, Where  # noqa: E402
from masked_opt.summary import MaskRow, MaskSummary, format_mask_summary, mask_summary, plot_masks, print_mask_summary  # noqa: E402
from masked_opt.verify import FrozenSnapshot, FrozenWeightsChangedError, VerifyFrozen, snapshot_frozen, verify_frozen  # noqa: E402

try:
    __version__ = _metadata.version("masked_opt")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "BaseRecord",
    "ConstantSparsity",
    "DeltaFileError",
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
    "MultiplierValue",
    "OptimizerInfo",
    "PolynomialSparsity",
    "RigL",
    "SET",
    "SpIEL",
    "SparseDelta",
    "VariableInfo",
    "VerifyFrozen",
    "Where",
    "__version__",
    "callbacks",
    "delta",
    "format_mask_summary",
    "layer_densities",
    "layerwise_decay",
    "mask_summary",
    "masked_optimizer",
    "masks",
    "plot_masks",
    "print_mask_summary",
    "prunable_masks",
    "pruning",
    "snapshot_frozen",
    "sparse_training",
    "verify_frozen",
]
