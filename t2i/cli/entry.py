"""Console-script entry points: import the command's module (torch and the rest take seconds),
then run its click `main`. Ctrl-C during that import exits 130 with one line, as it does once
the command runs (`common.exit_on_interrupt`), instead of an import traceback. (SIGTERM's
default action ends the process without output, 143.) `python -m t2i.cli.train` and friends
call the same `main` functions directly."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from t2i.train import signals  # standard library only: cheap to import first


def run(module: str) -> Any:
    """Import `module` and call its `main()`. Exits 130 on Ctrl-C during the import."""
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"\ninterrupted by {signals.describe(signals.signal.SIGINT)} during start-up",
              file=sys.stderr)
        sys.exit(signals.exit_status(signals.signal.SIGINT))
    return main()


def train() -> Any:
    return run("t2i.cli.train")


def sample() -> Any:
    return run("t2i.cli.sample")


def evaluate() -> Any:
    return run("t2i.cli.eval")


def data() -> Any:
    return run("t2i.cli.data")


def bench() -> Any:
    return run("bench.__main__")
