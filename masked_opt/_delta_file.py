"""The sparse-delta file format: writing it, and reading it safely.

A delta file is a zip archive in NumPy's ``.npz`` layout whose members are
*stored* (never compressed). Version 2 (what `write` writes) has two members:

- ``header.npy``: UTF-8 JSON as a uint8 array, ``{"format":
  "masked_opt_delta", "version": 2, "data_bytes": N, "variables": [...]}``;
- ``data.npy``: a uint8 array of N bytes, every variable's sections back to
  back in header order.

Each variable's entry: ``path``, ``shape``, ``dtype``, ``base_sha256`` (the
base variable's `fingerprint`), ``tuned_sha256`` (the tuned variable's, or
null for a composed delta), ``count`` (changed elements), ``dense``,
``position`` and ``num_weights`` (its place among the base model's weights,
for a model whose layers Keras numbered differently), ``offset`` (into
``data.npy``), ``crc32`` of its bytes there, and ``sizes``: for each of the
sections the header's ``sections`` names (``values``, ``positions``,
``apply_fix_at``, ``apply_fix``, ``revert_fix_at``, ``revert_fix``, in that
order) its bytes and its count, 12 integers (0, 0 where absent). ``values`` are the differences ``tuned - base`` in the variable's
dtype, little-endian (bfloat16 as its uint16 bits); ``positions`` (sparse
variables only) the sorted flat positions as LEB128 varints of each gap
minus one (1 byte for gaps under 128, 2 under 16,384); the ``*_fix_at``
sections are varint indices into the changed elements, the ``*_fix`` ones
the exact values written there.

Reading never trusts a size it has not checked: every member must be stored,
its size in the zip directory must fit the file and match the npy header and
the JSON header before its bytes are read, and unknown members are refused;
so memory stays within the file's size. Any damage raises `DeltaFileError`.
Version 1 files (one member per array: ``i.values``, ``i.positions``,
``i.apply_fix_at``, ...) are still read, under the same checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "masked_opt_delta"
VERSION = 2
SECTIONS = ("values", "positions", "apply_fix_at", "apply_fix", "revert_fix_at", "revert_fix")
_DTYPES = ("float16", "float32", "float64", "bfloat16")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_VARINT_BYTES = 9  # 63 bits: every int64 position


class DeltaFileError(ValueError):
    """A delta file is damaged, truncated, or not a masked_opt delta file."""


def bits(values: np.ndarray) -> np.ndarray:
    """The values' bit patterns (so -0.0 != 0.0 and NaN == NaN of the same bits)."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def fingerprint(values: np.ndarray) -> str:
    """SHA-256 of a flat array's dtype and little-endian bytes."""
    digest = hashlib.sha256(str(values.dtype).encode())
    digest.update(_le_bytes(values))
    return digest.hexdigest()


def encode_positions(positions: np.ndarray) -> np.ndarray:
    """Sorted distinct flat positions -> LEB128 varints of (gap - 1), uint8."""
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    nbytes = np.ones(gaps.size, np.int64)
    for k in range(1, 10):
        nbytes += gaps >= 1 << (7 * k)
    out = np.zeros(int(nbytes.sum()), np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for k in range(int(nbytes.max(initial=0))):
        has = nbytes > k
        more = (nbytes > k + 1)[has]
        out[starts[has] + k] = ((gaps[has] >> (7 * k)) & 0x7F) | np.where(more, 0x80, 0)
    return out


def decode_positions(data: np.ndarray) -> np.ndarray:
    """Inverse of `encode_positions`; raises `DeltaFileError` on a varint
    that is cut off or longer than an int64 allows."""
    data = np.asarray(data, np.uint8)
    if data.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size == 0 or ends[-1] != data.size - 1:
        raise DeltaFileError("Corrupt delta file: a position's varint is cut off.")
    starts = np.concatenate([[0], ends[:-1] + 1])
    if int(np.max(ends - starts)) >= _MAX_VARINT_BYTES:
        raise DeltaFileError("Corrupt delta file: a position's varint is longer than an int64 allows.")
    k = np.arange(data.size) - np.repeat(starts, ends - starts + 1)
    gaps = np.add.reduceat((data & 0x7F).astype(np.int64) << (7 * k), starts)
    with np.errstate(over="ignore"):
        return np.cumsum(gaps + 1) - 1


# ------------------------------------------------------------------ parts


@dataclass(eq=False)
class Part:
    """One variable's share of a delta."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    base_sha256: str
    positions: np.ndarray | None  # sorted int64 flat positions; None: dense
    diff: np.ndarray  # at `positions` (or everywhere), the variable's dtype
    apply_fix_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    apply_fix: np.ndarray | None = None
    revert_fix_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    revert_fix: np.ndarray | None = None
    position: int = -1  # among the base model's weights (for renamed-model matching)
    num_weights: int = -1
    tuned_sha256: str | None = None  # the tuned variable's fingerprint (None: unknown, e.g. composed)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return self.size if self.positions is None else int(self.positions.size)

    def flat_positions(self) -> np.ndarray:
        return np.arange(self.size) if self.positions is None else self.positions

    def index(self) -> Any:
        return slice(None) if self.positions is None else self.positions


# ------------------------------------------------------------------ write


def write(parts: list[Part], path: str) -> None:
    """Writes `parts` as a version-2 delta file at `path` (a name ending in '.npz')."""
    chunks: list[bytes] = []
    entries = []
    offset = 0
    for part in parts:
        sections = _sections(part)
        blob = b"".join(raw for raw, _ in sections.values())
        entries.append({
            "path": part.path, "shape": list(part.shape), "dtype": _dtype_name(part.dtype),
            "base_sha256": part.base_sha256, "tuned_sha256": part.tuned_sha256, "count": part.count,
            "dense": part.positions is None, "position": part.position, "num_weights": part.num_weights,
            "offset": offset, "crc32": zlib.crc32(blob),
            "sizes": [n for raw, count in sections.values() for n in (len(raw), count)],
        })
        chunks.append(blob)
        offset += len(blob)
    header = {"format": FORMAT, "version": VERSION, "sections": list(SECTIONS), "data_bytes": offset, "variables": entries}
    np.savez(  # np.savez stores its members uncompressed
        path,
        header=np.frombuffer(json.dumps(header, separators=(",", ":")).encode(), np.uint8),
        data=np.frombuffer(b"".join(chunks), np.uint8),
    )


def _sections(part: Part) -> dict[str, tuple[bytes, int]]:
    empty = (b"", 0)
    fixes = {}
    for name in ("apply_fix", "revert_fix"):
        at = getattr(part, f"{name}_at")
        fixes[f"{name}_at"] = (encode_positions(at).tobytes(), int(at.size)) if at.size else empty
        fixes[name] = (_le_bytes(getattr(part, name)), int(at.size)) if at.size else empty
    positions = empty if part.positions is None else (encode_positions(part.positions).tobytes(), part.count)
    return {"values": (_le_bytes(part.diff), part.count), "positions": positions, **fixes}


def _le_bytes(values: np.ndarray) -> bytes:
    raw = bits(np.asarray(values))
    return np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("<")).tobytes()


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)


# ------------------------------------------------------------------- read


def read(path: str) -> list[Part]:
    """The parts of the delta file at `path`. Reads no pickle, checks every
    size before reading, and raises `DeltaFileError` (naming the file) on
    any damage; a missing file raises `FileNotFoundError` as usual."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No delta file at {path!r}.")
    try:
        return _Reader(path).parts()
    except DeltaFileError as error:
        raise DeltaFileError(f"{path!r}: {error}") from None
    except PermissionError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, EOFError, OSError,
            RuntimeError, NotImplementedError, struct.error, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise DeltaFileError(
            f"{path!r} is not a readable masked_opt delta file ({type(error).__name__}: {error})."
        ) from error


class _Reader:
    """One pass over a delta file's zip directory, members and header."""

    def __init__(self, path: str):
        self.path = path
        self.file_size = os.path.getsize(path)

    def parts(self) -> list[Part]:
        if not zipfile.is_zipfile(self.path):
            raise DeltaFileError("not a masked_opt delta file (not a zip archive in NumPy's .npz layout).")
        with zipfile.ZipFile(self.path) as archive:
            self.archive = archive
            infos = archive.infolist()
            self.members = {info.filename: info for info in infos}
            if len(self.members) != len(infos):
                raise DeltaFileError("two zip members share one name.")
            for info in infos:
                self._check_member(info)
            if "header.npy" not in self.members:
                raise DeltaFileError("not a masked_opt delta file (no header).")
            header = _json(self._array("header.npy", np.uint8))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise DeltaFileError(f"not a masked_opt delta file (format {_get(header, 'format')!r}).")
            version = header.get("version")
            if version == 1:
                return self._v1(header)
            if version == 2:
                return self._v2(header)
            raise DeltaFileError(
                f"delta file version {version!r} is not one this masked_opt reads (1, 2): upgrade masked_opt."
            )

    # --------------------------------------------------------- members

    def _check_member(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED:
            raise DeltaFileError(f"zip member {name!r} is compressed; a delta file's members are stored.")
        if info.flag_bits & 0x1:
            raise DeltaFileError(f"zip member {name!r} is encrypted.")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > self.file_size:
            raise DeltaFileError(
                f"zip member {name!r} claims {info.file_size:,} bytes, more than the file holds "
                f"({self.file_size:,} bytes): the file is truncated or damaged."
            )

    def _array(self, name: str, dtype: Any, count: int | None = None) -> np.ndarray:
        """Member `name` as a 1-D array of `dtype` (and `count` elements),
        its npy header checked against the zip directory before any data are read."""
        if name not in self.members:
            raise DeltaFileError(f"zip member {name!r} is missing.")
        info = self.members[name]
        dtype = np.dtype(dtype).newbyteorder("<")
        with self.archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise DeltaFileError(f"zip member {name!r} has npy format version {version}.")
            shape, fortran, stored = read_header[version](member, max_header_size=4096)
            if stored != dtype or fortran or len(shape) != 1 or (count is not None and shape[0] != count):
                want = f"({count},)" if count is not None else "(n,)"
                raise DeltaFileError(
                    f"zip member {name!r} holds an array of shape {shape} and dtype {stored}; the header "
                    f"expects shape {want} and dtype {dtype}."
                )
            nbytes = shape[0] * dtype.itemsize
            if nbytes != info.file_size - member.tell():
                raise DeltaFileError(
                    f"zip member {name!r} holds {info.file_size - member.tell():,} bytes of data; its npy header "
                    f"says {nbytes:,}."
                )
            raw = member.read(nbytes)
            if len(raw) != nbytes or member.read(1):  # reading to the end checks the zip's CRC-32
                raise DeltaFileError(f"zip member {name!r} is truncated.")
        return np.frombuffer(raw, dtype)

    def _expect_members(self, names: set[str]) -> None:
        unexpected = sorted(set(self.members) - names)
        if unexpected:
            raise DeltaFileError(f"unexpected zip members {unexpected[:4]} (damaged names, or not written by masked_opt).")
        missing = sorted(names - set(self.members))
        if missing:
            raise DeltaFileError(f"zip members {missing[:4]} are missing.")

    # -------------------------------------------------------- versions

    def _v2(self, header: dict) -> list[Part]:
        _require(set(header) == {"format", "version", "sections", "data_bytes", "variables"}, "the header's keys are damaged.")
        _require(header["sections"] == list(SECTIONS), "the header's section names are damaged.")
        self._expect_members({"header.npy", "data.npy"})
        entries = _list(header["variables"], "variables")
        total = _int(header["data_bytes"], "data_bytes")
        data = self._array("data.npy", np.uint8, total).tobytes()
        parts, offset = [], 0
        for i, entry in enumerate(entries):
            _require(isinstance(entry, dict), f"variable {i}'s entry is not an object.")
            meta = _Meta(i, entry)
            _require(_int(entry.get("offset"), "offset") == offset, f"variable {meta.path!r}'s data offset is damaged.")
            sizes = _list(entry.get("sizes"), f"{meta.path!r}'s sizes")
            _require(len(sizes) == 2 * len(SECTIONS), f"{meta.path!r}'s sizes are damaged.")
            arrays = {}
            for k, name in enumerate(SECTIONS):
                nbytes, count = _int(sizes[2 * k], f"{name} bytes"), _int(sizes[2 * k + 1], f"{name} count")
                _require(offset + nbytes <= total, f"{meta.path!r}'s {name} runs past the data ({total:,} bytes).")
                arrays[name] = (np.frombuffer(data, np.uint8, nbytes, offset), count)
                offset += nbytes
            blob = data[_int(entry["offset"], "offset"):offset]
            _require(zlib.crc32(blob) == entry.get("crc32"), f"the data of {meta.path!r} fail their CRC-32 check.")
            parts.append(meta.part(arrays, entry.get("tuned_sha256")))
        _require(offset == total, f"the data hold {total - offset:,} bytes no variable claims.")
        return parts

    def _v1(self, header: dict) -> list[Part]:
        entries = _list(header.get("variables"), "variables")
        metas = []
        names = {"header.npy"}
        for i, entry in enumerate(entries):
            _require(isinstance(entry, dict), f"variable {i}'s entry is not an object.")
            meta = _Meta(i, entry)
            metas.append(meta)
            names |= {f"{i}.values.npy"} | (set() if meta.dense else {f"{i}.positions.npy"})
            for name in ("apply_fix", "revert_fix"):  # optional, in pairs
                present = [f"{i}.{n}.npy" in self.members for n in (f"{name}_at", name)]
                _require(present[0] == present[1], f"variable {i}'s {name} entries are damaged (one of two present).")
                if present[0]:
                    names |= {f"{i}.{name}_at.npy", f"{i}.{name}.npy"}
        self._expect_members(names)
        parts = []
        for meta in metas:
            i = meta.index
            arrays = {"values": (self._array(f"{i}.values.npy", meta.storage, meta.count), meta.count)}
            arrays["positions"] = (
                (np.zeros(0, np.uint8), 0) if meta.dense else (self._array(f"{i}.positions.npy", np.uint8), meta.count)
            )
            for name in ("apply_fix", "revert_fix"):
                if f"{i}.{name}.npy" in self.members:
                    fix = self._array(f"{i}.{name}.npy", meta.storage)
                    arrays[f"{name}_at"] = (self._array(f"{i}.{name}_at.npy", np.uint8), fix.size)
                    arrays[name] = (fix, fix.size)
                else:
                    arrays[f"{name}_at"] = arrays[name] = (np.zeros(0, np.uint8), 0)
            parts.append(meta.part({k: (np.frombuffer(v.tobytes(), np.uint8), c) for k, (v, c) in arrays.items()}, None))
        return parts


class _Meta:
    """A variable's header entry, checked field by field."""

    def __init__(self, index: int, entry: dict):
        self.index = index
        self.path = entry.get("path")
        _require(isinstance(self.path, str) and self.path, f"variable {index}'s path is damaged.")
        shape = _list(entry.get("shape"), f"{self.path!r}'s shape")
        self.shape = tuple(_int(n, f"{self.path!r}'s shape") for n in shape)
        name = entry.get("dtype")
        _require(name in _DTYPES, f"{self.path!r} has dtype {name!r}; a delta holds {', '.join(_DTYPES)}.")
        self.dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
        self.storage = np.dtype(f"u{self.dtype.itemsize}") if name == "bfloat16" else self.dtype
        self.base_sha256 = entry.get("base_sha256")
        _require(isinstance(self.base_sha256, str) and _SHA256.fullmatch(self.base_sha256), f"{self.path!r}'s base SHA-256 is damaged.")
        self.dense = entry.get("dense")
        _require(isinstance(self.dense, bool), f"{self.path!r}'s dense flag is damaged.")
        self.count = _int(entry.get("count"), f"{self.path!r}'s count")
        size = math.prod(self.shape)
        _require(self.count == size if self.dense else self.count <= size,
                 f"{self.path!r} claims {self.count:,} changed elements of {size:,}.")
        self.position = _int(entry.get("position"), "position", low=-1)
        self.num_weights = _int(entry.get("num_weights"), "num_weights", low=-1)

    def part(self, arrays: dict[str, tuple[np.ndarray, int]], tuned_sha256: Any) -> Part:
        """The Part, from each section's bytes and count; every count,
        position and index checked against the others."""
        _require(tuned_sha256 is None or (isinstance(tuned_sha256, str) and _SHA256.fullmatch(tuned_sha256)),
                 f"{self.path!r}'s tuned SHA-256 is damaged.")
        values = self._values(*arrays["values"], "values")
        _require(values.size == self.count, f"{self.path!r} has {values.size:,} values for {self.count:,} elements.")
        positions = None
        raw, count = arrays["positions"]
        if self.dense:
            _require(raw.size == 0 and count == 0, f"{self.path!r} is dense but has positions.")
        else:
            positions = self._indices(raw, count, math.prod(self.shape), "positions")
        fixes = {}
        for name in ("apply_fix", "revert_fix"):
            fixes[f"{name}_at"] = self._indices(*arrays[f"{name}_at"], self.count, name)
            fixes[name] = self._values(*arrays[name], name)
            _require(fixes[name].size == fixes[f"{name}_at"].size, f"{self.path!r}'s {name} counts differ.")
        return Part(
            self.path, self.shape, self.dtype, self.base_sha256, positions, values,
            position=self.position, num_weights=self.num_weights, tuned_sha256=tuned_sha256, **fixes,
        )

    def _values(self, raw: np.ndarray, count: int, name: str) -> np.ndarray:
        _require(raw.size == count * self.dtype.itemsize, f"{self.path!r}'s {name} hold {raw.size:,} bytes for {count:,} values.")
        stored = np.frombuffer(raw.tobytes(), self.storage.newbyteorder("<")).astype(self.storage)
        return stored.view(self.dtype)

    def _indices(self, raw: np.ndarray, count: int, bound: int, name: str) -> np.ndarray:
        """Varint-coded sorted indices: exactly `count`, all below `bound`."""
        indices = decode_positions(raw)
        _require(indices.size == count, f"{self.path!r} has {indices.size:,} {name} for {count:,}.")
        if indices.size:
            _require(int(indices[0]) >= 0 and int(indices[-1]) < bound and bool(np.all(np.diff(indices) > 0)),
                     f"{self.path!r}'s {name} are out of range (0 to {bound - 1:,}) or out of order.")
        return indices


# ---------------------------------------------------------------- helpers


def _require(condition: Any, message: str) -> None:
    if not condition:
        raise DeltaFileError(message)


def _int(value: Any, what: str, low: int = 0) -> int:
    _require(type(value) is int and value >= low, f"the header's {what} is damaged ({value!r}).")
    return value


def _list(value: Any, what: str) -> list:
    _require(isinstance(value, list), f"the header's {what} is damaged.")
    return value


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


def _json(raw: np.ndarray) -> Any:
    try:
        return json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DeltaFileError(f"the header is not valid JSON ({error}).") from None
