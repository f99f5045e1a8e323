"""The continual-learning demo, end to end at reduced size, and its command line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from masked_opt import demo  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    return demo.run(demo.DemoConfig.quick(), out=str(png), verbose=0)


def test_frozen_weights_are_bit_identical_after_task_b(quick):
    assert quick.method("(a)").frozen_unchanged is None  # nothing frozen
    assert quick.method("(b)").frozen_unchanged is True
    assert quick.method("(c)").frozen_unchanged is True


def test_freezing_forgets_less_than_full_fine_tuning(quick):
    # Seed 0, quick run, on TF / JAX / torch: forgetting 0.583 (a), 0.059 (b), 0.000 (c);
    # over seeds 0-4 (a) forgets 0.21-0.75 and (b) at most 0.06.
    a, b, c = (quick.method(k) for k in ("(a)", "(b)", "(c)"))
    assert a.forgetting > 0.2  # full fine-tuning does forget task A
    assert b.forgetting < 0.1 and b.forgetting < a.forgetting / 4
    assert c.forgetting == 0.0


def test_packnet_task_a_predictions_are_unchanged_exactly(quick):
    # Survivors and biases frozen bit-exactly, B's weights masked out for A: same accuracy.
    c = quick.method("(c)")
    assert c.acc_a_after == c.acc_a_before


def test_numbers_are_sane(quick):
    assert quick.acc_a_pretrained > 0.9
    for m in quick.methods:
        for acc in (m.acc_a_before, m.acc_a_after, m.acc_b):
            assert 0.0 <= acc <= 1.0
        assert m.acc_b > 0.7, m.name  # every method learns task B
    assert quick.method("(a)").acc_a_before == quick.acc_a_pretrained


def test_frozen_shares_match_the_configuration(quick):
    config = demo.DemoConfig.quick()
    shapes = {"hidden_0": (64, 128), "hidden_1": (128, 128), "logits": (128, 10)}
    kernels = [math.prod(s) for s in shapes.values()]
    biases = [s[-1] for s in shapes.values()]
    total = sum(kernels) + sum(biases)
    # (b): the top `fisher_frozen` share of all weights, round half up.
    fisher = math.floor(config.fisher_frozen * total + 0.5)
    assert quick.method("(b)").frozen_fraction == pytest.approx(fisher / total, abs=1e-12)
    # (c): each kernel keeps round_half_up(size * (1 - sparsity)) survivors; all biases frozen.
    survivors = sum(math.floor(n * (1 - config.packnet_sparsity) + 0.5) for n in kernels)
    assert quick.method("(c)").frozen_fraction == pytest.approx(
        (survivors + sum(biases)) / total, abs=1e-12)
    masks_c = quick.method("(c)").masks
    assert sum(int(np.count_nonzero(m)) for m in masks_c.values()) == total - survivors - sum(biases)


def test_png_and_table_are_written(quick):
    with open(quick.png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = demo.format_table(quick)
    assert "frozen weights unchanged" in table
    assert table.count("  yes") == 2
    assert "(a) full fine-tuning" in table and "n/a" in table


def test_png_keys_cover_no_bar_and_bars_carry_their_values(quick):
    fig = demo.figure(quick.methods)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars_ax = fig.axes[-1]
    bars = [p.get_window_extent(renderer) for p in bars_ax.patches]
    labels = [t for t in bars_ax.texts if t.get_text()]
    assert len(bars) == len(labels) == 3 * len(quick.methods)
    values = [v for key in ("acc_a_before", "acc_a_after", "acc_b")
              for v in (getattr(m, key) for m in quick.methods)]
    assert sorted(t.get_text() for t in labels) == sorted(f"{v:.3f}" for v in values)
    ticks = " ".join(t.get_text() for t in bars_ax.get_xticklabels())
    for m in quick.methods:
        assert f"forgetting {m.forgetting:+.3f}" in ticks
    # The mask key is a figure legend, not part of the bar chart's title; no key covers
    # a bar, a value label or a mask panel.
    assert "frozen" not in bars_ax.get_title() and "dark" not in bars_ax.get_title()
    keys = fig.legends
    assert len(keys) == 2 and [t.get_text() for t in keys[0].get_texts()] == ["trained on B", "frozen"]
    covered = bars + [t.get_window_extent(renderer) for t in labels]
    covered += [ax.get_window_extent(renderer) for ax in fig.axes]
    for key in keys:
        box = key.get_window_extent(renderer)
        assert not any(box.overlaps(b) for b in covered)
    for t in labels:  # value labels inside the axes, above their bar
        assert bars_ax.get_window_extent(renderer).contains(*t.get_window_extent(renderer).max)


def test_missing_extras_name_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(ImportError, match=r"scikit-learn.*masked_opt\[demo\]"):
        demo.run(demo.DemoConfig.quick(), out=None, verbose=0)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick"])
    assert exit_info.value.code == 2
    assert 'pip install "masked_opt[demo]"' in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--out", "--epochs", "--seed", "--verbose"):
        assert option in out


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_cli_quick_run_exits_zero_and_prints_the_proof(tmp_path):
    from test_readme import NATIVE_LOG

    # Runs under the test session's backend (KERAS_BACKEND is inherited), without
    # TF_CPP_MIN_LOG_LEVEL: no backend log lines before (or among) the demo's output.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "masked_opt", "demo", "--quick", "--epochs", "1",
         "--verbose", "0", "--out", str(tmp_path / "cli.png")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NATIVE_LOG.findall(proc.stdout + proc.stderr) == []
    table = proc.stdout.split("frozen weights unchanged", 1)[1]
    assert [line.rsplit("  ", 1)[-1] for line in table.splitlines()[2:5]] == [
        "n/a (none frozen)", "yes", "yes"]
    assert (tmp_path / "cli.png").exists()


def test_shuffled_batches_are_full_seeded_and_reshuffled_each_epoch():
    x = np.arange(10, dtype="float32")[:, None] * 2
    y = np.arange(10)
    batches = demo.shuffled_batches(x, y, 4, seed=0)
    assert len(batches) == 2  # the last, partial batch is dropped

    def epoch(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        assert all(b.shape == (4, 1) for b in xs)
        np.testing.assert_array_equal(np.concatenate(xs)[:, 0], 2 * np.concatenate(ys))
        return np.concatenate(ys)

    first = epoch(batches)
    assert len(set(first.tolist())) == 8
    np.testing.assert_array_equal(epoch(demo.shuffled_batches(x, y, 4, seed=0)), first)
    assert not np.array_equal(epoch(demo.shuffled_batches(x, y, 4, seed=1)), first)
    batches.on_epoch_end()
    assert not np.array_equal(epoch(batches), first)


def test_cli_without_command_prints_usage_and_unknown_command_fails(capsys):
    from masked_opt.__main__ import main

    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
