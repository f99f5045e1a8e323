"""Writes tests/data/delta_v2.npz (run on TensorFlow): the delta of
`test_delta.pair(seed=7)`, whose values are NumPy's, so the file applies to
the same base built on any backend (test_a_delta_made_on_tensorflow_applies_on_this_backend). delta_v1.npz is
the same delta written by masked_opt 0.1 before format version 2 (kept, not
rewritten: old files must still load)."""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_delta import pair  # noqa: E402

from masked_opt import SparseDelta  # noqa: E402

base, tuned, _, _ = pair(seed=7)
SparseDelta.from_models(base, tuned).save(os.path.join(os.path.dirname(__file__), "delta_v2.npz"))
