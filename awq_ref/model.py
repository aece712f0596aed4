"""A minimal Llama in PyTorch, with HF tensor names so weights compare 1:1 with public checkpoints.

Shape legend: B batch, T tokens, D model dim, H / Hkv heads, Dh head dim, F MLP width, V vocab,
S cached positions (past + current).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from awq_ref.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # One-kernel versions (awq_ref.fuse.use_elementwise_kernels, run time only):
        # (x, weight, eps) -> forward(x); (x, delta, weight, eps) -> add_and_norm(x, delta)
        self.kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
        self.add_kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        # x * rsqrt(mean(x^2) + eps) computed in fp32 (the mean of squares overflows / loses
        # precision in fp16) and rounded to x's dtype, then times the weight, as HF does.
        # F.rms_norm upcasts internally: the same bits on the CPU for fp32/fp16/bf16 as writing
        # it out, and one fused kernel on CUDA, where a decode step is hundreds of tiny kernels.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): a residual add and the norm that reads its result."""
        if self.add_kernel is not None:
            return self.add_kernel(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/Dh), with Llama-3 scaling when configured.

    Llama-3 ("llama3") keeps high frequencies (wavelength < L/high_freq_factor), divides low
    frequencies (wavelength > L/low_freq_factor) by `factor`, and interpolates smoothly between,
    where L = original_max_position_embeddings. Always computed on the CPU in fp32 (also when
    the model is built under a meta-device context).
    """
    dh = config.head_dim
    # an int past int64 (a hostile config) would overflow torch.pow
    theta = float(config.rope_theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.int64,
                                             device="cpu").float() / dh))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq  # (Dh/2,)
    old_len = rs.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / rs.low_freq_factor, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ((wavelen >= old_len / rs.high_freq_factor)
                 & (wavelen <= old_len / rs.low_freq_factor))
    return torch.where(is_medium, smoothed, scaled)


def rotary_tables(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos (T, Dh) and signed sin (T, Dh) for angles freqs (T, Dh/2) fp32, cast once to dtype.

    HF layout: dims i and i + Dh/2 form the (real, imaginary) pair i, both halves rotating by
    freqs[:, i]. The sin table carries the rotation's signs, -sin in the first half and +sin
    in the second, so that `apply_rotary` needs no negation.
    """
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, Dh)
    sign = torch.ones_like(emb)
    sign[:, : freqs.shape[-1]] = -1.0
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), x1 / x2 the halves.

    Written as x * cos + roll(x) * sin_signed with roll(x) = (x2, x1): the same bits as HF's
    x * cos + rotate_half(x) * sin (negating is exact), in four kernels on CUDA (mul, roll, mul,
    add) instead of five (chunk is a view; then neg, cat, two mul, add).
    x (B, H, T, Dh); cos, sin_signed (T, Dh) from `rotary_tables`.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` for x (B, T, H, Dh) (heads not yet moved forward), cos, sin_signed (T, Dh)
    shared by the heads: the signature of the one-kernel version (awq_kernels.ops.rotary)."""
    return apply_rotary(x, cos[:, None], sin_signed[:, None])


def check_window(config: LlamaConfig, length: int) -> None:
    """Mistral's sliding window is not implemented: a sequence may not outgrow it (up to its
    length full causal attention is what the window computes too)."""
    if config.sliding_window is not None and length > config.sliding_window:
        raise ValueError(f"{length} positions exceed this model's sliding attention window of "
                         f"{config.sliding_window}: windowed attention is not implemented here, "
                         f"so sequences (prompt + new tokens) are limited to "
                         f"{config.sliding_window}")


def check_token_ids(config: LlamaConfig, ids: torch.Tensor, what: str) -> None:
    """ValueError unless every id indexes the embedding table: an id past it means a tokenizer
    (or data) that does not belong to the model, which torch reports as an IndexError mid-run.
    For ids on the CPU (prompts, calibration and evaluation tokens): it reads them all."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise ValueError(f"{what}: token ids {int(ids.min())}..{int(ids.max())} do not fit the "
                         f"model's vocabulary (vocab_size {config.vocab_size}); are the "
                         "tokenizer and the model from the same checkpoint?")


class KVCache:
    """Static per-layer key/value buffers, filled left to right; `length` positions are valid."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        check_window(config, max_len)
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)  # (B, Hkv, S, Dh)
        self.k = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, Hkv, T, Dh) keys/values at `length`; return all valid ones
        (B, Hkv, S, Dh)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.config = layer, config
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d, bias = config.hidden_size, config.qkv_bias  # Llama: attention_bias; Qwen2: q, k, v
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.attention_bias)
        # Qwen3: RMSNorm over each head's Dh values of q and of k, before RoPE (None elsewhere)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.qkv: nn.Module | None = None  # q, k, v as one linear (awq_ref.fuse, run time only)
        self.rotary: Callable[..., torch.Tensor] | None = None  # rotate_heads in one kernel (ditto)
        # rotary of q and k + their KV-cache writes in one kernel (cuda_graph's decode step; ditto)
        self.rotary_cache: Callable[..., torch.Tensor] | None = None
        # one token's attention over the cache in one kernel (cuda_graph's decode step; ditto)
        self.decode_attention: Callable[..., torch.Tensor] | None = None

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, T, H, Dh), k and v (B, T, Hkv, Dh), not rotated (views, or
        q and k normalised per head where the architecture does that)."""
        b, t, _ = x.shape
        if self.qkv is None:
            q, k, v = (proj(x).view(b, t, -1, self.head_dim)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = (y.view(b, t, -1, self.head_dim) for y in self.qkv(x))  # awq_ref.fuse
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, H, T, Dh), k and v (B, Hkv, T, Dh), q and k rotated (RoPE)."""
        b, t, _ = x.shape
        rotate = self.rotary or rotate_heads
        if self.qkv is None or self.q_norm is not None:
            q, k, v = self.projections(x)  # (B, T, H or Hkv, Dh)
            return (rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2),
                    v.transpose(1, 2))
        # Fused (awq_ref.fuse): q and k lie side by side in the one output, so one rotation
        # covers both (the same elementwise ops: the same bits as rotating each).
        nq, nk, nv = self.qkv.sizes
        qk, v = self.qkv.linear(x).split([nq + nk, nv], dim=-1)
        qk = rotate(qk.view(b, t, -1, self.head_dim), cos, sin)  # (B, T, H + Hkv, Dh)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, D)
        q, k, v = self.heads(x, cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh) x 2
        past = 0
        if cache is None:
            check_window(self.config, t)  # with a cache: checked when it was made
        else:
            past = cache.length
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, Dh)
        # Query i sits at position past + i and may see keys 0..past + i. Without a past the
        # built-in causal mask says exactly that; with one we build it (T x S, True = visible).
        if past == 0:
            mask, causal = None, t > 1
        else:
            s = k.shape[2]
            mask = (torch.arange(s, device=x.device)[None, :]
                    <= (past + torch.arange(t, device=x.device))[:, None])
            causal = False
        # enable_gqa shares each KV head among n_heads / n_kv_heads query heads, as repeat_kv would.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.gate_up: nn.Module | None = None  # gate and up as one linear (awq_ref.fuse)
        self.silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # ditto

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_up(x) if self.gate_up is not None
                    else (self.gate_proj(x), self.up_proj(x)))
        act = self.silu_mul(gate, up) if self.silu_mul is not None else F.silu(gate) * up  # SwiGLU
        return self.down_proj(act)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(  # x + attention, and its norm
            x, self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.mlp(h)


class LlamaBody(nn.Module):
    """Holds the HF `model.*` tensors: embed_tokens, layers, norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # fp32 on the CPU, kept outside the module's buffers so .to(float16) never rounds it.
        self._inv_freq = rope_frequencies(config)
        self._inv_freq_on_device: torch.Tensor | None = None  # its copy where the model runs

    @property
    def device(self) -> torch.device:
        """Where the token table is (an nn.Embedding, or a packed one: awq_ref.quant.embedding);
        the streaming quantizer's shell has only that table loaded when it asks."""
        emb = self.model.embed_tokens
        return next(itertools.chain(emb.parameters(), emb.buffers())).device

    def inv_freq(self) -> torch.Tensor:
        """The RoPE inverse frequencies (Dh/2,) fp32 on the model's device, copied there once: a
        copy from pageable CPU memory waits for the GPU's queue to drain, so one per forward
        would stop the host from running ahead of the GPU (and cannot be graph-captured)."""
        device = self.device
        if self._inv_freq_on_device is None or self._inv_freq_on_device.device != device:
            self._inv_freq_on_device = self._inv_freq.to(device)
        return self._inv_freq_on_device

    def rotary(self, start: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (T, Dh) for positions start..start+T-1 (see `rotary_tables`)."""
        pos = torch.arange(start, start + t, device=self.device, dtype=torch.float32)
        return rotary_tables(torch.outer(pos, self.inv_freq()), dtype)  # freqs (T, Dh/2)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only."""
        return self.lm_head(self.hidden(tokens, cache, last_only))

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None,
               last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> the final norm's output (B, T, D), what lm_head reads; (B, 1, D),
        the last position only, with last_only."""
        x = self.model.embed_tokens(tokens)  # (B, T, D)
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary(start, tokens.shape[1], x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        if last_only:
            x = x[:, -1:]
        return self.model.norm(x)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.model.norm.weight.dtype)
