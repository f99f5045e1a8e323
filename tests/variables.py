"""Small scoped `keras.Variable`s shared by the API and error tests."""

import keras
import numpy as np


def scoped_variable(value, name, *scopes):
    """A `keras.Variable` whose path is `scope/.../name`."""
    value = np.asarray(value, dtype="float32")
    if not scopes:
        return keras.Variable(value, name=name)
    with keras.name_scope(scopes[0]):
        return scoped_variable(value, name, *scopes[1:])


def net_variables():
    """'net/dense_1/kernel' (3, 4), 'net/dense_1/bias' (4,), 'net/dense_2/kernel' (4, 2)."""
    rng = np.random.default_rng(0)
    return [
        scoped_variable(rng.normal(size=(3, 4)), "kernel", "net", "dense_1"),
        scoped_variable(rng.normal(size=(4,)), "bias", "net", "dense_1"),
        scoped_variable(rng.normal(size=(4, 2)), "kernel", "net", "dense_2"),
    ]
