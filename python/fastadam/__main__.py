"""``python -m fastadam``: the command-line entry point.

Commands:

``python -m fastadam [train] [--epochs N] [--batch-size N] [--hidden N] [--lr LR] [--seed S]``
``[--dataset {digits,synthetic}] [--threads N] [--state-dtype S[,S...]]``
    The default.  Trains a small NumPy network twice side by side, stepped by
    fastadam.Adam and by the NumPy reference, checks that both copies stay
    bitwise identical and times the optimizer steps (see ``fastadam._demo``).
    With ``--state-dtype float32,bfloat16,int8`` (a pair: ``bfloat16/float32``
    for exp_avg/exp_avg_sq; int8 is 8-bit block-wise state) it trains one copy
    per storage of Adam's moments instead, each checked against the
    reference, and compares their accuracy.

``python -m fastadam bench [--quick] [--out DIR] [args...]``
    How fast the step runs on this machine: measurements and ratios against
    the memory-bandwidth limit and the NumPy reference (see ``fastadam._bench``;
    ``--help`` lists the options).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ("train", "bench")


def _bench(args: list[str]) -> Optional[int]:
    # Imported here, not at the top, so that the default command works in an
    # installation without the benchmark module (or its dependencies).
    name = f"{__package__}._bench"
    try:
        bench = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise  # the module exists but one of *its* imports failed: show that
        print(f"python -m fastadam bench: this installation has no {name}", file=sys.stderr)
        return 2
    return bench.main(args, prog="python -m fastadam bench")


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Dispatch ``argv`` (default: ``sys.argv[1:]``) to a command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in COMMANDS:
            print(f"python -m fastadam: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
                  file=sys.stderr)
            return 2
    if command == "bench":
        return _bench(args)
    from . import _demo

    return _demo.main(args, prog="python -m fastadam [train]")


if __name__ == "__main__":
    sys.exit(main())
