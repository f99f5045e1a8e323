"""The README's claims point at tests that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_test_named_in_the_readme_exists():
    # Rows name a test as `tests/test_x.py::test_name`, then `::other` for the same file.
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "COMPATIBILITY.md").read_text()
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


def test_readme_links_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:tests|benchmarks|masked_opt)/[^)#]+)\)", readme)
    assert links
    assert [p for p in links if not (ROOT / p).exists()] == []
