"""GGUF (llama.cpp) checkpoints of the `llama` architecture -> Llama with HF names and layout.

Weights are dequantized to float with the `gguf` package's own dequantizers; llama.cpp's
converter permuted q/k rows to interleaved RoPE pairs, which we undo. The config comes from the
`llama.*` metadata keys. (Not named gguf.py: that would shadow the `gguf` package.)
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from awq_ref.config import LlamaConfig
from awq_ref.loaders.state_dict import interleaved_to_half, model_from_state_dict
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
    if 24 + n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size:
        raise ValueError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata "
                         f"entries cannot fit in {size} bytes")


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
    return reader, metadata


def _get(meta: dict[str, Any], key: str, source: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise ValueError(f"{source}: GGUF metadata lacks {key}")
    return default


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
    d, heads = _get(meta, "llama.embedding_length", source), _get(meta, "llama.attention.head_count", source)
    head_dim = meta.get("llama.attention.key_length", d // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if meta.get(key, head_dim) != head_dim:
            raise ValueError(f"{source}: {key}={meta[key]} differs from head_dim {head_dim}; unsupported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{source}: GGUF metadata gives no vocab size (llama.vocab_size or tokens)")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    try:
        return LlamaConfig(
            vocab_size=int(vocab), hidden_size=int(d),
            intermediate_size=int(_get(meta, "llama.feed_forward_length", source)),
            num_hidden_layers=int(_get(meta, "llama.block_count", source)),
            num_attention_heads=int(heads),
            num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            rms_norm_eps=_f32(_get(meta, "llama.attention.layer_norm_rms_epsilon", source)),
            rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(meta.get("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


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
    tensors = gguf_state_dict(reader, config, str(path), dtype)
    return model_from_state_dict(config, tensors, source=str(path), device=device, dtype=dtype)
