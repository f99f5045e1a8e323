"""Inspection: mask_summary numbers and the plot_masks PNG."""

import dataclasses
import sys

import numpy as np
import pytest

import keras
from models import mlp, small_masked
from masked_opt import MaskedOptimizer
from masked_opt import masks as M
from masked_opt import summary as S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model():
    # kernel (4, 3), bias (3,), kernel_1 (3, 2), bias_1 (2,): 23 elements
    return mlp(4, 3, 2)


# -------------------------------------------------------------------- summary


def test_mask_summary_counts_every_built_variable():
    _, opt = small_masked({"dense/kernel": M.rows([0]), "dense/bias": False})
    s = S.mask_summary(opt)
    assert [(r.path, r.shape, r.trainable, r.frozen, r.masked) for r in s.rows] == [
        ("sequential/dense/kernel", (4, 3), 3, 9, True),  # row 0 of 4 rows of 3
        ("sequential/dense/bias", (3,), 0, 3, True),
        ("sequential/dense_1/kernel", (3, 2), 6, 0, False),  # unmasked: all trainable
        ("sequential/dense_1/bias", (2,), 2, 0, False),
    ]
    assert [r.trainable_pct for r in s.rows] == [25.0, 0.0, 100.0, 100.0]
    assert (s.trainable, s.frozen, s.total) == (11, 12, 23)
    assert s.trainable_pct == pytest.approx(100 * 11 / 23)
    assert s.rows[0].total == 12


def test_mask_summary_follows_freeze_after_build():
    _, opt = small_masked({"dense/kernel": np.ones((4, 3), bool)})
    opt.freeze("dense/kernel", np.s_[1:, 0])
    assert S.mask_summary(opt).rows[0].frozen == 3


def test_mask_summary_is_frozen_dataclass():
    _, opt = small_masked({"dense/kernel": True})
    s = S.mask_summary(opt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.total = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rows[0].frozen = 1


def test_mask_summary_unwraps_loss_scale_optimizer():
    model = _model()
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/bias": False})
    lso = keras.optimizers.LossScaleOptimizer(opt)
    lso.build(model.trainable_variables)
    assert S.mask_summary(lso) == S.mask_summary(opt)
    assert S.mask_summary(lso).frozen == 3


def test_mask_summary_rejects_unbuilt_or_foreign_optimizer():
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/bias": False})
    with pytest.raises(ValueError, match="not built yet.*optimizer.build.*model.fit"):
        S.mask_summary(opt)
    with pytest.raises(TypeError, match="needs a MaskedOptimizer.*Received: SGD"):
        S.mask_summary(keras.optimizers.SGD(0.1))


def test_print_mask_summary_total_line_is_peft_style():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, use_bias=False)])
    opt = MaskedOptimizer(keras.optimizers.SGD(0.1), masks={"dense/kernel": M.columns(range(48))})
    opt.build(model.trainable_variables)
    lines = []
    S.print_mask_summary(opt, print_fn=lines.append)
    text = lines[0].splitlines()
    assert text[-1] == "trainable: 3,072 || frozen: 1,024 || total: 4,096 || trainable%: 75.00"
    assert text[0].split() == ["variable", "shape", "mask", "trainable", "frozen", "trainable%"]
    lines2 = []
    S.print_mask_summary(S.mask_summary(opt), print_fn=lines2.append)  # a summary works too
    assert lines2 == lines


def test_mask_summary_masked_only_keeps_rows_with_a_frozen_element():
    # dense/kernel: all-True mask (masked, nothing frozen) -> left out; totals still count all.
    _, opt = small_masked({"dense/kernel": True, "dense_1/kernel": M.columns([1])})
    s = S.mask_summary(opt, masked_only=True)
    assert [(r.path, r.trainable, r.frozen) for r in s.rows] == [
        ("sequential/dense_1/kernel", 3, 3),  # column 1 of (3, 2)
    ]
    assert (s.trainable, s.frozen, s.total, s.hidden, s.masked_only) == (20, 3, 23, 3, True)
    text = S.format_mask_summary(s).splitlines()
    assert len(text) == 2 + 1 + 1 + 2  # header, rule, 1 row, rule, shown-line, totals
    assert text[-2] == "1 of 4 variables shown (those with a frozen element)"
    assert text[-1] == "trainable: 20 || frozen: 3 || total: 23 || trainable%: 86.96"
    assert S.mask_summary(opt).hidden == 0 and len(S.mask_summary(opt).rows) == 4


def test_mask_summary_by_layer_sums_each_layers_variables():
    _, opt = small_masked({"dense/kernel": M.rows([0]), "dense_1/bias": False})
    s = S.mask_summary(opt, by="layer")
    assert s.by == "layer"
    assert [(r.path, r.shape, r.variables, r.trainable, r.frozen, r.masked) for r in s.rows] == [
        ("sequential/dense", None, 2, 3 + 3, 9, True),  # kernel row 0 (3) + bias (3)
        ("sequential/dense_1", None, 2, 6, 2, True),  # kernel (6) + bias frozen (2)
    ]
    assert [r.trainable_pct for r in s.rows] == [pytest.approx(40.0), pytest.approx(75.0)]
    assert (s.trainable, s.frozen, s.total) == (12, 11, 23)
    text = S.format_mask_summary(s).splitlines()
    assert text[0].split() == ["layer", "variables", "mask", "trainable", "frozen", "trainable%"]
    assert text[2].split() == ["sequential/dense", "2", "yes", "6", "9", "40.00"]
    assert len(text) == 2 + 2 + 2


def test_summary_shows_update_multipliers_and_masked_only_keeps_them():
    model = _model()
    opt = MaskedOptimizer(
        keras.optimizers.SGD(0.1),
        masks={"dense_1/bias": False},
        multipliers={"dense/kernel": np.array([[0.5, 1.0, 2.0]]), "dense/bias": 1.0},
    )
    opt.build(model.trainable_variables)
    s = S.mask_summary(opt)
    assert [r.multiplier for r in s.rows] == [(0.5, 2.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]
    text = S.format_mask_summary(s).splitlines()
    assert text[0].split()[-1] == "mult"
    assert text[2].split()[-1] == "0.5–2" and text[3].split()[-1] == "1"
    # masked_only: a frozen element or a multiplier other than 1 (dense/bias at 1 is left out).
    only = S.mask_summary(opt, masked_only=True)
    assert [r.path for r in only.rows] == ["sequential/dense/kernel", "sequential/dense_1/bias"]
    footer = S.format_mask_summary(only).splitlines()[-2]
    assert footer == "2 of 4 variables shown (those with a frozen element or a multiplier other than 1)"
    layers = S.mask_summary(opt, by="layer")
    assert [r.multiplier for r in layers.rows] == [(0.5, 2.0), (1.0, 1.0)]


def test_print_mask_summary_passes_masked_only_and_by():
    _, opt = small_masked({"dense_1/bias": False})
    lines = []
    S.print_mask_summary(opt, print_fn=lines.append, masked_only=True, by="layer")
    text = lines[0].splitlines()
    assert text[2].split() == ["sequential/dense_1", "2", "yes", "6", "2", "75.00"]
    assert text[-2] == "1 of 2 layers shown (those with a frozen element)"
    with pytest.raises(ValueError, match=r"MaskSummary is printed as it is.*mask_summary\(optimizer"):
        S.print_mask_summary(S.mask_summary(opt), masked_only=True)
    with pytest.raises(ValueError, match=r'`by` must be "variable" or "layer". Received: by=\'layers\''):
        S.mask_summary(opt, by="layers")
    with pytest.raises(TypeError, match="`masked_only` must be a bool"):
        S.mask_summary(opt, masked_only="yes")


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_mask_summary_views_of_mobilenet_v2_match_numpy_counts():
    # 158 trainable variables; freeze the 16 `block_N_expand` kernels (regex key)
    # and 70 % of Conv1's kernel (a NumPy mask), then count independently.
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    conv1 = np.random.default_rng(0).random((3, 3, 3, 32)) < 0.3
    opt = MaskedOptimizer(
        keras.optimizers.SGD(0.1), masks={r"block_\d+_expand/kernel": False, "Conv1/kernel": conv1}
    )
    opt.build(model.trainable_variables)
    expected_frozen = {}  # path -> frozen count, from shapes and the NumPy mask only
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        if v.path == "Conv1/kernel":
            expected_frozen[v.path] = int((~conv1).sum())
        elif v.path.startswith("block_") and v.path.endswith("_expand/kernel"):
            expected_frozen[v.path] = size
        else:
            expected_frozen[v.path] = 0
    sizes = {v.path: int(np.prod(v.shape)) for v in model.trainable_variables}
    total, frozen = sum(sizes.values()), sum(expected_frozen.values())

    full = S.mask_summary(opt)
    assert len(full.rows) == len(model.trainable_variables) == 158
    only = S.mask_summary(opt, masked_only=True)
    assert len(only.rows) == 17 and only.hidden == 158 - 17
    assert {r.path: r.frozen for r in only.rows} == {
        p: n for p, n in expected_frozen.items() if n}
    for s in (full, only):
        assert (s.total, s.frozen, s.trainable) == (total, frozen, total - frozen)

    layers = S.mask_summary(opt, by="layer")
    expected_layers = {}
    for path, n in expected_frozen.items():
        layer = path.rsplit("/", 1)[0]
        t, f, k = expected_layers.get(layer, (0, 0, 0))
        expected_layers[layer] = (t + sizes[path] - n, f + n, k + 1)
    assert {r.path: (r.trainable, r.frozen, r.variables) for r in layers.rows} == expected_layers
    assert len(layers.rows) == len(expected_layers) == 52 + 52 + 1  # convs, BatchNorms, head
    layers_only = S.mask_summary(opt, masked_only=True, by="layer")
    assert [r.path for r in layers_only.rows] == ["Conv1"] + [
        f"block_{i}_expand" for i in range(1, 17)]
    assert layers_only.rows[0].frozen == int((~conv1).sum())
    assert layers_only.rows[0].trainable_pct == pytest.approx(100 * conv1.mean())
    assert len(S.format_mask_summary(layers_only).splitlines()) == 2 + 17 + 3


# ----------------------------------------------------------------------- plot


def test_plot_masks_writes_png(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(700),
        ]  # kernel (48, 700): downsampled along the last axis
    )
    opt = MaskedOptimizer(
        keras.optimizers.SGD(0.1),
        masks={
            "conv2d/kernel": M.random(0.3, seed=0),
            "dense/kernel": M.columns([1]),
            "dense/bias": False,
        },
    )
    opt.build(model.trainable_variables)
    out = S.plot_masks(opt, str(tmp_path / "masks.png"), max_side=256)
    data = open(out, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_masks_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    _, opt = small_masked({"dense/kernel": True})
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "masked_opt\[plot\]"'):
        S.plot_masks(opt, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_plot_masks_needs_a_masked_variable(tmp_path):
    _, opt = small_masked(None)
    with pytest.raises(ValueError, match="no masked variables"):
        S.plot_masks(opt, str(tmp_path / "x.png"))


def test_as_2d_keeps_last_axis_as_columns():
    assert S.as_2d(np.ones((), bool)).shape == (1, 1)
    assert S.as_2d(np.ones(5, bool)).shape == (1, 5)
    assert S.as_2d(np.ones((3, 4), bool)).shape == (3, 4)
    conv = np.zeros((2, 3, 4, 5), bool)
    conv[..., 1] = True
    flat = S.as_2d(conv)
    assert flat.shape == (24, 5) and np.array_equal(flat.all(axis=0), [0, 1, 0, 0, 0])


def test_downsample_shows_trainable_share_per_block():
    grid = np.zeros((1, 10), bool)
    grid[0, [0, 1, 2, 3, 9]] = True
    # blocks of 3: [0:3] -> 1, [3:6] -> 1/3, [6:9] -> 0, [9:10] (padding ignored) -> 1
    np.testing.assert_allclose(S._downsample(grid, 4), [[1, 1 / 3, 0, 1]], rtol=1e-6)
