"""Block inputs and the statistics of each scaling group's input, gathered chunk by chunk.

For every group's input x (the shared input of its linears), over all B x T calibration tokens:
    mean|x|   (K,)      the activation magnitude that AWQ's scales follow
    X^T X     (K, K)    the Gram matrix: exact quadratic losses of linear outputs (fp32 sums)
plus, for groups whose loss runs a module forward, a fixed subset of the inputs: the first
`seqs` whole sequences (attention mixes tokens) or `tokens` strided tokens (token-wise MLP).
Shape legend: B batch (calibration windows), T tokens per window, D model dim, K in_features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from awq_ref.awq.scaling_groups import ScalingGroup

GRAM_BLOCK = 128  # rows of X^T X per matmul in gram_matrix (measured: 64..384 within 5%)


class NonFiniteError(FloatingPointError):
    """NaN or inf in calibration activations or search losses; the message names block and layer."""


def check_finite(t: torch.Tensor, where: str) -> None:
    """NonFiniteError if t holds a NaN or an inf. Its least and greatest elements say so (both are
    NaN if any element is): one read of t, where isfinite(t).all() writes a mask as large as t
    (0.9 against 12 ms on one 16 x 512 x 576 chunk here, ~5% of the AWQ search)."""
    if t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
        raise NonFiniteError(f"{where}: NaN or inf found")


def gram_matrix(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """X^T X (K, K) for x (M, K): its upper block triangle, `block` rows per matmul, mirrored.

    X^T X is symmetric, so the part below the diagonal blocks is copied instead of multiplied:
    ~40% fewer flops (K = 1536, M = 8192: 345 -> 211 ms on one CPU thread; the default model's
    capture 10.8 -> 9.2 s, search_block 29.1 -> 26.8 s). Every entry is still one dot product
    over the M rows: on the CPU (MKL) the same bits as x.T @ x, checked for K in 64..4096,
    M in 100..16384, on 1 and 2 threads.
    """
    k = x.shape[1]
    out = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for i in range(0, k, block):
        rows = x[:, i:i + block].T @ x[:, i:]  # (block, K - i): diagonal block and right of it
        out[i:i + block, i:] = rows
        out[i + block:, i:i + block] = rows[:, block:].T  # the mirror below the diagonal
    return out


@dataclass
class InputStats:
    """Statistics of one group's input x (.., K); see the module docstring."""

    abs_sum: torch.Tensor  # (K,)
    gram: torch.Tensor | None  # (K, K), None when not requested
    count: int = 0  # tokens seen: B x T after capture_block
    # inputs kept for module losses: positional groups [(c, T, K) chunks]; token-wise groups one
    # (<= plan.tokens, K) tensor after capture_block; closed-form groups none
    subset: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count


@dataclass(frozen=True)
class SubsetPlan:
    seqs: int  # whole sequences kept for positional (attention) losses
    tokens: int  # strided tokens kept for token-wise (MLP) losses


@torch.no_grad()
def embed(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Inputs of the first block (B, T, D) in fp32 on `device`: simply the token embeddings."""
    emb = model.model.embed_tokens
    return torch.cat([emb(tokens[i:i + 64].to(emb.weight.device)).to(device, torch.float32)
                      for i in range(0, tokens.shape[0], 64)])


@torch.no_grad()
def forward_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  chunk_seqs: int, where: str) -> None:
    """x (B, T, D) <- block(x), in place, `chunk_seqs` sequences at a time."""
    for i in range(0, x.shape[0], chunk_seqs):
        y = block(x[i:i + chunk_seqs], cos, sin)
        check_finite(y, f"{where} output")
        x[i:i + chunk_seqs] = y


@torch.no_grad()
def capture_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  groups: tuple[ScalingGroup, ...], plan: SubsetPlan, chunk_seqs: int,
                  where: str, gram: bool = True, write_outputs: bool = False
                  ) -> list[InputStats]:
    """Run the block over x (B, T, D) and return one InputStats per group.

    With write_outputs=True, x is overwritten in place by the block's output (fp weights as
    given): the next block's inputs from the same forward (pipeline's propagate="fp").
    """
    b, t, _ = x.shape
    # rounded up: at most plan.tokens strided tokens, spread to the last window when the
    # stride is at most T (loss_tokens >= B, as by default)
    stride = max(1, -(-(b * t) // max(1, plan.tokens)))
    stats: list[InputStats] = []
    pos = [0]  # first sequence of the current chunk, read by the hooks

    def hook_for(group: ScalingGroup, st: InputStats, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            h = args[0]  # (c, T, K)
            check_finite(h, f"{where} input of {name}")
            flat = h.reshape(-1, h.shape[-1]).float()  # (c*T, K)
            st.abs_sum += flat.abs().sum(0)
            if st.gram is not None:
                st.gram += gram_matrix(flat)
            st.count += flat.shape[0]
            if group.positional:
                keep = max(0, min(h.shape[0], plan.seqs - pos[0]))
                if keep:
                    st.subset.append(h[:keep].float().clone())
            elif not group.closed_form:
                first = pos[0] * t
                offset = (-first) % stride  # next global token index on the stride
                st.subset.append(flat[offset::stride].clone())
        return hook

    handles = []
    for g in groups:
        lin = block.get_submodule(g.linears[0])
        k = lin.in_features
        st = InputStats(abs_sum=torch.zeros(k, device=x.device),
                        gram=torch.zeros(k, k, device=x.device) if gram else None)
        stats.append(st)
        handles.append(lin.register_forward_pre_hook(hook_for(g, st, g.linears[0])))
    try:
        for i in range(0, b, chunk_seqs):
            pos[0] = i
            y = block(x[i:i + chunk_seqs], cos, sin)
            check_finite(y, f"{where} output")
            if write_outputs:
                x[i:i + chunk_seqs] = y
    finally:
        for h in handles:
            h.remove()
    for g, st in zip(groups, stats):
        if st.subset and not g.positional:
            st.subset = [torch.cat(st.subset)]  # (<= plan.tokens, K)
    return stats
