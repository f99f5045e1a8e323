"""`python -m masked_opt demo [--quick] [--out PNG]`: the continual-learning demo."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "continual learning on scikit-learn's digits (needs masked_opt[demo])"}


def _usage() -> str:
    lines = ["usage: python -m masked_opt <command> [options]", "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    lines.append("\n`python -m masked_opt <command> --help` for a command's options.")
    lines.append("The Keras backend is the one KERAS_BACKEND names (tensorflow, jax or torch).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from masked_opt import demo  # the package quieted TensorFlow's start-up (masked_opt/_quiet.py)

    return demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
