"""The README's claims point at tests that exist."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _docs() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_every_test_named_in_the_docs_exists():
    # Rows name a test as `tests/test_x.py::test_name`, then `::other` for the same file.
    readme = _docs()
    named, missing = 0, []
    for line in readme.splitlines():
        current = None
        for m in re.finditer(r"`(tests/\w+\.py)?::(\w+)`", line):
            current = m.group(1) or current
            assert current is not None, f"no file before ::{m.group(2)} in: {line[:80]}"
            named += 1
            if not re.search(rf"^def {m.group(2)}\(", (ROOT / current).read_text(), re.M):
                missing.append(f"{current}::{m.group(2)}")
    assert named > 30
    assert missing == []


def test_readme_and_docs_link_to_files_that_exist():
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / link).exists():
                missing.append(f"{page.name}: {link}")
    assert missing == []


def _recipe_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0].split("\n### KerasHub", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_recipes_run(tmp_path, monkeypatch, capsys):
    """The Recipes section runs top to bottom (one namespace, as a reader pastes it)."""
    blocks = _recipe_blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Recipes)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "[ True  True False False]" in out  # the reloaded model's mask
    assert "encoder/kernel" in out  # the listed paths
    assert "[20, 1, 5, 1]" in out  # a random 2 % of every weight: round(0.02 * size), at least 1
    # The warm-unfreezing ramp ended at 1 for both layers.
    opt = namespace["opt"]
    assert all((opt.get_multiplier(k) == 1.0).all() for k in ("d1/kernel", "d2/bias"))


# TensorFlow's C++ log (`I0000 00:00:...  port.cc:153] oneDNN ...`, the absl
# pre-init warning, `E0000 ... cuInit`), which the CLI quiets for its process.
NATIVE_LOG = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+|absl::InitializeLog|oneDNN|cuInit|cuda drivers", re.MULTILINE
)


def _fenced_blocks(heading: str) -> list[tuple[str, str]]:
    """`(language, text)` of each fenced block in the README section under `heading`."""
    section = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_quick_example_prints_its_documented_output():
    # In a fresh interpreter, on the session's backend.
    (lang, code), (_, documented) = _fenced_blocks("## Quick example")[:2]
    assert lang == "python" and documented.startswith("True True\n")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == documented
    assert not re.search(r"\w+Warning: ", proc.stderr), proc.stderr[-3000:]  # no warning from us


@pytest.mark.slow  # left to `--rest` by the quick tier (tests/conftest.py)
def test_importing_masked_opt_changes_nothing_in_the_process():
    # No environment variable set, no file descriptor redirected (stderr stays
    # the user's: TensorFlow's own start-up log, if any, is not ours to hide).
    # Compared with importing Keras alone, in fresh interpreters (TensorFlow
    # itself sets TF_CPP_MIN_LOG_LEVEL when it loads).
    def effects(module):
        code = (
            "import os; calls = []; real = os.dup2\n"
            "os.dup2 = lambda *a, **k: (calls.append(a), real(*a, **k))[1]\n"
            f"import {module}\n"
            "print(calls, os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
        )
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip()

    assert effects("masked_opt") == effects("keras")
    assert effects("masked_opt").startswith("[] ")
