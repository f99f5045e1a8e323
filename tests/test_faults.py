"""Nothing is lost on faults, on every backend.

1. A `fit` that crashes mid-run and is resumed with
   `keras.callbacks.BackupAndRestore` ends bit-identical to an uninterrupted
   run: weights, every optimizer variable (masks, multipliers, compact
   indices and state), including masks edited during the run. The resumed
   model is built anew in the same process, where Keras numbers the model
   and its unnamed layers anew (the file's paths differ from the model's).
2. NaN/inf batches never move a frozen element, for every inner optimizer.
3. A rejected `set_mask`/`freeze`/`set_multiplier` mid-fit leaves training
   exactly as if it had not been called (every selected variable is
   validated before any is changed).
"""

from __future__ import annotations

import numpy as np
import pytest

import keras
from backends import to_numpy
from masked_opt import MaskedOptimizer, masked_optimizer
from models import mlp, mse_step, regression_data
from optimizer_table import AVAILABLE, OPTIMIZERS

O = keras.optimizers
ELEMENTWISE = ("sgd", "sgd_momentum", "sgd_nesterov", "rmsprop_momentum", "rmsprop_centered", "adam",
               "adam_amsgrad", "adamw", "adamax", "nadam", "adagrad", "adadelta", "ftrl", "lion")
KERNEL = np.random.default_rng(3).random((8, 16)) < 0.4
FIT = dict(epochs=4, batch_size=16, shuffle=False, verbose=0)


def _model(compact: bool, named: bool = True) -> keras.Model:
    layers = [("d1", 16), ("d2", 3)] if named else [16, 3]
    model = mlp(8, *layers, init_seed=0)
    first, second = (v.path.split("/")[-2] for v in model.trainable_variables[::2])
    opt = MaskedOptimizer(
        O.AdamW(0.01, weight_decay=0.1),
        masks={f"{first}/kernel": KERNEL, f"{first}/bias": False, f"{second}/kernel": np.ones((16, 3), bool)},
        multipliers={f"{second}/kernel": np.linspace(0.25, 1.0, 3, dtype="float32")[None, :]},
        compact_state=compact,
        compact_capacity=1.0 if compact else None,
    )
    model.compile(optimizer=opt, loss="mse")
    return model


class FreezeOneMoreRow(keras.callbacks.Callback):
    """A mask edited during the run: row `epoch` of the first kernel freezes at
    each epoch's start, on top of the rows frozen before (so the resumed run
    must get the earlier rows back from the backup)."""

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model  # syncs JAX's trainer state
        kernel = model.trainable_variables[0]
        masked_optimizer(model).freeze(kernel, np.s_[epoch])


class CrashAt(keras.callbacks.Callback):
    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("simulated crash")


def _state(model: keras.Model) -> list[np.ndarray]:
    return [to_numpy(v) for v in model.weights] + [to_numpy(v) for v in model.optimizer.variables]


@pytest.mark.parametrize("named", [True, False], ids=["named_layers", "auto_named_layers"])
@pytest.mark.parametrize("compact", [False, True], ids=["dense_state", "compact_state"])
def test_crash_and_backup_and_restore_resume_bit_identically(tmp_path, compact, named):
    x, y = regression_data(48, 8, 3)
    reference = _model(compact, named)
    reference.fit(x, y, callbacks=[FreezeOneMoreRow()], **FIT)

    crashed = _model(compact, named)
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup), FreezeOneMoreRow(),
                                     CrashAt(epoch=2, batch=1)], **FIT)
    resumed = _model(compact, named)  # the process carries on: new model, new auto names
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup), FreezeOneMoreRow()], **FIT)

    kernel = resumed.trainable_variables[0]
    expected_mask = KERNEL.copy()
    expected_mask[:4] = False  # rows 0-1 from the backup, 2-3 after the resume
    assert np.array_equal(masked_optimizer(resumed).get_mask(kernel), expected_mask)
    want, got = _state(reference), _state(resumed)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert np.array_equal(g, w), f"state {i} differs from the uninterrupted run"


def test_a_backup_of_other_masks_is_refused_not_mixed(tmp_path):
    x, y = regression_data(48, 8, 3)
    backup = str(tmp_path / "backup")
    first = _model(compact=False)
    first.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)],
              epochs=1, batch_size=16, verbose=0)
    other = mlp(8, ("d1", 16), ("d2", 3), init_seed=0)
    other.compile(MaskedOptimizer(O.AdamW(0.01), masks={"d2/kernel": False}), loss="mse")
    with pytest.raises(ValueError, match="saved masks do not match"):
        other.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup)], epochs=2, verbose=0)


# ---------------------------------------------------------- NaN/inf batches


def _nan_batches() -> tuple[np.ndarray, np.ndarray]:
    """Four batches of 4: clean, NaN inputs, inf targets, clean."""
    x, y = regression_data(16, 6, 3, seed=1)
    x[4:8, 2] = np.nan
    y[8:12, 0] = np.inf
    return x, y


def _nan_run(opt_id: str, compact: bool, use_fit: bool) -> None:
    model = mlp(6, ("d1", 5), ("d2", 3), init_seed=0)
    kernel = np.random.default_rng(2).random((6, 5)) < 0.5
    opt = MaskedOptimizer(OPTIMIZERS[opt_id](), {"d1/kernel": kernel, "d2/bias": False}, compact_state=compact)
    model.compile(optimizer=opt, loss="mse")
    start = [to_numpy(v) for v in model.trainable_variables]
    x, y = _nan_batches()
    if use_fit:
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    else:  # the same batches through a custom loop (eager)
        for i in range(0, 16, 4):
            mse_step(model, opt, x[i:i + 4], y[i:i + 4])
    end = [to_numpy(v) for v in model.trainable_variables]
    assert np.array_equal(end[0][~kernel], start[0][~kernel]), opt_id
    assert np.array_equal(end[3], start[3]), opt_id


@pytest.mark.parametrize("compact", [False, True], ids=["dense_state", "compact_state"])
@pytest.mark.parametrize("opt_id", list(OPTIMIZERS))
def test_nan_and_inf_batches_never_move_a_frozen_element(opt_id, compact):
    if opt_id not in AVAILABLE:
        pytest.skip(f"{opt_id} is not in Keras {keras.__version__}")
    if compact and opt_id not in ELEMENTWISE:
        pytest.skip("compact state serves element-wise optimizers")
    _nan_run(opt_id, compact, use_fit=False)


@pytest.mark.parametrize("compact", [False, True], ids=["dense_state", "compact_state"])
@pytest.mark.parametrize("opt_id", ["adamw", "sgd_momentum", "ftrl"])
def test_nan_and_inf_batches_in_fit_never_move_a_frozen_element(opt_id, compact):
    _nan_run(opt_id, compact, use_fit=True)


# ------------------------------------------------------ rejected edits mid-fit

BAD_EDITS = {
    # Each selects two variables; the first edit is valid, the second (named
    # in the error) is not.
    "set_mask_shape": (lambda opt: opt.set_mask(r"d1/.*", KERNEL | np.eye(8, 16, dtype=bool)), "d1/bias"),
    "freeze_where": (lambda opt: opt.freeze(r".*kernel", np.s_[:, 10]), "d2/kernel"),
    "set_multiplier_value": (
        lambda opt: opt.set_multiplier(r".*kernel", lambda v: 0.75 if v.path.endswith("d1/kernel") else -1.0),
        "d2/kernel",
    ),
    "set_multiplier_shape": (lambda opt: opt.set_multiplier(r".*kernel", np.full((8, 16), 0.25)), "d2/kernel"),
    "over_capacity": (
        lambda opt: opt.set_mask(r".*kernel", lambda v: np.ones(v.shape, bool) if v.path.endswith("d2/kernel")
                                 else np.random.default_rng(0).random(v.shape) < 0.5),
        "d2/kernel",
    ),
}


def _edited_model(compact: bool) -> keras.Model:
    model = mlp(8, ("d1", 16), ("d2", 3), init_seed=0)
    d2_kernel = np.random.default_rng(4).random((16, 3)) < 0.5
    opt = MaskedOptimizer(
        O.Adam(0.01),
        masks={"d1/kernel": KERNEL, "d1/bias": np.ones(16, bool), "d2/kernel": d2_kernel},
        multipliers={"d1/kernel": np.full((8, 16), 0.5, "float32"), "d2/kernel": 1.0},
        compact_state=compact,
        compact_capacity=0.6 if compact else None,
    )
    model.compile(optimizer=opt, loss="mse")
    return model


class CallAt(keras.callbacks.Callback):
    """Makes the call at batch 2 and catches its ValueError (training goes on)."""

    def __init__(self, call):
        super().__init__()
        self.call, self.raised = call, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 2 and self.raised is None:
            with pytest.raises(ValueError) as info:
                self.call(masked_optimizer(self.model))
            self.raised = info.value


_REFERENCE: dict[bool, list[np.ndarray]] = {}


def _reference_state(compact: bool) -> list[np.ndarray]:
    """The run without the call (one per state layout, shared by the edits)."""
    if compact not in _REFERENCE:
        reference = _edited_model(compact)
        reference.fit(*regression_data(64, 8, 3, seed=5), epochs=2, batch_size=16, shuffle=False, verbose=0)
        _REFERENCE[compact] = _state(reference)
    return _REFERENCE[compact]


@pytest.mark.parametrize("compact", [False, True], ids=["dense_state", "compact_state"])
@pytest.mark.parametrize("edit", list(BAD_EDITS))
def test_a_rejected_edit_mid_fit_changes_nothing(edit, compact):
    if edit == "over_capacity" and not compact:
        pytest.skip("capacity is a compact-state limit")
    x, y = regression_data(64, 8, 3, seed=5)
    want = _reference_state(compact)
    model = _edited_model(compact)
    do, named = BAD_EDITS[edit]
    call = CallAt(do)
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[call])
    assert call.raised is not None and named in str(call.raised), call.raised
    for i, (w, g) in enumerate(zip(want, _state(model))):
        assert np.array_equal(g, w), f"{edit}: state {i} differs from the run without the call"
