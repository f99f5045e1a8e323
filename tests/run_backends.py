"""Runs the whole test suite once per Keras backend: TensorFlow, JAX, torch.

    python tests/run_backends.py                      # all three
    python tests/run_backends.py --backends jax -x    # one backend, extra pytest args

Keras picks its backend once per process (`KERAS_BACKEND`), so each backend
gets its own pytest process. Exits non-zero if any run fails, and ends with
one summary line over all runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ALL = ("tensorflow", "jax", "torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(ALL), help="comma-separated subset of %(default)s")
    args, pytest_args = parser.parse_known_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(ALL))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {list(ALL)}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_runs = []
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", *pytest_args],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        last = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last = line
        code = proc.wait()
        for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last):
            totals["error" if word.startswith("error") else word] += int(count)
        print(f"===== {backend}: exit {code} in {time.perf_counter() - start:.0f} s =====", flush=True)
        if code != 0:
            failed_runs.append(backend)
    print(f"\nbackends: {', '.join(backends)}; failed runs: {', '.join(failed_runs) or 'none'}")
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
