"""One of two JAX processes of `test_multiprocess_jax.py` (run as a script).

    python tests/multiprocess_worker.py <process_id> <port> <out_dir> <data|model>

Joins a 2-process job on localhost (`keras.distribution.initialize`, one CPU
device per process, gloo collectives), trains the masked model of
`test_multiprocess_jax.py` under DataParallel or ModelParallel for a few
steps on this process's half of each global batch, and writes to `out_dir`:
`p{id}.npz` (every weight before and after, gathered from all processes; the
masks as stored; the Adam slots) and `p{id}.json` (shardings). Process 0
saves the model: with `model.save` under DataParallel, where every variable
is replicated (every process calls it, as every process runs the same
program); under ModelParallel, where variables are sharded over processes,
through a one-process copy of the gathered values (see docs/distribution.md).
"""

import json
import os
import sys

pid, port, out, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from masked_opt import MaskedOptimizer, _backend  # noqa: E402
from multiprocess_case import BATCH, STEPS, build, data, masks  # noqa: E402

keras.distribution.initialize(job_addresses=f"localhost:{port}", num_processes=2, process_id=pid)
devices = keras.distribution.list_devices("cpu")
if kind == "data":
    distribution = keras.distribution.DataParallel(devices=devices)
else:
    mesh = keras.distribution.DeviceMesh((2,), ["model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*d1/kernel"] = (None, "model")
    layout_map[".*d2/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=None)
distribution.auto_shard_dataset = False  # each process feeds its own half of every global batch
keras.distribution.set_distribution(distribution)

model, optimizer = build()
before = [_backend.to_numpy(v) for v in model.weights]
x, y = data()
if kind == "data":  # this process's half of each global batch of BATCH
    rows = np.arange(len(x)).reshape(STEPS, 2, BATCH // 2)[:, pid].reshape(-1)
    model.fit(x[rows], y[rows], batch_size=BATCH // 2, epochs=1, shuffle=False, verbose=0)
else:  # the model is split over the processes, each sees the whole batch
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
after = [_backend.to_numpy(v) for v in model.weights]
arrays = {f"before_{i}": b for i, b in enumerate(before)}
arrays.update({f"after_{i}": a for i, a in enumerate(after)})
for path in masks():
    arrays[f"mask_{path}"] = optimizer.get_mask(path)
optimizer_values = [_backend.to_numpy(v) for v in optimizer.variables]
arrays.update({f"opt_{i}": v for i, v in enumerate(optimizer_values)})
np.savez(os.path.join(out, f"p{pid}.npz"), **arrays)


def spec(variable):
    sharding = variable.value.sharding
    return None if sharding.is_fully_replicated else [str(a) for a in sharding.spec]


info = {
    "paths": [v.path for v in model.weights],
    "weight_specs": {v.path: spec(v) for v in model.weights},
    "mask_specs": {v.path: spec(v) for v in optimizer.variables if v.path.endswith("_mask")},
    "num_processes": jax.process_count(),
}
with open(os.path.join(out, f"p{pid}.json"), "w") as f:
    json.dump(info, f)

if kind == "data":  # every process runs the same program (saving reads collectively)
    model.save(os.path.join(out, "model.keras" if pid == 0 else f"model_p{pid}.keras"))
elif pid == 0:  # a one-process copy of the gathered values
    keras.distribution.set_distribution(None)
    copy, copy_optimizer = build()
    copy_optimizer.build(copy.trainable_variables)
    for variable, value in zip(copy.weights, after):
        variable.assign(value)
    for variable, value in zip(copy_optimizer.variables, optimizer_values):
        variable.assign(value)
    copy.save(os.path.join(out, "model.keras"))
print(f"process {pid}: done", flush=True)
