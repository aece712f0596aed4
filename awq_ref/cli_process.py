"""How a command-line run meets its process: SIGTERM, and a stderr that cannot be written.

Shared by `python -m awq_ref` (cli.main) and the tools (tools/tool_cli.exit_status).
- SIGTERM (what `timeout`, `docker stop`, systemd and Slurm send) is handled as Ctrl-C is: the
  `except BaseException` cleanups run (a half-written checkpoint's temporary folder is removed),
  the run says what is kept, and the status is 143 (128 + SIGTERM) instead of a silent death.
- stderr carries notes and progress bars only: written to a full disk (/dev/full) or closed
  (`2>&-`), it made the run fail before any work. It is made forgiving for the run's duration.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


class ForgivingStream(io.TextIOBase):
    """A text stream whose writes never fail: what `stream` cannot take (it is None, full, or
    closed) is dropped, since notes and progress bars must not end a run."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
        except (OSError, ValueError, AttributeError):
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


@contextmanager
def command_process() -> Iterator[None]:
    """For the duration: SIGTERM raises Terminated (main thread only: signal handlers can be set
    nowhere else) and sys.stderr forgives failed writes; both restored after. Nested or
    concurrent runs (threads) wrap stderr once: the run that wrapped it unwraps it, if it is
    still the wrapper then."""
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():
        previous, installed = signal.signal(signal.SIGTERM, _raise_terminated), True
    stderr = wrapper = None
    if not isinstance(sys.stderr, ForgivingStream):
        stderr, wrapper = sys.stderr, ForgivingStream(sys.stderr)
        sys.stderr = wrapper
    try:
        yield
    finally:
        if wrapper is not None and sys.stderr is wrapper:
            sys.stderr = stderr
        if installed:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def silence_stdout() -> None:
    """Point stdout's file at /dev/null, after a write to it failed (its reader gone, its disk
    full): Python's exit would flush the rest into it and fail again, with a traceback."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file behind it (captured)
        pass


def print_result_line(line: str) -> None:
    """A last line on stdout that reports work already done and kept (a checkpoint written): a
    stdout that cannot take it is no failure of the run."""
    try:
        print(line, flush=True)
    except OSError:
        silence_stdout()


def interrupted_status(e: KeyboardInterrupt) -> tuple[str, int]:
    """(the word for it, the exit status) of a Ctrl-C (130) or a SIGTERM (143)."""
    return ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
