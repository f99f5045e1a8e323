"""Every documented error: ValueError for bad values, TypeError for bad types,
raised by masked_opt itself (never a backend traceback), naming the variable
path or key, the offending value or shape, and saying how to fix it."""

import re
import warnings

import numpy as np
import pytest

import keras
from backends import BACKEND, IS_TF, IS_TORCH, tensor, to_numpy
from masked_opt import MaskedOptimizer

O = keras.optimizers


from variables import net_variables, scoped_variable  # noqa: E402


def raises(exc_type, *fragments):
    """`pytest.raises` that requires every fragment (literal text) in the message."""
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc_type, match=re.compile(pattern, re.DOTALL))


def assert_raised_by_masked_opt(excinfo, exc_type):
    assert type(excinfo.value) is exc_type
    assert "masked_opt" in str(excinfo.traceback[-1].path), (
        "raised outside masked_opt (a backend traceback):\n" + str(excinfo.traceback[-1])
    )


# ------------------------------------------------------------- mask values


def test_mask_that_does_not_broadcast_names_path_and_both_shapes():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((3, 3), bool)})
    with raises(ValueError, "net/dense_1/kernel", "(3, 3)", "(3, 4)", "Pass a mask of shape") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


def test_callable_returning_a_wrong_shape_names_path_and_shapes():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_2/kernel": lambda v: np.ones((5,), bool)})
    with raises(ValueError, "net/dense_2/kernel", "(5,)", "(4, 2)") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


def test_callable_that_raises_is_reported_with_the_path():
    def broken(variable):
        raise RuntimeError("no scores for this layer")

    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/bias": broken})
    with raises(ValueError, "net/dense_1/bias", "no scores for this layer") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize(
    "value, shown",
    [
        (0.5, "0.5"),
        (np.array([[1.0, 0.5, 0.0, 1.0]]), "0.5"),
        (float("nan"), "nan"),
        (np.array([0, 1, 2, 1]), "2"),
        ([[1, 0], [-1, 1]], "-1"),
    ],
    ids=["scalar_half", "array_half", "nan", "int_two", "list_minus_one"],
)
def test_non_boolean_mask_values_are_rejected(value, shown):
    with raises(ValueError, "dense_1/kernel", shown, "True = trainable", "threshold") as e:
        MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": value})
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize(
    "value",
    ["yes", {"a": 1}, None, b"\x01", {True}, np.array(["x"])],
    ids=["str", "dict", "none", "bytes", "set", "str_array"],
)
def test_mask_values_of_the_wrong_type_raise_type_error(value):
    with raises(TypeError, "dense_1/kernel", "bool") as e:
        MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": value})
    assert_raised_by_masked_opt(e, TypeError)


def test_set_mask_before_build_validates_the_value():
    opt = MaskedOptimizer(O.SGD(0.1))
    with raises(ValueError, "dense_1/kernel", "0.25") as e:
        opt.set_mask("dense_1/kernel", np.array([0.25]))
    assert_raised_by_masked_opt(e, ValueError)
    with raises(TypeError, "dense_1/kernel", "'off'") as e:
        opt.set_mask("dense_1/kernel", "off")
    assert_raised_by_masked_opt(e, TypeError)


def test_masks_argument_must_be_a_dict_or_pairs():
    with raises(TypeError, "`masks`", "dict", "42") as e:
        MaskedOptimizer(O.SGD(0.1), 42)
    assert_raised_by_masked_opt(e, TypeError)


# --------------------------------------------------------------------- keys


def test_key_matching_no_variable_names_key_and_existing_paths():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_3/kernel": False})
    with raises(ValueError, "'dense_3/kernel'", "matches no trainable variable",
                "net/dense_1/kernel", "net/dense_2/kernel", "re.fullmatch") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


def test_variable_matched_by_two_keys_names_both_keys():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": False, r".*/kernel": True})
    with raises(ValueError, "net/dense_1/kernel", "'dense_1/kernel'", "'.*/kernel'", "disjoint") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


def test_invalid_regex_key_says_so():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel[": False})
    with raises(ValueError, "'dense_1/kernel['", "regex") as e:
        opt.build(net_variables())
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize("key", [3, 1.5, None, ("dense_1", "kernel")], ids=repr)
def test_key_of_the_wrong_type_raises_type_error(key):
    with raises(TypeError, "keys must be a `keras.Variable`, a `keras.layers.Layer` or a string", repr(key)) as e:
        MaskedOptimizer(O.SGD(0.1), [(key, True)])
    assert_raised_by_masked_opt(e, TypeError)
    with raises(TypeError, repr(key)) as e:
        MaskedOptimizer(O.SGD(0.1)).freeze(key)
    assert_raised_by_masked_opt(e, TypeError)


def test_foreign_variable_key_after_build_names_its_path():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
    opt.build(variables)
    stranger = scoped_variable(np.ones(2), "kernel", "elsewhere")
    with raises(ValueError, "elsewhere/kernel", "not one of the trainable variables") as e:
        opt.freeze(stranger)
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize("method", ["get_mask", "get_multiplier"])
def test_getters_refuse_a_variable_of_another_model_after_build(method):
    """A loaded copy's variable (same path, other object) is not answered with
    the all-trainable default: the error names its path."""
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.zeros((3, 4), bool)}, multipliers={"dense_1/kernel": 0.5})
    opt.build(net_variables())
    twin = net_variables()[0]
    with raises(ValueError, f"`{method}`", twin.path, "not one of the trainable variables") as e:
        getattr(opt, method)(twin)
    assert_raised_by_masked_opt(e, ValueError)
    expected = {"get_mask": False, "get_multiplier": 0.5}[method]
    np.testing.assert_array_equal(getattr(opt, method)(twin.path), np.full((3, 4), expected))  # its path answers


def test_unknown_key_after_build_names_key_and_paths():
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
    opt.build(net_variables())
    with raises(ValueError, "'dense_9/bias'", "net/dense_1/bias") as e:
        opt.unfreeze("dense_9/bias")
    assert_raised_by_masked_opt(e, ValueError)


def test_get_mask_with_a_string_before_build_asks_for_a_build():
    with raises(ValueError, "'dense_1/kernel'", "optimizer.build(") as e:
        MaskedOptimizer(O.SGD(0.1)).get_mask("dense_1/kernel")
    assert_raised_by_masked_opt(e, ValueError)


def test_get_mask_with_a_key_selecting_several_variables():
    opt = MaskedOptimizer(O.SGD(0.1))
    opt.build(net_variables())
    with raises(ValueError, "'.*/kernel'", "net/dense_1/kernel", "net/dense_2/kernel") as e:
        opt.get_mask(r".*/kernel")
    assert_raised_by_masked_opt(e, ValueError)


# ----------------------------------------------------------- inner optimizer


def test_loss_scale_optimizer_inside_is_rejected_with_an_explanation():
    lso = O.LossScaleOptimizer(O.Adam(0.1))
    with raises(ValueError, "LossScaleOptimizer", "mixed_float16", "compile", "wraps") as e:
        MaskedOptimizer(lso)
    assert_raised_by_masked_opt(e, ValueError)


def test_nested_masked_optimizer_is_rejected():
    with raises(ValueError, "already a MaskedOptimizer") as e:
        MaskedOptimizer(MaskedOptimizer(O.SGD(0.1)))
    assert_raised_by_masked_opt(e, ValueError)


class NotAnOptimizer:
    def apply_gradients(self, grads_and_vars):
        pass


def _legacy_tf_optimizer():
    tf = pytest.importorskip("tensorflow")
    return tf.compat.v1.train.GradientDescentOptimizer(0.1)


@pytest.mark.parametrize(
    "make, shown",
    [
        (lambda: 42, "42"),
        (lambda: NotAnOptimizer(), "NotAnOptimizer"),
        (_legacy_tf_optimizer, "GradientDescentOptimizer"),
        (lambda: [O.SGD(0.1)], "list"),
    ],
    ids=["int", "plain_object", "tf_v1_legacy", "list"],
)
def test_not_an_optimizer_raises_type_error(make, shown):
    with raises(TypeError, "`inner_optimizer`", "Keras 3 optimizer", shown) as e:
        MaskedOptimizer(make())
    assert_raised_by_masked_opt(e, TypeError)


def test_unknown_optimizer_identifier_raises_value_error():
    with raises(ValueError, "'not_an_optimizer'", "keras.optimizers.Adam") as e:
        MaskedOptimizer("not_an_optimizer")
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize(
    "kwarg, value",
    [("weight_decay", 0.01), ("learning_rate", 0.1), ("clipnorm", 1.0), ("use_ema", True),
     ("gradient_accumulation_steps", 2)],
)
def test_base_optimizer_kwargs_on_the_wrapper_point_to_the_inner_optimizer(kwarg, value):
    with raises(ValueError, f"`{kwarg}`", "inner optimizer") as e:
        MaskedOptimizer(O.AdamW(0.1), **{kwarg: value})
    assert_raised_by_masked_opt(e, ValueError)


def test_unexpected_keyword_raises_type_error():
    with raises(TypeError, "'maks'") as e:
        MaskedOptimizer(O.SGD(0.1), maks={})
    assert_raised_by_masked_opt(e, TypeError)


# ---------------------------------------------------------------- after build


@pytest.fixture
def built():
    variables = net_variables()
    opt = MaskedOptimizer(
        O.SGD(0.1),
        {"dense_1/kernel": np.ones((3, 4), bool), "dense_2/kernel": np.ones((1, 2), bool)},
    )
    opt.build(variables)
    return opt, variables


def test_set_mask_with_a_wrong_shape_after_build(built):
    opt, _ = built
    with raises(ValueError, "net/dense_1/kernel", "(2, 2)", "(3, 4)") as e:
        opt.set_mask("dense_1/kernel", np.ones((2, 2), bool))
    assert_raised_by_masked_opt(e, ValueError)


def test_set_mask_with_a_non_boolean_value_after_build(built):
    opt, _ = built
    with raises(ValueError, "net/dense_1/kernel", "0.5") as e:
        opt.set_mask("dense_1/kernel", np.full((3, 4), 0.5))
    assert_raised_by_masked_opt(e, ValueError)


@pytest.mark.parametrize(
    "where", [np.s_[5, :], np.array([0, 7]), np.s_[:, :, 0], np.ones((2, 2), bool)],
    ids=["row_5", "index_7", "too_many_axes", "bool_wrong_shape"],
)
def test_freeze_where_out_of_range_names_path_and_shape(built, where):
    opt, variables = built
    before = opt.get_mask(variables[0])
    with raises(ValueError, "net/dense_1/kernel", "(3, 4)", "where") as e:
        opt.freeze("dense_1/kernel", where)
    assert_raised_by_masked_opt(e, ValueError)
    np.testing.assert_array_equal(opt.get_mask(variables[0]), before)  # untouched


def test_where_of_the_wrong_type_raises_type_error(built):
    opt, _ = built
    with raises(TypeError, "`where`", "'row 1'") as e:
        opt.freeze("dense_1/kernel", "row 1")
    assert_raised_by_masked_opt(e, TypeError)


def test_set_mask_after_build_on_a_variable_without_a_mask_slot(built):
    opt, _ = built
    with raises(ValueError, "`set_mask('dense_1/bias')`", "net/dense_1/bias", "has no mask", "before build",
                "masks=") as e:
        opt.set_mask("dense_1/bias", False)
    assert_raised_by_masked_opt(e, ValueError)
    assert "`set(" not in str(e.value)  # the method's own name
    with raises(ValueError, "`freeze('dense_1/bias')`", "net/dense_1/bias", "has no mask") as e:
        opt.freeze("dense_1/bias")
    assert_raised_by_masked_opt(e, ValueError)


def test_errors_of_edits_name_the_method_that_was_called(built):
    opt, _ = built
    with raises(ValueError, "`set_mask('net/dense_1/kernel'") as e:
        opt.set_mask("dense_1/kernel", np.ones((2, 2), bool))
    assert "`set(" not in str(e.value)
    opt2 = MaskedOptimizer(O.SGD(0.1))
    with raises(TypeError, "`set_mask` keys") as e:
        opt2.set_mask(3.5, True)


def test_an_inner_optimizer_used_by_another_model_is_refused_naming_the_reuse():
    inner = O.Adam(0.01)
    first = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a")], name="first")
    first.compile(MaskedOptimizer(inner, {"a/bias": False}), loss="mse")
    first.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0)
    second = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="b")], name="second")
    opt = MaskedOptimizer(inner, {"b/bias": False})
    with raises(ValueError, "'adam'", "already built", "another model or another MaskedOptimizer",
                "first/a/kernel", "second/b/kernel", "its own optimizer instance") as e:
        opt.build(second.trainable_variables)
    assert_raised_by_masked_opt(e, ValueError)


def test_an_inner_optimizer_built_on_the_same_variables_is_accepted():
    variables = net_variables()
    inner = O.Adam(0.01)
    inner.build(variables)
    opt = MaskedOptimizer(inner, {"dense_1/bias": False})
    opt.build(variables)  # a user who built the inner optimizer first: fine
    assert opt.built and opt.inner_optimizer is inner


def test_element_edit_on_a_column_mask_after_build_explains_the_storage_shape(built):
    opt, variables = built
    with raises(ValueError, "net/dense_2/kernel", "(1, 2)", "(4, 2)", "before the optimizer is built") as e:
        opt.freeze("dense_2/kernel", np.s_[0, 0])
    assert_raised_by_masked_opt(e, ValueError)
    assert opt.get_mask(variables[2]).all()


# --------------------------------------------------------------- inside fit


def test_bad_mask_is_reported_from_fit_with_the_path():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="dense_1")], name="seq"
    )
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((4, 3), bool)})
    model.compile(opt, "mse")
    with raises(ValueError, "seq/dense_1/kernel", "(4, 3)", "(3, 4)") as e:
        model.fit(np.ones((4, 3)), np.ones((4, 4)), verbose=0)
    assert type(e.value) is ValueError


def test_jit_compile_must_be_a_bool():
    with raises(TypeError, "`jit_compile`", "'yes'") as excinfo:
        MaskedOptimizer(O.Adam(), jit_compile="yes")
    assert_raised_by_masked_opt(excinfo, TypeError)


# ----------------------------------------------------------------- backends


@pytest.mark.skipif(IS_TF, reason="jit_compile=True is TensorFlow's XLA path (tested in test_jit.py)")
def test_jit_compile_true_off_tensorflow_names_the_backend_and_the_alternative():
    alternative = "jit_compile=True)` (torch.compile)" if IS_TORCH else "already compiles the whole train step"
    with raises(ValueError, "`MaskedOptimizer(jit_compile=True)`", f"'{BACKEND}'", alternative,
                "drop the argument") as e:
        MaskedOptimizer(O.Adam(), jit_compile=True)
    assert_raised_by_masked_opt(e, ValueError)


def test_config_saved_with_jit_compile_loads_off_tensorflow_with_a_warning():
    config = MaskedOptimizer(O.Adam(0.1), {"dense_1/bias": False}, name="m").get_config()
    config["jit_compile"] = True  # as saved on TensorFlow
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = MaskedOptimizer.from_config(config)
    messages = [str(w.message) for w in caught]
    if IS_TF:
        assert opt.jit_compile is True and not messages
        return
    assert opt.jit_compile is False
    (message,) = messages
    for fragment in ("'m'", "`jit_compile=True`", "TensorFlow backend only", f"'{BACKEND}'", "jit_compile=False"):
        assert fragment in message, message
    opt.build(net_variables())
    assert not opt.get_mask("dense_1/bias").any()


class LossExploded(Exception):
    pass


def exploding_loss():
    """A loss that raises inside the train step (its first call is Keras's
    symbolic build of the loss, before `fit`'s loop)."""
    calls = []

    def loss(y_true, y_pred):
        calls.append(1)
        if len(calls) > 1:
            raise LossExploded("the loss exploded at step 1")
        return keras.ops.mean(keras.ops.square(y_true - y_pred))

    return loss


@pytest.mark.parametrize(
    "inner, policy",
    [
        pytest.param(lambda: O.Adam(0.1), "float32", id="plain"),
        pytest.param(lambda: O.Adam(0.1, use_ema=True), "float32", id="ema"),
        pytest.param(lambda: O.AdamW(0.1, use_ema=True), "mixed_float16", id="ema_lso"),
    ],
)
def test_an_error_inside_the_train_step_surfaces_from_fit(inner, policy):
    keras.config.set_dtype_policy(policy)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="dense_1")], name="seq")
    model.compile(MaskedOptimizer(inner(), {"dense_1/kernel": np.ones((1, 4), bool)}), exploding_loss())
    with pytest.raises(LossExploded, match="exploded at step 1"):
        model.fit(np.ones((8, 3)), np.ones((8, 4)), batch_size=4, verbose=0)


def test_numpy_gradients_are_applied_like_tensors():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=s).astype("float32") for s in [(3, 4), (4,), (4, 2)]]
    results = []
    for as_tensors in (True, False):
        variables = net_variables()
        opt = MaskedOptimizer(O.Adam(0.1), {"dense_1/kernel": np.ones((1, 4), bool)})
        opt.apply([tensor(g) if as_tensors else g for g in grads], variables)
        results.append([to_numpy(v) for v in variables])
    for a, b in zip(*results):
        assert np.array_equal(a, b)
