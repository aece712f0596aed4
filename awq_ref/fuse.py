"""Fuse the projections that read the same input into one linear each, at run time.

q, k and v all read the attention's normed input; gate and up both read the MLP's. Stacking
their weights along the output dimension turns 3 + 2 products into 1 + 1 per block, split on
the way out:

    [q | k | v] = x @ [Wq | Wk | Wv]        [gate | up] = x @ [Wg | Wu]

Same numbers (each output column is still its own dot product), fewer and larger kernels: at
decode time on a GPU a product of one row is a kernel launch, and Llama-3-8B's k and v
(N = 1024) alone cannot fill a GPU. Works for nn.Linear (weights concatenated) and for the packed
QuantLinear (qweight, qzeros and scales concatenated along N: the format packs columns
independently, FORMAT.md). Run time only: AWQ and `save_quantized` need the separate layers and
refuse a fused model.

`use_elementwise_kernels` is the same idea for the small element-wise steps: RMSNorm with its
weight (and with the residual add before it), silu(gate) * up and the rotary embedding (and, in
the CUDA-graph decode step, the KV-cache writes after it) each become one kernel of a backend
(e.g. awq_kernels.ops) instead of 2 (3), 2 and 4 (6) torch kernels; and the decode step's
attention one kernel over the filled cache slots instead of the masked SDPA over all.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from awq_ref.model import MLP, Attention, RMSNorm
from awq_ref.quant.qlinear import QuantLinear


class FusedProjections(nn.Module):
    """One linear whose output is split into the named projections' outputs."""

    def __init__(self, linear: nn.Module, sizes: tuple[int, ...]):
        super().__init__()
        self.linear, self.sizes = linear, sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)  # views, no copies

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


def _stack(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `layers` (same input), or None when they cannot be stacked."""
    if all(isinstance(m, QuantLinear) for m in layers):
        if len({(m.in_features, m.group_size) for m in layers}) != 1:
            return None
        biases = [m.bias for m in layers]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        # [K, N/8], [K/G, N/8] and [K/G, N] side by side: N = the sum of the layers' N
        fused = QuantLinear.from_packed(
            torch.cat([m.qweight for m in layers], dim=1),
            torch.cat([m.qzeros for m in layers], dim=1),
            torch.cat([m.scales for m in layers], dim=1), layers[0].group_size,
            None if biases[0] is None else torch.cat(biases), name="fused")
        fused.kernel = layers[0].kernel
        return fused
    if all(type(m) is nn.Linear for m in layers):
        if len({(m.in_features, m.weight.dtype, m.bias is None) for m in layers}) != 1:
            return None
        first = layers[0]
        with torch.device("meta"):
            fused = nn.Linear(first.in_features, sum(m.out_features for m in layers),
                              bias=first.bias is not None)
        weights = [m.weight.detach() for m in layers]  # (N_i, K) each
        fused.weight = nn.Parameter(torch.cat(weights), requires_grad=False)  # (sum N_i, K)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]),
                                      requires_grad=False)
        return fused
    return None  # a mix (e.g. one layer kept unquantized): leave them apart


def fuse_projections(model: nn.Module) -> int:
    """Fuse (in place) q/k/v and gate/up of every block where their layers allow it; returns
    how many groups were fused. The separate layers are removed (their memory is freed)."""
    fused = 0
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.qkv is None:
            layers = [attn.q_proj, attn.k_proj, attn.v_proj]
            if (stacked := _stack(layers)) is not None:
                attn.qkv = FusedProjections(stacked, tuple(m.out_features for m in layers))
                attn.q_proj = attn.k_proj = attn.v_proj = None
                fused += 1
        if mlp.gate_up is None:
            layers = [mlp.gate_proj, mlp.up_proj]
            if (stacked := _stack(layers)) is not None:
                mlp.gate_up = FusedProjections(stacked, tuple(m.out_features for m in layers))
                mlp.gate_proj = mlp.up_proj = None
                fused += 1
    return fused


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedProjections) for m in model.modules())


class ElementwiseOps(Protocol):
    """What `use_elementwise_kernels` installs; awq_kernels.ops is one. Each must compute what
    the model's own code does (RMSNorm.forward and its comment, MLP.forward, rotate_heads),
    up to rounding, for models whose head dim is in HEAD_DIMS and whose KV heads each serve at
    most MAX_GROUP query heads."""

    HEAD_DIMS: tuple[int, ...]
    MAX_GROUP: int  # query heads per KV head the decode attention handles

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def rotary(self, x: torch.Tensor, cos: torch.Tensor,
               sin_signed: torch.Tensor) -> torch.Tensor: ...

    def rotary_into_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos: torch.Tensor, sin_signed: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, position: torch.Tensor) -> torch.Tensor: ...

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         position: torch.Tensor) -> torch.Tensor: ...


def use_elementwise_kernels(model: nn.Module, ops: ElementwiseOps | None) -> int:
    """Run every RMSNorm (and residual add + RMSNorm), SwiGLU and rotary embedding (and rotary +
    KV-cache write, and the decode step's attention) of `model` on `ops` (None: back to the
    model's torch code). Returns how many modules were set."""
    if ops is not None and model.config.head_dim not in ops.HEAD_DIMS:
        raise ValueError(f"these kernels handle head dims {ops.HEAD_DIMS}; the model's is "
                         f"{model.config.head_dim}: run it without them")
    if ops is not None and model.config.n_rep > ops.MAX_GROUP:
        raise ValueError(f"these kernels handle at most {ops.MAX_GROUP} query heads per KV head; "
                         f"the model has {model.config.n_rep}: run it without them")
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and name.endswith(("q_norm", "k_norm")):
            continue  # Qwen3's per-head norms read strided views: torch's F.rms_norm takes those
        if isinstance(module, RMSNorm):
            module.kernel = None if ops is None else ops.rms_norm
            module.add_kernel = None if ops is None else ops.add_rms_norm
        elif isinstance(module, MLP):
            module.silu_mul = None if ops is None else ops.silu_mul
        elif isinstance(module, Attention):
            module.rotary = None if ops is None else ops.rotary
            module.rotary_cache = None if ops is None else ops.rotary_into_cache
            module.decode_attention = None if ops is None else ops.decode_attention
        else:
            continue
        count += 1
    return count
