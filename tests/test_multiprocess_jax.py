"""keras.distribution across 2 JAX processes on localhost (CPU, gloo).

Two worker processes (`multiprocess_worker.py`) join one job with
`keras.distribution.initialize` and train the masked model of
`multiprocess_case.py` under DataParallel (each process feeds half of every
global batch) and ModelParallel (kernels split over the processes). The
oracle is this process: the same model trained on one device. Frozen
elements must be bit-identical to their start; trainable ones match the
one-device run within a stated bound (the gradient is reduced across
processes in another order); both processes hold the same values; masks
are laid out like their variables; the file process 0 saved loads here, in
one process, with the same weights, masks and optimizer state.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from backends import jax_only
from multiprocess_case import BATCH, build, data, masks

pytestmark = jax_only

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_job(kind: str, out: str) -> list[dict]:
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [open(os.path.join(out, f"p{i}.log"), "w") for i in range(2)]  # files: a full pipe would block
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), port, out, kind],
                         env=env, stdout=logs[i], stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
    for f in logs:
        f.close()
    for i, p in enumerate(procs):
        log = open(os.path.join(out, f"p{i}.log")).read()
        assert p.returncode == 0, f"process {i} of the {kind} job failed (exit {p.returncode}):\n{log[-3000:]}"
    return [dict(np.load(os.path.join(out, f"p{i}.npz"))) for i in range(2)], [
        json.load(open(os.path.join(out, f"p{i}.json"))) for i in range(2)
    ]


def _one_device():
    keras.distribution.set_distribution(None)
    model, optimizer = build()
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model, optimizer


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
@pytest.mark.parametrize("kind", ["data", "model"])
def test_two_processes_keep_frozen_elements_and_save_a_file_one_process_loads(kind, tmp_path):
    results, infos = _run_job(kind, str(tmp_path))
    assert [i["num_processes"] for i in infos] == [2, 2]
    reference, reference_optimizer = _one_device()
    paths = infos[0]["paths"]
    m = masks()
    for i, path in enumerate(paths):
        for r in results:
            before, after = r[f"before_{i}"], r[f"after_{i}"]
            key = next((k for k in m if path.endswith(k)), None)
            frozen = ~np.broadcast_to(np.asarray(m[key]), before.shape) if key else np.zeros(before.shape, bool)
            assert np.array_equal(after[frozen], before[frozen]), f"{kind}: frozen elements of {path} moved"
            if (~frozen).any():
                assert np.any(after[~frozen] != before[~frozen]), f"{kind}: {path} did not train"
            # Same training as on one device, up to the order of the gradient's reduction.
            np.testing.assert_allclose(after, keras.ops.convert_to_numpy(reference.weights[i]), rtol=1e-5, atol=1e-6)
        assert np.array_equal(results[0][f"after_{i}"], results[1][f"after_{i}"]), path  # one model
    for key, mask in m.items():
        for r in results:
            assert np.array_equal(r[f"mask_{key}"], np.broadcast_to(mask, r[f"mask_{key}"].shape))
    kernel = next(p for p in paths if p.endswith("d1/kernel"))
    mask_spec = next(s for p, s in infos[0]["mask_specs"].items() if "d1_kernel" in p)
    if kind == "model":
        assert infos[0]["weight_specs"][kernel] == ["None", "model"]
        assert mask_spec == infos[0]["weight_specs"][kernel]  # the element mask is split like its kernel
    else:
        assert infos[0]["weight_specs"][kernel] is None and mask_spec is None  # replicated
    column = next(s for p, s in infos[0]["mask_specs"].items() if "d2_kernel" in p)
    assert column is None  # a (1, 4) column mask is replicated

    loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    for i, variable in enumerate(loaded.weights):
        assert np.array_equal(keras.ops.convert_to_numpy(variable), results[0][f"after_{i}"])
    for key, mask in m.items():
        assert np.array_equal(loaded.optimizer.get_mask(key), np.broadcast_to(mask, loaded.optimizer.get_mask(key).shape))
    for i, variable in enumerate(loaded.optimizer.variables):
        assert np.array_equal(keras.ops.convert_to_numpy(variable), results[0][f"opt_{i}"]), variable.path
