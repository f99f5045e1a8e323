"""Runs the test suite once per installed Keras backend: TensorFlow, JAX, torch.

    python tests/run_backends.py                      # the quick tier, every installed backend
    python tests/run_backends.py --full               # everything (CI: quick, then --rest)
    python tests/run_backends.py --rest               # what the quick tier leaves out
    python tests/run_backends.py --backends jax -x    # one backend, extra pytest args

The quick tier (tests/conftest.py) keeps every test function of every module
and a spread sample of each parametrized family, so every module and every
backend's exactness is exercised in a few minutes; `--rest` runs exactly the
cases it leaves out. Keras picks its backend once per process
(`KERAS_BACKEND`), so each backend gets its own pytest process. A backend that
is not installed is skipped and said so. Exits non-zero if any run fails,
and ends with one summary line over all runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

ALL = ("tensorflow", "jax", "torch")
INSTALL = {
    "tensorflow": 'pip install -e ".[tensorflow]"',
    "jax": 'pip install -e ".[jax]"',
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu  (CPU wheel; or .[torch])",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(ALL), help="comma-separated subset of %(default)s")
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="run every test")
    tier.add_argument("--rest", dest="tier", action="store_const", const="rest", help="run what the quick tier leaves out")
    parser.set_defaults(tier="quick")
    args, pytest_args = parser.parse_known_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(ALL))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {list(ALL)}")
    missing = [b for b in backends if importlib.util.find_spec(b) is None]
    backends = [b for b in backends if b not in missing]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "deselected": 0}
    failed_runs = []
    start_all = time.perf_counter()
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        print(f"\n===== KERAS_BACKEND={backend}, {args.tier} tier =====", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", f"--tier={args.tier}", *pytest_args],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        last = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last = line
        code = proc.wait()
        for count, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", last):
            totals["error" if word.startswith("error") else word] += int(count)
        print(f"===== {backend}: exit {code} in {time.perf_counter() - start:.0f} s =====", flush=True)
        if code != 0:
            failed_runs.append(backend)
    minutes = (time.perf_counter() - start_all) / 60
    print(f"\nbackends run: {', '.join(backends) or 'none'}; failed runs: {', '.join(failed_runs) or 'none'}; "
          f"{args.tier} tier in {minutes:.1f} min")
    for backend in missing:
        print(f"not installed, skipped: {backend} (install: {INSTALL[backend]})")
    if args.tier == "quick":
        print(f"deselected: {totals['deselected']} tests over all runs (the quick tier's sample of each matrix and its "
              "`slow` tests): run them with `python tests/run_backends.py --rest`, everything with `--full` (what CI runs)")
    if not backends:
        print("no backend installed: install one (see README, Install)")
        return 1
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
