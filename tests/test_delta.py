"""SparseDelta: built, saved, loaded, applied, reverted and composed exactly.

Oracles are NumPy: the changed positions are where the bits of two weight
copies differ, the applied model is the tuned copy, the reverted one the base
copy, all compared with `np.array_equal` on bit patterns."""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

import masked_opt
from masked_opt import MaskedOptimizer, SparseDelta
from masked_opt._delta_file import decode_positions, encode_positions
from masked_opt.delta import BaseRecord
from models import classification_data, mlp

DATA = os.path.join(os.path.dirname(__file__), "data")


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def numpy_weights(model):
    return [np.array(keras.ops.convert_to_numpy(w.value)) for w in model.weights]


def assert_bits_equal(model, expected):
    for w, e in zip(model.weights, expected):
        assert np.array_equal(bits(keras.ops.convert_to_numpy(w.value).astype(e.dtype)), bits(e)), w.path


def seeded_model(seed=0, sizes=(64, 96, 10), dtype=None):
    """An MLP whose weights come from NumPy (the same on every backend)."""
    model = mlp(sizes[0], *sizes[1:])
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(size=tuple(w.shape)).astype("float32"))
    return model


def tune(base_values, seed, fraction):
    """Tuned copies: `fraction` of each kernel's elements and every bias changed."""
    rng = np.random.default_rng(seed)
    tuned = []
    for v in base_values:
        t = v.copy()
        if v.ndim == 2:
            at = rng.choice(v.size, max(1, int(fraction * v.size)), replace=False)
            t.reshape(-1)[at] += rng.normal(scale=1e-2, size=at.size).astype(v.dtype)
        else:
            t += np.float32(0.5)
        tuned.append(t)
    return tuned


def pair(seed=0, fraction=0.05, sizes=(64, 96, 10)):
    base = seeded_model(seed, sizes)
    tuned = seeded_model(seed, sizes)
    expected = tune(numpy_weights(base), seed + 1, fraction)
    for w, t in zip(tuned.weights, expected):
        w.assign(t)
    return base, tuned, numpy_weights(base), expected


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize(
    "positions",
    [[], [0], [5], list(range(10)), [0, 127, 128, 255, 16_510, 16_511, 49_152, 2**40, 2**40 + 1, 2**62]],
)
def test_position_encoding_round_trips(positions):
    positions = np.array(positions, np.int64)
    assert np.array_equal(decode_positions(encode_positions(positions)), positions)


def test_position_encoding_bytes_per_position():
    # Gaps below 128 take one byte, below 16,384 two (LEB128 of gap - 1).
    assert encode_positions(np.arange(0, 128 * 100, 128)).size == 100  # gap 128 -> 127: one byte
    assert encode_positions(np.arange(0, 129 * 100, 129)).size == 1 + 99 * 2
    rng = np.random.default_rng(0)
    one_percent = np.sort(rng.choice(1_000_000, 10_000, replace=False))
    assert encode_positions(one_percent).size / 10_000 < 1.4


# ---------------------------------------------------------------- from_models


def test_from_models_stores_exactly_the_changed_elements():
    base, tuned, b, t = pair()
    delta = SparseDelta.from_models(base, tuned)
    assert delta.paths == [w.path for w in base.weights]
    for w, bv, tv in zip(base.weights, b, t):
        changed = np.flatnonzero(bits(bv) != bits(tv))
        assert np.array_equal(delta.positions(w.path), changed), w.path
        assert np.array_equal(bits(delta.differences(w.path)), bits((tv - bv).reshape(-1)[changed])), w.path
    assert delta.num_changed == sum(int(np.sum(bits(x) != bits(y))) for x, y in zip(b, t))


def test_apply_gives_the_tuned_model_and_revert_the_base_bit_for_bit():
    base, tuned, b, t = pair()
    delta = SparseDelta.from_models(base, tuned)
    delta.apply(base)
    assert_bits_equal(base, t)
    delta.revert(base)
    assert_bits_equal(base, b)


def test_values_that_do_not_round_trip_are_fixed_up():
    base = seeded_model(sizes=(4, 3))
    tuned = seeded_model(sizes=(4, 3))
    b = numpy_weights(base)
    t = [x.copy() for x in b]
    kernel_b, kernel_t = b[0].reshape(-1), t[0].reshape(-1)
    # 3 + (1e-9 - 3) rounds to 0 in float32; 0.0 -> -0.0 changes only the sign bit.
    kernel_b[:3] = [3.0, 0.0, 1e30]
    kernel_t[:3] = [1e-9, -0.0, -1e-30]
    kernel_b[3:], kernel_t[3:] = 1.0, 1.0
    base.weights[0].assign(b[0])
    tuned.weights[0].assign(t[0])
    for w, x in zip(tuned.weights[1:], b[1:]):
        w.assign(x)
    delta = SparseDelta.from_models(base, tuned)
    assert np.array_equal(delta.positions(base.weights[0].path), [0, 1, 2])
    delta.apply(base)
    assert_bits_equal(base, t)
    delta.revert(base)
    assert_bits_equal(base, b)


def test_nearly_dense_variables_are_stored_dense():
    base, tuned, _, _ = pair(fraction=0.9)
    delta = SparseDelta.from_models(base, tuned)
    # bias: changed everywhere; kernel: 90 % changed -> cheaper dense (4 < 0.9 * 6 bytes).
    assert "dense" in repr(delta) and "(4 dense)" in repr(delta)


def test_scaled_apply_matches_numpy_and_reverts_exactly():
    base, tuned, b, t = pair()
    delta = SparseDelta.from_models(base, tuned)
    delta.apply(base, scale=0.5)
    expected = [(x.astype(np.float32) + 0.5 * (y - x)).astype(np.float32) for x, y in zip(b, t)]
    assert_bits_equal(base, expected)
    delta.revert(base)
    assert_bits_equal(base, b)


def test_trainable_only_leaves_batchnorm_statistics_out():
    def net():
        inputs = keras.Input((8,))
        return keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs)))

    base, tuned = net(), net()
    for b, t in zip(base.weights, tuned.weights):
        t.assign(keras.ops.convert_to_numpy(b.value) + 1.0)
    assert len(SparseDelta.from_models(base, tuned)) == 6
    only = SparseDelta.from_models(base, tuned, trainable_only=True)
    assert sorted(p.split("/")[-1] for p in only.paths) == ["beta", "bias", "gamma", "kernel"]


# ------------------------------------------------------------------ save/load


def test_save_load_round_trip_and_file_size(tmp_path):
    base, tuned, b, t = pair(fraction=0.01, sizes=(512, 512, 10))
    delta = SparseDelta.from_models(base, tuned)
    path = tmp_path / "task.delta.npz"
    delta.save(path)
    loaded = SparseDelta.load(path)
    for p in delta.paths:
        assert np.array_equal(loaded.positions(p), delta.positions(p))
        assert np.array_equal(bits(loaded.differences(p)), bits(delta.differences(p)))
    loaded.apply(base)
    assert_bits_equal(base, t)
    # Stated bound: 4 bytes of value + <= 2 of position per changed element + 0.5 KB per variable.
    kernel_elements = sum(int(np.sum(bits(x) != bits(y))) for x, y in zip(b, t) if x.ndim == 2)
    bias_elements = sum(x.size for x in b if x.ndim == 1)
    size = os.path.getsize(path)
    assert size <= kernel_elements * (4 + 2) + bias_elements * 4 + 512 * len(delta) + 512
    assert size < 0.1 * sum(x.nbytes for x in b)


def test_saved_file_loads_without_pickle_and_is_documented(tmp_path):
    # The layout documented in masked_opt/_delta_file.py, read back with NumPy, json and zlib alone.
    import json
    import zlib

    base, tuned, b, t = pair()
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz", allow_pickle=False) as data:
        assert set(data.files) == {"header", "data"}
        header = json.loads(bytes(data["header"]))
        blob = bytes(data["data"])
    assert (header["format"], header["version"], header["data_bytes"]) == ("masked_opt_delta", 2, len(blob))
    for entry, bv, tv in zip(header["variables"], b, t):
        changed = np.flatnonzero(bits(bv).reshape(-1) != bits(tv).reshape(-1))
        assert header["sections"] == ["values", "positions", "apply_fix_at", "apply_fix", "revert_fix_at", "revert_fix"]
        nbytes, counts = entry["sizes"][0::2], entry["sizes"][1::2]
        own = blob[entry["offset"]:entry["offset"] + sum(nbytes)]
        assert zlib.crc32(own) == entry["crc32"]
        values = np.frombuffer(own[:nbytes[0]], "<f4")
        assert entry["count"] == counts[0] == changed.size == values.size
        assert counts[1] == (0 if entry["dense"] else changed.size)
        assert np.array_equal(bits(values), bits((tv - bv).reshape(-1)[changed]))
        assert entry["tuned_sha256"] == masked_opt.delta.fingerprint(tv.reshape(-1))


@pytest.mark.parametrize("name", ["delta_v1.npz", "delta_v2.npz"])
def test_a_delta_made_on_tensorflow_applies_on_this_backend(name):
    # tests/data/delta_v*.npz: made by tests/data/make_delta_file.py on TensorFlow
    # (v1 by masked_opt before format version 2) from `pair(seed=7)`; the base and
    # tuned values are NumPy's, so on every backend the model built here is the same base.
    base, _, b, t = pair(seed=7)
    SparseDelta.load(os.path.join(DATA, name)).apply(base)
    assert_bits_equal(base, t)


def test_applies_to_the_same_architecture_built_again_in_this_process():
    base, tuned, b, t = pair()
    delta = SparseDelta.from_models(base, tuned)
    again = seeded_model()  # Keras numbers its layers anew: dense_2 -> dense_4 ...
    assert [w.path for w in again.weights] != [w.path for w in base.weights]
    delta.apply(again)
    assert_bits_equal(again, t)


def test_bfloat16_delta_round_trips(tmp_path):
    keras.config.set_dtype_policy("bfloat16")
    base, tuned = mlp(16, 8), mlp(16, 8)
    rng = np.random.default_rng(0)
    for b, t in zip(base.weights, tuned.weights):
        values = rng.normal(size=tuple(b.shape)).astype(ml_dtypes.bfloat16)
        b.assign(values.astype(np.float32))
        t.assign((values + ml_dtypes.bfloat16(0.25)).astype(np.float32))
    expected = [keras.ops.convert_to_numpy(w.value).astype(ml_dtypes.bfloat16) for w in tuned.weights]
    original = [keras.ops.convert_to_numpy(w.value).astype(ml_dtypes.bfloat16) for w in base.weights]
    SparseDelta.from_models(base, tuned).save(tmp_path / "bf16.npz")
    delta = SparseDelta.load(tmp_path / "bf16.npz")
    delta.apply(base)
    assert_bits_equal(base, expected)
    delta.revert(base)
    assert_bits_equal(base, original)


# ------------------------------------------------------------------ composition


def test_disjoint_deltas_compose_to_both_applied():
    base, _, b, _ = pair()
    tuned_a, tuned_b = seeded_model(), seeded_model()
    ta, tb = [x.copy() for x in b], [x.copy() for x in b]
    ta[0].reshape(-1)[:100] += np.float32(0.25)  # language: first 100 elements of kernel 0
    tb[0].reshape(-1)[100:150] -= np.float32(0.5)  # task: the next 50 and kernel 1
    tb[2].reshape(-1)[:7] *= np.float32(2.0)
    for m, vals in ((tuned_a, ta), (tuned_b, tb)):
        for w, v in zip(m.weights, vals):
            w.assign(v)
    both = SparseDelta.from_models(base, tuned_a) + SparseDelta.from_models(base, tuned_b)
    expected = [np.where(bits(x) != bits(y), x, z) for x, y, z in zip(ta, b, tb)]
    both.apply(base)
    assert_bits_equal(base, expected)
    both.revert(base)
    assert_bits_equal(base, b)


def test_overlapping_deltas_raise_unless_summed():
    base, tuned_a, b, ta = pair(seed=0)
    _, tuned_b, _, tb = pair(seed=0, fraction=0.2)
    a, d = SparseDelta.from_models(base, tuned_a), SparseDelta.from_models(base, tuned_b)
    with pytest.raises(ValueError, match=r"both change .* overlap='sum'"):
        a + d
    summed = SparseDelta.compose([a, d], overlap="sum")
    summed.apply(base)
    expected = [x + ((y - x) + (z - x)) for x, y, z in zip(b, ta, tb)]  # base + (d_a + d_b), float32
    assert_bits_equal(base, expected)


def test_deltas_from_different_bases_do_not_compose():
    base, tuned, _, _ = pair(seed=0)
    other, other_tuned, _, _ = pair(seed=3)
    with pytest.raises(ValueError, match="different base"):
        SparseDelta.from_models(base, tuned) + SparseDelta.from_models(other, other_tuned)


# ------------------------------------------------------------------ bad input


def test_applying_to_the_wrong_base_names_the_variable():
    base, tuned, _, _ = pair(seed=0)
    delta = SparseDelta.from_models(base, tuned)
    wrong = seeded_model(seed=5)
    with pytest.raises(ValueError, match=r"'.*kernel' is not the base this delta was made on"):
        delta.apply(wrong)
    assert_bits_equal(wrong, numpy_weights(seeded_model(seed=5)))  # nothing written


def test_applying_twice_raises_and_reverting_an_unapplied_model_raises():
    base, tuned, _, _ = pair()
    delta = SparseDelta.from_models(base, tuned)
    with pytest.raises(ValueError, match="not this delta applied"):
        delta.revert(base)
    delta.apply(base)
    with pytest.raises(ValueError, match="only once"):
        delta.apply(base)


def test_other_architecture_and_bad_arguments_raise(tmp_path):
    base, tuned, _, _ = pair()
    delta = SparseDelta.from_models(base, tuned)
    with pytest.raises(ValueError, match=r"has shape \(64, 32\).*shape \(64, 96\)"):
        delta.apply(mlp(64, 32, 10))
    with pytest.raises(ValueError, match="same architecture"):
        SparseDelta.from_models(base, mlp(64, 10))
    with pytest.raises(ValueError, match="finite"):
        delta.apply(base, scale=float("nan"))
    with pytest.raises(ValueError, match="'.npz'"):
        delta.save(tmp_path / "delta.bin")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a masked_opt delta"):
        SparseDelta.load(tmp_path / "other.npz")
    with pytest.raises(TypeError, match="Keras model"):
        SparseDelta.from_models("model", tuned)


# ------------------------------------------------------------------ base record


def test_base_record_gives_the_delta_of_masked_training():
    x, y = classification_data(64, 64, 10)
    model = seeded_model()
    rng = np.random.default_rng(1)
    masks = {model.weights[0].path: rng.random((64, 96)) < 0.05, model.weights[2].path: rng.random((96, 10)) < 0.05}
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks=masks)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    before = numpy_weights(model)
    record = BaseRecord(model, optimizer)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    after = numpy_weights(model)
    delta = record.delta(model)
    for w, b, a in zip(model.weights, before, after):
        changed = np.flatnonzero(bits(b) != bits(a))
        assert np.array_equal(delta.positions(w.path) if w.path in delta.paths else [], changed), w.path
    delta.revert(model)
    assert_bits_equal(model, before)
    delta.apply(model)
    assert_bits_equal(model, after)
    optimizer.unfreeze(model.weights[0].path)
    with pytest.raises(ValueError, match="trainable now but were frozen"):
        record.delta(model)


def test_base_record_needs_a_built_masked_optimizer():
    model = seeded_model()
    with pytest.raises(ValueError, match="built MaskedOptimizer"):
        BaseRecord(model, MaskedOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="built MaskedOptimizer"):
        BaseRecord(model, keras.optimizers.SGD())


def test_exported():
    assert masked_opt.SparseDelta is SparseDelta and masked_opt.BaseRecord is BaseRecord
