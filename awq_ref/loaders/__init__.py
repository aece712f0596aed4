"""load_model / load_tokenizer for every checkpoint format we read, chosen from the file itself.

| path                           | model                       | tokenizer                         |
|--------------------------------|-----------------------------|-----------------------------------|
| "default"                      | SmolLM2-135M-Instruct GGUF  | from the GGUF                     |
| folder with config.json        | HF safetensors (or AWQ)     | tokenizer.json / .model / .bin    |
| file starting with b"GGUF"     | GGUF (llama)                | from the GGUF metadata            |
| other .bin                     | llama2.c legacy checkpoint  | tokenizer.bin / tok*.bin beside it|
"""

from __future__ import annotations

from pathlib import Path

import torch

from awq_ref.config import LlamaConfig
from awq_ref.loaders.default_model import DEFAULT_NAME, default_gguf_path
from awq_ref.loaders.gguf_file import config_from_gguf, is_gguf, load_gguf_model, open_gguf
from awq_ref.loaders.gguf_tokenizer import load_gguf_tokenizer
from awq_ref.loaders.hf import (
    load_hf_model,
    read_config_json,
    read_safetensors_file,
    read_safetensors_folder,
)
from awq_ref.loaders.llama2c import (
    config_from_header,
    find_tokenizer_for,
    is_llama2c_model,
    load_llama2c_model,
    read_header,
)
from awq_ref.loaders.llama2c_tokenizer import BOS_ID, EOS_ID, read_llama2c_tokenizer
from awq_ref.loaders.state_dict import check_float_dtype
from awq_ref.model import Llama
from awq_ref.tokenizer import (
    Tokenizer,
    chat_template_from_folder,
    special_ids_from_folder,
    tokenizer_from_file,
    tokenizer_from_folder,
)

__all__ = [
    "default_gguf_path",
    "load_model",
    "load_tokenizer",
    "read_safetensors_file",
    "read_safetensors_folder",
]


def _resolve(path: str | Path) -> Path:
    if str(path) == DEFAULT_NAME:
        return default_gguf_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if not (path.is_dir() or path.is_file()):  # a FIFO would block the first read, a device
        raise ValueError(f"{path}: not a regular file or folder")  # never end it
    return path


def is_quantized_folder(path: str | Path) -> bool:
    """Whether `path` is a checkpoint folder whose config.json has a quantization_config."""
    path = _resolve(path)
    if not path.is_dir():
        return False
    raw = read_config_json(path)
    return isinstance(raw, dict) and "quantization_config" in raw


def load_config(path: str | Path) -> LlamaConfig | None:
    """The LlamaConfig of "default", an fp HF folder, a .gguf file or a llama2.c .bin, read
    without any weights (to check settings before a long load); None for quantized folders and
    other files (their loaders say what is wrong)."""
    path = _resolve(path)
    if path.is_dir():
        raw = read_config_json(path)
        if isinstance(raw, dict) and "quantization_config" in raw:
            return None
        return LlamaConfig.from_hf_dict(raw, source=str(path / "config.json"))
    if is_gguf(path):
        header = open_gguf(path)
        return config_from_gguf(header.metadata, {t.name for t in header.tensors}, str(path))
    if path.suffix == ".bin" and is_llama2c_model(path):
        return config_from_header(read_header(path))
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama (eval mode) from "default", an HF folder, a .gguf file or a llama2.c .bin."""
    check_float_dtype(dtype, "load_model")  # an integer dtype failed deep in load_state_dict
    path = _resolve(path)
    if path.is_dir():
        return load_hf_model(path, device=device, dtype=dtype)
    if is_gguf(path):
        return load_gguf_model(path, device=device, dtype=dtype)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: pass the folder holding config.json and the safetensors files")
    if path.suffix == ".bin":
        return load_llama2c_model(path, device=device, dtype=dtype)
    raise ValueError(f"{path}: unknown checkpoint format (expected an HF folder with config.json, "
                     "a GGUF file or a llama2.c .bin)")


def _llama2c_tokenizer(path: Path) -> Tokenizer:
    backend = read_llama2c_tokenizer(path)
    # llama2.c's fixed ids; run.c encodes with BOS
    bos, eos, add_bos, template = BOS_ID, [EOS_ID], None, None
    if path.name == "tokenizer.bin":  # as save_pretrained writes it, beside tokenizer_config.json
        bos, eos, add_bos = special_ids_from_folder(path.parent, backend, default_bos=BOS_ID,
                                                    default_eos=[EOS_ID])
        template = chat_template_from_folder(path.parent)
    return Tokenizer(backend, bos, eos, True if add_bos is None else add_bos, source=str(path),
                     chat_template=template)


FOLDER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.bin")  # any one


def folder_lacks_tokenizer(path: str | Path) -> bool:
    """Whether `path` is a folder with none of FOLDER_TOKENIZER_FILES (e.g. a random checkpoint
    of tools/make_random_checkpoint.py): load_tokenizer would refuse it."""
    path = Path(path)
    return path.is_dir() and not any((path / f).is_file() for f in FOLDER_TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The Tokenizer of "default", a folder (tokenizer.json > tokenizer.model > tokenizer.bin),
    a .gguf file, a tokenizer.json / .model file, a llama2.c tokenizer .bin, or a llama2.c model
    .bin (its tokenizer is looked for beside it)."""
    path = _resolve(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file() \
                and (path / "tokenizer.bin").is_file():
            return _llama2c_tokenizer(path / "tokenizer.bin")
        return tokenizer_from_folder(path)
    if is_gguf(path):
        return load_gguf_tokenizer(path)
    if path.suffix in (".json", ".model"):
        return tokenizer_from_file(path)
    if path.suffix == ".bin":
        if is_llama2c_model(path):
            return _llama2c_tokenizer(find_tokenizer_for(path))
        return _llama2c_tokenizer(path)
    raise ValueError(f"{path}: unknown tokenizer format (expected a folder, .gguf, tokenizer.json, "
                     "tokenizer.model or a llama2.c .bin)")
