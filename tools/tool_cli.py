"""What the tools' command lines share with `python -m awq_ref` (awq_ref/cli.py): counts checked
by the parser, output paths checked before any work, and a user error or Ctrl-C ending in one
line instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from awq_ref.cli_common import COUNT_LIMIT  # past it torch's sizes overflow
from awq_ref.cli_process import command_process, interrupted_status
from awq_ref.files import check_writable


def count(text: str) -> int:
    """argparse type of a count of windows, tokens, steps, threads: an integer 1..2**31-1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= COUNT_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{COUNT_LIMIT}, got {text}")
    return value


def check_output(flag: str, path: str | Path, inputs: Iterable[str | Path]) -> None:
    """ValueError when the file `path` is a folder or one of `inputs` (written over, it would be
    lost): refused before the work, not after it."""
    out = Path(path).resolve()
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    for given in inputs:
        if Path(given).resolve() == out:
            raise ValueError(f"{flag} {path} is also an input; writing it would destroy it")
    check_writable(path, flag)  # a file, read-only folder or too long a name: before the work


def exit_status(main: Callable[[], int | None], interrupted: str = "nothing is kept") -> int:
    """main()'s exit status; a ValueError or OSError (a bad input, a disk full) is one line and
    status 2, Ctrl-C or SIGTERM one line saying what is kept and 130 / 143 (awq_ref.cli_process:
    also a stderr that cannot be written is no error). Any other exception is a bug and keeps
    its traceback."""
    with command_process():
        try:
            return main() or 0
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            word, status = interrupted_status(e)
            print(f"\n{word}: {interrupted}", file=sys.stderr)
            return status
