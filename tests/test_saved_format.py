"""The saved-file format is frozen: files written before the redesign of
issue 14 (masked_opt 0.1.0 at commit e8871db, `tests/data/saved_*.keras`,
written by `tests/data/make_saved_files.py` from `saved_format_cases.py`)
load under every backend, and saving them again writes what that code wrote
(`saved_*_resaved.keras`): the same optimizer config and the same datasets,
bit for bit. A model built today from the same
case saves the same structure: dataset paths, dtypes and shapes, the same
masks, indices and multipliers, and float state within a few ulp (it was
computed on another backend or CPU)."""

from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import numpy as np
import pytest

import keras
import masked_opt  # noqa: F401  (registers MaskedOptimizer with keras.saving)
from backends import IS_TF, KERAS_VERSION, assert_ulp_close
from saved_format_cases import CASES

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(the optimizer's config, {dataset path: array}) of a `.keras` file."""
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read("config.json"))
        weights = io.BytesIO(z.read("model.weights.h5"))
    arrays = {}
    with h5py.File(weights, "r") as f:
        f.visititems(
            lambda name, obj: arrays.__setitem__(name, np.array(obj))
            if isinstance(obj, h5py.Dataset)
            else None
        )
    return config["compile_config"]["optimizer"], arrays


def _without_name(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    config["config"].pop("name")
    config["config"]["inner_optimizer"]["config"].pop("name")
    return config


@pytest.mark.skipif(
    KERAS_VERSION < (3, 15),
    reason="the fixtures were written by Keras 3.15; an older Keras cannot read its layer configs "
    "(e.g. Dense's `quantization_config`), whatever the optimizer",
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_old_file_loads_and_saves_back_bit_for_bit(case, tmp_path):
    old = os.path.join(DATA, f"saved_{case}.keras")
    old_config, old_arrays = _read(old.replace(".keras", "_resaved.keras"))
    model = keras.models.load_model(old)
    again = str(tmp_path / "again.keras")
    model.save(again)
    new_config, new_arrays = _read(again)
    assert new_config == old_config
    assert sorted(new_arrays) == sorted(old_arrays)
    for name, value in old_arrays.items():
        got = new_arrays[name]
        assert got.shape == value.shape and _same_dtype(got, value), name
        assert np.array_equal(got, value), name


def _same_dtype(got: np.ndarray, want: np.ndarray) -> bool:
    """The fixtures were written on TensorFlow; JAX (without x64) keeps the
    step counters as int32 where TensorFlow has int64: that is Keras's."""
    if IS_TF or got.dtype == want.dtype:
        return got.dtype == want.dtype
    return got.dtype.kind == want.dtype.kind == "i"


@pytest.mark.parametrize("case", sorted(CASES))
def test_todays_file_has_the_old_layout(case, tmp_path):
    old_config, old_arrays = _read(os.path.join(DATA, f"saved_{case}.keras"))
    path = str(tmp_path / "today.keras")
    CASES[case]().save(path)
    new_config, new_arrays = _read(path)
    assert _without_name(new_config) == _without_name(old_config)
    assert sorted(new_arrays) == sorted(old_arrays)
    for name, value in old_arrays.items():
        got = new_arrays[name]
        assert got.shape == value.shape and _same_dtype(got, value), name
        if np.issubdtype(value.dtype, np.floating):
            assert_ulp_close(got, value, 64, name)  # another backend or CPU computed it
        else:  # masks, indices, counts, step counters, the metadata record
            assert np.array_equal(got, value), name
