"""keras.distribution on JAX: DataParallel and ModelParallel over 2 host devices.

conftest.py sets `XLA_FLAGS=--xla_force_host_platform_device_count=2` before JAX
loads. Frozen elements must stay bit-identical; trainable ones must match
single-device training within float tolerance (the gradient is reduced across
devices in another order, so not bitwise). Full-shape masks take their
weight's layout (sharded like it; Keras 3.10+); broadcast masks are replicated.
"""

import numpy as np
import pytest

import keras
from backends import jax_only
from models import mlp
from masked_opt import MaskedOptimizer, _compat

pytestmark = jax_only  # keras.distribution runs on JAX

ELEM = np.random.default_rng(1).random((8, 6)) < 0.5
COL = np.array([[True, False, True, True, False, True]])
# Optimizer variables take a layout from Keras 3.10 on; before, the distribution
# places a mask by its own path (as it places Keras's slots), so the LayoutMap
# below leaves it replicated.
MASKS_FOLLOW_WEIGHTS = _compat.ADD_VARIABLE_TAKES_LAYOUT


def _devices():
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2:
        pytest.fail("expected 2 host devices (XLA_FLAGS set by conftest.py before JAX loads)")
    return devices[:2]


def _model():
    return mlp(8, ("d1", 6), ("d2", 6), ("out", 4), name="net", init_seed=0)


def _train(distribution=None, steps=4):
    """AdamW with weight decay (moves every element it touches) for `steps` batches."""
    keras.distribution.set_distribution(distribution)
    try:
        model = _model()
        opt = MaskedOptimizer(
            keras.optimizers.AdamW(0.05, weight_decay=0.1),
            {"d1/kernel": ELEM, "d1/bias": False, "d2/kernel": COL},
        )
        model.compile(optimizer=opt, loss="mse")
        start = [np.array(v.numpy()) for v in model.trainable_variables]
        rng = np.random.default_rng(2)
        x = rng.normal(size=(8 * steps, 8)).astype("float32")
        y = rng.normal(size=(8 * steps, 4)).astype("float32")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        end = [np.array(v.numpy()) for v in model.trainable_variables]
        masks = {v.path: _mask_variable(opt, v) for v in opt.masked_variables}
        return model, opt, start, end, masks
    finally:
        keras.distribution.set_distribution(None)


def _mask_variable(opt, variable):
    """The optimizer variable holding `variable`'s mask (named after its path:
    part of the saved format)."""
    name = variable.path.replace("/", "_") + "_mask"
    return next(v for v in opt.variables if v.name == name)


def _check_frozen(start, end):
    d1k, d1b, d2k = 0, 1, 2
    assert np.array_equal(end[d1k][~ELEM], start[d1k][~ELEM])
    assert np.array_equal(end[d1b], start[d1b])
    frozen_cols = ~np.broadcast_to(COL, (6, 6))
    assert np.array_equal(end[d2k][frozen_cols], start[d2k][frozen_cols])
    assert np.any(end[d1k][ELEM] != start[d1k][ELEM])  # non-vacuous
    assert np.any(end[d2k][~frozen_cols] != start[d2k][~frozen_cols])


def _sharding(x):
    return x.value.sharding if hasattr(x, "value") else x.sharding


def test_data_parallel_keeps_frozen_exact_and_matches_single_device():
    _, _, start, single, _ = _train()
    model, opt, start2, end, masks = _train(keras.distribution.DataParallel(devices=_devices()))
    for a, b in zip(start, start2):
        assert np.array_equal(a, b)
    _check_frozen(start2, end)
    for s, e in zip(single, end):
        np.testing.assert_allclose(e, s, rtol=1e-5, atol=1e-6)
    # Masks are replicated on both devices, like the weights.
    for path, mask in masks.items():
        assert len(_sharding(mask).device_set) == 2, path
        assert _sharding(mask).is_fully_replicated, path


def test_model_parallel_shards_full_shape_masks_like_their_weight():
    devices = _devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*d1/kernel"] = (None, "model")  # (8, 6) split over columns (fullmatch)
    layout_map[".*d2/kernel"] = (None, "model")
    _, _, start, single, _ = _train()
    model, opt, start2, end, masks = _train(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    _check_frozen(start2, end)
    for s, e in zip(single, end):
        np.testing.assert_allclose(e, s, rtol=1e-5, atol=1e-6)
    kernel = model.get_layer("d1").kernel
    full_mask = masks[kernel.path]
    assert not _sharding(kernel).is_fully_replicated  # the LayoutMap took effect
    if MASKS_FOLLOW_WEIGHTS:
        assert _sharding(full_mask).spec == _sharding(kernel).spec  # the mask follows its weight
        assert not _sharding(full_mask).is_fully_replicated
    else:
        assert _sharding(full_mask).is_fully_replicated
    col_mask = masks[model.get_layer("d2").kernel.path]  # stored (1, 6): broadcast
    assert tuple(col_mask.shape) == (1, 6)
    assert _sharding(col_mask).is_fully_replicated
    # The Adam slots of the sharded kernel are sharded too (stock Keras), and
    # the mask edits still work on sharded storage.
    opt.freeze(kernel.path, np.s_[:, :3])
    assert not opt.get_mask(kernel)[:, :3].any()
    assert np.array_equal(opt.get_mask(kernel)[:, 3:], ELEM[:, 3:])
    if MASKS_FOLLOW_WEIGHTS:
        assert _sharding(full_mask).spec == _sharding(kernel).spec
