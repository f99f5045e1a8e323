"""Mask builders: oracles on small arrays, errors, composition, use with the optimizer."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras
from backends import IS_TORCH, gradients, jax_only, tensor, tf_only, torch_only
from models import mlp
from masked_opt import MaskedOptimizer
from masked_opt import masks as M


def _dense_model(n_in=4, units=(3, 2), activation=None):
    hidden = [(None, u, {"activation": activation}) for u in units[:-1]]
    return mlp(n_in, *hidden, units[-1])


def _mask_variables(opt):
    return {v.name: tuple(v.shape) for v in opt.variables if v.name.endswith("_mask")}


def _train_steps(model, opt, x, y, steps=3):
    """Eager custom loop: a few MSE steps through `opt.apply`."""
    x, y = tensor(x, "float32"), tensor(y, "float32")
    for _ in range(steps):
        grads = gradients(lambda: keras.ops.mean((model(x) - y) ** 2), model.trainable_variables)
        opt.apply(grads, model.trainable_variables)


# ------------------------------------------------------------- rows / columns


def test_rows_keeps_broadcast_shape_and_selects_rows():
    w = keras.Variable(np.zeros((5, 3)), name="w")
    mask = M.rows([0, -1])(w)
    assert mask.shape == (5, 1)
    np.testing.assert_array_equal(mask[:, 0], [True, False, False, False, True])


def test_columns_keeps_broadcast_shape_and_selects_columns():
    w = keras.Variable(np.zeros((5, 3)), name="w")
    mask = M.columns([1])(w)
    assert mask.shape == (1, 3)
    np.testing.assert_array_equal(mask[0], [False, True, False])


def test_rows_and_columns_of_conv_kernel_use_first_and_last_axis():
    k = keras.Variable(np.zeros((3, 2, 4, 6)), name="k")
    r, c = M.rows([2])(k), M.columns(range(4, 6))(k)
    assert r.shape == (3, 1, 1, 1) and c.shape == (1, 1, 1, 6)
    np.testing.assert_array_equal(r.ravel(), [False, False, True])
    np.testing.assert_array_equal(c.ravel(), [False] * 4 + [True] * 2)


def test_columns_of_rank_one_variable_index_its_only_axis():
    b = keras.Variable(np.zeros(4), name="b")
    np.testing.assert_array_equal(M.columns(2)(b), [False, False, True, False])


def test_rows_and_columns_reject_bad_index_or_rank():
    cases = [
        (M.rows([5]), (5, 3), r"index 5 .*'w'.*size 5"),
        (M.rows([-6]), (5, 3), r"index -6 .*'w'.*size 5"),
        (M.columns([3]), (5, 3), r"index 3 .*'w'.*size 3"),
        (M.rows([0]), (4,), r"'w' has shape \(4,\) \(rank 1\).*columns"),
        (M.columns([0]), (), r"'w' is a scalar"),
    ]
    for builder, shape, match in cases:
        w = keras.Variable(np.zeros(shape), name="w")
        with pytest.raises(ValueError, match=match):
            builder(w)


def test_rows_and_columns_reject_non_integer_indices():
    for indices in ([True, False], [0.5], "0", np.zeros((2, 2), int)):
        for builder in (M.rows, M.columns):
            with pytest.raises(TypeError, match="integer"):
                builder(indices)


def test_out_of_range_rows_through_optimizer_name_the_path():
    model = _dense_model()
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/kernel": M.rows([4])})
    with pytest.raises(ValueError, match=r"index 4 .*'sequential/dense/kernel'.*size 4"):
        opt.build(model.trainable_variables)


def test_rows_train_only_new_embedding_rows_and_store_column_vector():
    # Use case: 3 new tokens (ids 7..9) appended to a 10-token vocabulary.
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(10, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    new = [7, 8, 9]
    opt = MaskedOptimizer(
        keras.optimizers.AdamW(0.05, weight_decay=0.1),
        masks={"embedding/embeddings": M.rows(new), ".*dense/.*": False},
    )
    model.compile(opt, loss="mse")
    x = np.random.default_rng(0).integers(0, 10, (32, 4))
    y = np.random.default_rng(1).normal(size=(32, 1))
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    emb_before, emb_after = before[0], model.trainable_variables[0].numpy()
    old = np.arange(10) < 7
    assert np.array_equal(emb_after[old], emb_before[old])  # bit-identical
    assert np.all(emb_after[~old] != emb_before[~old])
    for b, v in zip(before[1:], model.trainable_variables[1:]):
        assert np.array_equal(v.numpy(), b)
    assert _mask_variables(opt)["sequential_embedding_embeddings_mask"] == (10, 1)


# --------------------------------------------------------------------- random


def test_count_rounds_half_up_and_keeps_at_least_one():
    assert M.count(0.5, 5) == 3  # 2.5 -> 3
    assert M.count(0.25, 10) == 3  # 2.5 -> 3
    assert M.count(0.24, 10) == 2
    assert M.count(0.01, 10) == 1  # 0.1 -> 0, at least 1
    assert M.count(1.0, 7) == 7
    assert M.count(0.3, 0) == 0


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple),
    fraction=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31),
)
def test_random_has_exact_trainable_count(shape, fraction, seed):
    mask = M.random(fraction, seed=seed)(np.zeros(shape))
    size = math.prod(shape)
    assert mask.shape == shape and mask.dtype == bool
    assert int(mask.sum()) == min(size, max(1, math.floor(fraction * size + 0.5)))


def test_random_is_reproducible_by_seed_and_path():
    a = keras.Variable(np.zeros((20, 20)), name="a")
    b = keras.Variable(np.zeros((20, 20)), name="b")
    assert np.array_equal(M.random(0.3, seed=1)(a), M.random(0.3, seed=1)(a))
    assert not np.array_equal(M.random(0.3, seed=1)(a), M.random(0.3, seed=2)(a))
    assert not np.array_equal(M.random(0.3, seed=1)(a), M.random(0.3, seed=1)(b))


def test_every_builder_rejects_bad_fraction():
    ones = {"w": np.ones(3)}
    builders = {
        "random": M.random,
        "magnitude": M.magnitude,
        "global_magnitude": lambda f: M.global_magnitude(ones, f),
        "diff": lambda f: M.diff(ones, ones, f),
        "fisher": lambda f: M.fisher(None, None, f),  # fraction is checked first
    }
    for name, builder in builders.items():
        for fraction in (0, -0.1, 1.5, float("nan")):
            with pytest.raises(
                ValueError, match=rf"`{name}`: `fraction` must be in \(0, 1\].*{fraction}"
            ):
                builder(fraction)
        for fraction in ("0.5", True, None):
            with pytest.raises(TypeError, match=rf"`{name}`: `fraction` must be a number"):
                builder(fraction)


# ------------------------------------------------------------------ magnitude


def test_magnitude_keeps_largest_absolute_values():
    w = np.array([1.0, -5.0, 3.0, 0.0])
    np.testing.assert_array_equal(M.magnitude(0.5)(w), [False, True, True, False])
    np.testing.assert_array_equal(M.magnitude(0.5, largest=False)(w), [True, False, False, True])


def test_magnitude_breaks_ties_by_lower_index():
    np.testing.assert_array_equal(M.magnitude(0.5)(np.full(4, 2.0)), [True, True, False, False])


def test_magnitude_matches_sort_oracle(rng):
    w = rng.normal(size=(7, 9))
    mask = M.magnitude(0.2)(w)
    k = M.count(0.2, w.size)
    expected = np.zeros(w.size, bool)
    expected[np.argsort(-np.abs(w), axis=None)[:k]] = True
    np.testing.assert_array_equal(mask, expected.reshape(w.shape))


def test_magnitude_ranks_the_weights_held_at_build():
    model = _dense_model(n_in=2, units=(2,))
    kernel = model.trainable_variables[0]
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/kernel": M.magnitude(0.25)})
    kernel.assign([[0.0, 1.0], [9.0, 2.0]])  # after the optimizer exists, before build
    opt.build(model.trainable_variables)
    np.testing.assert_array_equal(opt.get_mask(kernel), [[False, False], [True, False]])


def test_global_magnitude_ranks_across_variables():
    weights = {"a": np.array([0.1, -0.2]), "b": np.array([[5.0, -6.0, 0.3]])}
    masks = M.global_magnitude(weights, 0.4)  # k = 2 of 5
    np.testing.assert_array_equal(masks["a"], [False, False])
    np.testing.assert_array_equal(masks["b"], [[True, True, False]])


def test_global_magnitude_of_variables_drives_optimizer(rng):
    model = _dense_model()
    masks = M.global_magnitude(model.trainable_variables, 0.3)
    flat = np.concatenate([np.abs(v.numpy()).ravel() for v in model.trainable_variables])
    k = M.count(0.3, flat.size)
    assert sum(int(m.sum()) for m in masks.values()) == k
    threshold = np.sort(flat)[::-1][k - 1]
    for v in model.trainable_variables:
        m = masks[v.path]
        assert np.all(np.abs(v.numpy())[m] >= threshold)
        assert np.all(np.abs(v.numpy())[~m] <= threshold)
    opt = MaskedOptimizer(keras.optimizers.Adam(0.1), masks=masks)
    before = [v.numpy().copy() for v in model.trainable_variables]
    _train_steps(model, opt, rng.normal(size=(8, 4)), rng.normal(size=(8, 2)))
    for b, v in zip(before, model.trainable_variables):
        m = masks[v.path]
        assert np.array_equal(v.numpy()[~m], b[~m])
        assert np.all(v.numpy()[m] != b[m])


def test_global_builders_reject_duplicate_paths():
    a, b = keras.Variable(np.ones(2), name="w"), keras.Variable(np.ones(2), name="w")
    with pytest.raises(ValueError, match="share the path 'w'"):
        M.global_magnitude([a, b], 0.5)


# ----------------------------------------------------------------------- diff


def test_diff_keeps_elements_that_moved_most():
    before = {"a": np.array([0.0, 0.0, 0.0]), "b": np.array([[1.0, 1.0]])}
    after = {"a": np.array([0.1, -3.0, 0.0]), "b": np.array([[1.0, 3.0]])}
    masks = M.diff(before, after, 0.4)  # k = 2 of 5: |-3| and |2|
    np.testing.assert_array_equal(masks["a"], [False, True, False])
    np.testing.assert_array_equal(masks["b"], [[False, True]])


def test_diff_accepts_lists_aligned_with_variables(rng):
    model = _dense_model()
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    _train_steps(model, keras.optimizers.SGD(0.1), rng.normal(size=(8, 4)), rng.normal(size=(8, 2)))
    after = [v.numpy() for v in variables]
    masks = M.diff(before, after, 0.25, variables=variables)
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(after, before)])
    k = M.count(0.25, moved.size)
    expected = np.zeros(moved.size, bool)
    expected[np.argsort(-moved, kind="stable")[:k]] = True
    got = np.concatenate([masks[v.path].ravel() for v in variables])
    np.testing.assert_array_equal(got, expected)


def test_diff_rejects_misaligned_inputs():
    cases = [
        ({"a": np.zeros(2)}, {"b": np.zeros(2)}, {}, ValueError, "same keys"),
        ({"a": np.zeros(2)}, {"a": np.zeros(3)}, {}, ValueError, r"'a' has shape \(2,\).*\(3,\)"),
        ([np.zeros(2)], [np.zeros(2)], {}, ValueError, "need `variables`"),
        (
            [np.zeros(2)],
            [np.zeros(2), np.zeros(2)],
            {"variables": ["a"]},
            ValueError,
            "same length",
        ),
        ({"a": np.zeros(2)}, [np.zeros(2)], {}, TypeError, "both be dicts"),
    ]
    for before, after, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            M.diff(before, after, 0.5, **kwargs)


# ---------------------------------------------------------------- composition


def test_composed_array_masks_work_with_optimizer(rng):
    model = _dense_model()
    kernel = model.trainable_variables[0]
    rows = M.rows([0, 1])(kernel)
    mag = M.magnitude(0.5)(kernel)
    composed = (rows & ~mag) | M.columns([2])(kernel)  # plain NumPy on the arrays
    assert composed.shape == (4, 3)
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), masks={"dense/kernel": composed})
    before = kernel.numpy().copy()
    _train_steps(model, opt, rng.normal(size=(8, 4)), rng.normal(size=(8, 2)))
    after = kernel.numpy()
    assert np.array_equal(after[~composed], before[~composed])
    assert np.all(after[composed] != before[composed])


def test_maskfn_composes_with_arrays_bools_and_maskfns():
    w = keras.Variable(np.arange(12.0).reshape(4, 3), name="w")
    r, c = M.rows([0]), M.columns([1])
    np.testing.assert_array_equal((r | c)(w), r(w) | c(w))
    np.testing.assert_array_equal((r & c)(w), r(w) & c(w))
    np.testing.assert_array_equal((r ^ c)(w), r(w) ^ c(w))
    np.testing.assert_array_equal((~M.magnitude(0.5))(w), ~M.magnitude(0.5)(w))
    arr = np.zeros((4, 3), bool)
    arr[3, 0] = True
    combined = arr | r  # ndarray on the left defers to MaskFn
    assert isinstance(combined, M.MaskFn)
    np.testing.assert_array_equal(combined(w), arr | r(w))
    np.testing.assert_array_equal((True & c)(w), np.broadcast_to(c(w), (1, 3)))


def test_maskfn_composition_resolves_per_variable_in_optimizer():
    model = _dense_model()
    opt = MaskedOptimizer(
        keras.optimizers.SGD(0.1),
        masks={r".*dense/.*": M.columns([0]) | M.magnitude(0.5)},  # kernel and bias
    )
    opt.build(model.trainable_variables)
    for v in model.trainable_variables[:2]:
        np.testing.assert_array_equal(
            opt.get_mask(v), np.broadcast_to(M.columns([0])(v) | M.magnitude(0.5)(v), v.shape)
        )


def test_builder_masks_compose_with_freeze_and_unfreeze():
    model = _dense_model()
    kernel = model.trainable_variables[0]
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/kernel": M.random(0.5, seed=3)})
    opt.build(model.trainable_variables)
    start = M.random(0.5, seed=3)(kernel)
    np.testing.assert_array_equal(opt.get_mask(kernel), start)
    opt.freeze("dense/kernel", np.s_[0])
    expected = start.copy()
    expected[0] = False
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)
    opt.unfreeze("dense/kernel", np.s_[:, 2])
    expected[:, 2] = True
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)


# --------------------------------------------------------------------- Fisher


def _loop_fisher(model, x, y, loss_fn):
    """Slow reference: one eager gradient per example (the active backend's
    autodiff, not the vectorised path under test)."""
    variables = model.trainable_variables
    sums = [np.zeros(v.shape) for v in variables]
    for i in range(len(x)):
        xi, yi = tensor(x[i : i + 1]), tensor(y[i : i + 1])
        grads = gradients(lambda: keras.ops.mean(loss_fn(yi, model(xi))), variables)
        for s, g in zip(sums, grads):
            s += np.square(keras.ops.convert_to_numpy(g).astype(np.float64))
    return [s / len(x) for s in sums]


def test_fisher_scores_match_per_example_loop(rng):
    model = _dense_model(units=(5, 2), activation="tanh")
    x = rng.normal(size=(10, 4)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    scores = M.fisher_scores(model, (x, y), loss="mse", batch_size=4)  # last batch partial
    expected = _loop_fisher(model, x, y, keras.losses.mean_squared_error)
    assert list(scores) == [v.path for v in model.trainable_variables]
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(scores[v.path], e, rtol=1e-5, atol=1e-10)


def test_fisher_scores_match_numpy_oracle_for_linear_model(rng):
    model = _dense_model(n_in=3, units=(2,))
    model.compile(loss="mse")
    x = rng.normal(size=(6, 3))
    y = rng.normal(size=(6, 2))
    w, b = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    x32 = x.astype(np.float32).astype(np.float64)
    y32 = y.astype(np.float32).astype(np.float64)
    # loss_n = mean_j (x_n W + b - y_n)_j^2  =>  dL/db = 2 r / 2 = r, dL/dW = x_n^T r
    r = x32 @ w + b - y32
    fisher_w = np.mean(np.einsum("ni,nj->nij", x32, r) ** 2, axis=0)
    fisher_b = np.mean(r**2, axis=0)
    scores = M.fisher_scores(model, (x, y))  # compiled loss, float64 input cast to float32
    np.testing.assert_allclose(scores["sequential/dense/kernel"], fisher_w, rtol=1e-4)
    np.testing.assert_allclose(scores["sequential/dense/bias"], fisher_b, rtol=1e-4)


def test_fisher_freezes_weights_fed_by_always_zero_inputs(rng):
    model = _dense_model(units=(3, 2), activation="tanh")
    model.compile(loss="mse")
    x = rng.normal(size=(16, 4)).astype("float32")
    x[:, [1, 3]] = 0.0  # inputs 1 and 3 are always zero
    y = rng.normal(size=(16, 2)).astype("float32")
    scores = M.fisher_scores(model, (x, y), variables=["dense/kernel"])
    assert list(scores) == ["sequential/dense/kernel"]
    assert np.all(scores["sequential/dense/kernel"][[1, 3]] == 0)
    assert np.all(scores["sequential/dense/kernel"][[0, 2]] > 0)
    masks = M.fisher(model, (x, y), 0.5, variables=["dense/kernel"])  # 6 of 12: all nonzero ones
    np.testing.assert_array_equal(
        masks["sequential/dense/kernel"], np.repeat([[1], [0], [1], [0]], 3, 1).astype(bool)
    )


def test_fisher_on_embeddings_is_zero_for_unused_tokens(rng):
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(8, 2),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    x = rng.integers(1, 4, size=(12, 3))  # tokens 1..3 only
    y = rng.normal(size=(12, 1)).astype("float32")
    scores = M.fisher_scores(model, (x, y), loss="mse", variables=["embedding/embeddings"])
    emb = scores["sequential/embedding/embeddings"]
    assert np.all(emb[[0, 4, 5, 6, 7]] == 0) and np.all(emb[1:4] > 0)
    expected = _loop_fisher(model, x, y, keras.losses.mean_squared_error)[0]
    np.testing.assert_allclose(emb, expected, rtol=1e-5)


def test_fisher_mask_has_exact_global_count_and_top_scores(rng):
    model = _dense_model(units=(4, 3), activation="relu")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.normal(size=(20, 4)).astype("float32")
    y = rng.integers(0, 3, size=(20,))
    scores = M.fisher_scores(model, (x, y), batch_size=10)
    masks = M.fisher(model, (x, y), 0.1, batch_size=10)
    flat = np.concatenate([s.ravel() for s in scores.values()])
    k = M.count(0.1, flat.size)
    chosen = np.concatenate([m.ravel() for m in masks.values()])
    assert chosen.sum() == k
    assert flat[chosen].min() >= flat[~chosen].max()


def test_fisher_scores_from_iterable_of_batches_and_num_batches(rng):
    model = _dense_model()
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.normal(size=(12, 2)).astype("float32")
    ref = M.fisher_scores(model, (x, y), loss="mse", batch_size=12)
    batches = M.fisher_scores(model, [(x[:5], y[:5]), (x[5:], y[5:])], loss="mse")
    first = M.fisher_scores(model, [(x[:4], y[:4]), (x[4:], y[4:])], loss="mse", num_batches=1)
    only4 = M.fisher_scores(model, (x[:4], y[:4]), loss="mse")
    for p in ref:
        np.testing.assert_allclose(batches[p], ref[p], rtol=1e-5)
        np.testing.assert_allclose(first[p], only4[p], rtol=1e-6)


def test_fisher_verbose_shows_a_keras_progress_bar_or_nothing(rng, capsys):
    model = _dense_model()
    x = rng.normal(size=(10, 4)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    ref = M.fisher_scores(model, (x, y), loss="mse", batch_size=4, verbose=0)
    assert capsys.readouterr() == ("", "")  # silent
    M.fisher(model, (x, y), 0.5, loss="mse", batch_size=4, verbose=0)
    assert capsys.readouterr() == ("", "")
    # 1 (and "auto", the default, as in `model.predict`): a bar over the 3 batches (4 + 4 + 2).
    for verbose in (1, "auto"):
        scores = M.fisher_scores(model, (x, y), loss="mse", batch_size=4, verbose=verbose)
        out = capsys.readouterr().out
        assert "1/3" in out and "3/3" in out and "━" in out and "step" in out, out
    M.fisher(model, (x, y), 0.5, loss="mse", batch_size=4)
    assert "3/3" in capsys.readouterr().out
    # 2: one line at the end, no bar.
    M.fisher_scores(model, (x, y), loss="mse", batch_size=4, verbose=2)
    out = capsys.readouterr().out
    assert out.startswith("3/3 - ") and out.count("\n") == 1 and "━" not in out, out
    # Unknown length (a generator): the bar counts batches; num_batches caps the target.
    M.fisher_scores(model, ((x[i : i + 5], y[i : i + 5]) for i in (0, 5)), loss="mse", verbose=1)
    assert "2/Unknown" in capsys.readouterr().out
    M.fisher_scores(model, (x, y), loss="mse", batch_size=2, num_batches=2, verbose=2)
    assert capsys.readouterr().out.startswith("2/2 - ")
    for p in ref:
        np.testing.assert_array_equal(scores[p], ref[p])  # progress changes nothing
    for bad in (3, "yes", True, -1):
        with pytest.raises(ValueError, match=r'`fisher_scores`: `verbose` must be "auto", 0, 1 or 2'):
            M.fisher_scores(model, (x, y), loss="mse", verbose=bad)


@tf_only  # a tf.data pipeline yields TensorFlow tensors
def test_fisher_scores_from_tf_data_dataset(rng):
    import tensorflow as tf

    model = _dense_model()
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.normal(size=(12, 2)).astype("float32")
    ref = M.fisher_scores(model, (x, y), loss="mse", batch_size=12)
    from_ds = M.fisher_scores(
        model, tf.data.Dataset.from_tensor_slices((x, y)).batch(6), loss="mse"
    )
    for p in ref:
        np.testing.assert_allclose(from_ds[p], ref[p], rtol=1e-5)


def _record_torch_steps(monkeypatch):
    """On torch, the per-example gradient objects `fisher_scores` creates."""
    made = []
    if IS_TORCH:
        from masked_opt import _backend

        cls = _backend.squared_grad_sums

        def make(*args):
            made.append(cls(*args))
            return made[-1]

        monkeypatch.setattr(_backend, "squared_grad_sums", make)
    return made


def test_fisher_scores_of_conv_model_match_per_example_loop(rng, monkeypatch):
    # On torch, torch.func.vmap rejects Conv2D's channels-last copy: the
    # per-example loop takes over (and must give the same numbers).
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    x = rng.normal(size=(6, 5, 5, 2)).astype("float32")
    y = rng.integers(0, 2, size=(6,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    made = _record_torch_steps(monkeypatch)
    scores = M.fisher_scores(model, (x, y), loss=loss)  # one batch: one XLA compile on JAX
    expected = _loop_fisher(model, x, y, loss)
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(scores[v.path], e, rtol=1e-4, atol=1e-9)
    if IS_TORCH:
        assert [m.vectorised for m in made] == [False]


@torch_only
def test_fisher_scores_on_torch_are_vectorised_for_dense_layers(rng, monkeypatch):
    model = _dense_model(units=(5, 2), activation="relu")
    made = _record_torch_steps(monkeypatch)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    M.fisher_scores(model, (x, y), loss="mse")
    assert [m.vectorised for m in made] == [True]


@jax_only
def test_builders_on_detached_jax_variables_say_to_sync_first(rng):
    # During a JAX `fit` the trainer holds the weights; a callback that reads
    # the model from a closure (not `self.model`) sees detached variables.
    model = _dense_model()
    model.compile(optimizer="sgd", loss="mse")
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    calls = {
        "fisher_scores": lambda: M.fisher_scores(model, (x, y)),
        "magnitude": lambda: M.magnitude(0.5)(model.trainable_variables[0]),
    }
    for name, call in calls.items():
        cb = keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs: call() if batch == 1 else None
        )
        with pytest.raises(RuntimeError, match=r"'sequential/dense/kernel' is held by JAX's trainer.*self\.model"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
        model.jax_state_sync()  # Keras < 3.10 leaves the variables detached after an aborted fit
    synced = []
    cb = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: synced.append(M.fisher_scores(cb.model, (x, y)))
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert len(synced) == 2


def test_fisher_scores_build_unbuilt_subclassed_model(rng):
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    model = Tiny()
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    scores = M.fisher_scores(model, (x, y), loss="mse")
    assert {s.shape for s in scores.values()} == {(3, 2), (2,)}


def test_fisher_rejects_data_that_does_not_fit_model(rng):
    model = _dense_model(n_in=4)
    with pytest.raises(
        ValueError, match=r"x has shape \(10, 5\).*expects inputs of shape \(None, 4\)"
    ):
        M.fisher_scores(model, (np.zeros((10, 5)), np.zeros((10, 2))), loss="mse")
    with pytest.raises(ValueError, match=r"same number of examples.*\(10, 4\).*\(9, 2\)"):
        M.fisher_scores(model, (np.zeros((10, 4)), np.zeros((9, 2))), loss="mse")
    with pytest.raises(
        ValueError, match=r"loss could not be computed from y of shape \[\(10, 7\)\]"
    ):
        M.fisher_scores(model, (np.zeros((10, 4)), np.zeros((10, 7))), loss="mse")


def test_fisher_needs_a_loss_when_model_is_not_compiled():
    with pytest.raises(ValueError, match="not compiled with a loss.*loss="):
        M.fisher_scores(_dense_model(), (np.zeros((2, 4)), np.zeros((2, 2))))


def test_fisher_rejects_bad_arguments_and_containers():
    model = _dense_model()
    data = (np.zeros((2, 4)), np.zeros((2, 2)))
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"num_batches": 0}, "num_batches"),
        ({"variables": ["nope/kernel"]}, "nope/kernel"),
    ]:
        with pytest.raises(ValueError, match=match):
            M.fisher_scores(model, data, loss="mse", **kwargs)
    with pytest.raises(ValueError, match="must be `\\(x, y\\)`"):
        M.fisher_scores(model, (np.zeros((2, 4)),), loss="mse")
    with pytest.raises(TypeError, match="`data` must be"):
        M.fisher_scores(model, np.zeros((2, 4)), loss="mse")
    with pytest.raises(ValueError, match="Batch 0"):
        M.fisher_scores(model, [np.zeros((2, 4))], loss="mse")
