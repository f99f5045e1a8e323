"""A delta file cannot silently lie, and reading one is safe.

Every single-bit flip of a small delta with fix-ups either raises or applies
to exactly the tuned bits (and after a raise the model is unchanged); damaged
and foreign files raise `DeltaFileError` naming the file; a small file that
claims a huge array is refused before anything is expanded (peak memory,
measured with tracemalloc, within a few MB of loading a valid file)."""

import json
import os
import tracemalloc
import zipfile
import zlib

import keras
import numpy as np
import pytest

from delta_v1 import write_version_1
from masked_opt import DeltaFileError, SparseDelta

DATA = os.path.join(os.path.dirname(__file__), "data")


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def values(model):
    return [np.array(keras.ops.convert_to_numpy(w.value)) for w in model.weights]


def dense_model(kernel, bias=None):
    """Input(n) -> Dense(1), kernel (and bias) set from NumPy."""
    layer = keras.layers.Dense(1, use_bias=bias is not None, name="unit")
    model = keras.Sequential([keras.Input((len(kernel),)), layer])
    layer.kernel.assign(np.array(kernel, np.float32).reshape(-1, 1))
    if bias is not None:
        layer.bias.assign(np.array(bias, np.float32))
    return model


def fixup_pair():
    """The issue's case: 3 + (1e-9 - 3) rounds to 0 in float32, so the delta
    needs an apply fix-up (the sign-of-zero change one more, 1e-9 -> 3 a revert
    fix-up); a bias
    changed everywhere is stored dense."""
    base_k = [3.0, 1.0, 0.0, 2.0, 1e-9, 7.0, 1e30, 4.0]
    tuned_k = [1e-9, 1.0, -0.0, 2.0, 3.0, 7.0, -1e-30, 4.0]
    base, tuned = dense_model(base_k, [0.5]), dense_model(tuned_k, [0.25])
    return base, tuned


def test_the_fixup_pair_needs_fixups():
    base, tuned = fixup_pair()
    part = SparseDelta.from_models(base, tuned)._parts[base.weights[0].path]
    assert part.apply_fix_at.size >= 2 and part.revert_fix_at.size >= 1


def assert_unchanged(model, expected):
    for w, e in zip(model.weights, expected):
        assert np.array_equal(bits(keras.ops.convert_to_numpy(w.value)), bits(e)), w.path


def flip_and_apply(raw, offsets, tmp_path, base, b, t):
    """For each offset: flip one bit there, load and apply; returns the number of raises."""
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.npz"
    raised = 0
    for offset in offsets:
        damaged = bytearray(raw)
        damaged[offset] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        try:
            delta = SparseDelta.load(path)
            delta.apply(base)
        except ValueError:  # DeltaFileError, or a mismatch found by apply
            raised += 1
            assert_unchanged(base, b)
            continue
        assert_unchanged(base, t)  # a harmless flip (a zip timestamp, say): exactly the tuned bits
        delta.revert(base)
        assert_unchanged(base, b)
    return raised


def test_every_single_bit_flip_raises_or_gives_the_tuned_bits(tmp_path):
    base, tuned = fixup_pair()
    b, t = values(base), values(tuned)
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    raw = (tmp_path / "d.npz").read_bytes()
    raised = flip_and_apply(raw, range(len(raw)), tmp_path, base, b, t)
    assert raised > 0.5 * len(raw)  # most bytes matter; the rest are zip metadata


def test_a_damaged_fixup_name_in_a_version_1_file_raises(tmp_path):
    # The repro in the old layout: a damaged '0.apply_fix_at' entry name
    # made load treat the fix-ups as absent and apply write 0.0 for 1e-9.
    base, tuned = dense_model([3.0, 1.0]), dense_model([1e-9, 1.0])
    path = tmp_path / "v1.npz"
    write_version_1(SparseDelta.from_models(base, tuned), path)
    assert np.array_equal(bits(SparseDelta.load(path).differences(base.weights[0].path)),
                          bits(np.array([1e-9 - 3.0], np.float32)))
    raw = path.read_bytes()
    SparseDelta.load(path).apply(base)
    assert_unchanged(base, values(tuned))
    SparseDelta.load(path).revert(base)
    at = raw.index(b"0.apply_fix_at.npy")
    for offset in (at + 2, at + 9):  # the name in the local header; in the central directory below
        damaged = bytearray(raw)
        damaged[offset] ^= 0x04
        (tmp_path / "bad.npz").write_bytes(bytes(damaged))
        with pytest.raises(DeltaFileError, match="bad.npz"):
            SparseDelta.load(tmp_path / "bad.npz")
    central = raw.rindex(b"0.apply_fix_at.npy")
    both = bytearray(raw)
    for name_at in (at, central):
        both[name_at + 9] ^= 0x04  # the same damage in both copies of the name
    (tmp_path / "both.npz").write_bytes(bytes(both))
    with pytest.raises(DeltaFileError, match="apply_fix entries are damaged"):
        SparseDelta.load(tmp_path / "both.npz")


def test_the_version_1_fixture_still_loads_bit_for_bit():
    # tests/data/delta_v1.npz was written by masked_opt before version 2; its
    # test_delta.py test applies it. Here: it reads as the same delta as a fresh one.
    from test_delta import pair

    base, tuned, _, _ = pair(seed=7)
    old, new = SparseDelta.load(os.path.join(DATA, "delta_v1.npz")), SparseDelta.from_models(base, tuned)
    assert old.paths == new.paths
    for p in new.paths:
        assert np.array_equal(old.positions(p), new.positions(p))
        assert np.array_equal(bits(old.differences(p)), bits(new.differences(p)))


# -------------------------------------------------------- foreign and damaged


def foreign_files(tmp_path, valid):
    model = dense_model([1.0, 2.0], [0.0])
    model.save_weights(str(tmp_path / "model.weights.h5"))
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    np.savez_compressed(tmp_path / "compressed.npz", header=np.zeros(3, np.uint8))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_bytes(b"not a delta\n" * 10)
    (tmp_path / "truncated.npz").write_bytes(valid[: len(valid) // 2])
    (tmp_path / "tail.npz").write_bytes(valid[:-10])
    np.save(tmp_path / "array.npy", np.zeros(3))
    return ["model.weights.h5", "plain.npz", "compressed.npz", "empty.npz", "text.npz", "truncated.npz", "tail.npz", "array.npy"]


def test_damaged_and_foreign_files_raise_one_documented_error(tmp_path):
    base, tuned = fixup_pair()
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    for name in foreign_files(tmp_path, (tmp_path / "d.npz").read_bytes()):
        with pytest.raises(DeltaFileError) as info:
            SparseDelta.load(tmp_path / name)
        message = str(info.value)
        assert name in message and "allow_pickle" not in message, message
        assert isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        SparseDelta.load(tmp_path / "missing.npz")


def rewrite_member(path, out, name, data, compress=zipfile.ZIP_STORED, file_size=None):
    """A copy of the zip at `path` with member `name` replaced by `data`."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            payload = data if info.filename == name else src.read(info)
            dst.writestr(info.filename, payload, compress_type=compress if info.filename == name else zipfile.ZIP_STORED)


def npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [2, 1])
def test_a_small_file_that_expands_to_gigabytes_is_refused_in_bounded_memory(tmp_path, version):
    base, tuned = fixup_pair()
    delta = SparseDelta.from_models(base, tuned)
    delta.save(tmp_path / "d.npz") if version == 2 else write_version_1(delta, tmp_path / "d.npz")
    # 256 MB of zeros deflates to ~250 KB: the same header, a member that claims 256 MB.
    dtype = np.uint8 if version == 2 else np.float32
    bomb = npy_bytes(np.zeros(256 * 2**20 // np.dtype(dtype).itemsize, dtype))
    member = "data.npy" if version == 2 else "0.values.npy"
    rewrite_member(tmp_path / "d.npz", tmp_path / "bomb.npz", member, bomb, zipfile.ZIP_DEFLATED)
    del bomb
    assert os.path.getsize(tmp_path / "bomb.npz") < 2**20

    def peak(path, raises):
        tracemalloc.start()
        try:
            if raises:
                with pytest.raises(DeltaFileError, match="compressed"):
                    SparseDelta.load(path)
            else:
                SparseDelta.load(path)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    valid, refused = peak(tmp_path / "d.npz", False), peak(tmp_path / "bomb.npz", True)
    assert refused < valid + 4 * 2**20, (valid, refused)


def test_an_entry_whose_npy_header_claims_more_than_the_file_holds_is_refused(tmp_path):
    base, tuned = fixup_pair()
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as data:
        header, blob = json.loads(bytes(data["header"])), data["data"]
    # A stored member whose npy header says 2**40 bytes, with the JSON header agreeing.
    claim = bytearray(npy_bytes(blob))
    claim = claim.replace(f"({blob.size},)".encode(), f"({2**40},)".encode().ljust(len(f"({blob.size},)")), 1)
    rewrite_member(tmp_path / "d.npz", tmp_path / "claim.npz", "data.npy", bytes(claim))
    with pytest.raises(DeltaFileError, match="claim.npz"):
        SparseDelta.load(tmp_path / "claim.npz")
    header["data_bytes"] = 2**40
    rewrite_member(tmp_path / "d.npz", tmp_path / "both.npz", "header.npy", np.frombuffer(json.dumps(header).encode(), np.uint8).tobytes())
    with pytest.raises(DeltaFileError, match="both.npz"):
        SparseDelta.load(tmp_path / "both.npz")


def edited_header(tmp_path, edit):
    """A copy of a valid delta whose JSON header `edit` changed (the zip's CRC valid)."""
    base, tuned = fixup_pair()
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as data:
        header = json.loads(bytes(data["header"]))
    edit(header)
    out = tmp_path / "edited.npz"
    rewrite_member(tmp_path / "d.npz", out, "header.npy", npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8)))
    return out, base


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["variables"][0]["sizes"].__setitem__(5, 0), "apply_fix"),
    (lambda h: h["variables"][0]["sizes"].__setitem__(1, 3), "values"),
    (lambda h: h["variables"][0].__setitem__("count", 2), "count|values|positions"),
    (lambda h: h["variables"][0].__setitem__("dtype", "object"), "dtype"),
    (lambda h: h["variables"][0].__setitem__("shape", [8, "1"]), "shape"),
    (lambda h: h["variables"][0].__setitem__("crc32", 1), "CRC-32"),
    (lambda h: h["variables"][1].__setitem__("offset", 0), "offset"),
    (lambda h: h.__setitem__("version", 3), "version 3"),
    (lambda h: h["variables"][0].__setitem__("tuned_sha256", "00"), "tuned SHA-256"),
])
def test_a_header_that_disagrees_with_the_data_raises(tmp_path, edit, message):
    path, base = edited_header(tmp_path, edit)
    with pytest.raises(DeltaFileError, match=message):
        SparseDelta.load(path)


def test_a_wrong_tuned_fingerprint_stops_apply_before_anything_is_written(tmp_path):
    # A file consistent in itself whose values do not give the tuned model (the
    # header's tuned SHA-256 says otherwise): apply raises, the model is unchanged.
    from masked_opt._delta_file import fingerprint

    other = np.array([1.0] * 8, np.float32)
    path, base = edited_header(tmp_path, lambda h: h["variables"][0].__setitem__("tuned_sha256", fingerprint(other)))
    b = values(base)
    with pytest.raises(ValueError, match="damaged. Nothing was written"):
        SparseDelta.load(path).apply(base)
    assert_unchanged(base, b)


def test_positions_out_of_range_are_refused(tmp_path):
    base = dense_model([0.0] * 300, None)
    tuned = dense_model([0.0] * 299 + [1.0], None)
    SparseDelta.from_models(base, tuned).save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as data:
        header, blob = json.loads(bytes(data["header"])), bytearray(data["data"])
    entry = header["variables"][0]
    at = entry["offset"] + entry["sizes"][0]  # the position's varint: 299 -> [0xAB, 0x02]
    blob[at + 1] = 0x05  # 299 + 3 * 128: past the variable's 300 elements
    entry["crc32"] = zlib.crc32(bytes(blob[entry["offset"]:]))
    rewrite_member(tmp_path / "d.npz", tmp_path / "p.npz", "data.npy", npy_bytes(np.frombuffer(bytes(blob), np.uint8)))
    rewrite_member(tmp_path / "p.npz", tmp_path / "q.npz", "header.npy", npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8)))
    with pytest.raises(DeltaFileError, match="out of range"):
        SparseDelta.load(tmp_path / "q.npz")


# ------------------------------------------------------------ architecture


def test_another_architecture_reports_the_shape_difference_first():
    # A freshly initialised model whose *second* kernel has another shape: the
    # first kernel's values differ too, but the shape is what the user must hear.
    from models import mlp

    base, tuned = mlp(8, ("a", 6), ("b", 4), init_seed=0), mlp(8, ("a", 6), ("b", 4), init_seed=1)
    delta = SparseDelta.from_models(base, tuned)
    other = mlp(8, ("a", 6), ("b", 5), init_seed=2)
    before = values(other)
    with pytest.raises(ValueError, match=r"has shape \(6, 5\).*shape \(6, 4\)"):
        delta.apply(other)
    assert_unchanged(other, before)
