"""Lazy safetensors: index every tensor of an HF folder from the headers, read one on demand.

A .safetensors file is an 8-byte little-endian header length n, a JSON header of n bytes
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
section; offsets count from its start. `LazyTensors` validates every header up front (offsets
inside the file, size = numel * element size, known dtype) and reads a tensor with plain file
reads into a fresh torch buffer. No mmap: pages of the file never count toward the process RSS,
so a model larger than RAM can be walked tensor by tensor.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from awq_ref.files import parse_json
from awq_ref.loaders.hf import check_safetensors_header, check_tensor_count, read_folder
from awq_ref.loaders.state_dict import check_disjoint

MAX_DIM = 1 << 40  # past any real dimension, and far inside int64 (torch's sizes)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: file, absolute byte offset, byte count, dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def meta(self) -> torch.Tensor:
        """A meta tensor of this dtype and shape (for checks that need no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int
                 ) -> TensorInfo:
    """One header entry, checked; ValueError naming the file and the tensor."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry is not an object")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ValueError(f"{where}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        raise ValueError(f"{where}: bad shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"{where}: data_offsets {offsets!r} lie outside the data section "
                         f"({data_size} bytes)")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: holds {offsets[1] - offsets[0]} bytes, shape {shape} "
                         f"{entry['dtype']} needs {nbytes} bytes")
    return TensorInfo(path, data_start + offsets[0], nbytes, dtype, tuple(shape))


def index_safetensors_file(path: str | Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of one file; ValueError naming the file if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    check_safetensors_header(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    check_tensor_count(path, len(header))
    data_start = 8 + n
    infos = {name: _tensor_info(path, name, entry, data_start, size - data_start)
             for name, entry in header.items()}
    check_disjoint([(name, info.offset, info.nbytes) for name, info in infos.items()],
                   f"{path}: corrupt safetensors header")  # as the safetensors library
    return infos


class LazyTensors:
    """The tensors of an HF checkpoint folder, indexed but not loaded: `read(name)` loads one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = self._index_folder()

    def _index_folder(self) -> dict[str, TensorInfo]:
        """Single file, or shards that must hold exactly the tensors the index assigns them."""
        return read_folder(self.folder, index_safetensors_file)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` on the CPU, freshly allocated and filled by plain reads."""
        info = self.index[name]
        if sys.byteorder != "little":  # safetensors stores little-endian
            raise ValueError("reading safetensors lazily needs a little-endian machine")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with info.path.open("rb", buffering=0) as f:
            done = 0
            while done < info.nbytes:  # pread may return fewer bytes than asked
                got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if got == 0:
                    raise ValueError(f"{info.path}: tensor {name} is truncated")
                done += got
        return buf.view(info.dtype).reshape(info.shape)

    def sample_digest(self, pieces: int = 8, piece_bytes: int = 64) -> str:
        """SHA-256 (hex) of every tensor's name, dtype, shape and `pieces` evenly spaced runs of
        its bytes: a few reads per tensor, and any fine-tune or edited tensor moves it (file
        sizes and times alone miss a copy that keeps them, `cp -p` or `rsync -t`)."""
        h = hashlib.sha256()
        for name, info in sorted(self.index.items()):
            h.update(f"{name} {info.dtype} {info.shape}".encode())
            step = max(1, info.nbytes // pieces)
            with info.path.open("rb", buffering=0) as f:
                for start in range(0, info.nbytes, step)[:pieces]:
                    h.update(os.pread(f.fileno(), min(piece_bytes, info.nbytes - start),
                                      info.offset + start))
        return h.hexdigest()
