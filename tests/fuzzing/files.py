"""Valid tiny files every hostile-input target mutates: an HF folder, GGUFs with either
tokenizer kind, a llama2.c model and tokenizer, a tokenizer.json folder, a SentencePiece model
and a quantized checkpoint; base_files() builds them all, fresh_case() a case folder."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file, save_file

from fuzzing.worker import CASE


def tiny_model(vocab: int, seed: int = 0):
    from awq_ref.config import LlamaConfig
    from awq_ref.model import Llama

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(cfg).eval()


def byte_level_tokens() -> tuple[list[str], list[str]]:
    from awq_ref.loaders.gguf_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["H e", "l l", "o r", "He ll", "\u0120 w"]
    return alphabet + [m.replace(" ", "") for m in merges], merges


def sentencepiece_tokens() -> tuple[list[str], list[float], list[int]]:
    pieces = ["\u2581", "e", "l", "o", "H", "w", "r", "d", "ll", "He", "\u2581w", "Hell"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def gguf_metadata(model, kind: str) -> dict[str, tuple[object, object]]:
    """key -> (value, GGUFValueType) of a GGUF holding `model` and a `kind` tokenizer."""
    t = gguf.GGUFValueType
    c = model.config
    meta = {
        "general.architecture": ("llama", t.STRING),
        "llama.context_length": (c.max_position_embeddings, t.UINT32),
        "llama.embedding_length": (c.hidden_size, t.UINT32),
        "llama.block_count": (c.num_hidden_layers, t.UINT32),
        "llama.feed_forward_length": (c.intermediate_size, t.UINT32),
        "llama.attention.head_count": (c.num_attention_heads, t.UINT32),
        "llama.attention.head_count_kv": (c.num_key_value_heads, t.UINT32),
        "llama.rope.freq_base": (c.rope_theta, t.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, t.FLOAT32),
        "llama.vocab_size": (c.vocab_size, t.UINT32),
        "tokenizer.ggml.model": (kind, t.STRING),
        "tokenizer.ggml.bos_token_id": (1, t.UINT32),
        "tokenizer.ggml.eos_token_id": (2, t.UINT32),
    }
    if kind == "gpt2":
        tokens, merges = byte_level_tokens()
        meta |= {"tokenizer.ggml.tokens": (tokens, t.ARRAY),
                 "tokenizer.ggml.merges": (merges, t.ARRAY),
                 "tokenizer.ggml.pre": ("smollm", t.STRING),
                 "tokenizer.ggml.token_type": ([1] * len(tokens), t.ARRAY)}
    else:
        tokens, scores, types = sentencepiece_tokens()
        meta |= {"tokenizer.ggml.tokens": (tokens, t.ARRAY),
                 "tokenizer.ggml.scores": (scores, t.ARRAY),
                 "tokenizer.ggml.token_type": (types, t.ARRAY),
                 "tokenizer.ggml.add_bos_token": (True, t.BOOL)}
    return meta


def write_gguf(path: Path, model, meta: dict, qtype: str = "F32") -> Path:
    from awq_ref.loaders.gguf_file import NAME_MAP
    from awq_ref.loaders.state_dict import half_to_interleaved

    to_gguf = {hf.format(n=i): g.format(n=i) for g, hf in NAME_MAP.items()
               for i in range(model.config.num_hidden_layers)}
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)  # it warns on every override
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    for name, tensor in model.state_dict().items():
        arr = tensor.detach()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (model.config.num_attention_heads if "q_proj" in name
                     else model.config.num_key_value_heads)
            arr = half_to_interleaved(arr, heads)
        arr = arr.numpy().astype(np.float32)
        if qtype == "F32" or arr.ndim == 1:
            w.add_tensor(to_gguf[name], arr)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(to_gguf[name], gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges = byte_level_tokens()
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "!", "eos_token": "\"", "add_bos_token": True, "eos_token_ids": [2]}))


def write_hf_folder(folder: Path, model) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def write_llama2c(path: Path, model) -> Path:
    from awq_ref.loaders.llama2c import HEADER
    from awq_ref.loaders.state_dict import half_to_interleaved

    c, layers = model.config, model.model.layers
    head = HEADER.pack(c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, -c.vocab_size,
                       c.max_position_embeddings)
    stack = lambda f: torch.stack([f(b) for b in layers])
    parts = [model.model.embed_tokens.weight, stack(lambda b: b.input_layernorm.weight),
             stack(lambda b: half_to_interleaved(b.self_attn.q_proj.weight, c.num_attention_heads)),
             stack(lambda b: half_to_interleaved(b.self_attn.k_proj.weight, c.num_key_value_heads)),
             stack(lambda b: b.self_attn.v_proj.weight), stack(lambda b: b.self_attn.o_proj.weight),
             stack(lambda b: b.post_attention_layernorm.weight),
             stack(lambda b: b.mlp.gate_proj.weight),
             stack(lambda b: b.mlp.down_proj.weight), stack(lambda b: b.mlp.up_proj.weight),
             model.model.norm.weight, torch.zeros(2 * c.max_position_embeddings * c.head_dim // 2),
             model.lm_head.weight]
    body = b"".join(p.detach().float().numpy().astype("<f4").tobytes() for p in parts)
    path.write_bytes(head + body)
    return path


def llama2c_tokenizer_bytes() -> bytes:
    tokens, scores, _ = sentencepiece_tokens()
    tokens = [t.replace("\u2581", " ").encode() for t in tokens]
    body = b"".join(struct.pack("<fi", s, len(t)) + t for t, s in zip(tokens, scores))
    return struct.pack("<i", max(len(t) for t in tokens)) + body


def sentencepiece_model_bytes() -> bytes:
    import io

    import sentencepiece as spm

    text = ["Hello world, hello there.", "The quick brown fox jumps over the lazy dog."] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=40,
                                   model_type="bpe", byte_fallback=False, minloglevel=2)
    return out.getvalue()


class Files(dict):
    """The base files; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<base files: {', '.join(self)}>"


def base_files(root: Path) -> Files:
    """The valid files every target mutates (bytes / parsed objects), built under `root`."""
    from awq_ref.api import quantize
    from awq_ref.quant.checkpoint import save_quantized

    gpt2_model = tiny_model(len(byte_level_tokens()[0]))
    sp_model = tiny_model(len(sentencepiece_tokens()[0]), seed=1)
    hf = write_hf_folder(root / "hf", gpt2_model)
    q = save_quantized(quantize(tiny_model(64, seed=2), group_size=32), root / "quant")
    return Files({
        "config": json.loads((hf / "config.json").read_text()),
        "safetensors": (hf / "model.safetensors").read_bytes(),
        "gguf_gpt2": write_gguf(root / "a.gguf", gpt2_model,
                                gguf_metadata(gpt2_model, "gpt2")).read_bytes(),
        "gguf_llama": write_gguf(root / "b.gguf", sp_model, gguf_metadata(sp_model, "llama"),
                                 "Q8_0").read_bytes(),
        "gguf_model": sp_model,
        "llama2c": write_llama2c(root / "m.bin", sp_model).read_bytes(),
        "llama2c_tok": llama2c_tokenizer_bytes(),
        "spm": sentencepiece_model_bytes(),
        "quant_config": json.loads((q / "config.json").read_text()),
        "quant_tensors": load_file(str(q / "model.safetensors")),
        "quant_safetensors": (q / "model.safetensors").read_bytes(),
    })


def fresh_case(root: Path) -> Path:
    """An empty folder named CASE under `root` (what was there before is removed)."""
    folder = root / CASE
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder

