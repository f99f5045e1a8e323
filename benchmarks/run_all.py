"""Every benchmark on every backend, on whatever device Keras sees, one table.

Runs, per backend (each in its own processes, `KERAS_BACKEND` set):

* ``bench_step.py``: the full training step and the optimizer step alone,
  bare vs masked variants (Adam, AdamW);
* ``bench_first_step.py``: time to the first step, MobileNetV2, whole-variable,
  column and element masks;
* ``bench_memory.py --parts speed``: the optimizer step at 1 % density,
  dense vs compact state;
* ``bench_xla_step.py`` (TensorFlow, JAX): the masked step under XLA.

and writes ``<out>/<backend>_<benchmark>.md`` (each script's own report) and
``<out>/summary.md``: one row per (backend, benchmark, variant) with the
median wall and CPU-time ratios to the bare optimizer. The device is
whatever Keras picks (a GPU when one is visible: TensorFlow and JAX take it
by themselves, torch through Keras's `torch` backend); the summary names it.

    python benchmarks/run_all.py                          # ~15 min on 2 CPU cores
    python benchmarks/run_all.py --backends jax --out /tmp/bench
    python benchmarks/run_all.py --rounds 10              # more rounds, tighter medians
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")
_BOLD = re.compile(r"\*\*([0-9.]+)\*\*")


def commands(backend: str, rounds: int) -> dict[str, list[str]]:
    """The benchmark runs for one backend, sized for ~5 min each on 2 cores."""
    eager = backend == "torch"
    step = ["bench_step.py", "--rounds", str(rounds), "--steps", "1" if eager else "2",
            "--opt-steps", "1" if eager else "2", "--warmup", "1"]
    runs = {
        "step": step,
        "first_step": ["bench_first_step.py", "--rounds", "1"],
        "compact_1pct": ["bench_memory.py", "--parts", "speed"],
    }
    if backend in ("tensorflow", "jax"):
        runs["xla_step"] = ["bench_xla_step.py", "--rounds", str(rounds), "--steps", "3", "--warmup", "2"]
    return runs


def device_line(backend: str) -> str:
    code = ("import keras\n"
            "try:\n    d = keras.distribution.list_devices()\n"
            "except Exception:  # torch: no keras.distribution\n"
            "    import torch\n    d = [f'cuda:{i}' for i in range(torch.cuda.device_count())] or ['cpu:0']\n"
            "print(keras.backend.backend(), keras.__version__, d[0], len(d))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"))
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


def ratio_rows(report: str) -> list[tuple[str, str, str]]:
    """(label, wall ratio, CPU ratio) of each table row that has bold ratios:
    the label is the row's text cells before the first number."""
    rows: dict[str, tuple[str, str, str]] = {}  # a table printed again (progress) counts once, the last
    section = ""
    for line in report.splitlines():
        if line.startswith("#"):
            section = line.lstrip("# ").split(":")[0].split("(")[0].strip()
        if not line.startswith("|") or "**" not in line:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        label = []
        for c in cells:
            if re.match(r"^[\d.,*]", c):
                break
            label.append(c)
        bold = _BOLD.findall(line)
        if not label or not bold:
            continue
        if any(c.startswith("bare") for c in label) and set(bold) == {"1.00"}:
            continue  # the reference row
        name = f"{section}: {' / '.join(label)}" if section else " / ".join(label)
        rows[name] = (name, bold[0], bold[1] if len(bold) > 1 else "")
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = ["# All benchmarks", "", f"- command: `python benchmarks/run_all.py --backends {args.backends} "
               f"--rounds {args.rounds}`", ""]
    table = ["| backend | benchmark | variant | wall ratio | CPU ratio |", "|---|---|---|---:|---:|"]
    failed = []
    for backend in args.backends.split(","):
        summary.append(f"- {backend}: {device_line(backend)} (backend, keras, first device, device count)")
        for name, cmd in commands(backend, args.rounds).items():
            start = time.perf_counter()
            out = subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], capture_output=True,
                                 text=True, env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"))
            seconds = time.perf_counter() - start
            with open(os.path.join(args.out, f"{backend}_{name}.md"), "w") as f:
                f.write(out.stdout)
            print(f"{backend} {name}: exit {out.returncode} in {seconds:.0f} s", flush=True)
            if out.returncode:
                failed.append(f"{backend} {name}")
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            for label, wall, cpu in ratio_rows(out.stdout):
                table.append(f"| {backend} | {name} | {label} | {wall} | {cpu} |")
    summary += ["", *table, ""]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(summary))
    print("\n".join(summary))
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
