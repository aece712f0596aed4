"""awq_ref.cli_process: a command-line run meeting SIGTERM, an unwritable stderr or stdout
(found by a review of the environments runs meet, 2026-12-07)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from awq_ref.cli_process import ForgivingStream, Terminated, command_process
from awq_ref.quant.checkpoint import atomic_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
def test_sigterm_runs_the_cleanups_like_ctrl_c(tmp_path):
    """SIGTERM ended the process at once: a checkpoint's temporary folder being written stayed
    beside OUT for good. Raised as Terminated (a KeyboardInterrupt), the cleanups run; the
    previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    with command_process(), pytest.raises(Terminated), atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stderr_that_cannot_be_written_is_no_error():
    """Notes and progress bars go to stderr: a full disk behind it or a closed one (None) made
    the run fail before any work (and then fail again printing the error)."""
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    for broken in (Full(), None):
        stream = ForgivingStream(broken)
        assert stream.write("note") == 4
        stream.flush()
        assert stream.isatty() is False and stream.encoding == "utf-8"
    with command_process():
        assert isinstance(sys.stderr, ForgivingStream)
    assert not isinstance(sys.stderr, ForgivingStream)


AWQ_TINY = "--n-samples 2 --calib-seqlen 16 --n-grid 2"  # data-free: the folder has no tokenizer


@pytest.mark.parametrize("redirect,method", [("2>/dev/full", "--method rtn"),
                                             ("2>&-", AWQ_TINY), (">/dev/full", "--method rtn")])
def test_quantize_finishes_whatever_its_output_streams(tmp_path, redirect, method):
    """quantize with stderr full or closed (AWQ's progress bar), or stdout full: the checkpoint
    is written and the run succeeds (stderr carries notes; stdout's last line reports work
    done). They ended with status 1 and no checkpoint, or status 2 and "error:" after it."""
    from test_cli_errors import _random_folder

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    folder = _random_folder(tmp_path)
    out = tmp_path / "q"
    cmd = (f"{sys.executable} -m awq_ref quantize --model {folder} --out {out} {method} "
           f"{redirect}; echo status=$? >&2")
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert "status=0" in done.stderr, done.stderr[-800:]
    assert "Traceback" not in done.stderr and (out / "model.safetensors").is_file()


def test_overlapping_runs_leave_stderr_as_it_was():
    """Two runs in threads, or nested (a tool calling cli.main): entered A, B, left A, B left
    sys.stderr wrapped for good (fileno() gone)."""
    original = sys.stderr
    a, b = command_process(), command_process()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert sys.stderr is original
