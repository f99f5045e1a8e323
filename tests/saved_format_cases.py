"""The models whose saved files `tests/test_saved_format.py` freezes.

Each case builds, compiles and trains (a few eager steps with fixed
pseudo-random gradients) a small model with a `MaskedOptimizer`: dense
masks of every storage shape with multipliers, compact state with
capacity, an optimizer saved before it was built, and a MultiOptimizer-free
EMA + accumulation inner optimizer. Changing a case changes the fixtures:
don't.
"""

from __future__ import annotations

import numpy as np

import keras
from masked_opt import MaskedOptimizer

O = keras.optimizers


def _model(name: str) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="dense_1"),
            keras.layers.Dense(4, name="dense_2"),
            keras.layers.Dense(3, name="head"),
        ],
        name=name,
    )
    init = np.random.default_rng(0)  # the same weights on every backend
    for v in model.trainable_variables:
        v.assign(init.normal(size=v.shape).astype("float32"))
    return model


def _steps(model: keras.Model, n: int = 3, seed: int = 0) -> keras.Model:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        grads = [
            keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
            for v in model.trainable_variables
        ]
        model.optimizer.apply(grads, model.trainable_variables)
    return model


ELEMENT = np.random.default_rng(1).random((6, 8)) < 0.4


def dense_masks_and_multipliers() -> keras.Model:
    model = _model("dense_case")
    opt = MaskedOptimizer(
        O.AdamW(0.05, weight_decay=0.1),
        masks={
            "dense_1/kernel": ELEMENT,  # full shape
            "dense_1/bias": False,  # scalar
            "dense_2/kernel": np.array([[True, False, True, False]]),  # columns (1, 4)
        },
        multipliers={"dense_2/bias": 0.5, "head/kernel": np.linspace(0, 1, 3, dtype="float32")[None, :]},
    )
    model.compile(optimizer=opt, loss="mse")
    return _steps(model)


def compact_state() -> keras.Model:
    model = _model("compact_case")
    opt = MaskedOptimizer(
        O.Adam(0.05, use_ema=True),
        masks={"dense_1/kernel": ELEMENT, "dense_2/kernel": np.eye(8, 4, dtype=bool)},
        multipliers={"dense_2/kernel": 0.25},
        compact_state=True,
        compact_capacity=0.5,
    )
    model.compile(optimizer=opt, loss="mse")
    return _steps(model)


def unbuilt() -> keras.Model:
    model = _model("unbuilt_case")
    opt = MaskedOptimizer(
        O.SGD(0.1, momentum=0.9),
        masks={"dense_1/kernel": ELEMENT, "head": False},
        multipliers={"dense_2/kernel": np.full((1, 4), 0.5, "float32")},
    )
    model.compile(optimizer=opt, loss="mse")
    return model  # not built: the arrays go in the weights file by entry


def accumulation() -> keras.Model:
    model = _model("accumulation_case")
    opt = MaskedOptimizer(
        O.RMSprop(0.01, momentum=0.9, gradient_accumulation_steps=2),
        masks={"dense_2/kernel": ~np.eye(8, 4, dtype=bool)},
    )
    model.compile(optimizer=opt, loss="mse")
    return _steps(model, n=4)


CASES = {
    "dense": dense_masks_and_multipliers,
    "compact": compact_state,
    "unbuilt": unbuilt,
    "accumulation": accumulation,
}
