"""tf.distribute: MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy
with 2 worker processes on localhost, and the strategy check.

The logical-device setup must run before TensorFlow initializes its devices,
and a multi-worker cluster needs processes of its own, so both run as
subprocess scripts (written to a temporary folder); each writes its results
(JSON on stdout, arrays in .npz) for the assertions made here. Every run is
bounded: a subprocess timeout here, and a watchdog inside each worker.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras
from backends import needs_multi_optimizer, tf_only
from masked_opt import MaskedOptimizer, _backend, _inner_optimizer

pytestmark = tf_only  # tf.distribute is TensorFlow's


O = keras.optimizers
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(**extra):
    env = dict(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
    )
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no RESULT line; output tail:\n{stdout[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------- MirroredStrategy

MIRRORED_SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import keras
    from masked_opt import MaskedOptimizer

    out = sys.argv[1]
    COMPACT = len(sys.argv) > 2 and sys.argv[2] == "compact"
    rng = np.random.default_rng(0)
    VOCAB = 20
    ids = rng.integers(0, VOCAB, size=(32, 3))
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    row_mask = np.zeros((VOCAB, 1), bool)
    row_mask[12:] = True
    MASKS = {
        "emb/embeddings": row_mask,                       # sparse gradients
        "out/kernel": np.ones((10, 2), bool),             # full shape: edited below
        "out/bias": np.array([True, False]),
        "hidden/kernel": rng.random((10, 10)) < 0.5,
    }

    def build():
        keras.utils.set_random_seed(0)
        a = keras.Input((3,), dtype="int32", name="ids")
        b = keras.Input((4,), name="x")
        e = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 2, name="emb")(a))
        h = keras.layers.Dense(10, activation="tanh", name="hidden")(keras.layers.Concatenate()([e, b]))
        model = keras.Model([a, b], keras.layers.Dense(2, name="out")(h), name="net")
        extra = {"compact_state": True, "compact_capacity": 1.0} if COMPACT else {}
        # Update multipliers too: on a masked kernel (per column) and an unmasked bias.
        mults = {"hidden/kernel": np.linspace(0.5, 2.0, 10, dtype="float32")[None], "hidden/bias": 0.5}
        opt = MaskedOptimizer(
            keras.optimizers.AdamW(0.05, weight_decay=0.1), masks=MASKS, multipliers=mults, **extra
        )
        model.compile(optimizer=opt, loss="mse")
        return model, opt

    def fit(model, epochs):
        model.fit({"ids": ids, "x": x}, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)

    def run(strategy):
        if strategy is None:
            model, opt = build()
        else:
            with strategy.scope():
                model, opt = build()
        start = [v.numpy() for v in model.trainable_variables]
        fit(model, 2)
        first_masks = [opt.get_mask(v) for v in model.trainable_variables]
        mid = [v.numpy() for v in model.trainable_variables]
        # a mask changed after build, between fits (cross-replica context)
        opt.freeze("out/kernel", np.s_[0])
        fit(model, 1)
        return model, opt, (start, first_masks, mid)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, opt, (start, first_masks, mid) = run(strategy)
    single, _, (single_start, _, _) = run(None)
    result = {"replicas": strategy.num_replicas_in_sync, "paths": [], "frozen_exact": {},
              "trainable_moved": {}, "max_abs_diff_vs_single": {}, "mask_copies_equal": {}}
    mask_vars = [v for v in opt.variables if v.path.endswith(("_mask", "_compact_indices"))]
    result["mask_vars_mirrored"] = [isinstance(v.value, tf.distribute.DistributedValues) for v in mask_vars]
    result["mask_copies_equal"] = [
        all(np.array_equal(c.numpy(), v.value.values[0].numpy()) for c in v.value.values)
        for v in mask_vars
    ]
    arrays = {}
    for i, v in enumerate(model.trainable_variables):
        s, m0, mid_i, w = start[i], first_masks[i], mid[i], single.trainable_variables[i]
        key = "/".join(v.path.split("/")[-2:])  # layer/variable
        mask = opt.get_mask(v)
        copies = [c.numpy() for c in v.value.values]
        result["paths"].append(key)
        # frozen from the start: unchanged since the start; frozen later: since then
        result["frozen_exact"][key] = [
            bool(np.array_equal(c[~m0], s[~m0]) and np.array_equal(c[~mask], mid_i[~mask]))
            for c in copies
        ]
        result["trainable_moved"][key] = bool(np.all(copies[0][mask] != mid_i[mask]))
        result["max_abs_diff_vs_single"][key] = float(np.max(np.abs(copies[0] - w.numpy())))
        arrays[f"mask_{key}"] = mask
    result["same_start"] = all(np.array_equal(a, b) for a, b in zip(start, single_start))
    np.savez(out, **arrays)
    print("RESULT " + json.dumps(result), flush=True)
    '''
)


@pytest.fixture(scope="module", params=["dense", "compact"])
def mirrored(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("mirrored")
    script = folder / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    out = str(folder / "arrays.npz")
    proc = subprocess.run(
        [sys.executable, str(script), out, request.param],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return _result(proc.stdout), np.load(out)


def test_mirrored_strategy_runs_on_two_replicas_with_mirrored_masks(mirrored):
    result, _ = mirrored
    assert result["replicas"] == 2
    assert len(result["mask_vars_mirrored"]) == 4
    assert all(result["mask_vars_mirrored"])  # created under the strategy scope
    assert all(result["mask_copies_equal"])  # freeze() after build reached every replica


def test_mirrored_strategy_keeps_frozen_elements_exact_on_every_replica(mirrored):
    result, arrays = mirrored
    for key in ("emb/embeddings", "hidden/kernel", "out/kernel", "out/bias", "hidden/bias"):
        assert result["frozen_exact"][key] == [True, True], key
        assert result["trainable_moved"][key], key
    # the freeze made after two epochs: row 0 of out/kernel is frozen now
    assert not arrays["mask_out/kernel"][0].any() and arrays["mask_out/kernel"][1:].all()


def test_mirrored_strategy_matches_single_device_training(mirrored):
    result, _ = mirrored
    assert result["same_start"]
    for key, diff in result["max_abs_diff_vs_single"].items():
        assert diff < 1e-5, (key, diff)


# ------------------------------------------------- MultiWorkerMirroredStrategy

WORKER_SCRIPT = textwrap.dedent(
    '''
    import json, os, shutil, sys, threading
    # Stops by itself: a worker whose peer died would otherwise wait forever.
    threading.Timer(float(os.environ["WORKER_TIMEOUT"]), os._exit, args=(3,)).start()
    import numpy as np
    import tensorflow as tf
    import keras
    from masked_opt import MaskedOptimizer

    out_dir = sys.argv[1]
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    is_chief = task["index"] == 0
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    MASKS = {"hidden/kernel": rng.random((4, 6)) < 0.5, "out/bias": np.array([True, False])}
    GLOBAL_BATCH = 8

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="hidden"),
             keras.layers.Dense(2, name="out")],
            name="net",
        )
        opt = MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), masks=MASKS)
        model.compile(optimizer=opt)  # so that save_weights includes the optimizer (and masks)
    start = [v.numpy() for v in model.trainable_variables]
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    distributed = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def train_step(batch):
        def step_fn(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
        strategy.run(step_fn, args=batch)

    for epoch in range(2):
        for batch in distributed:
            train_step(batch)
    end = [v.numpy() for v in model.trainable_variables]
    masks = [opt.get_mask(v) for v in model.trainable_variables]

    # Every worker saves; only the chief writes to the real path (the others
    # write to a temporary folder and delete it).
    if is_chief:
        path = os.path.join(out_dir, "masked.weights.h5")
    else:
        path = os.path.join(out_dir, f"tmp_worker_{task['index']}", "masked.weights.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save_weights(path)
    if not is_chief:
        shutil.rmtree(os.path.dirname(path))

    # The strategy check refuses an option that stock Keras fails on.
    with strategy.scope():
        bad = MaskedOptimizer(keras.optimizers.Adam(0.1, gradient_accumulation_steps=2), masks=MASKS)
    try:
        bad.build(model.trainable_variables)
        check_error = ""
    except ValueError as e:
        check_error = str(e)

    np.savez(
        os.path.join(out_dir, f"worker_{task['index']}.npz"),
        **{f"start_{i}": a for i, a in enumerate(start)},
        **{f"end_{i}": a for i, a in enumerate(end)},
        **{f"mask_{i}": a for i, a in enumerate(masks)},
        iterations=np.array(int(opt.iterations.numpy())),
    )
    print("RESULT " + json.dumps({"index": task["index"], "replicas": strategy.num_replicas_in_sync,
                                  "check_error": check_error}), flush=True)
    os._exit(0)
    '''
)

def _mw_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    masks = {"hidden/kernel": rng.random((4, 6)) < 0.5, "out/bias": np.array([True, False])}
    return x, y, masks


def _mw_model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_worker")
    script = folder / "worker.py"
    script.write_text(WORKER_SCRIPT)
    out = folder / "out"
    out.mkdir()
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}  # loopback only
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out)],
                env=_env(TF_CONFIG=tf_config, WORKER_TIMEOUT="200"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-6000:]
    results = [_result(o) for o in outputs]
    workers = [np.load(out / f"worker_{i}.npz") for i in range(2)]
    return results, workers, out


def test_multi_worker_runs_two_workers_in_sync(multi_worker):
    results, workers, _ = multi_worker
    assert sorted(r["index"] for r in results) == [0, 1]
    assert all(r["replicas"] == 2 for r in results)
    for i in range(4):  # both workers end bit-identical
        assert np.array_equal(workers[0][f"end_{i}"], workers[1][f"end_{i}"])
    assert int(workers[0]["iterations"]) == 8  # 2 epochs of 4 global batches


def test_multi_worker_keeps_frozen_elements_exact(multi_worker):
    _, workers, _ = multi_worker
    _, _, masks = _mw_data()
    expected = [masks["hidden/kernel"], np.ones(6, bool), np.ones((6, 2), bool), masks["out/bias"]]
    for w in workers:
        for i, mask in enumerate(expected):
            assert np.array_equal(w[f"mask_{i}"], mask)
            start, end = w[f"start_{i}"], w[f"end_{i}"]
            assert np.array_equal(end[~mask], start[~mask])
            assert np.all(end[mask] != start[mask])


def test_multi_worker_matches_single_device_training(multi_worker):
    _, workers, _ = multi_worker
    x, y, masks = _mw_data()
    model = _mw_model()
    model.set_weights([workers[0][f"start_{i}"] for i in range(4)])
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), masks=masks)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for _ in range(2):
        for i in range(0, 32, 8):
            step(x[i : i + 8], y[i : i + 8])
    for i, v in enumerate(model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), workers[0][f"end_{i}"], rtol=0, atol=1e-5)


def test_multi_worker_chief_saves_masks_once_and_they_load_back(multi_worker):
    _, workers, out = multi_worker
    saved = sorted(str(p.relative_to(out)) for p in out.rglob("*.weights.h5"))
    assert saved == ["masked.weights.h5"]  # the chief's; the other worker left nothing
    _, _, masks = _mw_data()
    model = _mw_model()
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), masks={k: ~v for k, v in masks.items()})
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    model.load_weights(str(out / "masked.weights.h5"))
    for i, v in enumerate(model.trainable_variables):
        assert np.array_equal(opt.get_mask(v), workers[0][f"mask_{i}"])
        assert np.array_equal(v.numpy(), workers[0][f"end_{i}"])
    assert int(opt.iterations.numpy()) == 8


def test_multi_worker_strategy_check_names_the_option(multi_worker):
    results, _, _ = multi_worker
    for r in results:
        assert "`gradient_accumulation_steps=2`" in r["check_error"]
        assert "keras-team/keras#20582" in r["check_error"]


# ----------------------------------------------- the strategy check, in process
# A one-device MirroredStrategy needs no logical devices and shows the same
# stock failure as two devices.


def _mirrored_one_device():
    return tf.distribute.MirroredStrategy(["/cpu:0"])


def _tiny():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    return model


@pytest.mark.parametrize(
    "option, kwargs",
    [
        ("ema_overwrite_frequency", dict(use_ema=True, ema_overwrite_frequency=2)),
        ("gradient_accumulation_steps", dict(gradient_accumulation_steps=2)),
    ],
)
def test_stock_keras_fails_on_these_options_under_mirrored_strategy(option, kwargs):
    # The reason for the check: if Keras fixes #20582, this test fails and the
    # check should be relaxed.
    with _mirrored_one_device().scope():
        model = _tiny()
        model.compile(optimizer=O.Adam(0.1, **kwargs), loss="mse")
    with pytest.raises(RuntimeError, match="merge_call"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=2, verbose=0)


@pytest.mark.parametrize(
    "option, kwargs",
    [
        ("ema_overwrite_frequency", dict(use_ema=True, ema_overwrite_frequency=2)),
        ("gradient_accumulation_steps", dict(gradient_accumulation_steps=2)),
    ],
)
def test_masked_optimizer_refuses_unsupported_option_under_mirrored_strategy(option, kwargs):
    with _mirrored_one_device().scope():
        model = _tiny()
        opt = MaskedOptimizer(O.Adam(0.1, **kwargs), masks={"d/kernel": False})
        model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match=rf"`{option}=2` on the inner optimizer 'adam'.*MirroredStrategy"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=2, verbose=0)


@needs_multi_optimizer
def test_strategy_check_looks_into_multi_optimizer_sub_optimizers():
    with _mirrored_one_device().scope():
        model = _tiny()
        sub = O.SGD(0.1, gradient_accumulation_steps=3, name="acc_sgd")
        multi = O.MultiOptimizer(O.OptimizerMap(default_optimizer=O.Adam(0.1), optimizer_map={".*bias": sub}))
        opt = MaskedOptimizer(multi, masks={"d/kernel": False})
        with pytest.raises(ValueError, match=r"`gradient_accumulation_steps=3` on the inner optimizer 'acc_sgd' \(SGD\)"):
            opt.build(model.trainable_variables)


@needs_multi_optimizer
def test_strategy_check_finds_sub_optimizers_of_a_callable_map_given_the_variables():
    # A callable map names its sub-optimizers only when asked about a variable.
    sub = O.SGD(0.1, gradient_accumulation_steps=2, name="from_callable")
    with _mirrored_one_device().scope():
        model = _tiny()
        multi = O.MultiOptimizer(lambda v: sub)
        assert multi.optimizers == []
        _backend.check_strategy_support(multi, _inner_optimizer.leaf_optimizers(multi))  # nothing known yet
        with pytest.raises(ValueError, match="'from_callable'"):
            MaskedOptimizer(multi).build(model.trainable_variables)


@pytest.mark.parametrize(
    "strategy",
    [None, lambda: tf.distribute.OneDeviceStrategy("/cpu:0")],
    ids=["no_strategy", "one_device"],
)
def test_options_are_accepted_where_stock_keras_runs_them(strategy):
    masks = {"d/kernel": np.array([[True, False]])}
    scope = strategy().scope() if strategy else contextlib.nullcontext()
    with scope:
        model = _tiny()
        start = model.layers[0].kernel.numpy().copy()
        opt = MaskedOptimizer(
            O.Adam(0.1, use_ema=True, ema_overwrite_frequency=2, gradient_accumulation_steps=2),
            masks=masks,
        )
        model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=2, verbose=0)
    end = model.layers[0].kernel.numpy()
    assert np.array_equal(end[:, 1], start[:, 1])
    assert np.all(end[:, 0] != start[:, 0])


def test_use_ema_without_overwrite_is_accepted_under_mirrored_strategy():
    with _mirrored_one_device().scope():
        model = _tiny()
        start = model.layers[0].kernel.numpy().copy()
        opt = MaskedOptimizer(O.Adam(0.1, use_ema=True), masks={"d/kernel": np.array([[True, False]])})
        model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=2, verbose=0)
    end = model.layers[0].kernel.numpy()
    assert np.array_equal(end[:, 1], start[:, 1])
    assert np.all(end[:, 0] != start[:, 0])


@needs_multi_optimizer
def test_masked_optimizer_checks_callable_multi_optimizer_at_build():
    # The core passes the variables, so a callable map's sub-optimizers are found.
    sub = O.SGD(0.1, gradient_accumulation_steps=2, name="from_callable")
    with _mirrored_one_device().scope():
        model = _tiny()
        opt = MaskedOptimizer(O.MultiOptimizer(lambda v: sub), masks={"d/kernel": False})
        with pytest.raises(ValueError, match="'from_callable'"):
            opt.build(model.trainable_variables)
