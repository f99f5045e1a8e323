"""The one table of inner optimizers that every matrix test reuses (optax `alias_test` style).

Each entry is `id -> factory(**extra_kwargs) -> keras.optimizers.Optimizer`; factories
accept the base-optimizer keyword arguments (weight_decay, use_ema, clipnorm, ...).
Learning rates are large enough that a few steps move every trainable element.

Entries the installed Keras cannot run (see `_missing`) skip the test that builds
them; `AVAILABLE` holds the entries this Keras has, for tests that loop over the table.
"""

import keras
import pytest
from backends import KERAS_VERSION

O = keras.optimizers


def _missing(name):
    """Why this Keras cannot run `keras.optimizers.<name>`, or None."""
    if not hasattr(O, name):  # Muon: Keras 3.10, ScheduleFreeAdamW: 3.14, MultiOptimizer: 3.15
        return f"keras.optimizers.{name} is not in Keras {keras.__version__}"
    if name == "Muon" and KERAS_VERSION < (3, 13) and keras.backend.backend() == "tensorflow":
        # Stock Muon reads `variable.path` of the raw tf.Variable in its update step.
        return f"stock keras.optimizers.Muon cannot step on TensorFlow in Keras {keras.__version__} (fixed in 3.13)"
    return None


def _cls(name):
    """`keras.optimizers.<name>`, or a skip of the calling test where this Keras cannot run it."""
    reason = _missing(name)
    if reason:
        pytest.skip(reason)
    return getattr(O, name)


def _multi(**kw):
    # MultiOptimizer: kernels by Adam, everything else by SGD with momentum.
    return _cls("MultiOptimizer")(
        O.OptimizerMap(
            default_optimizer=O.SGD(0.05, momentum=0.9, **kw),
            optimizer_map={".*kernel": O.Adam(0.05, **kw)},
        )
    )


OPTIMIZERS = {
    "sgd": lambda **kw: O.SGD(0.1, **kw),
    "sgd_momentum": lambda **kw: O.SGD(0.1, momentum=0.9, **kw),
    "sgd_nesterov": lambda **kw: O.SGD(0.1, momentum=0.9, nesterov=True, **kw),
    "rmsprop_momentum": lambda **kw: O.RMSprop(0.01, momentum=0.9, **kw),
    "rmsprop_centered": lambda **kw: O.RMSprop(0.01, centered=True, **kw),
    "adam": lambda **kw: O.Adam(0.05, **kw),
    "adam_amsgrad": lambda **kw: O.Adam(0.05, amsgrad=True, **kw),
    "adamw": lambda **kw: O.AdamW(0.05, **kw),
    "adamax": lambda **kw: O.Adamax(0.05, **kw),
    "nadam": lambda **kw: O.Nadam(0.05, **kw),
    "adagrad": lambda **kw: O.Adagrad(0.1, **kw),
    "adadelta": lambda **kw: O.Adadelta(1.0, **kw),
    "ftrl": lambda **kw: O.Ftrl(0.1, l1_regularization_strength=0.01, **kw),
    "lion": lambda **kw: O.Lion(0.01, **kw),
    "lamb": lambda **kw: O.Lamb(0.05, **kw),
    "adafactor": lambda **kw: O.Adafactor(0.1, **kw),
    "muon": lambda **kw: _cls("Muon")(0.05, **kw),
    "schedule_free_adamw": lambda **kw: _cls("ScheduleFreeAdamW")(0.05, **kw),
    "multi_optimizer": _multi,
}

# The class each entry needs beyond what every supported Keras has.
_NEEDS = {"muon": "Muon", "schedule_free_adamw": "ScheduleFreeAdamW", "multi_optimizer": "MultiOptimizer"}
AVAILABLE = {k: f for k, f in OPTIMIZERS.items() if k not in _NEEDS or not _missing(_NEEDS[k])}
