"""`MaskedOptimizer.inspect()`: the public view of what the optimizer keeps
per variable (storage shapes, compact capacity, bit-packed copies) and of how
its update ran (traces, XLA functions, whether the last update was compiled),
which tests and benchmarks read instead of private attributes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import keras
from backends import IS_TF, IS_TORCH, CompiledStep, tensor, tf_only
from masked_opt import MaskedOptimizer, OptimizerInfo, VariableInfo
from models import mlp, regression_data

O = keras.optimizers


def _model():
    return mlp(6, ("d1", 5), ("d2", 3), name="net", init_seed=0)


def test_before_build_nothing_is_known_and_nothing_ran():
    info = MaskedOptimizer(O.Adam(), {"d1/kernel": False}).inspect()
    assert info == OptimizerInfo(built=False, compact_state=False, variables=(), update_traces=0,
                                 xla_functions=0, last_update_compiled=None)


def test_rows_give_storage_shapes_in_build_order():
    model = _model()
    opt = MaskedOptimizer(
        O.Adam(),
        masks={"d1/kernel": np.ones((1, 5), bool), "d2/bias": False},
        multipliers={"d1/kernel": 0.5, "d2/kernel": np.ones((5, 3), "float32")},
    )
    opt.build(model.trainable_variables)
    info = opt.inspect()
    assert info.built and not info.compact_state
    assert [v.path for v in info.variables] == ["net/d1/kernel", "net/d2/kernel", "net/d2/bias"]
    assert info.variable("d1/kernel") == VariableInfo(
        path="net/d1/kernel", shape=(6, 5), mask_shape=(1, 5), multiplier_shape=(),
        compact_capacity=None, packed_mask=False,
    )
    assert info.variable("d2/kernel").mask_shape is None
    assert info.variable("d2/kernel").multiplier_shape == (5, 3)
    assert info.variable("d2/bias").mask_shape == ()
    with pytest.raises(KeyError, match="d1/bias"):
        info.variable("d1/bias")  # neither masked nor multiplied
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.built = False


def test_compact_rows_give_capacities():
    model = _model()
    mask = np.zeros((6, 5), bool)
    mask[:2] = True
    opt = MaskedOptimizer(O.Adam(), {"d1/kernel": mask}, compact_state=True, compact_capacity=15)
    opt.build(model.trainable_variables)
    info = opt.inspect()
    assert info.compact_state and info.variable("d1/kernel").compact_capacity == 15


def test_large_full_shape_masks_get_a_packed_copy_for_compiled_steps():
    kernel = keras.Variable(np.zeros((256, 512), "float32"), name="big")
    small = keras.Variable(np.zeros((8, 8), "float32"), name="small")
    opt = MaskedOptimizer(O.Adam(), [(kernel, np.ones((256, 512), bool)), (small, np.ones((8, 8), bool))])
    opt.build([kernel, small])
    info = opt.inspect()
    assert info.variable("big").packed_mask
    assert not info.variable("small").packed_mask


def test_eager_updates_count_one_trace_per_call():
    model = _model()
    opt = MaskedOptimizer(O.SGD(0.1), {"d1/kernel": False})
    grads = [tensor(np.ones(v.shape, "float32")) for v in model.trainable_variables]
    for _ in range(3):
        opt.apply(grads, model.trainable_variables)
    info = opt.inspect()
    assert info.update_traces == 3 and info.last_update_compiled is False and info.xla_functions == 0


def test_a_compiled_step_traces_the_update_once():
    model = _model()
    opt = MaskedOptimizer(O.Adam(0.1), {"d1/kernel": np.eye(6, 5, dtype=bool)})
    step = CompiledStep(opt, model.trainable_variables)
    grads = [tensor(np.ones(v.shape, "float32")) for v in model.trainable_variables]
    for _ in range(4):
        step(grads)
    info = opt.inspect()
    if IS_TORCH:  # eager: Python runs every step
        assert info.update_traces == 4 and info.last_update_compiled is False
    else:
        assert info.update_traces == 1
        assert info.last_update_compiled is True  # JAX's jit; TF's "auto" picks XLA here
        assert info.xla_functions == (1 if IS_TF else 0)


def test_fit_reports_how_the_update_ran():
    model = _model()
    opt = MaskedOptimizer(O.Adam(0.1), {"d1/kernel": np.eye(6, 5, dtype=bool)})
    model.compile(optimizer=opt, loss="mse")
    x, y = regression_data(32, 6, 3)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    info = opt.inspect()
    if IS_TORCH:
        assert info.update_traces == 8 and info.last_update_compiled is False
    else:
        assert 1 <= info.update_traces <= 2  # traced, not run per step
        assert info.last_update_compiled is True
    assert info.xla_functions == (1 if IS_TF else 0)


@tf_only
def test_graph_mode_is_reported_as_not_compiled():
    model = _model()
    opt = MaskedOptimizer(O.Adam(0.1), {"d1/kernel": np.eye(6, 5, dtype=bool)}, jit_compile=False)
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(16, 6, 3), batch_size=8, verbose=0)
    info = opt.inspect()
    assert info.last_update_compiled is False and info.xla_functions == 0


def test_info_is_exported_for_type_annotations():
    import masked_opt

    assert masked_opt.OptimizerInfo is OptimizerInfo and masked_opt.VariableInfo is VariableInfo
    assert "OptimizerInfo" in masked_opt.__all__ and "VariableInfo" in masked_opt.__all__
