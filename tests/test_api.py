"""Public API of `MaskedOptimizer`: constructor, key matching, mask values,
set_mask/freeze/unfreeze/get_mask before and after build, updates from
callbacks without retracing, forwarding to the inner optimizer, mask storage."""

import numpy as np
import pytest

import keras
import masked_opt
from backends import (
    IS_JAX,
    IS_TORCH,
    XLA_MAX_ULP,
    CompiledStep,
    assert_equal_across_programs,
    assert_ulp_close,
    tensor,
    to_numpy,
)
from models import mlp
from masked_opt import MaskedOptimizer

O = keras.optimizers


# ----------------------------------------------------------------- helpers


from variables import net_variables, scoped_variable  # noqa: E402


def masked_paths(opt):
    return [v.path for v in opt.masked_variables]


def make_model():
    keras.utils.set_random_seed(0)
    return mlp(3, ("dense_1", 4), ("dense_2", 2), name="seq")


def data(n=16):
    rng = np.random.default_rng(1)
    return (
        rng.normal(size=(n, 3)).astype("float32"),
        rng.normal(size=(n, 2)).astype("float32"),
    )


def mask_variables(opt):
    return [v for v in opt.variables if v.dtype == "bool"]


# ------------------------------------------------------------- constructor


@pytest.mark.parametrize("form", ["instance", "name", "config_dict"])
def test_inner_optimizer_accepts_instance_name_and_config_dict(form):
    inner = {
        "instance": O.Adam(0.25),
        "name": "adam",
        "config_dict": O.serialize(O.Adam(0.25)),
    }[form]
    opt = MaskedOptimizer(inner)
    # isinstance: on torch, `keras.optimizers.Adam(...)` returns torch's subclass.
    assert isinstance(opt.inner_optimizer, O.Adam)
    expected = 0.001 if form == "name" else 0.25
    assert float(opt.learning_rate) == pytest.approx(expected)


def test_instance_is_wrapped_not_copied():
    inner = O.SGD(0.1)
    assert MaskedOptimizer(inner).inner_optimizer is inner


def test_name_argument_and_default_name():
    assert MaskedOptimizer("sgd", name="frozen_sgd").name == "frozen_sgd"
    assert MaskedOptimizer("sgd").name.startswith("masked_optimizer")


def test_public_surface_is_exported():
    assert masked_opt.MaskedOptimizer is MaskedOptimizer
    assert "MaskedOptimizer" in masked_opt.__all__
    assert list(masked_opt.__all__) == sorted(masked_opt.__all__)
    assert isinstance(masked_opt.__version__, str)
    assert isinstance(MaskedOptimizer("sgd"), keras.optimizers.Optimizer)
    # dir() shows the public names, submodules and privates only: no helper imported in passing.
    public = {n for n in dir(masked_opt) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(masked_opt, n)).__name__ == "module"}
    assert public - submodules <= set(masked_opt.__all__), sorted(public - submodules - set(masked_opt.__all__))


# ------------------------------------------------------------ key matching


def test_exact_path_key_selects_one_variable():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {"net/dense_1/kernel": False})
    opt.build(variables)
    assert masked_paths(opt) == ["net/dense_1/kernel"]


def test_suffix_key_matches_at_slash_boundary():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": False})
    opt.build(variables)
    assert masked_paths(opt) == ["net/dense_1/kernel"]


def test_suffix_key_does_not_match_inside_a_path_component():
    # "ense_1/kernel" is a string suffix of "net/dense_1/kernel", but not at a "/".
    opt = MaskedOptimizer(O.SGD(0.1), {"ense_1/kernel": False})
    with pytest.raises(ValueError, match="matches no trainable variable"):
        opt.build(net_variables())


def test_regex_key_uses_fullmatch_of_a_slash_bounded_suffix_or_layer():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {r".*/kernel": False})
    opt.build(variables)
    assert masked_paths(opt) == ["net/dense_1/kernel", "net/dense_2/kernel"]
    # Like plain keys, a regex matches at a "/" boundary: no ".*" prefix needed.
    opt = MaskedOptimizer(O.SGD(0.1), {r"dense_\d/kernel": False})
    opt.build(net_variables())
    assert masked_paths(opt) == ["net/dense_1/kernel", "net/dense_2/kernel"]
    # A regex of a layer selects all its variables.
    opt = MaskedOptimizer(O.SGD(0.1), {r"dense_[1]": False})
    opt.build(net_variables())
    assert masked_paths(opt) == ["net/dense_1/kernel", "net/dense_1/bias"]
    # fullmatch, not search: "ense_2" is inside "dense_2" but is no segment run.
    with pytest.raises(ValueError, match="matches no trainable variable"):
        MaskedOptimizer(O.SGD(0.1), {"ense_2": False}).build(net_variables())
    with pytest.raises(ValueError, match="matches no trainable variable"):
        MaskedOptimizer(O.SGD(0.1), {r"ense_\d": False}).build(net_variables())


def test_layer_keys_select_all_trainable_variables_of_the_layer():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="dense_1"),
         keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="dense_2")],
        name="seq",
    )
    for key in ("dense_1", "seq/dense_1", model.layers[0]):
        opt = MaskedOptimizer(O.SGD(0.1), [(key, False)])
        opt.build(model.trainable_variables)
        assert masked_paths(opt) == ["seq/dense_1/kernel", "seq/dense_1/bias"], key
    model.layers[0].trainable = False
    with pytest.raises(ValueError, match=r"layer 'dense_1'.*no trainable variables"):
        MaskedOptimizer(O.SGD(0.1), [(model.layers[0], False)]).build(model.trainable_variables)


def test_key_naming_a_non_trainable_variable_says_so():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="d")]
    )
    model.compile(optimizer=MaskedOptimizer(O.SGD(0.1), {"bn/moving_mean": False}), loss="mse")
    with pytest.raises(ValueError, match=r"non-trainable variable.*bn/moving_mean.*never update"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)


def test_exact_path_takes_priority_over_suffix():
    inner = scoped_variable(np.ones(2), "kernel", "dense")  # path "dense/kernel"
    outer = scoped_variable(np.ones(2), "kernel", "outer", "dense")  # "outer/dense/kernel"
    opt = MaskedOptimizer(O.SGD(0.1), {"dense/kernel": False})
    opt.build([outer, inner])
    assert masked_paths(opt) == ["dense/kernel"]


def test_suffix_takes_priority_over_regex():
    dotted = scoped_variable(np.ones(2), "b.k", "s")  # path "s/b.k"
    other = scoped_variable(np.ones(2), "bxk")  # "bxk": fullmatches the regex "b.k"
    opt = MaskedOptimizer(O.SGD(0.1), {"b.k": False})
    opt.build([dotted, other])
    assert masked_paths(opt) == ["s/b.k"]


def test_variable_key_in_pairs_and_in_set_mask():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), [(variables[2], False)])
    opt.set_mask(variables[1], np.array([True, False, True, False]))
    opt.build(variables)
    assert masked_paths(opt) == ["net/dense_1/bias", "net/dense_2/kernel"]
    assert not opt.get_mask(variables[2]).any()
    np.testing.assert_array_equal(opt.get_mask(variables[1]), [True, False, True, False])


def test_keys_are_resolved_at_build_not_at_construction():
    # No variable exists yet: the key is only checked when the optimizer is built.
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_2/kernel": False})
    variables = net_variables()
    opt.build(variables)
    assert masked_paths(opt) == ["net/dense_2/kernel"]


# ------------------------------------------------------------- mask values

MASK_VALUES = {
    "bool_true": (True, ()),
    "bool_false": (False, ()),
    "numpy_bool": (np.array([[True, False, True, True]]), (1, 4)),
    "list": ([[True], [False], [True]], (3, 1)),
    "int_0_1": (np.array([[1, 0, 1, 1]] * 3), (3, 4)),
    "tensor": (keras.ops.convert_to_tensor(np.array([True, False, True, False])), (4,)),
    "numpy_bool_scalar": (np.bool_(False), ()),
}


def test_mask_value_forms_resolve_to_bool_at_the_given_shape():
    for form, (value, stored_shape) in sorted(MASK_VALUES.items()):
        kernel = net_variables()[0]  # (3, 4)
        opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": value})
        opt.build([kernel])
        expected = np.broadcast_to(
            np.asarray(keras.ops.convert_to_numpy(value)).astype(bool), (3, 4)
        )
        mask = opt.get_mask(kernel)
        assert mask.dtype == np.bool_ and mask.shape == (3, 4), form
        np.testing.assert_array_equal(mask, expected, err_msg=form)
        (stored,) = mask_variables(opt)
        assert tuple(stored.shape) == stored_shape, form
        assert str(stored.dtype) == "bool", form


def test_callable_mask_is_called_with_the_variable():
    seen = []

    def rows_with_positive_sum(variable):
        seen.append(variable.path)
        return keras.ops.convert_to_numpy(variable).sum(axis=1, keepdims=True) > 0

    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {r".*kernel": rows_with_positive_sum})
    opt.build(variables)
    assert seen == ["net/dense_1/kernel", "net/dense_2/kernel"]
    for v in (variables[0], variables[2]):
        expected = np.broadcast_to(v.numpy().sum(axis=1, keepdims=True) > 0, v.shape)
        np.testing.assert_array_equal(opt.get_mask(v), expected)


def test_sgd_step_by_hand():
    # v = [[1, 2], [3, 4]], g = [[10, 20], [30, NaN]], lr = 0.1, mask = [[T, F], [T, F]]:
    # trainable column: 1 - 0.1*10 = 0 and 3 - 0.1*30 = 0; frozen column stays 2 and 4,
    # and the NaN gradient on a frozen element leaves no trace.
    v = scoped_variable([[1.0, 2.0], [3.0, 4.0]], "kernel", "d")
    opt = MaskedOptimizer(O.SGD(0.1), {"d/kernel": [[True, False]]})
    opt.apply([np.array([[10.0, 20.0], [30.0, np.nan]], "float32")], [v])
    np.testing.assert_allclose(v.numpy(), [[0.0, 2.0], [0.0, 4.0]], atol=1e-6)
    assert v.numpy()[0, 1] == np.float32(2.0) and v.numpy()[1, 1] == np.float32(4.0)


def test_unmasked_variables_follow_the_bare_inner_optimizer_bit_for_bit():
    grads = [tensor(np.random.default_rng(i).normal(size=s), "float32")
             for i, s in enumerate([(3, 4), (4,), (4, 2)])]
    bare_vars, masked_vars = net_variables(), net_variables()
    bare = O.Adam(0.05)
    opt = MaskedOptimizer(O.Adam(0.05), {"dense_1/kernel": False})
    for _ in range(3):
        bare.apply(grads, bare_vars)
        opt.apply(grads, masked_vars)
    for b, m in zip(bare_vars[1:], masked_vars[1:]):
        assert np.array_equal(b.numpy(), m.numpy())
    assert np.array_equal(masked_vars[0].numpy(), net_variables()[0].numpy())


# ---------------------------------------------- set_mask / freeze / unfreeze

WHERE_FORMS = {
    "none": None,
    "slice": np.s_[:, 1:3],
    "int_index_array": np.array([0, 2]),
    "int_list": [1],
    "bool_positions": np.array([[True, False, False, True]] * 3),
    "tuple_of_index_arrays": (np.array([0, 2]), np.array([3, 1])),
}


def where_oracle(where, value):
    mask = np.ones((3, 4), bool) if value is False else np.zeros((3, 4), bool)
    if where is None:
        mask[...] = value
    else:
        mask[where if not isinstance(where, list) else np.asarray(where)] = value
    return mask


@pytest.mark.parametrize("built", [False, True], ids=["before_build", "after_build"])
def test_freeze_and_unfreeze_where_forms(built):
    for form, where in sorted(WHERE_FORMS.items()):
        kernel = net_variables()[0]
        opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
        if built:
            opt.build([kernel])
        opt.freeze("dense_1/kernel", where)
        if not built:
            opt.build([kernel])
        np.testing.assert_array_equal(opt.get_mask(kernel), where_oracle(where, False), err_msg=form)
        opt.set_mask("dense_1/kernel", False)
        opt.unfreeze("dense_1/kernel", where)
        np.testing.assert_array_equal(opt.get_mask(kernel), where_oracle(where, True), err_msg=form)


def test_calls_before_build_are_replayed_in_order():
    kernel = net_variables()[0]
    opt = MaskedOptimizer(O.SGD(0.1))
    opt.set_mask("dense_1/kernel", np.ones((3, 4), bool))
    opt.freeze("dense_1/kernel", np.s_[:2, :])
    opt.unfreeze("dense_1/kernel", np.s_[:, 0])
    opt.freeze("dense_1/kernel", np.array([[False] * 4, [False] * 4, [True, False, False, False]]))
    expected = np.ones((3, 4), bool)
    expected[:2, :] = False
    expected[:, 0] = True
    expected[2, 0] = False
    # get_mask accepts the variable before build (string keys need a build).
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)
    opt.build([kernel])
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)


def test_freeze_then_unfreeze_restores_the_mask():
    kernel = net_variables()[0]
    start = np.random.default_rng(3).random((3, 4)) > 0.5
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": start})
    opt.build([kernel])
    opt.freeze("dense_1/kernel", np.s_[1:, 2:])
    opt.unfreeze("dense_1/kernel", np.s_[1:, 2:])
    expected = start.copy()
    expected[1:, 2:] = True
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)


def test_get_mask_is_full_shape_bool_for_masked_and_unmasked_variables():
    variables = net_variables()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/bias": False})
    opt.build(variables)
    bias_mask = opt.get_mask("dense_1/bias")
    assert bias_mask.dtype == np.bool_ and bias_mask.shape == (4,) and not bias_mask.any()
    unmasked = opt.get_mask(variables[2])
    assert unmasked.dtype == np.bool_ and unmasked.shape == (4, 2) and unmasked.all()
    # A copy: editing it does not touch the stored mask.
    bias_mask[:] = True
    assert not opt.get_mask(variables[1]).any()


def test_set_mask_after_build_takes_effect_at_the_next_step():
    kernel = net_variables()[0]
    start = kernel.numpy().copy()
    grad = np.ones((3, 4), "float32")
    opt = MaskedOptimizer(O.SGD(0.5), {"dense_1/kernel": np.ones((3, 4), bool)})
    opt.apply([grad], [kernel])
    np.testing.assert_allclose(kernel.numpy(), start - 0.5, rtol=1e-6)
    opt.freeze("dense_1/kernel")
    after_one = kernel.numpy().copy()
    opt.apply([grad], [kernel])
    assert np.array_equal(kernel.numpy(), after_one)
    opt.unfreeze("dense_1/kernel")
    opt.apply([grad], [kernel])
    np.testing.assert_allclose(kernel.numpy(), after_one - 0.5, rtol=1e-6)


# ------------------------------------------ callbacks between batches, tracing


class CountingMaskedOptimizer(MaskedOptimizer):
    """Counts Python-side calls of `apply`: once per trace of the train step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.python_applies = 0

    def apply(self, grads, trainable_variables=None):
        self.python_applies += 1
        return super().apply(grads, trainable_variables)


class Recorder(keras.callbacks.Callback):
    """Edits masks at given batches and records the first kernel around every step."""

    def __init__(self, edits_begin=None, edits_end=None):
        super().__init__()
        self.edits_begin, self.edits_end = edits_begin or {}, edits_end or {}
        self.before, self.after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        if batch in self.edits_begin:
            self.edits_begin[batch](self.model.optimizer)
        self.before.append(self.model.layers[0].kernel.numpy().copy())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self.model.layers[0].kernel.numpy().copy())
        if batch in self.edits_end:
            self.edits_end[batch](self.model.optimizer)


def test_mask_edits_from_callbacks_apply_at_the_next_batch_without_retracing():
    x, y = data(16)
    model = make_model()
    opt = CountingMaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # trace once
    traces, train_function = opt.python_applies, model.train_function
    assert traces >= 1

    rec = Recorder(
        edits_begin={
            1: lambda o: o.freeze("dense_1/kernel", np.s_[:, 0]),
            3: lambda o: (o.unfreeze("dense_1/kernel"), o.freeze("dense_1/kernel", np.s_[:, 1])),
        },
        edits_end={0: lambda o: o.freeze("dense_1/kernel", np.s_[2, :])},
    )
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[rec])

    if IS_TORCH:  # no tracing: torch's trainer calls `apply` eagerly at every step
        assert opt.python_applies == traces + 8
    else:
        assert opt.python_applies == traces
    assert model.train_function is train_function
    before, after = rec.before, rec.after
    moved = [~np.equal(a, b) for a, b in zip(after, before)]
    assert moved[0].all()  # step 0: all trainable
    # Step 1: row 2 frozen (from on_train_batch_end of step 0) and column 0.
    assert not moved[1][2].any() and not moved[1][:, 0].any() and moved[1][:2, 1:].all()
    assert not moved[2][2].any() and not moved[2][:, 0].any()
    # Step 3: everything unfrozen, then column 1 frozen.
    assert not moved[3][:, 1].any() and moved[3][:, [0, 2, 3]].all()
    # Second epoch (steps 4..7) replays the same edits.
    assert not moved[5][:, 0].any() and not moved[7][:, 1].any()


class OptimizerOnlyEdits(keras.callbacks.Callback):
    """Edits masks holding only the optimizer: it never reads `self.model`,
    which on JAX would sync the trainer's state back into the variables."""

    def __init__(self, optimizer, edits_begin, edits_end):
        super().__init__()
        self.optimizer = optimizer
        self.edits_begin, self.edits_end = edits_begin, edits_end
        self.saw_detached_masks = False

    def _edit(self, edits, batch):
        if batch in edits:
            # On JAX the trainer holds the state between batches of a fit.
            self.saw_detached_masks |= any(getattr(v, "_value", 0) is None for v in mask_variables(self.optimizer))
            edits[batch](self.optimizer)

    def on_train_batch_begin(self, batch, logs=None):
        self._edit(self.edits_begin, batch)

    def on_train_batch_end(self, batch, logs=None):
        self._edit(self.edits_end, batch)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_mask_edits_from_a_callback_holding_only_the_optimizer_reach_the_next_step(policy):
    # The fit below must equal a reference that takes the same batches one
    # `fit` at a time and edits the masks between them, outside any fit.
    keras.config.set_dtype_policy(policy)
    x, y = data(16)

    def freeze_column_0(o):
        o.freeze("dense_1/kernel", np.s_[:, 0])

    def freeze_row_2(o):
        o.freeze("dense_1/kernel", np.s_[2])

    def compiled():
        model = make_model()
        opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
        model.compile(opt, "mse")
        return model, opt

    reference, ref_opt = compiled()
    kernels = [to_numpy(reference.layers[0].kernel)]
    for batch, edit in enumerate([freeze_column_0, freeze_row_2, None, None]):
        xb, yb = x[4 * batch : 4 * batch + 4], y[4 * batch : 4 * batch + 4]
        reference.fit(xb, yb, batch_size=4, shuffle=False, verbose=0)
        kernels.append(to_numpy(reference.layers[0].kernel))
        if edit is not None:
            edit(ref_opt)

    model, opt = compiled()
    edits = OptimizerOnlyEdits(opt, edits_begin={2: freeze_row_2}, edits_end={0: freeze_column_0})
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[edits])

    if IS_JAX:
        assert edits.saw_detached_masks  # the edits went through the trainer-state sync
    for a, b in zip(model.weights, reference.weights):
        assert_equal_across_programs(to_numpy(a), to_numpy(b), err_msg=a.path)
    for a, b in zip(opt.variables, ref_opt.variables):
        assert_equal_across_programs(to_numpy(a), to_numpy(b), err_msg=a.path)
    kernel = to_numpy(model.layers[0].kernel)
    # Independent of the reference: column 0 held from step 1 on, row 2 from step 2 on.
    assert np.array_equal(kernel[:, 0], kernels[1][:, 0])
    assert np.array_equal(kernel[2], kernels[2][2])
    assert (kernel[:2, 1:] != kernels[3][:2, 1:]).all()  # the rest still trains
    expected = np.ones((3, 4), bool)
    expected[:, 0] = expected[2] = False
    np.testing.assert_array_equal(opt.get_mask(model.layers[0].kernel), expected)


def test_set_mask_after_build_takes_effect_in_the_compiled_step_without_retracing():
    # SGD(lr=0.5, weight_decay=0.1), g = 1: a trainable element goes
    # v -> v - 0.05 v - 0.5 (decay, then the step); a frozen one stays v.
    kernel = net_variables()[0]
    opt = MaskedOptimizer(O.SGD(0.5, weight_decay=0.1), {"dense_1/kernel": np.ones((3, 4), bool)})
    opt.build([kernel])
    step = CompiledStep(opt, [kernel])
    grad = tensor(np.ones((3, 4)), "float32")
    edits = [
        lambda: None,
        lambda: opt.freeze("dense_1/kernel", np.s_[:, 1]),
        lambda: (opt.unfreeze("dense_1/kernel"), opt.freeze("dense_1/kernel", np.s_[0])),
        lambda: opt.set_mask("dense_1/kernel", np.eye(3, 4, dtype=bool)),
    ]
    for edit in edits:
        edit()
        mask = opt.get_mask(kernel)
        before = to_numpy(kernel).astype(np.float64)
        step([grad])
        after = to_numpy(kernel)
        assert np.array_equal(after[~mask], before[~mask].astype("float32"))
        np.testing.assert_allclose(after[mask], (before - 0.05 * before - 0.5)[mask], rtol=1e-6, atol=1e-6)
    if not IS_TORCH:  # torch runs the update eagerly: nothing is traced
        assert step.traces() == 1


@pytest.mark.parametrize("density", [None, 0.01, 0.05, 0.5], ids=["small", "4k_1%", "4k_5%", "4k_50%"])
def test_eager_apply_and_the_compiled_step_agree_and_keep_frozen_exact(density):  # cheap: 4 cases
    # Two programs (eager op by op, and tf.function / jax.jit over
    # stateless_apply / eager torch): frozen elements exact in both, the rest
    # within XLA_MAX_ULP ulp (at each array's scale) of each other, weights
    # and optimizer state; at small and realistic sizes (>= 4,096 elements).
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (4,), (4, 2)] if density is None else [(64, 96), (4096,), (96, 64)]
    mask = rng.random(shapes[0]) < (density or 0.5)
    grads = [[tensor(rng.normal(size=s), "float32") for s in shapes] for _ in range(3)]
    runs = []
    for compiled in (False, True):
        init = np.random.default_rng(0)
        variables = [scoped_variable(init.normal(size=s), n, "net", layer)
                     for s, (layer, n) in zip(shapes, [("dense_1", "kernel"), ("dense_1", "bias"), ("dense_2", "kernel")])]
        start = [to_numpy(v) for v in variables]
        opt = MaskedOptimizer(O.AdamW(0.05, weight_decay=0.1), {"dense_1/kernel": mask, "dense_1/bias": False})
        opt.build(variables)
        step = CompiledStep(opt, variables) if compiled else (lambda g, o=opt, vs=variables: o.apply(g, vs))
        for g in grads:
            step(g)
        now = [to_numpy(v) for v in variables]
        assert np.array_equal(now[0][~mask], start[0][~mask])
        assert np.array_equal(now[1], start[1])
        assert (now[0][mask] != start[0][mask]).all() and (now[2] != start[2]).all()
        runs.append(now + [to_numpy(v) for v in opt.variables])
    for a, b in zip(*runs):
        assert_ulp_close(a, b, XLA_MAX_ULP)


def test_learning_rate_is_forwarded_to_the_inner_optimizer():
    inner = O.Adam(0.01)
    opt = MaskedOptimizer(inner)
    assert float(opt.learning_rate) == pytest.approx(0.01)
    opt.learning_rate = 0.5
    assert float(inner.learning_rate) == pytest.approx(0.5)
    assert float(opt.learning_rate) == pytest.approx(0.5)


def fit_pair(callback_factory, epochs=3, inner=lambda: O.SGD(0.1, momentum=0.5)):
    """Trains a bare and a masked (all-True) model with the same callback."""
    x, y = data(16)
    results = []
    for wrap in (False, True):
        model = make_model()
        opt = MaskedOptimizer(inner(), {"dense_1/kernel": True}) if wrap else inner()
        model.compile(opt, "mse")
        history = model.fit(
            x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
            callbacks=[callback_factory()],
        )
        results.append((model, opt, history))
    return results


def test_learning_rate_scheduler_changes_the_inner_learning_rate():
    (bare, bare_opt, _), (model, opt, history) = fit_pair(
        lambda: keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 * 0.5**epoch)
    )
    assert float(opt.inner_optimizer.learning_rate) == pytest.approx(0.025)
    assert float(opt.learning_rate) == pytest.approx(0.025)
    assert history.history["learning_rate"][-1] < 0.1
    for a, b in zip(bare.weights, model.weights):
        assert np.array_equal(a.numpy(), b.numpy())


def test_reduce_lr_on_plateau_changes_the_inner_learning_rate():
    x, y = data(16)
    model = make_model()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((1, 4), bool)})
    model.compile(opt, "mse")
    # min_delta=1e9: no epoch after the first counts as an improvement -> halve each time.
    plateau = keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0, min_delta=1e9)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[plateau])
    assert float(opt.inner_optimizer.learning_rate) == pytest.approx(0.025)
    assert float(opt.learning_rate) == pytest.approx(0.025)
    assert history.history["learning_rate"][-1] < 0.1


def test_iterations_is_the_inner_optimizers_counter():
    x, y = data(16)
    model = make_model()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/bias": False})
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert int(opt.iterations) == 8
    assert int(opt.inner_optimizer.iterations) == 8
    assert opt.iterations is opt.inner_optimizer.iterations


def adamw_oracle(value, grads, lr, wd, decay, b1=0.9, b2=0.999, eps=1e-7):
    """Keras AdamW in float64: decay `v -= v*wd*lr`, then the Adam step."""
    v, m, s = np.asarray(value, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        if decay:
            v = v - v * wd * lr
        m = m + (g - m) * (1 - b1)
        s = s + (g * g - s) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        v = v - alpha * m / (np.sqrt(s) + eps)
    return v


def test_exclude_from_weight_decay_is_forwarded_numerically():
    rng = np.random.default_rng(5)
    kernel = scoped_variable(rng.normal(size=(3, 4)), "kernel", "dense")
    bias = scoped_variable(rng.normal(size=(4,)) + 2.0, "bias", "dense")
    k0, b0 = kernel.numpy().copy(), bias.numpy().copy()
    grads = [(rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32"))
             for _ in range(3)]
    lr, wd = 0.1, 0.5
    kernel_mask = np.array([[True, False, True, True]])
    opt = MaskedOptimizer(
        O.AdamW(lr, weight_decay=wd),
        {"dense/kernel": kernel_mask, "dense/bias": True},  # bias trainable, through the mask path
    )
    opt.exclude_from_weight_decay(var_names=["bias"])
    for gk, gb in grads:
        opt.apply([gk, gb], [kernel, bias])

    bias_no_decay = adamw_oracle(b0, [g[1] for g in grads], lr, wd, decay=False)
    bias_decayed = adamw_oracle(b0, [g[1] for g in grads], lr, wd, decay=True)
    np.testing.assert_allclose(bias.numpy(), bias_no_decay, rtol=1e-5, atol=1e-5)
    assert not np.allclose(bias.numpy(), bias_decayed, rtol=1e-3)  # the oracle can tell

    kernel_decayed = adamw_oracle(k0, [g[0] for g in grads], lr, wd, decay=True)
    cols = kernel_mask[0]
    np.testing.assert_allclose(kernel.numpy()[:, cols], kernel_decayed[:, cols], rtol=1e-5, atol=1e-5)
    assert np.array_equal(kernel.numpy()[:, ~cols], k0[:, ~cols])


def test_scale_loss_is_forwarded_and_fit_matches_the_bare_optimizer():
    opt = MaskedOptimizer(O.SGD(0.1, loss_scale_factor=4.0))
    assert float(opt.scale_loss(2.0)) == 8.0
    (bare, _, _), (model, _, _) = fit_pair(
        lambda: keras.callbacks.Callback(), epochs=1,
        inner=lambda: O.SGD(0.1, loss_scale_factor=4.0),
    )
    for a, b in zip(bare.weights, model.weights):
        assert np.array_equal(a.numpy(), b.numpy())


def test_finalize_variable_values_keeps_frozen_elements_after_ema_swap():
    rng = np.random.default_rng(2)
    grads = [tensor(rng.normal(size=(3, 4)), "float32") for _ in range(4)]
    mask = rng.random((3, 4)) > 0.5
    bare_kernel, kernel = net_variables()[0], net_variables()[0]
    start = kernel.numpy().copy()
    bare = O.Adam(0.05, use_ema=True, ema_momentum=0.7)
    opt = MaskedOptimizer(O.Adam(0.05, use_ema=True, ema_momentum=0.7), {"dense_1/kernel": mask})
    for g in grads:
        bare.apply([g], [bare_kernel])
        opt.apply([g], [kernel])
    bare.finalize_variable_values([bare_kernel])
    opt.finalize_variable_values([kernel])
    assert np.array_equal(kernel.numpy()[~mask], start[~mask])
    assert np.array_equal(kernel.numpy()[mask], bare_kernel.numpy()[mask])
    assert not np.array_equal(kernel.numpy()[mask], start[mask])


def test_fit_with_ema_keeps_frozen_elements_exact():
    x, y = data(16)
    model = make_model()
    start = model.layers[0].kernel.numpy().copy()
    opt = MaskedOptimizer(
        O.AdamW(0.05, use_ema=True, ema_momentum=0.9), {"dense_1/kernel": np.array([[True, True, False, False]])}
    )
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # fit calls finalize_variable_values
    kernel = model.layers[0].kernel.numpy()
    assert np.array_equal(kernel[:, 2:], start[:, 2:])
    assert (kernel[:, :2] != start[:, :2]).all()


# ------------------------------------------------------------------ memory


def test_masks_are_stored_as_bool_at_the_shape_given():
    variables = net_variables()
    opt = MaskedOptimizer(
        O.Adam(0.1),
        {
            "dense_1/kernel": np.ones((1, 4), bool),
            "dense_1/bias": False,
            "dense_2/kernel": np.ones((4, 2), bool),
        },
    )
    opt.build(variables)
    stored = mask_variables(opt)
    assert [str(v.dtype) for v in stored] == ["bool"] * 3
    assert sorted(tuple(v.shape) for v in stored) == [(), (1, 4), (4, 2)]
    assert all(any(v is w for w in opt.variables) for v in stored)
    assert set(masked_paths(opt)) == {"net/dense_1/kernel", "net/dense_1/bias", "net/dense_2/kernel"}
    # Inner state is part of `variables` too (own first, then inner).
    inner = opt.inner_optimizer.variables
    assert opt.variables[-len(inner):] == inner


def test_column_freeze_after_build_keeps_the_column_storage_shape():
    kernel = net_variables()[0]
    start = kernel.numpy().copy()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/kernel": np.ones((1, 4), bool)})
    opt.build([kernel])
    opt.freeze("dense_1/kernel", np.s_[:, 2:4])
    (stored,) = mask_variables(opt)
    assert tuple(stored.shape) == (1, 4)
    np.testing.assert_array_equal(stored.numpy(), [[True, True, False, False]])
    expected = np.zeros((3, 4), bool)
    expected[:, :2] = True
    np.testing.assert_array_equal(opt.get_mask(kernel), expected)
    opt.apply([np.ones((3, 4), "float32")], [kernel])
    assert np.array_equal(kernel.numpy()[:, 2:], start[:, 2:])
    assert (kernel.numpy()[:, :2] != start[:, :2]).all()


def test_scalar_mask_stays_scalar_after_freeze_and_unfreeze():
    bias = net_variables()[1]
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/bias": True})
    opt.build([bias])
    opt.freeze("dense_1/bias")
    opt.unfreeze("dense_1/bias")
    opt.freeze("dense_1/bias")
    (stored,) = mask_variables(opt)
    assert tuple(stored.shape) == () and not bool(stored.numpy())


def test_whole_variable_freeze_from_a_callback_with_a_scalar_mask():
    x, y = data(16)
    model = make_model()
    opt = MaskedOptimizer(O.SGD(0.1), {"dense_1/bias": True})
    model.compile(opt, "mse")
    rec = Recorder(edits_begin={2: lambda o: o.freeze("dense_1/bias")})
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[rec])
    assert not opt.get_mask("dense_1/bias").any()


def test_built_variables_and_mask_storage_shape_report_what_build_fixed():
    kernel, bias, other = net_variables()
    opt = MaskedOptimizer(
        O.SGD(0.1),
        masks={"dense_1/kernel": np.ones((1, 4), bool), "dense_1/bias": False},
    )
    assert opt.built_variables == []
    opt.build([kernel, bias, other])
    assert [v.path for v in opt.built_variables] == [kernel.path, bias.path, other.path]
    assert opt.mask_storage_shape(kernel) == (1, 4)
    assert opt.mask_storage_shape(bias) == ()
    assert opt.mask_storage_shape(other) is None
