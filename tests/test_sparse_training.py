"""RigL, SET and SpIEL against NumPy oracles.

A one-layer linear model with an MSE loss has the closed-form gradient
dL/dW = 2 / (n * out) * x^T (x W + b - y), so the growth criterion is checked
against NumPy, not against the backend's autodiff; drop scores, the cosine
schedule and ERK densities are re-derived in a few lines each."""

import math

import keras
import numpy as np
import pytest

from masked_opt import MaskedOptimizer, RigL, SET, SpIEL, layer_densities
from backends import IS_TORCH
from models import mlp

N_IN, N_OUT, N = 32, 16, 64


def linear_model(seed=0):
    model = mlp(N_IN, N_OUT)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(size=tuple(w.shape)).astype("float32"))
    return model


def data(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, N_IN)).astype("float32"), rng.normal(size=(N, N_OUT)).astype("float32")


def np_(v):
    return np.array(keras.ops.convert_to_numpy(v.value if hasattr(v, "value") else v))


def mse_grad(w, b, x, y):
    return 2.0 / (x.shape[0] * y.shape[1]) * x.T.astype(np.float64) @ (x @ w + b - y).astype(np.float64)


def compiled(model, callback, compact=False, inner=None):
    optimizer = MaskedOptimizer(inner or keras.optimizers.Adam(1e-2), masks=callback.masks(), compact_state=compact)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    return optimizer


def slots(optimizer, variable):
    """Adam's m and v of `variable` at its full shape (dense or compact state)."""
    out = {}
    compact = optimizer.inspect().compact_state
    for v in optimizer.inner_optimizer.variables:
        for name in ("momentum", "velocity"):
            if v.name.endswith(name) and variable.path.replace("/", "_") in v.name:
                full = np.zeros(int(np.prod(variable.shape)), np.float32)
                if compact:
                    active = np.flatnonzero(optimizer.get_mask(variable).reshape(-1))
                    full[active] = np_(v)[: active.size]
                else:
                    full = np_(v).reshape(-1)
                out[name] = full
    return out


# ----------------------------------------------------------------- densities


def test_erk_densities_match_the_formula():
    shapes = [(784, 300), (300, 100), (100, 10)]
    d = layer_densities(shapes, sparsity=0.99, distribution="erk")
    sizes = np.array([784 * 300, 300 * 100, 1000])
    raw = np.array([(784 + 300) / (784 * 300), 400 / 30000, 110 / 1000])
    eps = 0.01 * sizes.sum() / (raw * sizes).sum()
    assert np.allclose(d, eps * raw) and max(d) <= 1
    assert np.isclose(np.dot(d, sizes) / sizes.sum(), 0.01)


def test_erk_caps_small_layers_at_dense():
    d = layer_densities([(1000, 1000), (4, 4)], sparsity=0.5)
    assert d[1] == 1.0
    assert np.isclose(d[0], (0.5 * 1_000_016 - 16) / 1_000_000)


def test_uniform_densities_and_bad_input():
    assert layer_densities([(3, 4), (5, 6)], sparsity=0.75, distribution="uniform") == [0.25, 0.25]
    for bad in (1, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\)"):
            layer_densities([(3, 4)], sparsity=bad)
    with pytest.raises(ValueError, match="'erk' or 'uniform'"):
        layer_densities([(3, 4)], sparsity=0.5, distribution="random")
    with pytest.raises(TypeError, match=r"`sparsity=` \(like `RigL`\)"):
        layer_densities([(3, 4)], 0.5)
    with pytest.raises(TypeError, match="list of shapes"):
        layer_densities(["dense/kernel"], sparsity=0.5)


def test_densities_of_a_model_are_rigls_and_of_its_variables():
    model = mlp(32, 64, 10)
    kernels = [v for v in model.trainable_variables if len(v.shape) == 2]
    rigl = RigL(model, 0.9, update_every=10, end_step=100, data=data(), distribution="erk")
    assert layer_densities(model, sparsity=0.9) == rigl.densities
    assert layer_densities(kernels, sparsity=0.9) == layer_densities([(32, 64), (64, 10)], sparsity=0.9)
    sizes = np.array([32 * 64, 64 * 10])
    assert np.isclose(np.dot(layer_densities(model, sparsity=0.9), sizes) / sizes.sum(), 0.1)


def test_cosine_drop_fraction():
    rigl = RigL(linear_model(), 0.5, update_every=10, end_step=100, drop_fraction=0.3, data=data())
    for t in (0, 10, 50, 99, 100, 150):
        assert math.isclose(rigl.drop_fraction_at(t), 0.15 * (1 + math.cos(math.pi * min(t, 100) / 100)))


# -------------------------------------------------------------- one update


@pytest.mark.parametrize("compact, reinit_when_same", [(False, False), (True, False), (False, True)])
def test_rigl_update_matches_the_numpy_oracle(compact, reinit_when_same):
    model = linear_model()
    x, y = data()
    rigl = RigL(model, 0.75, update_every=10, end_step=100, distribution="uniform", data=(x, y), seed=3,
                reinit_when_same=reinit_when_same)
    optimizer = compiled(model, rigl, compact)
    rigl.on_train_begin()  # zeroes the inactive weights
    kernel, bias = model.weights
    for _ in range(3):  # some optimizer state to keep or reset
        model.train_on_batch(x, y)
    mask = optimizer.get_mask(kernel)
    w, b = np_(kernel), np_(bias)
    assert np.all(w[~mask] == 0)
    before = slots(optimizer, kernel)

    rigl.update(10)

    # Oracle: k = round(f(10) * active); drop smallest |w| among active, grow largest |g| among the rest.
    active = np.flatnonzero(mask)
    k = round(rigl.drop_fraction_at(10) * active.size)
    dropped = active[np.argsort(np.abs(w.reshape(-1)[active]), kind="stable")[:k]]
    after_drop = mask.reshape(-1).copy()
    after_drop[dropped] = False
    inactive = np.flatnonzero(~after_drop)
    g = mse_grad(w, b, x, y).reshape(-1)
    grown = inactive[np.argsort(-np.abs(g[inactive]), kind="stable")[:k]]
    # The fixture has a clear margin at both cuts, so the float32 gradient of
    # any backend on any CPU picks what this float64 oracle picks.
    cut_g = np.sort(np.abs(g[inactive]))[::-1][k - 1 : k + 1]
    cut_w = np.sort(np.abs(w.reshape(-1)[active]))[k - 1 : k + 1]
    assert cut_g[0] - cut_g[1] > 1e-4 * cut_g[0] and cut_w[1] - cut_w[0] > 1e-4 * cut_w[1]
    expected = after_drop.copy()
    expected[grown] = True
    new_mask = optimizer.get_mask(kernel).reshape(-1)
    assert np.array_equal(new_mask, expected)
    assert new_mask.sum() == active.size  # exact density
    # RigL's reference (reinit_when_same=False): an element dropped and regrown at
    # once keeps its value and state; only elements inactive before start afresh.
    regrown = np.intersect1d(dropped, grown)
    assert regrown.size > 0  # the fixture exercises the rule
    fresh = grown if reinit_when_same else np.setdiff1d(grown, dropped)
    expected_w = w.reshape(-1).copy()
    expected_w[np.setdiff1d(dropped, grown) if not reinit_when_same else dropped] = 0
    expected_w[fresh] = 0
    assert np.array_equal(np_(kernel).reshape(-1), expected_w)
    assert reinit_when_same or np.all(expected_w[regrown] != 0)
    after = slots(optimizer, kernel)
    kept = np.setdiff1d(np.flatnonzero(expected), fresh)
    for name in ("momentum", "velocity"):
        assert np.all(after[name][fresh] == 0), name  # fresh state
        assert np.array_equal(after[name][kept], before[name][kept]), name  # kept state


def test_set_drops_by_magnitude_and_grows_at_random_among_inactive():
    model = linear_model()
    x, y = data()
    set_ = SET(model, 0.5, update_every=5, end_step=50, distribution="uniform", seed=0)
    optimizer = compiled(model, set_)
    set_.on_train_begin()
    model.train_on_batch(x, y)
    kernel = model.weights[0]
    mask, w = optimizer.get_mask(kernel).reshape(-1), np_(kernel).reshape(-1)
    set_.update(5)
    new = optimizer.get_mask(kernel).reshape(-1)
    active = np.flatnonzero(mask)
    k = round(set_.drop_fraction_at(5) * active.size)
    dropped = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    assert new.sum() == mask.sum()
    assert np.all(new[np.setdiff1d(active, dropped)])  # the kept ones stay
    assert set(np.flatnonzero(mask & ~new)) <= set(dropped)  # only dropped ones leave
    assert np.any(new & ~mask)  # some grown among the inactive
    assert np.all(np_(kernel).reshape(-1)[~new] == 0)


def test_spiel_drops_the_least_moved_and_restores_their_pretrained_values():
    model = linear_model()
    x, y = data()
    pretrained = np_(model.weights[0]).reshape(-1)
    spiel = SpIEL(model, 0.9, update_every=5, end_step=50, distribution="uniform", data=(x, y), seed=0)
    optimizer = compiled(model, spiel)
    spiel.on_train_begin()
    assert np.array_equal(np_(model.weights[0]).reshape(-1), pretrained)  # nothing zeroed
    for _ in range(3):
        model.train_on_batch(x, y)
    kernel = model.weights[0]
    mask, w = optimizer.get_mask(kernel).reshape(-1), np_(kernel).reshape(-1)
    spiel.update(5)
    active = np.flatnonzero(mask)
    k = round(spiel.drop_fraction_at(5) * active.size)
    moved = np.abs(w[active].astype(np.float64) - pretrained[active].astype(np.float64))
    dropped = active[np.argsort(moved, kind="stable")[:k]]
    new = optimizer.get_mask(kernel).reshape(-1)
    now = np_(kernel).reshape(-1)
    gone = np.setdiff1d(dropped, np.flatnonzero(new))
    assert gone.size > 0
    assert np.array_equal(now[gone], pretrained[gone])  # back to the pretrained bits
    assert np.array_equal(now[~new], pretrained[~new])  # every inactive weight is pretrained
    assert new.sum() == mask.sum()


# ------------------------------------------------------------------ in fit


@pytest.mark.parametrize("compact", [False, True])
def test_rigl_in_fit_keeps_density_and_inactive_weights_exactly_zero(compact):
    x, y = data()
    model = mlp(N_IN, 24, N_OUT)
    rigl = RigL(model, 0.8, update_every=2, end_step=12, data=(x[:16], y[:16]))
    optimizer = compiled(model, rigl, compact)
    counts = [int(optimizer.get_mask(v).sum()) for v in rigl.targets]
    masks_seen = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for v, n in zip(rigl.targets, counts):
                mask = optimizer.get_mask(v)
                assert mask.sum() == n
                assert np.all(np_(v)[~mask] == 0), v.path
            masks_seen.append(optimizer.get_mask(rigl.targets[0]).copy())

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[rigl, Check()])
    traces = optimizer.inspect().update_traces
    assert [h["step"] for h in rigl.history] == [2, 4, 6, 8, 10]
    assert all(h["moved"] > 0 for h in rigl.history[:-1])
    assert any(not np.array_equal(a, b) for a, b in zip(masks_seen, masks_seen[1:]))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[rigl, Check()])
    if not IS_TORCH:  # eager torch runs the update's Python every step: no trace to count
        assert optimizer.inspect().update_traces == traces  # mask updates never retrace


def test_trained_sparse_model_saves_and_loads(tmp_path):
    x, y = data()
    model = mlp(N_IN, 24, N_OUT)
    rigl = RigL(model, 0.8, update_every=2, end_step=12, data=(x[:16], y[:16]))
    optimizer = compiled(model, rigl, compact=True)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[rigl])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model.weights, loaded.weights):
        assert np.array_equal(np_(a), np_(b))
    targets = {id(v) for v in rigl.targets}
    pairs = [(u, w) for u, w in zip(model.weights, loaded.weights) if id(u) in targets]
    assert len(pairs) == 2
    for v, w in pairs:
        assert np.array_equal(optimizer.get_mask(v), loaded.optimizer.get_mask(w))


# -------------------------------------------------------------- reset_state


@pytest.mark.parametrize("compact", [False, True])
def test_reset_state_gives_a_fresh_optimizers_state_where_asked(compact):
    model = linear_model()
    x, y = data()
    mask = np.random.default_rng(0).random((N_IN, N_OUT)) < 0.5
    optimizer = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={"kernel": mask}, compact_state=compact)
    model.compile(optimizer=optimizer, loss="mse")
    for _ in range(2):
        model.train_on_batch(x, y)
    kernel = model.weights[0]
    before = slots(optimizer, kernel)
    where = np.zeros((N_IN, N_OUT), bool)
    where[:4] = True
    optimizer.reset_state(kernel, where)
    after = slots(optimizer, kernel)
    for name in ("momentum", "velocity"):
        assert np.all(after[name][where.reshape(-1)] == 0)
        assert np.array_equal(after[name][~where.reshape(-1)], before[name][~where.reshape(-1)])
        assert np.any(before[name][(where & mask).reshape(-1)] != 0)  # there was something to reset
    with pytest.raises(ValueError, match=r"reset_state\('.*kernel'\).*not a valid index"):
        optimizer.reset_state(kernel, np.s_[99])


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors():
    model = linear_model()
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
            RigL(model, bad, end_step=10, data=data())
    with pytest.raises(ValueError, match="pass `data="):
        RigL(model, 0.9, end_step=10)
    with pytest.raises(ValueError, match="`update_every` must be a positive integer"):
        SET(model, 0.9, update_every=0, end_step=10)
    with pytest.raises(ValueError, match=r"`drop_fraction` must be in \(0, 1\]"):
        SET(model, 0.9, end_step=10, drop_fraction=0)
    with pytest.raises(TypeError, match="`data` must be"):
        RigL(model, 0.9, end_step=10, data=5)


def test_an_optimizer_that_couples_elements_is_refused():
    model = linear_model()
    rigl = RigL(model, 0.9, end_step=10, data=data())
    compiled(model, rigl, inner=keras.optimizers.Lamb())
    with pytest.raises(ValueError, match=r"\(Lamb\) couples the elements"):
        rigl.on_train_begin()


def test_masks_must_come_from_the_callback():
    model = linear_model()
    rigl = RigL(model, 0.9, end_step=10, data=data())
    optimizer = MaskedOptimizer(keras.optimizers.Adam(), masks={"kernel": np.ones((N_IN, N_OUT), bool)})
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"has 512 trainable elements, the target is 51"):
        rigl.on_train_begin()
    model2 = linear_model()
    rigl2 = RigL(model2, 0.9, end_step=10, data=data())
    optimizer2 = MaskedOptimizer(keras.optimizers.Adam())
    model2.compile(optimizer=optimizer2, loss="mse")
    optimizer2.build(model2.trainable_variables)
    with pytest.raises(ValueError, match=r"needs an element mask .*rigl.masks\(\)"):
        rigl2.on_train_begin()
