"""llama2.c "legacy" (version 0) checkpoints: a header of 7 int32 then fp32 arrays.

Header: dim D, hidden_dim F, n_layers L, n_heads H, n_kv_heads Hkv, vocab_size V (negative: the
classifier is stored separately, not tied), seq_len. Arrays, in order (each [out, in] like
nn.Linear): tok_emb[V,D]; rms_att[L,D]; wq[L,H*Dh,D]; wk[L,Hkv*Dh,D]; wv[L,Hkv*Dh,D];
wo[L,D,H*Dh]; rms_ffn[L,D]; w1(gate)[L,F,D]; w2(down)[L,D,F]; w3(up)[L,F,D]; rms_final[D];
freq_cis_real[seq_len,Dh/2]; freq_cis_imag[seq_len,Dh/2] (both read and dropped: the RoPE
tables are recomputed); wcls[V,D] if untied.
RoPE rotates interleaved pairs, so q/k rows are permuted to HF's rotate-half order at load.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from awq_ref.config import LlamaConfig
from awq_ref.loaders.llama2c_tokenizer import BOS_ID, EOS_ID, parse_llama2c_vocab
from awq_ref.loaders.state_dict import interleaved_to_half, model_from_state_dict
from awq_ref.model import Llama

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = struct.pack("<I", 0x616B3432)  # "ak42": llama2.c's export versions 1 and 2


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative: untied classifier
    seq_len: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every fp32 array in file order."""
        d, f, n_l, v = self.dim, self.hidden_dim, self.n_layers, abs(self.vocab_size)
        q, kv, half = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                       self.head_dim // 2)
        shapes = [("tok_emb", (v, d)), ("rms_att", (n_l, d)), ("wq", (n_l, q, d)),
                  ("wk", (n_l, kv, d)), ("wv", (n_l, kv, d)), ("wo", (n_l, d, q)),
                  ("rms_ffn", (n_l, d)), ("w1", (n_l, f, d)), ("w2", (n_l, d, f)),
                  ("w3", (n_l, f, d)), ("rms_final", (d,)), ("freq_cis_real", (self.seq_len, half)),
                  ("freq_cis_imag", (self.seq_len, half))]
        return shapes + ([] if self.vocab_size > 0 else [("wcls", (v, d))])

    def n_bytes(self) -> int:
        return HEADER.size + 4 * sum(math.prod(s) for _, s in self.arrays())


def read_header(path: Path) -> Llama2cHeader:
    """The header, checked for sense and against the file size before anything else is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER.size)
    if head[:4] == VERSIONED_MAGIC:
        raise ValueError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy "
                         "version-0 format is supported")
    if len(head) < HEADER.size:
        raise ValueError(f"{path}: too short for a llama2.c checkpoint header ({size} bytes)")
    h = Llama2cHeader(*HEADER.unpack(head))
    fields = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, abs(h.vocab_size),
              h.seq_len)
    if min(fields) <= 0 or h.dim % h.n_heads or h.n_heads % h.n_kv_heads or h.head_dim % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint: implausible header {h}")
    if h.n_bytes() != size:
        raise ValueError(f"{path}: the header {h} implies {h.n_bytes()} bytes, the file has {size} "
                         "(truncated, or not a llama2.c legacy checkpoint)")
    return h


def is_llama2c_model(path: Path) -> bool:
    try:
        read_header(path)
    except ValueError:
        return False
    return True


def config_from_header(h: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(vocab_size=abs(h.vocab_size), hidden_size=h.dim,
                       intermediate_size=h.hidden_dim,
                       num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads,
                       num_key_value_heads=h.n_kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=h.seq_len, tie_word_embeddings=h.vocab_size > 0,
                       bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))


def llama2c_state_dict(path: Path, h: Llama2cHeader) -> dict[str, torch.Tensor]:
    """HF name -> fp32 tensor, q/k rows permuted from interleaved to rotate-half pairs."""
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    arrays, off = {}, 0
    for name, shape in h.arrays():
        n = math.prod(shape)
        arrays[name] = torch.from_numpy(np.array(flat[off:off + n]).reshape(shape))
        off += n
    sd = {"model.embed_tokens.weight": arrays["tok_emb"], "model.norm.weight": arrays["rms_final"]}
    if "wcls" in arrays:
        sd["lm_head.weight"] = arrays["wcls"]
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half(arrays["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half(arrays["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    return {k: v.contiguous() for k, v in sd.items()}


def load_llama2c_model(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> Llama:
    path = Path(path)
    h = read_header(path)
    return model_from_state_dict(config_from_header(h), llama2c_state_dict(path, h),
                                 source=str(path), device=device, dtype=dtype)


def find_tokenizer_for(model_path: Path) -> Path:
    """The llama2.c tokenizer beside a model .bin: tokenizer.bin or tok*.bin with V tokens."""
    vocab = abs(read_header(model_path).vocab_size)
    folder = model_path.parent
    candidates = [p for p in [folder / "tokenizer.bin", *sorted(folder.glob("tok*.bin"))]
                  if p.is_file() and p.resolve() != model_path.resolve()]
    matching = []
    for p in dict.fromkeys(candidates):
        try:
            if len(parse_llama2c_vocab(p.read_bytes(), str(p))[1]) == vocab:
                matching.append(p)
        except ValueError:
            continue  # not a tokenizer file; keep looking
    if not matching:
        raise ValueError(f"{model_path}: no llama2.c tokenizer with {vocab} tokens next to it "
                         f"(looked for tokenizer.bin and tok*.bin in {folder}); "
                         "pass the tokenizer's path to load_tokenizer")
    return matching[0]
