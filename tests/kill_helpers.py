"""Helpers of the crash tests (test_resume, test_stream_quantize): kill a CLI run with SIGKILL
once its progress file says enough blocks are done, and compare checkpoint folders."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from safetensors import safe_open


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def saved_block(state: Path) -> int:
    """next_block of a progress file, 0 while there is none (the file is replaced atomically)."""
    if not state.is_file():
        return 0
    with safe_open(str(state), framework="pt") as f:
        return int(f.metadata()["next_block"])


def kill_after_block(cmd: list[str], env: dict[str, str], state: Path, block: int) -> int:
    """Start cmd, SIGKILL it once `state` records >= block blocks; the blocks recorded then.

    Fails the test if the run finished before it could be killed."""
    done, returncode, _ = stop_after_block(cmd, env, state, block, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return done


def stop_after_block(cmd: list[str], env: dict[str, str], state: Path, block: int,
                     sig: signal.Signals) -> tuple[int, int, str]:
    """Start cmd, send it `sig` once `state` records >= block blocks; (the blocks recorded when
    it exited, its exit status, its stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        while proc.poll() is None and saved_block(state) < block:
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return saved_block(state), proc.returncode, err
