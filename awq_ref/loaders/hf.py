"""HF checkpoint folders: config.json + model.safetensors, or shards listed in
model.safetensors.index.json. Tensors are memory-mapped (safetensors' safe_open), never copied
whole into RAM before they are needed."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from awq_ref.config import LlamaConfig
from awq_ref.files import library_path, parse_json
from awq_ref.loaders.state_dict import model_from_state_dict
from awq_ref.model import Llama

T = TypeVar("T")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors one file may list: a 405B Llama has ~1,150 (a 4-bit checkpoint of it ~3,500); a header
# of a million empty entries would take seconds and GBs to build before any name is checked.
MAX_TENSORS_PER_FILE = 1 << 16


def check_safetensors_header(path: Path) -> None:
    """The 8-byte header length must fit in the file before safetensors reads the JSON header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError(f"{path}: corrupt safetensors header: claims {n} header bytes, "
                         f"the file has {size}")


def check_tensor_count(path: Path, count: int) -> None:
    if count > MAX_TENSORS_PER_FILE:
        raise ValueError(f"{path}: lists {count} tensors; more than {MAX_TENSORS_PER_FILE} is "
                         "not supported")


def read_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, memory-mapped; ValueError naming it if corrupt."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    check_safetensors_header(path)
    try:
        with library_path(path) as name, safe_open(name, framework="pt", device="cpu") as f:
            names = list(f.keys())
            check_tensor_count(path, len(names))
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def _shard_map(folder: Path) -> dict[str, list[str]]:
    """shard file name -> tensor names, from model.safetensors.index.json."""
    index_path = folder / INDEX_FILE
    index = parse_json(index_path.read_bytes(), f"{index_path}: not a valid safetensors index")
    try:
        weight_map = index["weight_map"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a valid safetensors index ({e!r})") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: weight_map must be an object")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file:
            raise ValueError(f"{index_path}: tensor {name} points at {file!r}, "
                             f"not a file in the folder")
        shards.setdefault(file, []).append(name)
    return shards


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder` (single file or sharded), memory-mapped.

    With an index, each shard must hold exactly the tensors the index assigns to it.
    """
    return read_folder(Path(folder), read_safetensors_file)


def read_folder(folder: Path, read_file: Callable[[Path], dict[str, T]]) -> dict[str, T]:
    """read_file over the checkpoint's one file or every shard of its index, merged; each shard
    must hold exactly the tensors the index assigns to it."""
    if (folder / SINGLE_FILE).is_file():
        return read_file(folder / SINGLE_FILE)
    if not (folder / INDEX_FILE).is_file():
        raise ValueError(f"{folder}: no weights: expected {SINGLE_FILE} or {INDEX_FILE}")
    out: dict[str, T] = {}
    for file, names in _shard_map(folder).items():
        shard = read_file(folder / file)
        if set(shard) != set(names):
            missing = sorted(set(names) - set(shard))[:5]
            extra = sorted(set(shard) - set(names))[:5]
            raise ValueError(f"{folder / file}: does not match {INDEX_FILE}: missing {missing}, "
                             f"not in the index {extra}")
        out.update(shard)
    return out


def read_config_json(folder: Path) -> Any:
    """The parsed config.json of an HF folder; ValueError if missing or not JSON."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
        hint = f"; for a GGUF file pass the file itself ({ggufs[0]} here)" if ggufs else ""
        raise ValueError(f"{config_path}: config file not found (an HF checkpoint folder holds "
                         f"config.json and its safetensors files{hint})")
    return parse_json(config_path.read_bytes(), str(config_path))


def load_hf_model(folder: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama from an HF folder; quantized checkpoints go to awq_ref.quant.checkpoint."""
    folder = Path(folder)
    config_path = folder / "config.json"
    raw = read_config_json(folder)
    if isinstance(raw, dict) and "quantization_config" in raw:
        from awq_ref.quant.checkpoint import load_quantized_model

        return load_quantized_model(folder, device=device, dtype=dtype)
    config = LlamaConfig.from_hf_dict(raw, source=str(config_path))
    tensors = read_safetensors_folder(folder)
    return model_from_state_dict(config, tensors, source=str(folder), device=device, dtype=dtype)
