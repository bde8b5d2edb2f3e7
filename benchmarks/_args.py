"""What the CPU benchmark scripts share for their arguments and failures (the GPU check has its own: gpu/check.py):
an argument parser whose errors are one line (exit 2), argument types for sizes, and ``main``: a recipe the
benchmark composes that evolm refuses (``ConfigError``: a bad shape or batch) or a child `evolm` command that fails
ends in one line naming it (exit 2), not a traceback that hides the child's own message. Imports nothing heavy."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2); ``--help`` shows the script's docstring."""

    def __init__(self, doc: str | None, **kwargs):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):  # noqa: D401
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive(text: str) -> int:
    """An integer >= 1 (a size, a count of rounds or steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def child_failed(exc: subprocess.CalledProcessError) -> str:
    """One line for a failed child command: what it was and the last line it printed on stderr (its own one-line
    error, or a traceback's last line)."""
    cmd = [str(c) for c in exc.cmd]
    if len(cmd) > 3 and cmd[1] == "-m":  # python -m evolm_nemo.cli train ...: the command, not the interpreter
        name = "evolm " + cmd[3] if cmd[2] == "evolm_nemo.cli" else f"{cmd[2]} {cmd[3]}"
    else:
        name = " ".join(c.rsplit("/", 1)[-1] for c in cmd[:2] if not c.startswith("-")) or cmd[0]
    err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    last = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), "no message")
    return f"{name} failed (exit {exc.returncode}): {last}"


def main(run: Callable[[], int | None]) -> int:
    """Run the benchmark's ``run``; a refused recipe or a failed child command is one line on stderr and exit 2."""
    from evolm_nemo.config.errors import ConfigError, print_error

    try:
        return int(run() or 0)
    except ConfigError as exc:
        print_error(exc.key, exc.message)
    except subprocess.CalledProcessError as exc:
        print(f"error: {child_failed(exc)}", file=sys.stderr)
    return 2
