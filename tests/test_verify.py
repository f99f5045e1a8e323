"""verify_frozen, snapshot_frozen and the VerifyFrozen callback: frozen
elements checked bit for bit against a snapshot."""

import numpy as np
import pytest

import keras
import masked_opt
from masked_opt import MaskedOptimizer
from masked_opt import verify as V
from models import mse_step, small_data, small_masked
from optimizer_table import AVAILABLE


def _half_frozen(inner=None, build=True):
    mask = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    model, opt = small_masked({"dense/kernel": mask, "dense_1/bias": False}, inner=inner, build=build)
    return model, opt, mask


def test_verify_frozen_passes_after_training_and_counts_checked_elements():
    model, opt, mask = _half_frozen(keras.optimizers.AdamW(0.1, weight_decay=0.5))
    ref = V.snapshot_frozen(opt)
    assert set(ref.frozen) == {"sequential/dense/kernel", "sequential/dense_1/bias"}
    x, y = small_data()
    for _ in range(3):
        mse_step(model, opt, x, y)
    assert V.verify_frozen(opt, ref) == int((~mask).sum()) + 2


def test_verify_frozen_passes_for_every_inner_optimizer():
    # Decay and EMA are what move zero-gradient elements; the check must stay quiet.
    # One loop over the shared table (not a parametrization): the per-test teardown
    # (keras clear_session + gc) would cost more than the steps.
    x, y = small_data(8)
    for opt_id, factory in sorted(AVAILABLE.items()):
        keras.backend.clear_session(free_memory=False)  # layer names restart at "dense"
        model, opt, _ = _half_frozen(factory(weight_decay=0.1, use_ema=True))
        ref = V.snapshot_frozen(opt)
        for _ in range(2):
            mse_step(model, opt, x, y)
        try:
            assert V.verify_frozen(opt, ref) == 8, opt_id
        except V.FrozenWeightsChangedError as e:
            raise AssertionError(f"{opt_id}: {e}") from None


def test_verify_frozen_reports_path_and_count_of_tampered_elements():
    model, opt, _ = _half_frozen()
    ref = V.snapshot_frozen(opt)
    kernel = model.trainable_variables[0]
    w = kernel.numpy()
    w[0, 1] += 1.0  # frozen
    w[1, 0] = -w[1, 0] if w[1, 0] != 0 else -0.0  # frozen
    w[0, 0] += 1.0  # trainable: allowed
    kernel.assign(w)
    with pytest.raises(
        V.FrozenWeightsChangedError,
        match=r"'sequential/dense/kernel': 2 of 6 frozen elements changed .*index \(0, 1\)",
    ):
        V.verify_frozen(opt, ref)
    assert issubclass(V.FrozenWeightsChangedError, AssertionError)


def test_verify_frozen_compares_bits():
    model, opt, _ = _half_frozen()
    bias = model.trainable_variables[3]
    bias.assign([np.nan, 0.0])
    ref = V.snapshot_frozen(opt)
    assert V.verify_frozen(opt, ref) > 0  # a frozen NaN equals itself
    bias.assign([np.nan, -0.0])
    with pytest.raises(V.FrozenWeightsChangedError, match=r"dense_1/bias': 1 of 2"):
        V.verify_frozen(opt, ref)


def test_verify_frozen_allows_mask_changes_since_snapshot():
    model, opt, mask = _half_frozen()
    ref = V.snapshot_frozen(opt)
    x, y = small_data()
    opt.unfreeze("dense/kernel", np.s_[0])  # (0, 1) becomes trainable and moves
    mse_step(model, opt, x, y)
    opt.freeze("dense/kernel", np.s_[2])  # (2, 0), (2, 1) moved before being frozen
    # Checked: frozen at the snapshot and now: (1,0), (1,2), (2,2), (3,0), (3,1), + 2 bias.
    assert V.verify_frozen(opt, ref) == 7


def test_verify_frozen_rejects_foreign_reference():
    model, opt, _ = _half_frozen()
    other = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/bias": False})
    other.build(model.trainable_variables)
    with pytest.raises(
        ValueError, match="'sequential/dense/kernel', which optimizer .* does not mask"
    ):
        V.verify_frozen(other, V.snapshot_frozen(opt))
    with pytest.raises(TypeError, match="FrozenSnapshot"):
        V.verify_frozen(opt, {"sequential/dense/kernel": np.zeros((4, 3))})


class _Tamper(keras.callbacks.Callback):
    """Writes to a frozen kernel element after the second batch."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            kernel = self.model.trainable_variables[0]
            kernel.assign(
                kernel.numpy() + np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], "float32")
            )


class _Unfreeze(keras.callbacks.Callback):
    def __init__(self, opt):
        super().__init__()
        self.opt = opt

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.opt.unfreeze("dense/kernel")


def test_verify_frozen_callback_passes_under_fit_with_mask_changes():
    # Unbuilt at fit: the callback builds it at train begin to take its snapshot.
    model, opt, _ = _half_frozen(keras.optimizers.AdamW(0.05, weight_decay=0.5), build=False)
    model.compile(opt, loss="mse")
    cb = V.VerifyFrozen()
    x, y = small_data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[_Unfreeze(opt), cb])
    # epoch 0: 6 kernel + 2 bias; epochs 1, 2: kernel unfrozen, 2 bias; train end: 2 bias
    assert cb.checked == 8 + 2 + 2 + 2
    assert np.all(opt.get_mask("dense/kernel"))


def test_verify_frozen_callback_raises_on_tampering():
    model, opt, _ = _half_frozen()
    model.compile(opt, loss="mse")
    x, y = small_data()
    with pytest.raises(V.FrozenWeightsChangedError, match=r"'sequential/dense/kernel': 1 of 6"):
        model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[_Tamper(), V.VerifyFrozen()])


def test_verify_frozen_callback_unwraps_loss_scale_optimizer():
    model, opt, _ = _half_frozen(build=False)
    lso = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(lso, loss="mse")
    cb = V.VerifyFrozen()
    x, y = small_data()
    with pytest.raises(V.FrozenWeightsChangedError, match="dense/kernel"):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[_Tamper(), cb])


def test_verify_frozen_between_batches_from_a_callback_holding_only_the_optimizer():
    # On JAX the weights are detached during `fit`; `verify_frozen` reads the
    # masks first (which syncs the trainer's state), then the weights.
    model, opt, mask = _half_frozen(keras.optimizers.AdamW(0.05, weight_decay=0.5))
    model.compile(opt, loss="mse")
    ref = V.snapshot_frozen(opt)
    checked = []
    cb = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: checked.append(V.verify_frozen(opt, ref)))
    x, y = small_data()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    assert checked == [int((~mask).sum()) + 2] * 4
    assert masked_opt.mask_summary(opt).frozen == int((~mask).sum()) + 2


def test_verify_frozen_callback_rejects_non_masked_optimizer():
    with pytest.raises(TypeError, match="needs a MaskedOptimizer"):
        V.VerifyFrozen(keras.optimizers.SGD(0.1))
