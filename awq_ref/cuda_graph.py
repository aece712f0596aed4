"""Decode with a CUDA graph: one decode step is captured once, then replayed for every token.

At batch 1 an eager decode step launches a few hundred small kernels from Python, and the GPU
waits on the CPU between them. A CUDA graph records the step's kernels once and replays them
with one launch. A graph replays fixed kernels with fixed arguments and addresses, so
everything that changes from one token to the next lives in tensors allocated before capture:

    token (1, 1)      the input token id
    position (1,)     its position = the number of cached positions before it
    KV cache          keys/values written at `position` (index_copy_), and attention reads all
                      max_len slots under the mask slot <= position

`static_decode_step` is that step written with tensors only (no Python ints that move); it runs
on any device and is tested against the eager `Llama.forward` with the KV cache, which stays
the reference. `CudaGraphDecoder` captures it on the GPU following torch's documented recipe:
warm up on a side stream, capture with `torch.cuda.graph`, then fill the static inputs and replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from awq_ref.model import Attention, KVCache, Llama, rotary_tables


def _attend(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            cache: KVCache, position: torch.Tensor, visible: torch.Tensor | None
            ) -> torch.Tensor:
    """Attention.forward for one token whose position is a tensor (see the module docstring),
    on the attention's one-kernel versions where installed (awq_ref.fuse)."""
    b = x.shape[0]  # x (B, 1, D)
    keys, values = cache.k[attn.layer], cache.v[attn.layer]  # (B, Hkv, S_max, Dh)
    if attn.rotary_cache is not None:  # one kernel: rotate q and k, write k and v at `position`
        q, k, v = attn.projections(x)  # (B, 1, H, Dh), (B, 1, Hkv, Dh) x 2
        q = attn.rotary_cache(q, k, v, cos, sin, keys, values, position)  # (B, 1, H, Dh)
    else:
        q, k, v = attn.heads(x, cos, sin)  # (B, H, 1, Dh), (B, Hkv, 1, Dh) x 2, rotated
        keys.index_copy_(2, position, k)
        values.index_copy_(2, position, v)
        q = q.transpose(1, 2)  # (B, 1, H, Dh)
    if attn.decode_attention is not None:  # one kernel, over slots 0..position only
        y = attn.decode_attention(q, keys, values, position)  # (B, 1, H, Dh)
    else:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible,
                                           enable_gqa=attn.n_heads != attn.n_kv_heads
                                           ).transpose(1, 2)  # (B, 1, H, Dh)
    return attn.o_proj(y.reshape(b, 1, attn.n_heads * attn.head_dim))


def static_decode_step(model: Llama, cache: KVCache, token: torch.Tensor, position: torch.Tensor,
                       inv_freq: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) for token (B, 1) at position (1,) int64; writes that slot of the cache.

    Does not advance `cache.length` (the caller does). inv_freq (Dh/2,) fp32 on the model's
    device (`model.inv_freq()`: a copy from the CPU cannot be captured).
    """
    x = model.model.embed_tokens(token)  # (B, 1, D)
    freqs = position.to(torch.float32)[:, None] * inv_freq[None, :]  # (1, Dh/2), as Llama.rotary
    cos, sin = rotary_tables(freqs, x.dtype)  # (1, Dh) each
    # Slots after `position` hold zeros or stale keys from warm-up: never visible. (The
    # one-kernel attention reads slots 0..position only: no mask to build for it.)
    visible = None
    if any(block.self_attn.decode_attention is None for block in model.model.layers):
        visible = (torch.arange(cache.max_len, device=x.device) <= position)[None, :]  # (1, S_max)
    for block in model.model.layers:  # Block.forward with a position tensor
        attended = _attend(block.self_attn, block.input_layernorm(x), cos, sin, cache, position,
                           visible)
        x, h = block.post_attention_layernorm.add_and_norm(x, attended)
        x = x + block.mlp(h)
    return model.lm_head(model.model.norm(x))[:, -1]  # (B, V)


class CudaGraphDecoder:
    """Decode steps for `model` with `cache` (already prefilled), replayed from one CUDA graph.

    The constructor warms up and captures; `step(token)` runs one token and advances
    `cache.length`, so eager steps (Llama.forward with the cache) may follow or precede.
    Everything in the step must be capturable: fp16 layers and awq_kernels are (tested on an
    H200). The reference QuantLinear path indexed with a host list, which capture refused (H200,
    2026-12-04); its unpacking is now a view, captured on an H100 (2026-12-05).
    """

    def __init__(self, model: Llama, cache: KVCache, warmup_steps: int = 3):
        if cache.length >= cache.max_len:  # the warm-up steps write slot cache.length
            raise ValueError(f"KV cache overflow: position {cache.length} >= max_len "
                             f"{cache.max_len}: no free slot to decode into")
        if model.device.type != "cuda":
            raise ValueError(f"CUDA-graph decode needs a model on a CUDA device, got "
                             f"{model.device}; use eager decode (the default) there")
        self.model, self.cache = model, cache
        device = model.device
        self.token = torch.zeros((cache.k[0].shape[0], 1), dtype=torch.long,
                                 device=device)  # (B, 1)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.inv_freq = model.inv_freq()  # (Dh/2,) fp32 on the device
        self.graph = torch.cuda.CUDAGraph()
        # Warm-up, capture and every replay run on this one stream: per-stream state a backend
        # keeps (awq_kernels' split-K counters) is then never touched by two streams at once,
        # even when torch's stream pool hands the same stream to other code.
        self.stream = torch.cuda.Stream(device)
        self.logits = self._capture(warmup_steps)  # (B, V), rewritten by every replay

    def _run(self) -> torch.Tensor:
        return static_decode_step(self.model, self.cache, self.token, self.position, self.inv_freq)

    @torch.no_grad()
    def _capture(self, warmup_steps: int) -> torch.Tensor:
        # Warm-up steps run once eagerly so that lazy set-up (cuBLAS workspaces, kernels
        # compiled on first use, per-stream scratch a backend keeps) happens before capture,
        # on the stream that then captures; they write the cache slot at
        # `position` = cache.length, which the first real step overwrites before reading it.
        self.position.fill_(self.cache.length)
        current = torch.cuda.current_stream(self.model.device)
        side = self.stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._run()
        current.wait_stream(side)
        with torch.cuda.graph(self.graph, stream=side):
            logits = self._run()
        return logits

    @torch.no_grad()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Logits (V,) of the next token after `token` (an id, or a 0-dim tensor on the device).
        The result is the graph's output buffer: read it before the next step."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: position {self.cache.length} >= max_len "
                             f"{self.cache.max_len}")
        self.token.fill_(token)
        self.position.fill_(self.cache.length)
        current = torch.cuda.current_stream(self.model.device)
        self.stream.wait_stream(current)  # the inputs (and eager steps' cache writes) first
        with torch.cuda.stream(self.stream):
            self.graph.replay()
        current.wait_stream(self.stream)  # then whatever reads the logits or the cache
        self.cache.length += 1
        return self.logits[0]
