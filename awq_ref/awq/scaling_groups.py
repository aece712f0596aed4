"""The scaling groups of a Llama block, as data (llm-awq's auto_scale table).

A group is a previous op `prev` whose output feeds the linears `linears`. Scaling input channel c
of the linears by s_c and dividing prev's output channel c by s_c leaves the block's function
unchanged; the loss that chooses s is measured on the output of the module `inspect`.

With GQA, v_proj has Hkv*Dh outputs while o_proj has H*Dh inputs: each v channel feeds the
n_rep = H/Hkv query heads that share its KV head, so one scale per v channel is repeated over
those heads on o_proj's input (`repeat_kv=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScalingGroup:
    prev: str  # module whose output channels are divided by s (RMSNorm or nn.Linear)
    linears: tuple[str, ...]  # linears whose input channels are multiplied by s
    inspect: str  # module whose output defines the loss
    # inspect mixes tokens and takes (x, cos, sin): loss on whole sequences
    positional: bool = False
    repeat_kv: bool = False  # prev has Hkv*Dh outputs, the linears H*Dh inputs (GQA)

    def n_rep(self, cfg) -> int:
        """Query heads per scale entry on the linears' inputs: H/Hkv for GQA's v -> o, else 1."""
        return cfg.n_rep if self.repeat_kv else 1

    @property
    def closed_form(self) -> bool:
        """The loss is one linear's output error: exact via the Gram matrix of its input."""
        return self.linears == (self.inspect,)


LLAMA_GROUPS: tuple[ScalingGroup, ...] = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 inspect="self_attn", positional=True),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), inspect="self_attn.o_proj",
                 repeat_kv=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), inspect="mlp.down_proj"),
)

# Clipping q and k is judged on their own outputs, but their error passes through q k^T and the
# softmax, so a per-layer MSE is a poor proxy (llm-awq skips them for the same reason).
LLAMA_CLIP_SKIP: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")


def input_group(groups: tuple[ScalingGroup, ...], linear: str) -> int:
    """Index of the group whose linears include `linear` (they share one input)."""
    for i, g in enumerate(groups):
        if linear in g.linears:
            return i
    raise KeyError(f"{linear} belongs to no scaling group")


def expand_kv(s: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Scales of the Hkv*Dh v channels -> scales of the H*Dh o_proj inputs.

    Query head h reads KV head h // n_rep (as repeat_kv / SDPA enable_gqa do), so o_proj input
    h*Dh + d carries v channel (h // n_rep)*Dh + d. n_rep 1 (no GQA): s itself.
    """
    if n_rep == 1:
        return s
    if head_dim < 1 or s.numel() % head_dim:
        raise ValueError(f"expand_kv: {s.numel()} scales are no whole number of heads of "
                         f"head_dim {head_dim}")
    hkv = s.numel() // head_dim
    return s.view(hkv, 1, head_dim).expand(hkv, n_rep, head_dim).reshape(-1)  # (H*Dh,)


def reduce_kv(x: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Per-channel statistic of the H*Dh o_proj inputs -> one value per v channel (the mean over
    the n_rep query heads that share it); inverse of `expand_kv` for tied values, up to
    rounding."""
    hkv = x.numel() // (n_rep * head_dim)
    return x.view(hkv, n_rep, head_dim).mean(1).reshape(-1)  # (Hkv*Dh,)
