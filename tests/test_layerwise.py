"""layerwise_decay: the multipliers it gives each trainable variable.

Expected values are written out by hand (or computed in the test from layer
names with a few lines of its own), and each key is resolved to variables by
the registry's key rules, so the test checks what the optimizer will apply.
"""

import math
import re

import keras
import numpy as np
import pytest

from masked_opt import MaskedOptimizer, layerwise_decay
from masked_opt.keys import match_key

L = keras.layers

# The grouping reads the layer graph only, the same on every backend; building
# MobileNetV2 or a KerasHub model takes 5-12 s on JAX (eager initializers), so
# those cases run on TensorFlow and torch. tests/test_kerashub.py checks the
# BERT classifier's multipliers on every backend.
graph_only = pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="graph-only check; slow model build on JAX"
)


def per_variable(model, multipliers: dict) -> dict:
    """{variable path: multiplier}, each trainable variable selected by exactly one key."""
    variables = model.trainable_variables
    got: dict = {}
    for key, value in multipliers.items():
        assert isinstance(key, str) and isinstance(value, float)
        for i in match_key(key, variables, argument="multipliers"):
            assert variables[i].path not in got, f"{variables[i].path} selected twice"
            got[variables[i].path] = value
    assert sorted(got) == sorted(v.path for v in variables)
    return got


def expected_by_layer(model, value_of_layer: dict) -> dict:
    """{variable path: value} from {layer: value} over the layers' trainable variables."""
    out = {}
    for layer, value in value_of_layer.items():
        for v in layer.trainable_variables:
            out[v.path] = value
    return out


def test_sequential_of_three_dense_layers_gets_a_quarter_a_half_and_one():
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(3, name="a"), L.Dense(3, name="b"), L.Dense(2, name="c")]
    )
    multipliers = layerwise_decay(model, 0.5)
    assert multipliers == {"a": 0.25, "b": 0.5, "c": 1.0}
    assert per_variable(model, multipliers) == {
        "sequential/a/kernel": 0.25, "sequential/a/bias": 0.25,
        "sequential/b/kernel": 0.5, "sequential/b/bias": 0.5,
        "sequential/c/kernel": 1.0, "sequential/c/bias": 1.0,
    }


def test_masked_optimizer_takes_the_dict_as_multipliers():
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(3, name="a"), L.Dense(3, name="b"), L.Dense(2, name="c")]
    )
    opt = MaskedOptimizer("adam", multipliers=layerwise_decay(model, 0.5))
    opt.build(model.trainable_variables)
    for v, m in zip(model.trainable_variables, [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]):
        assert np.array_equal(opt.get_multiplier(v), np.full(v.shape, m, "float32")), v.path


def test_functional_branches_at_one_depth_share_a_multiplier():
    # depth = longest chain of layers with weights from the input:
    # stem 1; a1, b1 2; a2 3; head 4 (Concatenate and Dropout have no weights).
    x = keras.Input((4,))
    stem = L.Dense(4, name="stem")
    a1, a2, b1, head = L.Dense(4, name="a1"), L.Dense(4, name="a2"), L.Dense(4, name="b1"), L.Dense(2, name="head")
    h = stem(x)
    y = head(L.Dropout(0.1)(L.Concatenate()([a2(a1(h)), b1(h)])))
    model = keras.Model(x, y)
    multipliers = layerwise_decay(model, 0.5)
    assert per_variable(model, multipliers) == expected_by_layer(
        model, {stem: 0.125, a1: 0.25, b1: 0.25, a2: 0.5, head: 1.0}
    )
    assert list(multipliers) == ["stem", "a1", "b1", "a2", "head"]  # bottom-up


def test_min_multiplier_floors_the_lowest_layers():
    model = keras.Sequential([keras.Input((2,))] + [L.Dense(2, name=f"d{i}") for i in range(5)])
    multipliers = layerwise_decay(model, 0.1, min_multiplier=0.005)
    # 0.1**4, 0.1**3 are below the floor; 0.1**2 = 0.010000000000000002 is not
    assert multipliers == {"d0": 0.005, "d1": 0.005, "d2": 0.1**2, "d3": 0.1, "d4": 1.0}


def test_decay_one_gives_every_variable_one():
    model = keras.Sequential([keras.Input((2,)), L.Dense(2), L.Dense(2)])
    assert set(layerwise_decay(model, 1.0).values()) == {1.0}


def test_keys_tell_apart_layers_of_the_same_name_in_nested_models():
    enc1 = keras.Sequential([keras.Input((3,)), L.Dense(3, name="d")], name="enc1")
    enc2 = keras.Sequential([keras.Input((3,)), L.Dense(3, name="d")], name="enc2")
    x = keras.Input((3,))
    model = keras.Model(x, L.Dense(1, name="out")(enc2(enc1(x))))
    multipliers = layerwise_decay(model, 0.5)
    assert multipliers == {"enc1/d": 0.25, "enc2/d": 0.5, "out": 1.0}
    assert per_variable(model, multipliers) == {
        "enc1/d/kernel": 0.25, "enc1/d/bias": 0.25,
        "enc2/d/kernel": 0.5, "enc2/d/bias": 0.5,
        "out/kernel": 1.0, "out/bias": 1.0,
    }


def _chain(names):
    """A functional chain of tiny Dense layers with the given names (None: a
    weightless Activation)."""
    x = inp = keras.Input((2,))
    layers = {}
    for name in names:
        layer = L.Dense(2, name=name)
        layers[name] = layer
        x = layer(x)
    return keras.Model(inp, x), layers


def test_resnet_and_efficientnet_block_prefixes_share_a_multiplier():
    # keras.applications names: conv{s}_block{b}_..., block{n}{x}_...
    model, layers = _chain(
        ["conv1_conv", "conv1_bn", "conv2_block1_1_conv", "conv2_block1_2_conv", "conv2_block2_1_conv",
         "pool2_conv", "conv3_block1_1_conv", "block1a_dwconv", "block1a_project_conv",
         "block2b_expand_conv", "top_conv", "predictions"]
    )
    d = 0.5
    groups = [["conv1_conv", "conv1_bn"],  # stem
              ["conv2_block1_1_conv", "conv2_block1_2_conv"],
              ["conv2_block2_1_conv", "pool2_conv"],  # between blocks: joins the block below
              ["conv3_block1_1_conv"],
              ["block1a_dwconv", "block1a_project_conv"],
              ["block2b_expand_conv"],
              ["top_conv", "predictions"]]  # head
    want = {layers[n]: d ** (len(groups) - 1 - rank) for rank, g in enumerate(groups) for n in g}
    assert per_variable(model, layerwise_decay(model, d)) == expected_by_layer(model, want)


@graph_only
def test_mobilenet_v2_blocks_share_one_multiplier_each():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35)
    d = 0.5
    # Independent expectation from the layer names: Conv1 ... expanded_conv_*
    # below block_1 are the stem (rank 0), block_i_* rank i, Conv_1, Conv_1_bn
    # and predictions the head (rank 17).
    want = {}
    for layer in model.layers:
        if not layer.trainable_variables:
            continue
        m = re.match(r"block_(\d+)_", layer.name)
        if m:
            rank = int(m.group(1))
        elif layer.name in ("Conv_1", "Conv_1_bn", "predictions"):
            rank = 17
        else:
            assert layer.name.startswith(("Conv1", "bn_Conv1", "expanded_conv")), layer.name
            rank = 0
        want[layer] = d ** (17 - rank)
    got = per_variable(model, layerwise_decay(model, d))
    assert got == expected_by_layer(model, want)
    assert got["block_3_expand/kernel"] == got["block_3_project_BN/gamma"] == 0.5**14


def test_custom_blocks_regex_callable_and_none():
    model, layers = _chain(["in_proj", "stage1_a", "stage1_b", "stage2_a", "out_proj"])
    by_regex = per_variable(model, layerwise_decay(model, 0.5, blocks=r"(stage\d+)_"))
    by_callable = per_variable(
        model, layerwise_decay(model, 0.5, blocks=lambda layer: layer.name.split("_")[0] if "stage" in layer.name else None)
    )
    want = expected_by_layer(
        model, {layers["in_proj"]: 0.125, layers["stage1_a"]: 0.25, layers["stage1_b"]: 0.25,
                layers["stage2_a"]: 0.5, layers["out_proj"]: 1.0}
    )
    assert by_regex == by_callable == want
    # no grouping: one group per depth
    ungrouped = per_variable(model, layerwise_decay(model, 0.5, blocks=()))
    assert sorted(set(ungrouped.values())) == [0.0625, 0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("decay", [0, 0.0, -0.5, 1.5, math.nan, math.inf])
def test_decay_out_of_range_is_a_value_error_naming_it(decay):
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    with pytest.raises(ValueError, match=re.escape(f"decay={decay!r}")):
        layerwise_decay(model, decay)


@pytest.mark.parametrize("decay", ["0.5", None, True])
def test_decay_of_the_wrong_type_is_a_type_error(decay):
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    with pytest.raises(TypeError, match="`decay` must be a float"):
        layerwise_decay(model, decay)


def test_other_argument_errors():
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    with pytest.raises(ValueError, match=r"min_multiplier=1\.5"):
        layerwise_decay(model, 0.5, min_multiplier=1.5)
    with pytest.raises(ValueError, match="not a valid regex"):
        layerwise_decay(model, 0.5, blocks="block_(")
    with pytest.raises(TypeError, match="`blocks` must be None"):
        layerwise_decay(model, 0.5, blocks=3)
    with pytest.raises(TypeError, match="`blocks` must return a block name"):
        layerwise_decay(model, 0.5, blocks=lambda layer: 1)
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        layerwise_decay(L.Dense(2), 0.5)
    with pytest.raises(ValueError, match="has no trainable variables"):
        layerwise_decay(keras.Sequential([L.Dense(2)]), 0.5)


def _tiny_bert(keras_hub):
    return keras_hub.models.BertBackbone(
        vocabulary_size=20, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=8,
    )


@graph_only
def test_kerashub_bert_embeddings_lowest_blocks_then_the_head():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = _tiny_bert(keras_hub)
    d = 0.8
    multipliers = layerwise_decay(backbone, d)
    emb = {"token_embedding", "position_embedding", "segment_embedding", "embeddings_layer_norm"}
    assert multipliers == {
        **{name: d**3 for name in emb},
        "transformer_layer_0": d**2, "transformer_layer_1": d, "pooled_dense": 1.0,
    }
    want = {}
    for v in backbone.trainable_variables:
        top = v.path.split("/")[0]
        want[v.path] = {"transformer_layer_0": d**2, "transformer_layer_1": d, "pooled_dense": 1.0}.get(top, d**3)
        assert top in emb or top in want or top.startswith("transformer_layer_") or top == "pooled_dense"
    assert per_variable(backbone, multipliers) == want
    # A task model nests the backbone; its classifier head joins the top group.
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    on_task = layerwise_decay(classifier, d)
    assert on_task == {**multipliers, "logits": 1.0}
    per_variable(classifier, on_task)


@graph_only
def test_kerashub_gemma_decoder_blocks():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=20, num_layers=3, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    multipliers = layerwise_decay(backbone, 0.5)
    assert multipliers == {
        "token_embedding": 0.0625, "decoder_block_0": 0.125, "decoder_block_1": 0.25,
        "decoder_block_2": 0.5, "final_normalization": 1.0,
    }
    # The causal LM reuses token_embedding as its (tied) output layer: it keeps
    # the lowest multiplier, at its first use.
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    assert layerwise_decay(lm, 0.5) == multipliers
    per_variable(lm, multipliers)


def test_multipliers_are_plain_python_floats():
    model = keras.Sequential([keras.Input((2,)), L.Dense(2), L.Dense(2)])
    values = list(layerwise_decay(model, np.float32(0.5)).values())
    assert values == [0.5, 1.0] and all(type(v) is float for v in values)


def test_subclassed_model_layers_in_listed_order_and_own_weights_on_top():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.first = L.Dense(3, name="first")
            self.second = L.Dense(2, name="second")

        def build(self, input_shape):
            self.first.build(input_shape)
            self.second.build((None, 3))
            self.temperature = self.add_weight(shape=(), initializer="ones", name="temperature")

        def call(self, x):
            return self.second(self.first(x)) * self.temperature

    model = Net()
    model(np.zeros((1, 4), "float32"))
    multipliers = layerwise_decay(model, 0.5)
    got = per_variable(model, multipliers)
    assert got == {
        model.first.kernel.path: 0.25, model.first.bias.path: 0.25,
        model.second.kernel.path: 0.5, model.second.bias.path: 0.5,
        model.temperature.path: 1.0,
    }
    assert multipliers[model.temperature.path] == 1.0  # its exact path: "net" would select all
