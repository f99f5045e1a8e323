"""KerasHub models with MaskedOptimizer: tiny backbones built from config with
random weights (nothing downloaded), trained with `fit` for a few steps.

Frozen elements are checked against copies taken before training with
`np.array_equal`; that trainable ones moved is checked separately (every row
or element that should move did). Variable paths (KerasHub 0.32):

    BERT:  transformer_layer_{i}/self_attention_layer/{query,key,value}/kernel  (hidden, heads, head_dim)
           token_embedding/embeddings  (vocab, hidden), logits/kernel (task head)
    Gemma: decoder_block_{i}/attention/query/kernel  (heads, hidden, head_dim)
           decoder_block_{i}/attention/{key,value}/kernel  (kv_heads, hidden, head_dim)
           token_embedding/embeddings  (vocab, hidden), tied to the LM output
"""

import keras
import numpy as np
import pytest
from backends import assert_equal_across_programs, frozen_slot_names, gradients, is_frozen_slot, to_numpy

from masked_opt import MaskedOptimizer, layerwise_decay
from masked_opt import masks as M

keras_hub = pytest.importorskip("keras_hub")

VOCAB, OLD_VOCAB, SEQ, BATCH, STEPS = 24, 20, 8, 4, 3


def bert_classifier():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQ, dropout=0.0,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None, dropout=0.0)


def bert_data(seed=0):
    rng = np.random.default_rng(seed)
    n = BATCH * STEPS
    x = {
        "token_ids": rng.integers(0, VOCAB, (n, SEQ)).astype("int32"),
        "segment_ids": np.zeros((n, SEQ), "int32"),
        "padding_mask": np.ones((n, SEQ), bool),
    }
    return x, rng.integers(0, 3, n).astype("int32")


def gemma_lm():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def gemma_data(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH * STEPS, SEQ + 1)).astype("int32")
    tokens[:, 0] = np.arange(OLD_VOCAB, VOCAB).repeat(STEPS)  # every new token is in the data
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((len(tokens), SEQ), bool)}
    return x, tokens[:, 1:]


def compile_and_fit(model, optimizer, data):
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def weights(model) -> dict:
    """{path: NumPy copy} of every weight (trainable or not)."""
    return {v.path: to_numpy(v) for v in model.weights}


MODELS = {"bert": (bert_classifier, bert_data), "gemma": (gemma_lm, gemma_data)}
QKV_KERNELS = {
    "bert": r"transformer_layer_\d+/self_attention_layer/(query|key|value)/kernel",
    "gemma": r"decoder_block_\d+/attention/(query|key|value)/kernel",
}


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_regex_key_freezes_the_3d_einsum_dense_attention_kernels(name):
    make, data = MODELS[name]
    model = make()
    opt = MaskedOptimizer(keras.optimizers.Adam(1e-2), masks={QKV_KERNELS[name]: False})
    before = weights(model)
    compile_and_fit(model, opt, data())
    after = weights(model)
    frozen = sorted(v.path for v in model.trainable_variables if not opt.get_mask(v).any())
    prefix = "transformer_layer_{}/self_attention_layer" if name == "bert" else "decoder_block_{}/attention"
    assert frozen == sorted(f"{prefix.format(i)}/{p}/kernel" for i in range(2) for p in ("query", "key", "value"))
    for path in frozen:
        assert after[path].ndim == 3
        assert np.array_equal(after[path], before[path]), path
    # Every other trainable variable moved (all its elements, for these: Adam).
    for v in model.trainable_variables:
        if v.path not in frozen:
            assert np.any(after[v.path] != before[v.path]), v.path


@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_only_new_token_rows_of_the_embedding_train(name):
    # Gemma ties the embedding to the LM output: every row gets a gradient.
    make, data = MODELS[name]
    model = make()
    opt = MaskedOptimizer(
        keras.optimizers.AdamW(1e-2, weight_decay=0.1),
        masks={"token_embedding/embeddings": M.rows(range(OLD_VOCAB, VOCAB))},
    )
    # BERT's untied embedding only gets gradients for tokens in the data.
    x, y = data()
    x["token_ids"][:, 0] = np.arange(OLD_VOCAB, VOCAB).repeat(STEPS)
    before = weights(model)["token_embedding/embeddings"]
    compile_and_fit(model, opt, (x, y))
    after = weights(model)["token_embedding/embeddings"]
    assert after.shape == (VOCAB, 16)
    assert np.array_equal(after[:OLD_VOCAB], before[:OLD_VOCAB])
    assert np.all(after[OLD_VOCAB:] != before[OLD_VOCAB:])


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_lora_with_masks_on_the_other_trainable_weights():
    model = bert_classifier()
    model.backbone.enable_lora(rank=2)
    # enable_lora freezes the backbone but for query/value's LoRA factors and
    # their biases; the task head stays trainable.
    trainable = sorted(v.path for v in model.trainable_variables)
    assert trainable == sorted(
        [f"transformer_layer_{i}/self_attention_layer/{p}/{w}"
         for i in range(2) for p in ("query", "value") for w in ("bias", "lora_kernel_a", "lora_kernel_b")]
        + ["logits/kernel", "logits/bias"]
    )
    with pytest.raises(ValueError, match="matches no trainable variable"):  # the LoRA base kernel
        MaskedOptimizer("adam", masks={"query/kernel": False}).build(model.trainable_variables)
    opt = MaskedOptimizer(
        keras.optimizers.Adam(1e-2),
        masks={"query/bias": False, "value/bias": False, "logits/kernel": M.columns([0, 1])},
    )
    before = weights(model)
    compile_and_fit(model, opt, bert_data())
    after = weights(model)
    for i in range(2):
        for p in ("query", "value"):
            layer = f"transformer_layer_{i}/self_attention_layer/{p}"
            assert np.array_equal(after[f"{layer}/bias"], before[f"{layer}/bias"])  # masked
            assert np.array_equal(after[f"{layer}/kernel"], before[f"{layer}/kernel"])  # LoRA base
            # B starts at 0, so A's gradient is 0 at the first step and tiny
            # after: some of A's elements may round back to their old value.
            assert np.any(after[f"{layer}/lora_kernel_a"] != before[f"{layer}/lora_kernel_a"])
            assert np.all(after[f"{layer}/lora_kernel_b"] != before[f"{layer}/lora_kernel_b"])
    assert np.array_equal(after["logits/kernel"][:, 2], before["logits/kernel"][:, 2])
    assert np.all(after["logits/kernel"][:, :2] != before["logits/kernel"][:, :2])
    assert np.all(after["logits/bias"] != before["logits/bias"])
    # The rest of the backbone is frozen by Keras (not trainable).
    assert np.array_equal(after["transformer_layer_0/feedforward_output_dense/kernel"],
                          before["transformer_layer_0/feedforward_output_dense/kernel"])


def load_task(path, make_optimizer):
    """`load_model` for a KerasHub task. Tasks override `compile`, so Keras
    does not compile them on load and skips the saved optimizer state (it
    warns); compiling with the same optimizer and loading the file's weights
    again restores it, masks included."""
    loaded = keras.models.load_model(path)
    if not isinstance(loaded.optimizer, MaskedOptimizer):
        loaded.compile(optimizer=make_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        loaded.optimizer.build(loaded.trainable_variables)
        loaded.load_weights(path)
    return loaded


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
@pytest.mark.filterwarnings("ignore:`compile\\(\\)` was not called:UserWarning")
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning")
def test_saved_task_loads_and_continues_training_like_the_original(tmp_path):
    import masked_opt  # noqa: F401  (registers MaskedOptimizer for load_model)

    def make_optimizer():
        return MaskedOptimizer(
            keras.optimizers.Adam(1e-2),
            masks={QKV_KERNELS["bert"]: False, "token_embedding/embeddings": M.rows(range(OLD_VOCAB, VOCAB))},
        )

    model = bert_classifier()
    start = weights(model)
    compile_and_fit(model, make_optimizer(), bert_data(0))
    path = str(tmp_path / "bert.keras")
    model.save(path)
    loaded = load_task(path, make_optimizer)
    # Weights, masks and optimizer state come back to the bit.
    saved, back = weights(model), weights(loaded)
    assert back.keys() == saved.keys()
    for key, value in saved.items():
        assert np.array_equal(back[key], value), key
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) > 50
    # A wholly frozen kernel's slots are not state: zero-size where `fit` built
    # the optimizer, full-size (fresh) where `load_model` did (docs/freezing-cost.md).
    frozen = frozen_slot_names(model.optimizer)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        if tuple(a.shape) != tuple(b.shape):
            assert is_frozen_slot(a, frozen) and is_frozen_slot(b, frozen), (a.path, b.path)
            assert tuple(a.shape) == (0,) and not to_numpy(b).any(), (a.path, b.path)
            continue
        assert np.array_equal(to_numpy(a), to_numpy(b)), (a.path, b.path)
    for v in loaded.trainable_variables:
        assert np.array_equal(loaded.optimizer.get_mask(v), model.optimizer.get_mask(v.path)), v.path

    x, y = bert_data(1)
    for m in (model, loaded):
        m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    after, after_loaded = weights(model), weights(loaded)
    for key in after:  # two separately compiled train steps (see backends.py)
        assert_equal_across_programs(after_loaded[key], after[key], err_msg=key)
    for i in range(2):
        for p in ("query", "key", "value"):
            k = f"transformer_layer_{i}/self_attention_layer/{p}/kernel"
            assert np.array_equal(after_loaded[k], start[k]), k
    emb = "token_embedding/embeddings"
    assert np.array_equal(after_loaded[emb][:OLD_VOCAB], start[emb][:OLD_VOCAB])
    assert np.all(after_loaded[emb][OLD_VOCAB:] != start[emb][OLD_VOCAB:])


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_layerwise_decay_multipliers_scale_one_adam_step_per_layer():
    """Needs `MaskedOptimizer(..., multipliers=...)` (project issue 9, item 1)."""
    model = bert_classifier()
    d = 0.5
    multipliers = layerwise_decay(model, d)
    emb = ["token_embedding", "position_embedding", "segment_embedding", "embeddings_layer_norm"]
    assert multipliers == {**dict.fromkeys(emb, d**3), "transformer_layer_0": d**2,
                           "transformer_layer_1": d, "pooled_dense": 1.0, "logits": 1.0}
    expected = {}
    for v in model.trainable_variables:
        top = v.path.split("/")[0]
        expected[v.path] = {"transformer_layer_0": d**2, "transformer_layer_1": d}.get(
            top, 1.0 if top in ("pooled_dense", "logits") else d**3)

    x, y = bert_data()
    x = {k: v[:BATCH] for k, v in x.items()}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    grads = gradients(lambda: loss(y[:BATCH], model(x)), variables)
    w0 = [to_numpy(v) for v in variables]

    opt = MaskedOptimizer(keras.optimizers.Adam(1e-2), multipliers=multipliers)
    opt.apply(grads, variables)
    w_llrd = [to_numpy(v) for v in variables]
    for v, w in zip(variables, w0):
        v.assign(w)
    keras.optimizers.Adam(1e-2).apply(grads, variables)  # the bare step, same gradients
    w_bare = [to_numpy(v) for v in variables]

    for v, a, b, c in zip(variables, w0, w_llrd, w_bare):
        m = expected[v.path]
        np.testing.assert_allclose(opt.get_multiplier(v), np.full(a.shape, m, "float32"))
        if m == 1.0:
            assert np.array_equal(b, c), v.path  # m = 1 is the bare update, to the bit
            continue
        # w_new = w_old + m * (w_bare - w_old): within 2 ulp of the weights' scale
        oracle = a + np.float32(m) * (c - a)
        scale = np.spacing(np.max(np.abs(oracle))).astype("float32")
        assert np.max(np.abs(b - oracle)) <= 2 * scale, v.path
        ratio = np.linalg.norm(b - a) / np.linalg.norm(c - a)
        assert abs(ratio - m) <= 1e-4 * m, (v.path, ratio, m)
