"""How far compact state is from the default state, per optimizer, measured.

    KERAS_BACKEND=jax python tests/measure_compact_ulps.py [jit]

Runs `tests/test_compact.py`'s realistic-size matrix (every element-wise
optimizer x feature, variables with 1 %, 5 % and 50 % of their elements
trainable; eager, or under the backend's compiled step with `jit`) and prints the largest difference between the two
modes in ulp at the variable's scale, per optimizer. docs/compact-state.md
states the bounds the tests enforce, with these measurements beside them.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import test_compact as T  # noqa: E402


def ulps(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(np.abs(got).max(), np.abs(want).max())
    return float(np.abs(got.astype(np.float64) - want).max() / np.spacing(np.float32(scale)))


def main() -> None:
    jit = sys.argv[1:] == ["jit"]
    worst: dict[str, float] = {}
    for opt_id, feature in itertools.product(T.ELEMENTWISE, T.FEATURES):
        dense, _ = T._train(opt_id, feature, compact=False, jit=jit, size="realistic")
        compact, _ = T._train(opt_id, feature, compact=True, jit=jit, size="realistic")
        u = max(ulps(c, d) for cs, ds in zip(compact, dense) for c, d in zip(cs, ds))
        key = "norm_clipping" if feature in ("clipnorm", "global_clipnorm") else opt_id
        worst[key] = max(worst.get(key, 0.0), u)
    print(f"backend {keras.backend.backend()}, {'compiled' if jit else 'eager'} steps: max ulp at the variable's scale")
    for key, u in worst.items():
        print(f"  {key:18s} {u:.2f}")


if __name__ == "__main__":
    main()
