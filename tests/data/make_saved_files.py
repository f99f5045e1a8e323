"""Writes the saved-file fixtures of `tests/test_saved_format.py`.

    KERAS_BACKEND=tensorflow python tests/data/make_saved_files.py

Run once, with masked_opt 0.1.0 as it was before the redesign of issue 14
(commit e8871db), to freeze the file format: the `.keras` files here were
written by that code (`saved_<case>.keras`), and so were the files it wrote
after loading them back (`saved_<case>_resaved.keras`: a reloaded
Sequential drops its own name from variable paths). The test checks that
today's code loads the first and, saving them again, writes the second:
the same config and the same datasets, bit for bit.
Do not regenerate them to make a failing test pass: a difference is a change
of the saved format.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (for saved_format_cases)

from saved_format_cases import CASES  # noqa: E402


def main() -> None:
    import keras

    import masked_opt

    print("masked_opt from", os.path.dirname(masked_opt.__file__), "backend", keras.backend.backend())
    for name, build in CASES.items():
        path = os.path.join(HERE, f"saved_{name}.keras")
        build().save(path)
        keras.models.load_model(path).save(path.replace(".keras", "_resaved.keras"))
        print("wrote", path, "and its _resaved twin")


if __name__ == "__main__":
    main()
