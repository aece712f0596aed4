"""Resumable AWQ search: the state after each finished block, saved in a work folder.

    work_dir/state.safetensors     written after every block (temp file, fsync, rename)
    work_dir/.lock                 flock-ed while a run uses the folder (Progress.hold)
        hidden                     (B, T, D) fp32  the next block's calibration inputs
        scale.* / clip_lo.* / clip_hi.*            the AwqResult so far (AwqResult's names)
        metadata: format, fingerprint, next_block, search (JSON list)

The fingerprint is a SHA-256 over everything that decides the search: the model's config,
the calibration tokens, the QuantSpec, the AwqConfig (but its `progress` bar), the skipped
modules, the device, and an `identity`: the caller's (the CLI: model path and dtype) and, for
a model in memory, `weights_digest` (a base and a fine-tuned model share their config, not
their weights; streaming adds the source files' sizes and times instead). A state with another
fingerprint is refused with a ValueError, never silently reused. Restarting
from block i reruns block i from the same fp32 inputs, so the result is bit-identical to an
uninterrupted search on the same machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from awq_ref.awq.result import AwqResult
from awq_ref.files import atomic_write, flock_exclusive, library_path, parse_json
from awq_ref.quant.quantizer import QuantSpec

STATE_NAME = "state.safetensors"
LOCK_NAME = ".lock"  # held (flock) while a run uses the work folder
FORMAT = "awq_ref.AwqProgress/1"


def fingerprint(model_config: Any, calib_tokens: torch.Tensor, spec: QuantSpec, config: Any,
                skip: tuple[str, ...], device: torch.device, identity: dict[str, Any]) -> str:
    """SHA-256 (hex) of the search's inputs; see the module docstring."""
    awq = config.settings()  # AwqConfig's fields but the progress bar's
    tokens = calib_tokens.to(torch.int64).contiguous().cpu()
    doc = {"model": model_config.to_hf_dict(), "spec": asdict(spec), "awq": awq,
           "skip": list(skip), "device": str(device), "identity": identity,
           "calib": [list(tokens.shape), hashlib.sha256(tokens.numpy().tobytes()).hexdigest()]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: torch.nn.Module, samples: int = 1024) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and `samples` evenly strided values:
    milliseconds even for a 7B model, and any fine-tune or dtype change moves it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step].to(device="cpu", dtype=torch.float64).contiguous()  # exact for all
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


# safetensors' own temporary beside the file it writes (then renamed onto it)
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


class Progress:
    """The work folder of one search. `identity`: extra JSON-able facts for the fingerprint."""

    def __init__(self, work_dir: str | Path, identity: dict[str, Any] | None = None):
        self.work_dir = Path(work_dir)
        self.identity = dict(identity or {})
        self.fingerprint = ""  # set by search_awq through bind()
        self._holds = 0  # nesting depth of hold() (the CLI holds around search_awq's hold)

    @property
    def state_path(self) -> Path:
        return self.work_dir / STATE_NAME

    def bind(self, fp: str) -> None:
        self.fingerprint = fp

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Use the work folder alone for the duration: a second run on it (the same command
        started twice) is refused at once with a ValueError, instead of both writing its state
        and one deleting the folder under the other. The lock (flock) dies with the process,
        even a killed one; a folder this hold created and left with nothing saved in it is
        removed on the way out (a folder the user made, or a link to one, is kept)."""
        if self._holds:  # already held by this object: nested
            self._holds += 1
            try:
                yield
            finally:
                self._holds -= 1
            return
        created = not self.work_dir.exists()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lock = self.work_dir / LOCK_NAME
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:  # no room for even the lock (inodes): leave no empty folder behind
            if created:
                self._remove_if_unused(lock)
            raise
        try:
            # None: no locks here at all (not POSIX, or a file system without them): unlocked
            locked = flock_exclusive(fd, blocking=False)
            if locked is False:
                raise ValueError(f"{self.work_dir} is in use by another run (the same command "
                                 "started twice?): wait for it to end, or stop it")
            self._holds = 1
            if locked:  # no other run can be writing here
                self._remove_killed_temporaries()
            try:
                yield
            finally:
                self._holds = 0
        finally:
            if created:  # also when locking itself failed
                self._remove_if_unused(lock)
            os.close(fd)  # releases the lock

    def _remove_killed_temporaries(self) -> None:
        """Delete the temporary files killed writes of runs left here: the state's
        (`.state.safetensors.tmp-*`) and, in `shards/` (a streamed run's, nothing else's), the
        shards' and safetensors' own `.tmpXXXXXX`; each as large as the state or a block, one
        more per killed run. Only while the lock is held, so no live writer of this folder's
        files exists; nothing else is touched (a --work-dir the user shares with other work)."""
        shards = self.work_dir / "shards"
        found = [*self.work_dir.glob(f".{STATE_NAME}.tmp-*"),
                 *(shards.glob(".*.tmp-*") if shards.is_dir() else ()),
                 *(p for p in (shards.glob(".tmp*") if shards.is_dir() else ())
                   if SAFETENSORS_TMP.fullmatch(p.name))]
        for path in found:
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)

    def _remove_if_unused(self, lock: Path) -> None:
        """The work folder, if it holds nothing but the lock (best effort: never masks the
        exception that ends the run)."""
        try:
            if {p.name for p in self.work_dir.iterdir()} <= {LOCK_NAME}:
                lock.unlink(missing_ok=True)
                self.work_dir.rmdir()
        except OSError:
            pass

    def restore(self, result: AwqResult) -> tuple[int, torch.Tensor] | None:
        """(next block, its inputs (B, T, D) on cpu) and `result` filled in, or None if no state.

        ValueError if the saved state was made with other inputs or settings."""
        path = self.state_path
        if not path.is_file():
            return None
        corrupt = (f"{path}: corrupt AWQ progress file; delete {self.work_dir} to start over")
        try:
            with library_path(path) as name, safe_open(name, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not an AWQ progress file "
                                     f"(format={meta.get('format')!r})")
                if meta.get("fingerprint") != self.fingerprint:
                    raise ValueError(
                        f"{path}: saved progress was made with a different model, calibration "
                        f"data or settings; delete {self.work_dir} to start over, or rerun with "
                        "the original settings to resume")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            search = parse_json(meta["search"], corrupt)
            next_block, hidden = meta["next_block"], tensors["hidden"]
        except (SafetensorError, OSError, KeyError, TypeError) as e:
            raise ValueError(f"{corrupt} ({type(e).__name__}: {e})") from None
        if not (next_block.isascii() and next_block.isdigit() and len(next_block) <= 6) \
                or not isinstance(search, list):
            raise ValueError(f"{corrupt} (next_block={next_block[:20]!r}, search of type "
                             f"{type(search).__name__})")
        next_block = int(next_block)
        result.add_tensors(tensors, str(path), ignore=("hidden",))
        result.search[:] = search
        return next_block, hidden

    def announce(self, first: int, show: bool) -> None:
        """One line on stderr when a run resumes (with its progress bar, `show`): where from."""
        if show and first:
            print(f"resuming at block {first}: blocks 0-{first - 1} were finished and saved in "
                  f"{self.work_dir}", file=sys.stderr, flush=True)

    def saved_blocks(self) -> int:
        """How many blocks the saved state holds (0 without one, or with one unreadable): what a
        rerun resumes after. Only for messages; `restore` checks the state in full."""
        try:
            with library_path(self.state_path) as name, safe_open(name, framework="pt") as f:
                count = (f.metadata() or {}).get("next_block", "")
        except (SafetensorError, OSError):
            return 0
        return int(count) if count.isascii() and count.isdigit() and len(count) <= 6 else 0

    def save(self, next_block: int, result: AwqResult, hidden: torch.Tensor) -> None:
        """Atomically replace the state: the result so far and `hidden` (next_block's input)."""
        tensors = {"hidden": hidden.detach().float().cpu().contiguous(), **result.to_tensors()}
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "next_block": str(next_block),
                "search": json.dumps(result.search)}
        atomic_write(self.state_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def remove(self, folders: Iterable[Path] = ()) -> None:
        """After the final checkpoint is safely written: delete what runs write here (`folders`,
        e.g. a streamed run's shards, the state, a killed write's temporary copies of it, the
        lock), then the folder if that empties it. A folder the user named (--work-dir) keeps
        whatever else it holds. The checkpoint is complete by now, so a failure here (a file
        system gone read-only) is a line on stderr, not an error."""
        try:
            for folder in folders:
                shutil.rmtree(folder)
            self._remove_killed_temporaries()
            for path in [self.state_path, self.work_dir / LOCK_NAME]:
                path.unlink(missing_ok=True)
        except OSError as e:
            print(f"note: the checkpoint is complete, but {self.work_dir} could not be emptied "
                  f"({e.strerror or e}): delete it yourself", file=sys.stderr)
            return
        try:
            self.work_dir.rmdir()
        except OSError:  # not empty (the user's files), or already gone
            pass
