"""The sparse-delta file format and the arrays a delta is made of.

A delta file is a NumPy ``.npz`` read with ``allow_pickle=False``. Member
``header`` is UTF-8 JSON (uint8): ``{"format": "masked_opt_delta",
"version": 1, "variables": [{"path", "shape", "dtype", "base_sha256",
"count", "dense", "position", "num_weights"}, ...]}``. For variable ``i``:
``i.values`` holds the differences ``tuned - base`` in the variable's dtype
(bfloat16 as its uint16 bits); ``i.positions`` (sparse variables only) the
sorted flat positions, as LEB128 varints of each gap minus one (1 byte for
gaps under 128, 2 under 16,384); ``i.apply_fix_at`` / ``i.apply_fix`` and
``i.revert_fix_at`` / ``i.revert_fix`` the fix-ups (varint indices into the
changed elements, exact values), present only where needed. ``position`` and
``num_weights`` place the variable among the base model's weights, for a
model whose layers Keras numbered differently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "masked_opt_delta"
VERSION = 1


def bits(values: np.ndarray) -> np.ndarray:
    """The values' bit patterns (so -0.0 != 0.0 and NaN == NaN of the same bits)."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def fingerprint(values: np.ndarray) -> str:
    """SHA-256 of a flat array's dtype and little-endian bytes."""
    digest = hashlib.sha256(str(values.dtype).encode())
    raw = bits(values)
    digest.update(np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("<")).tobytes())
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
    """Inverse of `encode_positions`."""
    data = np.asarray(data, np.uint8)
    if data.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size == 0 or ends[-1] != data.size - 1:
        raise ValueError("Corrupt delta file: a position's varint is cut off.")
    starts = np.concatenate([[0], ends[:-1] + 1])
    k = np.arange(data.size) - np.repeat(starts, ends - starts + 1)
    gaps = np.add.reduceat((data & 0x7F).astype(np.int64) << (7 * k), starts)
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

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def count(self) -> int:
        return self.size if self.positions is None else int(self.positions.size)

    def flat_positions(self) -> np.ndarray:
        return np.arange(self.size) if self.positions is None else self.positions

    def index(self) -> Any:
        return slice(None) if self.positions is None else self.positions


def write(parts: list[Part], path: str) -> None:
    """Writes `parts` as a delta file at `path` (a name ending in '.npz')."""
    arrays: dict[str, np.ndarray] = {}
    header = {"format": FORMAT, "version": VERSION, "variables": []}
    for i, part in enumerate(parts):
        header["variables"].append({
            "path": part.path, "shape": list(part.shape), "dtype": str(part.dtype), "base_sha256": part.base_sha256,
            "count": part.count, "dense": part.positions is None, "position": part.position,
            "num_weights": part.num_weights,
        })
        arrays[f"{i}.values"] = _storable(part.diff)
        if part.positions is not None:
            arrays[f"{i}.positions"] = encode_positions(part.positions)
        for name in ("apply_fix", "revert_fix"):
            at = getattr(part, f"{name}_at")
            if at.size:
                arrays[f"{i}.{name}_at"] = encode_positions(at)
                arrays[f"{i}.{name}"] = _storable(getattr(part, name))
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


def read(path: str) -> list[Part]:
    """The parts of the delta file at `path` (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        if "header" not in data.files:
            raise ValueError(f"{path!r} is not a masked_opt delta file (no header).")
        header = json.loads(bytes(data["header"]).decode())
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(
                f"{path!r} is not a version-{VERSION} masked_opt delta file: "
                f"format {header.get('format')!r}, version {header.get('version')!r}."
            )
        return [_loaded(i, entry, data) for i, entry in enumerate(header["variables"])]


def _storable(values: np.ndarray) -> np.ndarray:
    return bits(values) if values.dtype == ml_dtypes.bfloat16 else values


def _loaded(i: int, entry: dict, data: Any) -> Part:
    dtype = np.dtype(ml_dtypes.bfloat16) if entry["dtype"] == "bfloat16" else np.dtype(entry["dtype"])

    def values(name: str) -> np.ndarray:
        raw = data[name]
        return raw.view(dtype) if dtype == ml_dtypes.bfloat16 else raw.astype(dtype, copy=False)

    positions = None if entry["dense"] else decode_positions(data[f"{i}.positions"])
    fixes = {}
    for name in ("apply_fix", "revert_fix"):
        present = f"{i}.{name}_at" in data.files
        fixes[f"{name}_at"] = decode_positions(data[f"{i}.{name}_at"]) if present else np.zeros(0, np.int64)
        fixes[name] = values(f"{i}.{name}") if present else np.zeros(0, dtype)
    part = Part(
        entry["path"], tuple(entry["shape"]), dtype, entry["base_sha256"], positions, values(f"{i}.values"),
        position=entry["position"], num_weights=entry["num_weights"], **fixes,
    )
    if part.diff.size != part.count or part.count != entry["count"]:
        raise ValueError(f"Corrupt delta file: variable {part.path!r} has {part.diff.size} values for {entry['count']} elements.")
    return part
