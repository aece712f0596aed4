"""GGUF (llama.cpp) checkpoints of the `llama` architecture -> Llama with HF names and layout.

Weights are dequantized to float with the `gguf` package's own dequantizers; llama.cpp's
converter permuted q/k rows to interleaved RoPE pairs, which we undo. The config comes from the
`llama.*` metadata keys. (Not named gguf.py: that would shadow the `gguf` package.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from awq_ref.config import LlamaConfig
from awq_ref.loaders.gguf_header import GGUF_MAGIC, GGUFHeader, TensorInfo, read_header
from awq_ref.loaders.state_dict import (
    check_disjoint,
    check_state_dict,
    interleaved_to_half,
    model_from_state_dict,
)
from awq_ref.model import Llama

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


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str | Path) -> GGUFHeader:
    """The file's metadata and tensor infos (gguf_header.py), no two tensors sharing bytes."""
    header = read_header(path)
    check_disjoint([(t.name, t.offset, t.n_bytes) for t in header.tensors],
                   f"{path}: corrupt GGUF file")
    parts = header.metadata.get("split.count", 1)
    if parts != 1:  # llama.cpp's gguf-split: the first part holds the metadata, each some tensors
        raise ValueError(f"{path}: one part of a GGUF split into {parts!r} files (split.count); "
                         "merge them into one file first (llama.cpp: llama-gguf-split --merge "
                         "FIRST_PART.gguf MERGED.gguf)")
    return header


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


def _f32(meta: dict[str, Any], key: str, source: str, default: Any = None) -> float:
    """A float metadata value (an integer too, not a bool or a string), finite as a float32,
    given as the shortest decimal that rounds to that float32 (1e-5, not 9.99999e-6)."""
    value = _get(meta, key, source, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) <= 3.4e38:
        raise ValueError(f"{source}: GGUF metadata {key}={value!r} is not a finite float32")
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> LlamaConfig:
    """LlamaConfig from the `llama.*` keys; ValueError for other archs, MoE, rope scaling."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: unsupported architecture {arch!r}; "
                         f"only 'llama' GGUF files load")
    if meta.get("llama.expert_count", 0):
        raise ValueError(f"{source}: unsupported architecture: llama.expert_count="
                         f"{meta['llama.expert_count']} (mixture of experts)")
    biases = sorted(n for n in tensor_names if n.endswith(".bias"))
    if biases:  # a Llama with attention_bias / mlp_bias: its HF folder loads
        raise ValueError(f"{source}: tensors {biases[:3]} are biases (attention_bias, mlp_bias), "
                         "which GGUF files do not load here; load the model's HF folder")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: rope scaling ({scaling!r}, rope_freqs tensor: "
                         f"{'rope_freqs.weight' in tensor_names}) is not supported for GGUF")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) and tokens else None
    eos = [_int(meta, k, source)
           for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    bos = (_int(meta, "tokenizer.ggml.bos_token_id", source)
           if "tokenizer.ggml.bos_token_id" in meta else None)
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
            rms_norm_eps=_f32(meta, "llama.attention.layer_norm_rms_epsilon", source),
            rope_theta=_f32(meta, "llama.rope.freq_base", source, 10000.0),
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
            raise ValueError(f"{source}: {key}={meta[key]} differs from head_dim "
                             f"{config.head_dim}; unsupported")
    return config


def hf_name(gguf_name: str) -> str:
    """HF name of a GGUF tensor; unknown names come back unchanged (and fail the key check)."""
    m = _LAYER.match(gguf_name)
    template = gguf_name.replace(m.group(0), "blk.{n}.", 1) if m else gguf_name
    target = NAME_MAP.get(template)
    return target.format(n=m.group(1) if m else "") if target else gguf_name


def dequantize_tensor(t: TensorInfo, source: str) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch order (rows, cols)."""
    from gguf.quants import dequantize

    kind = t.ggml_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{source}: tensor {t.name} has GGUF type {kind}, which is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    values = np.asarray(dequantize(t.data, t.ggml_type), dtype=np.float32)
    return torch.from_numpy(values.reshape(t.shape).copy())  # copy: the memmap is read-only


def check_tensor_infos(header: GGUFHeader, config: LlamaConfig, source: str) -> None:
    """Names, shapes and the total size of the tensors, from the header alone: checked before
    any tensor is dequantized (a few bytes of Q2_K dequantize to 16x their size as float32)."""
    shapes: dict[str, torch.Tensor] = {}
    for t in header.tensors:
        name = hf_name(t.name)
        if name in shapes:
            raise ValueError(f"{source}: tensor {t.name} appears twice")
        shapes[name] = torch.empty(t.shape, device="meta")  # a shape, no memory
    check_state_dict(config, shapes, source)


def gguf_state_dict(header: GGUFHeader, config: LlamaConfig, source: str,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF name -> tensor in `dtype` (cast one at a time, so fp32 copies never pile up), with
    q/k rows back in rotate-half order."""
    out: dict[str, torch.Tensor] = {}
    for t in header.tensors:
        name = hf_name(t.name)
        if name in out:
            raise ValueError(f"{source}: tensor {t.name} appears twice")
        w = dequantize_tensor(t, source)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            if w.dim() != 2 or w.shape[0] != heads * config.head_dim:
                raise ValueError(f"{source}: tensor {t.name} has shape {tuple(w.shape)}, "
                                 f"the config needs ({heads * config.head_dim}, "
                                 f"{config.hidden_size})")
            w = interleaved_to_half(w, heads)
        out[name] = w.to(dtype).contiguous()
    return out


def load_gguf_model(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Llama:
    header = open_gguf(path)
    config = config_from_gguf(header.metadata, {t.name for t in header.tensors}, str(path))
    check_tensor_infos(header, config, str(path))
    tensors = gguf_state_dict(header, config, str(path), dtype)
    return model_from_state_dict(config, tensors, source=str(path), device=device, dtype=dtype)
