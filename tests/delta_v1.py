"""The version-1 delta file layout (what masked_opt 0.1 wrote before format
version 2: one npz member per array), for the tests that load it and
`benchmarks/bench_delta_size.py`. No pytest here, so a benchmark script can
import it (`harness.use_test_support()`).
"""

from __future__ import annotations

import json

import numpy as np

from masked_opt._delta_file import encode_positions


def write_version_1(delta, path) -> None:
    """`delta` in the version-1 layout, written from its documented
    description (only the position encoding is the library's)."""
    arrays, entries = {}, []
    for i, part in enumerate(delta._parts.values()):
        entries.append({"path": part.path, "shape": list(part.shape), "dtype": str(part.dtype),
                        "base_sha256": part.base_sha256, "count": part.count, "dense": part.positions is None,
                        "position": part.position, "num_weights": part.num_weights})
        arrays[f"{i}.values"] = part.diff
        if part.positions is not None:
            arrays[f"{i}.positions"] = encode_positions(part.positions)
        for name in ("apply_fix", "revert_fix"):
            if getattr(part, f"{name}_at").size:
                arrays[f"{i}.{name}_at"] = encode_positions(getattr(part, f"{name}_at"))
                arrays[f"{i}.{name}"] = getattr(part, name)
    header = {"format": "masked_opt_delta", "version": 1, "variables": entries}
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
