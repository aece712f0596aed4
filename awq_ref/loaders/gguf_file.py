"""GGUF (llama.cpp) checkpoints of the `llama` architecture -> Llama with HF names and layout.

Weights are dequantized to float with the `gguf` package's own dequantizers; llama.cpp's
converter permuted q/k rows to interleaved RoPE pairs, which we undo. The config comes from the
`llama.*` metadata keys. (Not named gguf.py: that would shadow the `gguf` package.)
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from awq_ref.config import LlamaConfig
from awq_ref.loaders.state_dict import (
    check_disjoint,
    check_state_dict,
    interleaved_to_half,
    model_from_state_dict,
)
from awq_ref.model import Llama

GGUF_MAGIC = b"GGUF"
# The tensor types we dequantize (with gguf.quants.dequantize); others raise ValueError.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor name -> HF name; "{n}" is the layer index.
NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")
# Smallest possible header entries, to bound the counts a header claims by the file size.
_MIN_TENSOR_INFO, _MIN_KV = 8 + 4 + 4 + 8, 8 + 4 + 1
# GGUF value type -> bytes of one scalar (uint8, int8, uint16, int16, uint32, int32, float32,
# bool, uint64, int64, float64); 8 is a string (uint64 length + bytes), 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
# gguf's reader builds numpy views per metadata array item (measured: ~0.7 KB and ~8 us per
# float32, ~1.6 KB and ~13 us per string): a cap on the items of all arrays together, well
# above real vocabularies (Llama 3: 128K tokens, scores and types + 280K merges; Gemma 3: 3 x
# 262K), so that a small file cannot make it build millions; and on the tensor count (a Llama
# has 9 per layer + 3).
_MAX_ARRAY_ITEMS = 1 << 21
_MAX_TENSORS = 1 << 14


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_header(path: Path) -> None:
    """Version and the claimed tensor/metadata counts must fit the file before parsing."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (bad magic or shorter than its header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_tensors > _MAX_TENSORS:
        raise ValueError(f"{path}: corrupt GGUF header: {n_tensors} tensors; more than "
                         f"{_MAX_TENSORS} is not supported")
    if 24 + n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size:
        raise ValueError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata "
                         f"entries cannot fit in {size} bytes")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _walk_header(buf, n_tensors, n_kv, str(path))


class _Cursor:
    """Reads a GGUF header front to back; every length is checked against the file size before
    it is used, so a claimed count or string length never drives a loop or an allocation."""

    def __init__(self, buf: mmap.mmap, source: str):
        self.buf, self.off, self.source = buf, 24, source
        self.array_items = 0  # over the whole header

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.off:
            raise ValueError(f"{self.source}: corrupt GGUF header: {what} of {n} bytes at offset "
                             f"{self.off} runs past the end of the file ({len(self.buf)} bytes)")

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.off += n

    def uint(self, width: int, what: str) -> int:
        start = self.off
        self.skip(width, what)
        return int.from_bytes(self.buf[start:self.off], "little")

    def string(self, what: str) -> None:
        self.skip(self.uint(8, f"{what} length"), what)

    def value(self, vtype: int, what: str, in_array: bool = False) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY and not in_array:  # arrays of arrays: llama files have none
            itype, count = self.uint(4, f"{what} item type"), self.uint(8, f"{what} count")
            self.array_items += count
            if self.array_items > _MAX_ARRAY_ITEMS:
                raise ValueError(f"{self.source}: corrupt GGUF header: {what} claims {count} "
                                 f"items, past {_MAX_ARRAY_ITEMS} array items in the file: not "
                                 "supported")
            if itype in _SCALAR_BYTES:
                self.skip(count * _SCALAR_BYTES[itype], f"{what} ({count} items)")
                return
            self.need(8 * count, f"{what} ({count} items of at least 8 bytes)")
            for _ in range(count):  # strings; any other item type fails on the first
                self.value(itype, what, in_array=True)
        else:
            raise ValueError(f"{self.source}: corrupt GGUF header: {what} has value type {vtype}")


def _walk_header(buf: mmap.mmap, n_tensors: int, n_kv: int, source: str) -> None:
    """Every metadata entry and tensor info must lie inside the file (see _Cursor)."""
    cur = _Cursor(buf, source)
    for i in range(n_kv):
        cur.string(f"metadata key {i}")
        cur.value(cur.uint(4, f"metadata entry {i} type"), f"metadata entry {i}")
    for i in range(n_tensors):
        cur.string(f"tensor info {i} name")
        n_dims = cur.uint(4, f"tensor info {i} dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"{source}: corrupt GGUF header: tensor info {i} has {n_dims} dimensions")
        dims = [cur.uint(8, f"tensor info {i} shape") for _ in range(n_dims)]
        if math.prod(dims) > len(buf) * 8:  # no GGML type stores more than 8 weights per byte
            raise ValueError(f"{source}: corrupt GGUF header: tensor info {i} has shape {dims}, "
                             f"more weights than a {len(buf)}-byte file can hold")
        cur.skip(4 + 8, f"tensor info {i} type and offset")


def open_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(GGUFReader over the memory-mapped file, metadata key -> Python value)."""
    from gguf import GGUFReader

    path = Path(path)
    _check_header(path)
    try:
        reader = GGUFReader(path)
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                             f"past the end of the file ({size} bytes): truncated")
    check_disjoint([(t.name, t.data_offset, t.n_bytes) for t in reader.tensors],
                   f"{path}: corrupt GGUF file")
    return reader, metadata


def _get(meta: dict[str, Any], key: str, source: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise ValueError(f"{source}: GGUF metadata lacks {key}")
    return default


def _int(meta: dict[str, Any], key: str, source: str, default: Any = None) -> int:
    """An integer metadata value (GGUF stores them as integers; a float or a string is corrupt)."""
    value = _get(meta, key, source, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{source}: GGUF metadata {key}={value!r} is not an integer")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.99999e-6)."""
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> LlamaConfig:
    """LlamaConfig from the `llama.*` keys; ValueError for other architectures, MoE or rope scaling."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: unsupported architecture {arch!r}; only 'llama' GGUF files load")
    if meta.get("llama.expert_count", 0):
        raise ValueError(f"{source}: unsupported architecture: llama.expert_count="
                         f"{meta['llama.expert_count']} (mixture of experts)")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: rope scaling ({scaling!r}, rope_freqs tensor: "
                         f"{'rope_freqs.weight' in tensor_names}) is not supported for GGUF")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) and tokens else None
    eos = [_int(meta, k, source) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in meta]
    bos = _int(meta, "tokenizer.ggml.bos_token_id", source) if "tokenizer.ggml.bos_token_id" in meta else None
    heads = _int(meta, "llama.attention.head_count", source)
    try:
        config = LlamaConfig(
            vocab_size=_int(meta, "llama.vocab_size", source, n_tokens),
            hidden_size=_int(meta, "llama.embedding_length", source),
            intermediate_size=_int(meta, "llama.feed_forward_length", source),
            num_hidden_layers=_int(meta, "llama.block_count", source),
            num_attention_heads=heads,
            num_key_value_heads=_int(meta, "llama.attention.head_count_kv", source, heads),
            head_dim=_int(meta, "llama.attention.key_length", source, 0),
            rms_norm_eps=_f32(_get(meta, "llama.attention.layer_norm_rms_epsilon", source)),
            rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=_int(meta, "llama.context_length", source, 2048),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )
    except (TypeError, ValueError) as e:
        if source in str(e):
            raise
        raise ValueError(f"{source}: {e}") from e
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if meta.get(key, config.head_dim) != config.head_dim:
            raise ValueError(f"{source}: {key}={meta[key]} differs from head_dim {config.head_dim}; "
                             "unsupported")
    return config


def hf_name(gguf_name: str) -> str:
    """HF name of a GGUF tensor; unknown names come back unchanged (and fail the key check)."""
    m = _LAYER.match(gguf_name)
    template = gguf_name.replace(m.group(0), "blk.{n}.", 1) if m else gguf_name
    target = NAME_MAP.get(template)
    return target.format(n=m.group(1) if m else "") if target else gguf_name


def dequantize_tensor(t: Any, source: str) -> torch.Tensor:
    """One GGUF tensor as float32 (rows, cols), in PyTorch order (GGML lists ne0 = cols first)."""
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{source}: tensor {t.name} has GGUF type {kind}, which is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(values.reshape(shape).copy())  # copy: the memmap is read-only


def check_tensor_infos(reader: Any, config: LlamaConfig, source: str) -> None:
    """Names, shapes and the total size of the tensors, from the header alone: checked before
    any tensor is dequantized (a few bytes of Q2_K dequantize to 16x their size as float32)."""
    shapes: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name in shapes:
            raise ValueError(f"{source}: tensor {t.name} appears twice")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        shapes[name] = torch.empty(shape, device="meta")  # a shape, no memory
    check_state_dict(config, shapes, source)


def gguf_state_dict(reader: Any, config: LlamaConfig, source: str,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF name -> tensor in `dtype` (cast one at a time, so fp32 copies never pile up), with
    q/k rows back in rotate-half order."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name in out:
            raise ValueError(f"{source}: tensor {t.name} appears twice")
        w = dequantize_tensor(t, source)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            if w.dim() != 2 or w.shape[0] != heads * config.head_dim:
                raise ValueError(f"{source}: tensor {t.name} has shape {tuple(w.shape)}, the config "
                                 f"needs ({heads * config.head_dim}, {config.hidden_size})")
            w = interleaved_to_half(w, heads)
        out[name] = w.to(dtype).contiguous()
    return out


def load_gguf_model(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Llama:
    reader, meta = open_gguf(path)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, names, str(path))
    check_tensor_infos(reader, config, str(path))
    tensors = gguf_state_dict(reader, config, str(path), dtype)
    return model_from_state_dict(config, tensors, source=str(path), device=device, dtype=dtype)
