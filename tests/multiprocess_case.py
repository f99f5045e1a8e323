"""The model, masks and data of `test_multiprocess_jax.py`, shared with the
worker processes it starts (`multiprocess_worker.py`)."""

import keras
import numpy as np

from masked_opt import MaskedOptimizer

BATCH, STEPS = 8, 4


def masks() -> dict:
    rng = np.random.default_rng(1)
    return {
        "d1/kernel": rng.random((8, 6)) < 0.5,  # element mask, sharded like its kernel under ModelParallel
        "d1/bias": False,
        "d2/kernel": np.array([[True, False, True, True]]),  # column mask, stored (1, 4): replicated
    }


def build() -> tuple[keras.Model, MaskedOptimizer]:
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(6, name="d1"), keras.layers.Dense(4, name="d2")], name="net"
    )
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(size=tuple(v.shape)).astype("float32"))
    # AdamW with weight decay moves every element it is handed: a frozen one that moved would show.
    optimizer = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), masks())
    model.compile(optimizer=optimizer, loss="mse")
    return model, optimizer


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return (rng.normal(size=(BATCH * STEPS, 8)).astype("float32"),
            rng.normal(size=(BATCH * STEPS, 4)).astype("float32"))
