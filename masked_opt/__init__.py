"""masked_opt: exact element-wise freezing for any Keras 3 optimizer."""

from importlib.metadata import PackageNotFoundError, version

from masked_opt.optimizer import MaskedOptimizer
from masked_opt.registry import Key, MaskValue, Where

try:
    __version__ = version("masked_opt")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Key", "MaskValue", "MaskedOptimizer", "Where", "__version__"]
