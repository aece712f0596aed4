"""Helpers of the crash tests (test_resume, test_stream_quantize, test_demo): kill a CLI run with
SIGKILL once its progress file says enough blocks are done, stop an in-process run after a
block's state is saved, and compare checkpoint folders."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from safetensors import safe_open


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its relative path (additional_chat_templates/ too)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def stop_after_saving(monkeypatch, block: int, exc: type[BaseException]) -> None:
    """Make awq.resume.Progress.save raise `exc` once the state for blocks 0..block-1 is on
    disk: an in-process run interrupted there (undo with monkeypatch.undo or a new fixture)."""
    from awq_ref.awq.resume import Progress

    save = Progress.save

    def save_then_stop(self, next_block, result, hidden):
        save(self, next_block, result, hidden)
        if next_block == block:
            raise exc

    monkeypatch.setattr(Progress, "save", save_then_stop)


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
