"""Sparse gradients: `Embedding` lookups give `tf.IndexedSlices`.

What is and is not dense:

* our gradient masking never densifies: the mask rows are gathered by the
  slice indices, and the inner optimizer receives `IndexedSlices` with values
  of shape (n, dim);
* Keras's own Adam (and every built-in but SGD) densifies sparse gradients
  itself; the stock `Embedding` layer reads the whole table in its forward;
* the restore of frozen elements snapshots the whole variable, except when the
  inner optimizer provably moves only the gradient's rows (plain SGD without
  momentum, weight decay, EMA, accumulation or constraint): then only those
  rows are saved and written back (`_backend.RowSnapshot`).
"""

import numpy as np
import pytest
import tensorflow as tf

import keras
from backends import needs_multi_optimizer, tf_only
from masked_opt import MaskedOptimizer, _backend, _inner_optimizer
from optimizer_table import AVAILABLE, OPTIMIZERS
from tf_graphs import graph_ops

pytestmark = tf_only  # IndexedSlices gradients are TensorFlow's


def _full_size_float_ops(graph, shape):
    return [
        op.type
        for op in graph_ops(graph)
        for out in op.outputs
        if out.dtype.is_floating and out.shape.as_list() == list(shape)
    ]


BIG = (1_000_000, 64)
N_IDS = 300


def _big_step(inner, masked: bool, spy: list | None = None):
    """A traced (not run) train step on a 1,000,000 x 64 stock Embedding."""
    emb = keras.layers.Embedding(*BIG, embeddings_initializer="zeros", name="emb")
    emb.build((None,))
    if masked:
        row_mask = np.zeros((BIG[0], 1), bool)
        row_mask[-1000:] = True  # new tokens
        opt = MaskedOptimizer(inner, masks={"emb/embeddings": row_mask})
    else:
        opt = inner
    opt.build(emb.trainable_variables)
    if spy is not None:
        inner_apply = inner.apply

        def recording_apply(grads, trainable_variables=None):
            spy.extend(grads)
            return inner_apply(grads, trainable_variables)

        inner.apply = recording_apply

    @tf.function
    def step(ids, target):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(emb(ids) - target))
        grads = tape.gradient(loss, emb.trainable_variables)
        opt.apply_gradients(zip(grads, emb.trainable_variables))

    spec = (tf.TensorSpec([N_IDS], tf.int32), tf.TensorSpec([N_IDS, BIG[1]], tf.float32))
    return step.get_concrete_function(*spec).graph


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_gradient_handed_to_inner_optimizer_stays_indexed_slices(inner):
    seen = []
    _big_step(OPTIMIZERS[inner](), masked=True, spy=seen)
    assert seen, "the inner optimizer was never called"
    for grad in seen:  # traced twice: the all-True fast path and the masked path
        assert isinstance(grad, tf.IndexedSlices), type(grad)
        assert grad.values.shape.as_list() == [N_IDS, BIG[1]]
        assert grad.indices.shape.as_list() == [N_IDS]


def test_masking_a_sparse_gradient_allocates_nothing_of_the_table_size():
    # Row mask, full element mask and column mask: none produces a dense
    # (vocab, dim) tensor of any dtype when it masks an IndexedSlices.
    vocab, dim = BIG
    masks = {
        "row": tf.Variable(np.zeros((vocab, 1), bool)),
        "element": tf.Variable(np.zeros((vocab, dim), bool)),
        "column": tf.Variable(np.zeros((dim,), bool)),
    }
    for name, mask in masks.items():

        @tf.function
        def masked(values, indices, mask=mask):
            grad = tf.IndexedSlices(values, indices, tf.constant([vocab, dim]))
            out = _backend.mask_gradient(grad, mask, (vocab, dim))
            return out.values, out.indices

        graph = masked.get_concrete_function(
            tf.TensorSpec([N_IDS, dim]), tf.TensorSpec([N_IDS], tf.int32)
        ).graph
        big = [op.type for op in graph_ops(graph) for out in op.outputs if out.shape.as_list() == [vocab, dim]]
        assert big == [], f"{name} mask: {big}"
        values, indices = masked(tf.ones([N_IDS, dim]), tf.range(N_IDS))
        assert values.shape == (N_IDS, dim) and np.all(values.numpy() == 0)


def test_masked_sparse_sgd_step_materializes_no_more_of_the_table_than_bare_sgd():
    # Bare SGD + stock Embedding: 2 full-size reads (Shape, GatherV2 in the
    # layer's forward). The masked step must add none: no dense snapshot, no
    # dense `where` over the table.
    bare = _full_size_float_ops(_big_step(keras.optimizers.SGD(0.1), masked=False), BIG)
    keras.backend.clear_session()
    masked = _full_size_float_ops(_big_step(keras.optimizers.SGD(0.1), masked=True), BIG)
    assert sorted(masked) == sorted(bare), f"bare: {bare}, masked: {masked}"


def test_masked_adam_step_adds_only_the_snapshot_and_restore_to_the_dense_work():
    # Adam densifies the gradient itself (m, v and the update are full-size);
    # masking adds one snapshot copy and one `where` per branch where a frozen
    # element can move, and leaves the gradient sparse.
    bare = _full_size_float_ops(_big_step(keras.optimizers.Adam(), masked=False), BIG)
    keras.backend.clear_session()
    masked = _full_size_float_ops(_big_step(keras.optimizers.Adam(), masked=True), BIG)
    assert masked.count("Identity") == 1  # the snapshot
    assert masked.count("SelectV2") == 1  # the restore
    assert "Identity" not in bare and "SelectV2" not in bare


# ------------------------------------------------- row snapshot eligibility


def _emb_variable(**layer_kwargs):
    emb = keras.layers.Embedding(10, 3, name="emb", **layer_kwargs)
    emb.build((None,))
    return emb.embeddings


def test_only_plain_sgd_is_trusted_to_move_only_the_gradient_rows():
    variable = _emb_variable()
    trusted = {}
    for name, factory in AVAILABLE.items():
        opt = factory()
        opt.build([variable])
        trusted[name] = _backend.moves_only_gradient_rows(opt, variable)
    assert trusted == {name: name == "sgd" for name in AVAILABLE}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight_decay=0.01),
        dict(use_ema=True),
        dict(gradient_accumulation_steps=2),
        dict(momentum=0.5),
        dict(global_clipnorm=1.0),  # densifies the gradient: SGD then moves every row
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_sgd_options_that_move_every_row_disable_the_row_snapshot(kwargs):
    variable = _emb_variable()
    opt = keras.optimizers.SGD(0.1, **kwargs)
    opt.build([variable])
    assert not _backend.moves_only_gradient_rows(opt, variable)
    grad = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([1, 2]), tf.constant([10, 3]))
    assert not isinstance(_backend.snapshot(variable, grad, opt), _backend.RowSnapshot)


@pytest.mark.parametrize("kwargs", [dict(clipnorm=1.0), dict(clipvalue=0.5)], ids=lambda kw: next(iter(kw)))
def test_per_variable_clipping_keeps_the_gradient_sparse_and_the_row_snapshot(kwargs):
    variable = _emb_variable()
    seen = []

    class Spy(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            seen.append(type(gradient))
            return super().update_step(gradient, variable, learning_rate)

    opt = Spy(0.1, **kwargs)
    opt.build([variable])
    grad = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([1, 2]), tf.constant([10, 3]))
    tf.function(lambda: opt.apply([grad], [variable]))()
    assert seen == [tf.IndexedSlices]  # what makes the row snapshot sound here
    # the exact-type check trusts only keras.optimizers.SGD itself, not subclasses
    assert not _backend.moves_only_gradient_rows(opt, variable)
    plain = keras.optimizers.SGD(0.1, **kwargs)
    plain.build([variable])
    assert _backend.moves_only_gradient_rows(plain, variable)


def test_sgd_excluded_from_weight_decay_or_without_constraint_keeps_the_row_snapshot():
    variable = _emb_variable()
    opt = keras.optimizers.SGD(0.1, weight_decay=0.01)
    opt.exclude_from_weight_decay(var_list=[variable])
    opt.build([variable])
    assert _backend.moves_only_gradient_rows(opt, variable)
    grad = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([1, 2]), tf.constant([10, 3]))
    snap = _backend.snapshot(variable, grad, opt)
    assert isinstance(snap, _backend.RowSnapshot)
    assert snap.rows.shape == (2, 3)
    # a dense gradient, or no optimizer given: the whole variable
    assert not isinstance(_backend.snapshot(variable, tf.ones([10, 3]), opt), _backend.RowSnapshot)
    assert not isinstance(_backend.snapshot(variable), _backend.RowSnapshot)
    constrained = _emb_variable(embeddings_constraint="unit_norm")
    opt2 = keras.optimizers.SGD(0.1)
    opt2.build([constrained])
    assert not _backend.moves_only_gradient_rows(opt2, constrained)


@needs_multi_optimizer
def test_multi_optimizer_row_snapshot_follows_the_sub_optimizer_of_the_variable():
    emb = keras.layers.Embedding(10, 3, name="emb")
    emb.build((None,))
    dense = keras.layers.Dense(2, name="head")
    dense.build((None, 3))
    variables = emb.trainable_variables + dense.trainable_variables
    O = keras.optimizers
    multi = O.MultiOptimizer(
        O.OptimizerMap(default_optimizer=O.Adam(0.1), optimizer_map={"emb/.*": O.SGD(0.1)})
    )
    multi.build(variables)
    for variable, trusted in ((emb.embeddings, True), (dense.kernel, False)):
        opt = _inner_optimizer.optimizer_for(multi, variable)  # what the dense layout hands the snapshot
        assert _backend.moves_only_gradient_rows(opt, variable) is trusted


def test_row_restore_puts_back_frozen_elements_of_the_touched_rows_only():
    # Direct use of the backend: snapshot rows 1 and 4 (4 twice, as an
    # Embedding gradient can repeat ids), scribble on the variable, restore.
    variable = keras.Variable(np.arange(12, dtype="float32").reshape(6, 2), name="t")
    before = variable.numpy().copy()
    indices = tf.constant([1, 4, 4])
    snap = _backend.RowSnapshot(indices, tf.gather(variable.value, indices))
    variable.assign(before + 100.0)
    mask = tf.constant(np.array([[0], [0], [1], [1], [1], [1]], bool))  # rows 0, 1 frozen; 4 trainable
    _backend.restore_frozen([(variable, mask, snap)])
    expected = before + 100.0
    expected[1] = before[1]  # touched and frozen: restored
    # row 0 is frozen but untouched: not restored (the snapshot never saw it)
    assert np.array_equal(variable.numpy(), expected)


# ------------------------------------------------------------ end to end


def _row_masked_embedding_run(inner, vocab=8, dim=2, steps=3):
    emb = keras.layers.Embedding(vocab, dim, name="emb")
    emb.build((None,))
    start = emb.embeddings.numpy().copy()
    row_mask = np.zeros((vocab, 1), bool)
    row_mask[4:] = True
    opt = MaskedOptimizer(inner, masks={"emb/embeddings": row_mask})
    ids = tf.constant([1, 4, 4, 6])  # rows 1 (frozen), 4 (twice), 6 (trainable)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb(ids))
        grads = tape.gradient(loss, emb.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, emb.trainable_variables))

    for _ in range(steps):
        step()
    return start, emb.embeddings.numpy(), row_mask[:, 0]


def test_sparse_sgd_step_matches_hand_computed_update():
    # loss = sum of looked-up rows, so each lookup contributes gradient 1 to
    # its row: row 4 gets 2 per step, row 6 gets 1, row 1 is frozen.
    # SGD lr 0.5, 3 steps: row 4 -= 3 * 0.5 * 2 = 3.0; row 6 -= 3 * 0.5 = 1.5.
    start, end, _ = _row_masked_embedding_run(keras.optimizers.SGD(0.5))
    expected = start.copy()
    expected[4] -= 3.0
    expected[6] -= 1.5
    np.testing.assert_allclose(end, expected, rtol=0, atol=1e-6)
    assert np.array_equal(end[[0, 1, 2, 3, 5, 7]], start[[0, 1, 2, 3, 5, 7]])


def test_sparse_sgd_with_weight_decay_matches_numpy_oracle():
    # Weight decay moves every row, touched or not, so the whole variable is
    # snapshotted; frozen rows stay exact, trainable rows decay as NumPy says.
    lr, wd, steps = 0.5, 0.1, 3
    start, end, trainable = _row_masked_embedding_run(
        keras.optimizers.SGD(lr, weight_decay=wd), steps=steps
    )
    w = start.astype("float64").copy()
    counts = np.bincount([4, 4, 6], minlength=8)[:, None].astype("float64")
    for _ in range(steps):
        new = w - w * wd * lr - lr * counts
        w = np.where(trainable[:, None], new, w)
    assert np.array_equal(end[~trainable], start[~trainable])
    np.testing.assert_allclose(end, w, rtol=1e-6, atol=1e-6)
    assert np.all(end[5] != start[5])  # untouched trainable row decayed


@pytest.mark.parametrize("inner", ["sgd", "sgd_momentum", "adamw", "adagrad", "ftrl"])
def test_row_masked_embedding_keeps_frozen_rows_exact(inner):
    start, end, trainable = _row_masked_embedding_run(OPTIMIZERS[inner]())
    assert np.array_equal(end[~trainable], start[~trainable])
    assert np.all(end[[4, 6]] != start[[4, 6]])


def test_new_vocabulary_fine_tune_with_stock_embedding_keeps_old_rows_bit_identical():
    # The common "add tokens, train only their rows" fine-tune, end to end with
    # model.fit: old rows never move although AdamW decays every row.
    old_vocab, new_tokens, dim = 40, 8, 4
    vocab = old_vocab + new_tokens
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(64, 5))
    x[:, 0] = rng.integers(old_vocab, vocab, size=64)  # every sample uses a new token
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(vocab, dim, name="tokens"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="head"),
        ]
    )
    table = model.get_layer("tokens").embeddings
    start = table.numpy().copy()
    head_start = model.get_layer("head").kernel.numpy().copy()
    new_rows = np.zeros((vocab, 1), bool)
    new_rows[old_vocab:] = True
    opt = MaskedOptimizer(
        keras.optimizers.AdamW(0.05, weight_decay=0.1),
        masks={"tokens/embeddings": new_rows, ".*/head/.*": False},
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    end = table.numpy()
    assert np.array_equal(end[:old_vocab], start[:old_vocab])
    assert np.all(end[old_vocab:] != start[old_vocab:])
    assert np.array_equal(model.get_layer("head").kernel.numpy(), head_start)
    assert np.array_equal(opt.get_mask(table), np.broadcast_to(new_rows, (vocab, dim)))


def test_new_vocabulary_fine_tune_matches_gradient_masked_adam_bitwise():
    # Fresh Adam without weight decay leaves rows whose gradient is always
    # zero exactly in place, so gradient-only masking is an exact oracle here.
    vocab, dim, new = 30, 4, 6
    rng = np.random.default_rng(1)
    x = rng.integers(0, vocab, size=(32, 4))
    y = rng.normal(size=(32, 1)).astype("float32")
    new_rows = np.zeros((vocab, 1), bool)
    new_rows[-new:] = True

    class GradMaskedAdam(keras.optimizers.Adam):
        def apply(self, grads, trainable_variables=None):
            out = []
            for g, v in zip(grads, trainable_variables):
                if v.path.endswith("tokens/embeddings"):
                    mask = tf.gather(tf.constant(new_rows), g.indices)
                    g = tf.IndexedSlices(tf.where(mask, g.values, 0.0), g.indices, g.dense_shape)
                out.append(g)
            return super().apply(out, trainable_variables)

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,), dtype="int32"),
                keras.layers.Embedding(vocab, dim, name="tokens"),
                keras.layers.Flatten(),
                keras.layers.Dense(1, name="head"),
            ]
        )

    results = []
    for opt in (
        MaskedOptimizer(keras.optimizers.Adam(0.05), masks={"tokens/embeddings": new_rows}),
        GradMaskedAdam(0.05),
    ):
        m = model()
        m.compile(optimizer=opt, loss="mse")
        m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(m.get_weights())
    for a, b in zip(*results):
        assert np.array_equal(a, b)
