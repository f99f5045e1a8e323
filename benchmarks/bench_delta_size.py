"""Delta file size: bytes per changed element and per variable, the current
format (version 2: two stored members, sections packed with offsets in the
header) against the version-1 layout (one npz member per array), and the time
to save, load and apply.

    python benchmarks/bench_delta_size.py                       # MobileNetV2 (weights=None), 1 % and 10 %
    python benchmarks/bench_delta_size.py --densities 0.001,0.01

The tuned model changes a random `density` of every float weight's elements
(at least one per variable), so every variable is in the delta, as after
sparse fine-tuning spread over the whole model.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

import harness
from masked_opt import SparseDelta

harness.use_test_support()
from delta_v1 import write_version_1  # noqa: E402


def tuned_copy(model: keras.Model, density: float, seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    tuned = keras.models.clone_model(model)
    for b, t in zip(model.weights, tuned.weights):
        values = np.array(keras.ops.convert_to_numpy(b.value))
        if values.dtype.kind == "f":
            flat = values.reshape(-1)
            at = rng.choice(flat.size, max(1, int(density * flat.size)), replace=False)
            flat[at] += rng.normal(scale=1e-2, size=at.size).astype(flat.dtype)
        t.assign(values)
    return tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.01,0.1")
    args = parser.parse_args()
    base = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}: MobileNetV2 (weights=None, 96x96), "
          f"{len(base.weights)} weights, {base.count_params():,} parameters")
    print("\n".join(harness.table(
        ["density", "variables", "changed elements", "v1 bytes", "v2 bytes", "v2 / v1", "v2 B/element",
         "v2 header B/variable", "v1 overhead B/variable", "save s", "load s", "apply s"], "lrrrrrrrrrrr")))
    with tempfile.TemporaryDirectory() as tmp:
        for density in (float(d) for d in args.densities.split(",")):
            delta = SparseDelta.from_models(base, tuned_copy(base, density, seed=0))
            v1, v2 = os.path.join(tmp, "v1.npz"), os.path.join(tmp, "v2.npz")
            write_version_1(delta, v1)
            elapsed = harness.stopwatch()
            delta.save(v2)
            saved = elapsed()[0]
            elapsed = harness.stopwatch()
            loaded = SparseDelta.load(v2)
            load_s = elapsed()[0]
            elapsed = harness.stopwatch()
            loaded.apply(base)
            apply_s = elapsed()[0]
            loaded.revert(base)
            with np.load(v2) as data:
                header_bytes = data["header"].size
                payload = data["data"].size
            size1, size2 = os.path.getsize(v1), os.path.getsize(v2)
            n = delta.num_changed
            print(f"| {density:g} | {len(delta)} | {n:,} | {size1:,} | {size2:,} | {size2 / size1:.3f} | {payload / n:.2f} | "
                  f"{header_bytes / len(delta):.0f} | {(size1 - payload) / len(delta):.0f} | {saved:.2f} | {load_s:.2f} | {apply_s:.2f} |")


if __name__ == "__main__":
    main()
