"""Serialization of `MaskedOptimizer`: keras.saving registration, JSON config
without arrays, from_config, `model.save` / `load_model`, `save_weights` /
`load_weights`, refusing to load state saved with other masks, and `.keras`
files carried between backends (subprocesses under the other backends)."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import keras
from backends import BACKEND, IS_TF, IS_TORCH, XLA_MAX_ULP, assert_ulp_close, optimizer_class, tensor, to_numpy, frozen_slot_names, is_frozen_slot
from masked_opt import MaskedOptimizer, _saving

O = keras.optimizers

KERNEL_1 = np.array([[True, False, True, False]])  # (1, 4): columns of dense_1/kernel
KERNEL_2 = np.array([[True, False], [False, True], [True, True], [False, False]])  # (4, 2)


def make_model(kind="sequential"):
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(4, name="dense_1"), keras.layers.Dense(2, name="dense_2")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((3,))] + layers, name="seq")
    inputs = keras.Input((3,))
    return keras.Model(inputs, layers[1](layers[0](inputs)), name="func")


def make_optimizer(masks=None):
    if masks is None:
        masks = {"dense_1/kernel": KERNEL_1, "dense_1/bias": False, "dense_2/kernel": KERNEL_2}
    return MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), masks)


def data(n=16):
    rng = np.random.default_rng(1)
    return (
        rng.normal(size=(n, 3)).astype("float32"),
        rng.normal(size=(n, 2)).astype("float32"),
    )


def steps(model, n=2, seed=0):
    """`n` eager optimizer steps with fixed pseudo-random gradients (no tracing)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        grads = [tensor(rng.normal(size=v.shape), "float32") for v in model.trainable_variables]
        model.optimizer.apply(grads, model.trainable_variables)


def trained(kind="sequential", masks=None):
    model = make_model(kind)
    model.compile(make_optimizer(masks), "mse")
    steps(model)
    return model


def assert_same_state(a, b):
    """Optimizer variables and model weights equal to the bit, position by position."""
    va, vb = a.optimizer.variables, b.optimizer.variables
    assert len(va) == len(vb)
    frozen = frozen_slot_names(a.optimizer) + frozen_slot_names(b.optimizer)
    for x, y in zip(va, vb):
        if is_frozen_slot(x, frozen) and is_frozen_slot(y, frozen):
            continue  # a wholly frozen variable's slots: no state (size 0 in a stand-in)
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape)
        assert np.array_equal(x.numpy(), y.numpy()), (x.path, y.path)
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights):
        assert np.array_equal(x.numpy(), y.numpy()), (x.path, y.path)


def assert_same_masks(a, b):
    for la, lb in zip(a.layers, b.layers):
        for va, vb in zip(la.trainable_variables, lb.trainable_variables):
            np.testing.assert_array_equal(a.optimizer.get_mask(va), b.optimizer.get_mask(vb))


def walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk(v)


# ------------------------------------------------------------------ config


def test_registered_with_keras_saving():
    assert keras.saving.get_registered_name(MaskedOptimizer) == "masked_opt>MaskedOptimizer"
    assert keras.saving.get_registered_object("masked_opt>MaskedOptimizer") is MaskedOptimizer


@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "built"])
def test_config_is_json_nests_the_inner_optimizer_and_holds_no_arrays(built):
    big = keras.Variable(np.zeros((64, 64), "float32"), name="big")
    rng = np.random.default_rng(0)
    opt = MaskedOptimizer(
        O.AdamW(0.05, weight_decay=0.1),
        {"big": rng.random((64, 64)) > 0.5},
        name="masked_adamw",
    )
    if built:
        opt.build([big])
    config = opt.get_config()
    text = json.dumps(config)
    assert len(text) < 2000  # a 4096-element mask would not fit: values live in variables
    for item in walk(config):
        assert not isinstance(item, (np.ndarray, np.generic))
        if isinstance(item, (list, tuple)):
            assert len(item) <= 4, item
    assert config["name"] == "masked_adamw"
    inner = config["inner_optimizer"]
    assert inner["class_name"] == "AdamW"
    assert inner["config"]["weight_decay"] == pytest.approx(0.1)
    assert json.loads(text) == json.loads(json.dumps(json.loads(text)))


def test_from_config_round_trip_keeps_inner_optimizer_and_mask_shapes():
    variables = make_model().trainable_variables
    opt = make_optimizer()
    opt.build(variables)
    clone = MaskedOptimizer.from_config(json.loads(json.dumps(opt.get_config())))
    assert type(clone) is MaskedOptimizer and clone.name == opt.name
    assert type(clone.inner_optimizer) is type(opt.inner_optimizer)  # torch's AdamW on torch
    assert isinstance(clone.inner_optimizer, O.AdamW)
    assert clone.inner_optimizer.get_config() == opt.inner_optimizer.get_config()
    clone.build(variables)
    assert [v.path for v in clone.masked_variables] == [v.path for v in opt.masked_variables]
    assert [tuple(v.shape) for v in clone.variables] == [tuple(v.shape) for v in opt.variables]
    assert [str(v.dtype) for v in clone.variables] == [str(v.dtype) for v in opt.variables]


def test_mask_values_rebuilt_from_config_alone_are_held_frozen_and_refuse_to_train():
    # Values live in variables, not in the config: until they are loaded the
    # rebuilt masks freeze everything they cover, and training says why.
    variables = make_model().trainable_variables
    opt = make_optimizer()
    opt.build(variables)
    clone = MaskedOptimizer.from_config(opt.get_config())
    clone.build(variables)
    assert not clone.get_mask(variables[0]).any()
    grads = [np.ones(v.shape, "float32") for v in variables]
    with pytest.raises(ValueError, match="(?s)seq/dense_1/kernel.*saved weights"):
        clone.apply(grads, variables)


def test_serialize_and_deserialize_through_keras_optimizers():
    opt = MaskedOptimizer("sgd", {"dense_1/bias": False}, name="m")
    restored = O.deserialize(O.serialize(opt))
    assert type(restored) is MaskedOptimizer and restored.name == "m"
    assert type(restored.inner_optimizer) is type(O.SGD())
    restored.build(make_model().trainable_variables)
    assert not restored.get_mask("dense_1/bias").any()


def test_config_round_trip_is_idempotent():
    opt = make_optimizer()
    opt.build(make_model().trainable_variables)
    config = opt.get_config()
    assert MaskedOptimizer.from_config(config).get_config() == config


# --------------------------------------------------------- model.save / load


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_load_model_restores_masks_and_state_and_continues_bit_for_bit(kind, tmp_path):
    x, y = data()
    model = make_model(kind)
    model.compile(make_optimizer(), "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    start = [w.numpy().copy() for w in model.trainable_variables]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded.optimizer) is MaskedOptimizer
    assert type(loaded.optimizer.inner_optimizer) is type(model.optimizer.inner_optimizer)
    assert len(loaded.optimizer.masked_variables) == 3
    assert_same_masks(model, loaded)
    assert_same_state(model, loaded)
    if kind == "sequential":
        # A reloaded Sequential drops its own name from the variable paths.
        assert model.layers[0].kernel.path == "seq/dense_1/kernel"
        assert loaded.layers[0].kernel.path == "dense_1/kernel"

    for m in (model, loaded):
        if kind == "sequential":  # through the compiled train step
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        else:
            steps(m, seed=1)
    assert_same_state(model, loaded)
    # Frozen elements did not move across the reload and the continued training.
    kernel_1, bias_1, kernel_2 = (loaded.trainable_variables[i].numpy() for i in (0, 1, 2))
    cols = KERNEL_1[0]
    assert np.array_equal(kernel_1[:, ~cols], start[0][:, ~cols])
    assert np.array_equal(bias_1, start[1])
    assert np.array_equal(kernel_2[~KERNEL_2], start[2][~KERNEL_2])
    assert (kernel_2[KERNEL_2] != start[2][KERNEL_2]).all()


def test_reloaded_sequential_saves_and_loads_again(tmp_path):
    model = trained()
    model.save(tmp_path / "a.keras")
    once = keras.models.load_model(tmp_path / "a.keras")
    once.save(tmp_path / "b.keras")
    twice = keras.models.load_model(tmp_path / "b.keras")
    assert_same_masks(model, twice)
    assert_same_state(model, twice)


def test_mask_edits_after_build_survive_save_and_load(tmp_path):
    model = trained()
    model.optimizer.freeze("dense_2/kernel", np.s_[1:, :])
    model.optimizer.unfreeze("dense_1/kernel", np.s_[:, 1])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert_same_masks(model, loaded)
    expected = np.zeros((4, 2), bool)
    expected[0] = KERNEL_2[0]
    np.testing.assert_array_equal(loaded.optimizer.get_mask(loaded.layers[1].kernel), expected)


def test_save_weights_and_load_weights_round_trip(tmp_path):
    model = trained()
    path = str(tmp_path / "x.weights.h5")
    model.save_weights(path)

    other = make_model()
    other.compile(make_optimizer(), "mse")
    other.optimizer.build(other.trainable_variables)  # as for any Keras optimizer state
    other.load_weights(path)
    assert_same_masks(model, other)
    assert_same_state(model, other)
    for m in (model, other):
        steps(m, seed=1)
    assert_same_state(model, other)


# ------------------------------------------------------------ mismatches


def compiled_with(masks):
    model = make_model()
    model.compile(make_optimizer(masks), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize(
    "masks, shown",
    [
        ({"dense_2/kernel": KERNEL_2}, ["dense_1/kernel", "no mask"]),
        (
            {"dense_1/kernel": np.ones((3, 4), bool), "dense_1/bias": False, "dense_2/kernel": KERNEL_2},
            ["dense_1/kernel", "(1, 4)", "(3, 4)"],
        ),
        (
            {"dense_1/kernel": KERNEL_1, "dense_2/bias": False, "dense_2/kernel": KERNEL_2},
            ["dense_1/bias", "dense_2/bias"],
        ),
    ],
    ids=["other_variables", "other_shape", "other_bias"],
)
def test_load_weights_with_other_masks_raises_naming_the_paths(masks, shown, tmp_path):
    model = trained()
    path = str(tmp_path / "m.keras")
    model.save(path)
    other = compiled_with(masks)
    before = [v.numpy().copy() for v in other.optimizer.variables[: -len(other.optimizer.inner_optimizer.variables)]]
    with pytest.raises(ValueError, match="saved masks do not match") as e:
        other.load_weights(path)
    for fragment in shown:
        assert fragment in str(e.value)
    assert "MaskedOptimizer" in str(e.value)
    # The wrapper's own state (iteration, masks) was not overwritten.
    own = other.optimizer.variables[: len(before)]
    for b, v in zip(before, own):
        assert np.array_equal(b, v.numpy()), v.path


def test_load_weights_with_other_masks_leaves_the_inner_state_untouched(tmp_path):
    model = trained()
    path = str(tmp_path / "m.keras")
    model.save(path)
    other = compiled_with({"dense_2/kernel": KERNEL_2})
    inner = other.optimizer.inner_optimizer
    before = [v.numpy().copy() for v in inner.variables]
    with pytest.raises(ValueError, match="saved masks do not match"):
        other.load_weights(path)
    for b, v in zip(before, inner.variables):
        assert np.array_equal(b, v.numpy()), v.path


def test_state_saved_by_a_plain_optimizer_is_refused(tmp_path):
    model = make_model()
    model.compile(O.AdamW(0.05, weight_decay=0.1), "mse")
    steps(model)
    path = str(tmp_path / "plain.weights.h5")
    model.save_weights(path)
    other = compiled_with(None)
    with pytest.raises(ValueError, match="no mask metadata"):
        other.load_weights(path)


def test_load_weights_into_an_unbuilt_optimizer_with_the_same_masks(tmp_path):
    model = trained()
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = make_model()
    other.compile(make_optimizer(), "mse")
    try:
        other.load_weights(path)
    except ValueError as e:  # acceptable only as a clear "build it first" error
        assert "optimizer.build(" in str(e) and "no mask" not in str(e), str(e)
    else:
        for a, b in zip(model.weights, other.weights):
            assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("masks", [{"dense_1/bias": False}, {"dense_1/kernel": KERNEL_1}],
                         ids=["scalar", "columns"])
def test_model_saved_before_training_loads_with_its_masks(masks, tmp_path):
    model = make_model()
    model.compile(make_optimizer(masks), "mse")
    model.save(tmp_path / "untrained.keras")
    loaded = keras.models.load_model(tmp_path / "untrained.keras")
    (key, value), = masks.items()
    variable = loaded.get_layer(key.split("/")[0]).kernel if "kernel" in key else loaded.get_layer(key.split("/")[0]).bias
    np.testing.assert_array_equal(
        loaded.optimizer.get_mask(variable), np.broadcast_to(value, variable.shape)
    )


# ------------------------------------------------- inner optimizer's config


def _multi():
    return optimizer_class("MultiOptimizer")(
        O.OptimizerMap(default_optimizer=O.SGD(0.1), optimizer_map={".*kernel": O.AdamW(0.1)})
    )


def _optimizer_entries(config):
    """(module, class_name) of every optimizer-like entry in a keras.saving config."""
    return [(d["module"], d["class_name"]) for d in walk(config) if isinstance(d, dict) and "class_name" in d]


@pytest.mark.parametrize("make", [lambda: O.AdamW(0.1), _multi], ids=["adamw", "multi_optimizer"])
def test_inner_config_names_public_keras_classes_only(make):
    entries = _optimizer_entries(_saving.inner_config(make()))
    assert ("keras.optimizers", "AdamW") in entries
    assert all(module == "keras.optimizers" for module, _ in entries), entries


@pytest.mark.parametrize("make", [lambda: O.AdamW(0.1), _multi], ids=["adamw", "multi_optimizer"])
def test_inner_config_saved_with_a_private_torch_class_rebuilds_this_backends_optimizer(make):
    config = _saving.inner_config(make())
    for entry in walk(config):  # as stock keras.saving writes it on torch
        if isinstance(entry, dict) and entry.get("class_name") in ("AdamW", "SGD"):
            name = entry["class_name"].lower()
            entry.update(module=f"keras.src.backend.torch.optimizers.torch_{name}", registered_name=entry["class_name"])
    inner = _saving.inner_from_config(config)
    leaves = inner.optimizers if isinstance(inner, getattr(O, "MultiOptimizer", ())) else [inner]
    for leaf in leaves:  # what `keras.optimizers.X()` gives on this backend
        assert type(leaf) is type(getattr(O, type(leaf).__name__)())
        assert IS_TORCH or "torch" not in type(leaf).__module__
    assert any(isinstance(leaf, O.AdamW) for leaf in leaves)


def test_get_config_names_the_public_inner_optimizer_class():
    config = MaskedOptimizer(_multi(), {"dense_1/bias": False}).get_config()
    entries = _optimizer_entries(config["inner_optimizer"])
    assert all(module == "keras.optimizers" for module, _ in entries), entries


# ------------------------------------------------------ across backends

BACKENDS = ("tensorflow", "jax", "torch")
OTHERS = [b for b in BACKENDS if b != BACKEND]
INSTALLED = {b for b in OTHERS if importlib.util.find_spec(b) is not None}
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CROSS_MASKS = {"dense_1/kernel": KERNEL_1, "dense_1/bias": False, "dense_2/kernel": KERNEL_2}


def _other(backend):
    """A parameter for another backend: skipped where it is not installed."""
    return pytest.param(backend, marks=pytest.mark.skipif(backend not in INSTALLED, reason=f"{backend} is not installed"))


def _cross_grads():
    rng = np.random.default_rng(7)
    return [rng.normal(size=s).astype("float32") for s in [(3, 4), (4,), (4, 2), (2,)]]


def _save_here(path):
    """Trains a masked model under this backend (with a mask edit after build;
    with `jit_compile=True` on TensorFlow), saves it to `path`, and writes
    what a loader must find: masks, weights, optimizer state, and the weights
    after one more step with `_cross_grads()`."""
    x, y = data()
    model = make_model()
    opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), CROSS_MASKS, jit_compile=IS_TF)
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    opt.freeze("dense_2/kernel", np.s_[0, 0])
    model.save(path)
    record = {f"mask_{i}": opt.get_mask(v) for i, v in enumerate(model.trainable_variables)}
    record.update({f"weight_{i}": to_numpy(v) for i, v in enumerate(model.weights)})
    record.update({f"state_{i}": to_numpy(v) for i, v in enumerate(opt.variables)})
    opt.apply([tensor(g) for g in _cross_grads()], model.trainable_variables)
    record.update({f"stepped_{i}": to_numpy(v) for i, v in enumerate(model.trainable_variables)})
    np.savez(path + ".npz", **record)


def _check_load(path, saved_by):
    """Loads `path` (saved under `saved_by`) here and checks it against the
    saver's record: masks, weights and optimizer state to the bit, the
    jit_compile warning, and a step that keeps frozen elements exact and
    matches the saver's step within XLA_MAX_ULP ulp (two backends)."""
    record = np.load(path + ".npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(path)
    opt = model.optimizer
    assert type(opt) is MaskedOptimizer
    assert type(opt.inner_optimizer) is type(O.AdamW()), "not this backend's AdamW"
    jit_warnings = [w for w in caught if "jit_compile=True" in str(w.message)]
    assert len(jit_warnings) == (saved_by == "tensorflow" and not IS_TF), [str(w.message) for w in caught]
    assert opt.jit_compile is (saved_by == "tensorflow" and IS_TF)
    variables = model.trainable_variables
    masks = [np.asarray(record[f"mask_{i}"]) for i in range(len(variables))]
    for i, v in enumerate(variables):
        assert np.array_equal(opt.get_mask(v), masks[i]), f"mask of {v.path}"
    for i, v in enumerate(model.weights):
        assert np.array_equal(to_numpy(v), record[f"weight_{i}"]), f"weight {v.path}"
    assert len(opt.variables) == len([k for k in record.files if k.startswith("state_")])
    frozen = frozen_slot_names(opt)
    for i, v in enumerate(opt.variables):
        if is_frozen_slot(v, frozen):
            continue  # a wholly frozen variable's slots: no state (size 0 in a stand-in)
        assert np.array_equal(to_numpy(v), record[f"state_{i}"]), f"optimizer variable {v.path}"
    opt.apply([tensor(g) for g in _cross_grads()], variables)
    for i, v in enumerate(variables):
        now, before = to_numpy(v), record[f"weight_{i}"]
        assert np.array_equal(now[~masks[i]], before[~masks[i]]), f"frozen elements of {v.path} moved"
        assert_ulp_close(now, record[f"stepped_{i}"], XLA_MAX_ULP, f"{v.path} after a step")
    assert int(opt.iterations.numpy()) == 3
    return model


def _child_main(backend_saved_here, here_path, own_path, report_path):
    """Runs in a subprocess under another backend: checks the file saved by
    the parent, then saves its own for the parent to load."""
    import traceback

    report = {}
    try:
        _check_load(here_path, backend_saved_here)
        report["load"] = "ok"
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails with it
        report["load"] = traceback.format_exc()
    _save_here(own_path)
    with open(report_path, "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def cross_backend(tmp_path_factory):
    """Saves a model here, then runs one subprocess per other backend (in
    parallel): each loads this file and saves its own."""
    folder = tmp_path_factory.mktemp("cross_backend")
    here = str(folder / f"saved_by_{BACKEND}.keras")
    keras.config.set_dtype_policy("float32")
    _save_here(here)
    procs = {}
    for other in sorted(INSTALLED):
        code = (
            f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_saving; "
            f"test_saving._child_main({BACKEND!r}, {here!r}, "
            f"{str(folder / f'saved_by_{other}.keras')!r}, {str(folder / f'report_{other}.json')!r})"
        )
        env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="3")
        procs[other] = subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=TESTS_DIR,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    results = {}
    for other, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        report_path = folder / f"report_{other}.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        results[other] = (proc.returncode, output[-4000:], report, str(folder / f"saved_by_{other}.keras"))
    return results


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
@pytest.mark.parametrize("other", [_other(o) for o in OTHERS])
def test_keras_file_saved_here_loads_under_the_other_backend(cross_backend, other):
    code, output, report, _ = cross_backend[other]
    assert code == 0, f"the {other} subprocess failed:\n{output}"
    assert report.get("load") == "ok", f"loading under {other} (saved under {BACKEND}):\n{report.get('load')}"


@pytest.mark.parametrize("other", [_other(o) for o in OTHERS])
@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_keras_file_saved_under_the_other_backend_loads_here(cross_backend, other):
    code, output, _, path = cross_backend[other]
    assert code == 0, f"the {other} subprocess failed:\n{output}"
    model = _check_load(path, saved_by=other)
    # and it trains on: a fit keeps the frozen elements exact
    frozen = [(v, ~model.optimizer.get_mask(v), to_numpy(v)) for v in model.trainable_variables]
    model.fit(*data(), batch_size=8, epochs=1, shuffle=False, verbose=0)
    for v, where, before in frozen:
        assert np.array_equal(to_numpy(v)[where], before[where]), v.path
