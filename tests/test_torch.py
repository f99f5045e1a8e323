"""torch specifics: `model.compile(jit_compile=True)` (torch.compile) and host syncs.

On torch a stateful `cond` is a Python `if tensor:`: a host sync every step and
a graph break under torch.compile. MaskedOptimizer has no conditionals off
TensorFlow, so under torch.compile it adds no graph break and no recompile to
the bare optimizer's, and in eager mode it reads no tensor back to the host
(but once per mask edit: how many elements the edited mask freezes).
"""

import numpy as np
import pytest

import keras
from backends import pack_masks_from, to_numpy, torch_only
from masked_opt import MaskedOptimizer

pytestmark = torch_only

ELEM = np.random.default_rng(0).random((16, 32)) < 0.5


def _model(masked: bool, jit_compile: bool):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(32, name="d1"), keras.layers.Dense(4, name="out")]
    )
    inner = keras.optimizers.AdamW(1e-2, weight_decay=0.1)
    opt = (
        MaskedOptimizer(inner, {"d1/kernel": ELEM, "d1/bias": False}, multipliers={"out/kernel": 0.5})
        if masked
        else inner
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=jit_compile)
    return model


def _data():
    rng = np.random.default_rng(1)
    return rng.random((64 * 3, 16)).astype("float32"), rng.random((64 * 3, 4)).astype("float32")


def _compiled_fit(masked: bool):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(masked, jit_compile=True)
    start = [to_numpy(v) for v in model.trainable_variables]
    x, y = _data()
    model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    stats = {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()),
    }
    return model, start, stats


@pytest.mark.parametrize("packed", [False, True], ids=["bool-mask", "bit-packed-mask"])
def test_torch_compile_adds_no_graph_break_or_recompile(packed, monkeypatch):
    # A compiled step reads the bit-packed copy of a mask that has one.
    pack_masks_from(monkeypatch, 1 if packed else 1 << 40)
    _, _, bare = _compiled_fit(masked=False)
    model, start, masked = _compiled_fit(masked=True)
    assert model.optimizer.inspect().variable("d1/kernel").packed_mask == packed
    # Stock Keras's torch train step breaks the graph at `loss.backward()`;
    # the masked optimizer must add nothing on top of that.
    assert masked == bare, (masked, bare)
    end = [to_numpy(v) for v in model.trainable_variables]
    assert np.array_equal(end[0][~ELEM], start[0][~ELEM])
    assert np.array_equal(end[1], start[1])
    assert np.any(end[0][ELEM] != start[0][ELEM]) and np.any(end[2] != start[2])
    # Same training as eager within float tolerance (inductor fuses differently).
    eager = _model(masked=True, jit_compile=False)
    x, y = _data()
    eager.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    for e, c in zip(eager.trainable_variables, end):
        np.testing.assert_allclose(c, to_numpy(e), rtol=1e-5, atol=1e-6)


HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")


def _watch_host_reads(monkeypatch, calls: list) -> None:
    import torch

    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)


def test_eager_step_reads_nothing_back_to_the_host(monkeypatch):
    import torch

    variables = [keras.Variable(np.ones((16, 32), "float32"), name="k"),
                 keras.Variable(np.ones((32,), "float32"), name="b")]
    opt = MaskedOptimizer(
        keras.optimizers.Adam(0.1, use_ema=True),
        [(variables[0], ELEM), (variables[1], True)],
        multipliers=[(variables[1], np.linspace(0, 2, 32, dtype="float32"))],
    )
    grads = [torch.ones((16, 32)), torch.ones((32,))]
    opt.apply(grads, variables)  # build outside the watch
    calls = []
    _watch_host_reads(monkeypatch, calls)
    for _ in range(3):
        opt.apply(grads, variables)
    monkeypatch.undo()
    assert calls == []
    assert np.array_equal(to_numpy(variables[0])[~ELEM], np.ones((16, 32), "float32")[~ELEM])
    # After a mask edit the first step looks at the new mask once (what it
    # freezes: few elements here, restored by position); later steps do not.
    few_frozen = np.ones((16, 32), bool)
    few_frozen[3, 5] = False
    opt.set_mask("k", few_frozen)
    at_edit = to_numpy(variables[0])[3, 5]
    opt.apply(grads, variables)
    _watch_host_reads(monkeypatch, calls)
    for _ in range(3):
        opt.apply(grads, variables)
    monkeypatch.undo()
    assert calls == []
    assert to_numpy(variables[0])[3, 5] == at_edit
    assert np.all(np.delete(to_numpy(variables[0]).ravel(), 3 * 32 + 5) != 1.0)


def test_eager_integer_masking_and_restore_match_numpy_where():
    """The eager gradient masking and the restore (0/1 integers on the
    floats' integer views) equal `np.where` bit for bit, for one restore over
    variables of several sizes, in either order, of two float widths, with
    full, broadcast and small masks; NaN payloads, infinities, signed zeros
    and subnormals included."""
    import torch

    from masked_opt import _backend

    rng = np.random.default_rng(3)
    bits = {"float16": np.uint16, "float32": np.uint32}
    shapes = [((64, 64), "float32", (64, 64)), ((100, 90), "float32", (100, 90)), ((8, 8), "float32", (8, 8)),
              ((128, 64), "float16", (128, 64)), ((48, 96), "float32", (1, 96)), ((5000,), "float32", (5000,))]
    for order in (shapes, shapes[::-1]):
        items, expected = [], []
        for shape, dtype, mask_shape in order:
            n = int(np.prod(shape))
            special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40], dtype)
            new = np.concatenate([rng.standard_normal(n - len(special)).astype(dtype), special]).reshape(shape)
            old = rng.standard_normal(shape).astype(dtype)
            old.reshape(-1)[:len(special)] = special[::-1]
            mask = rng.random(mask_shape) < 0.5
            grad = _backend.mask_gradient(torch.from_numpy(new.copy()), torch.from_numpy(mask), shape)
            want_grad = np.where(mask, new, np.zeros((), dtype))
            assert np.array_equal(grad.numpy().view(bits[dtype]), want_grad.view(bits[dtype])), shape
            variable = keras.Variable(new, dtype=dtype)
            items.append((variable, torch.from_numpy(mask), torch.from_numpy(old)))
            expected.append(np.where(mask, new, old))
        _backend.restore_frozen(items)
        for (variable, _, _), want, (shape, dtype, _) in zip(items, expected, order):
            got = to_numpy(variable)
            assert np.array_equal(got.view(bits[dtype]), want.view(bits[dtype])), (shape, dtype)
