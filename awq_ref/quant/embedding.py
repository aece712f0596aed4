"""4-bit token embeddings and lm_head at run time: memory, not part of the checkpoint format.

The AWQ checkpoint quantizes only the decoder's linears; the token table and lm_head stay in
16 bits. On a large vocabulary they are a big share of the weights: Llama-3-8B's two tables are
2 x 128256 x 4096 fp16 = 2 GiB of its 15 GiB, so a 4-bit decoder still weighs 36% of fp16.
`quantize_embeddings` RTN-quantizes both tables after loading, into the same packed format as
the decoder (FORMAT.md), with V = vocab size and D = hidden size:

    lm_head:      QuantLinear(K = D, N = V), W [D, V] = lm_head.weight.T, groups of G along D
    embed_tokens: QuantEmbedding; embedding row v = column v of such a packed W, dequantized
                  for the looked-up tokens only: (q[:, v] - z[:, v]) * s[:, v]

so each token's D values are quantized in groups of G, and lm_head runs on the same kernels as
every other QuantLinear. A tied model (SmolLM2) keeps ONE packed table, shared by both modules
(like the tied fp weight). The token table rounds almost for free; the lm_head does not, and
`awq_ref.awq.head.clipped_head` clips it against calibration activations first
(`head_weight=`; measured in docs/quantize-your-model.md). The result is a run-time model:
`save_quantized` refuses it: readers of the AWQ format (vLLM, transformers) expect 16-bit ones.
"""

from __future__ import annotations

import torch
from torch import nn

from awq_ref.quant.packing import AWQ_REVERSE_ORDER, PACK_BITS, PACK_NUM
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.quant.quantizer import QuantSpec, dequantize


class QuantEmbedding(nn.Module):
    """nn.Embedding over a packed table: `packed` is a QuantLinear(K = D, N = V) whose column v is
    token v's embedding; forward returns the dequantized rows in `dtype` (the model's)."""

    def __init__(self, packed: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.packed = packed
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        device = packed.qweight.device
        # A 0-element buffer carries the activation dtype and follows model.to(dtype).
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype, device=device),
                             persistent=False)
        # Nibble shift of column v is shifts[v % 8]; a buffer, so forward never copies from the
        # host (CUDA-graph capturable).
        shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32) * PACK_BITS
        self.register_buffer("shifts", shifts.to(device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens (...) int -> (..., D)
        p = self.packed
        idx = tokens.reshape(-1)  # (T,)
        # nn.Embedding's check; indexing below would wrap negative ids silently. Checked where
        # it costs no device sync (on the CPU); on a GPU an id past V still faults in the gather.
        if idx.device.type == "cpu" and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(f"token ids must be in [0, {self.num_embeddings}), "
                                 f"got [{lo}, {hi}]")
        shift = self.shifts[idx % PACK_NUM]  # (T,)
        word = idx // PACK_NUM
        q = (p.qweight[:, word] >> shift) & 0xF  # (D, T) codes of the looked-up columns
        z = (p.qzeros[:, word] >> shift) & 0xF  # (D/G, T)
        s = p.scales[:, idx].to(torch.float32)  # (D/G, T)
        # The quantizer's formula in fp32 then one cast, as dequantize_packed: row v equals the
        # lm_head's column v bit for bit.
        w = dequantize(q.T, s.T, z.T)  # (T, D), a transposed view: made contiguous like
        # nn.Embedding's output (the elementwise CUDA kernels require rows contiguous)
        w = w.to(self.dtype_ref.dtype).contiguous()
        return w.reshape(*tokens.shape, self.embedding_dim)  # not -1: ambiguous for 0 tokens

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"group_size={self.packed.group_size}, dtype={self.dtype_ref.dtype}")


def _pack_table(weight: torch.Tensor, group_size: int, name: str) -> QuantLinear:
    """A (V, D) table -> QuantLinear(D, V), RTN 4-bit with zero points, groups of G along D."""
    v, d = weight.shape
    with torch.device("meta"):
        lin = nn.Linear(d, v, bias=False)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return QuantLinear.from_linear(lin, QuantSpec(4, group_size), name)


def default_group_size(model: nn.Module) -> int:
    """The decoder's group size (its first QuantLinear's), else the largest of 128, 64, 32 that
    divides the hidden size (0 if none does)."""
    decoder = [m.group_size for m in model.modules() if isinstance(m, QuantLinear)]
    d = model.config.hidden_size
    return decoder[0] if decoder else next((g for g in (128, 64, 32) if d % g == 0), 0)


def quantize_embeddings(model: nn.Module, group_size: int | None = None,
                        parts: tuple[str, ...] = ("embed", "head"),
                        init_only: bool = False, head_weight: torch.Tensor | None = None
                        ) -> nn.Module:
    """Replace (in place) model.model.embed_tokens and model.lm_head by 4-bit RTN versions;
    returns `model`. group_size None: `default_group_size`. Tied tables stay tied: one packed
    table for both.
    `parts` picks the tables ("embed", "head"); a tied model quantized in one part only keeps
    its 16-bit table for the other (so saves no memory). With init_only the packed tables are
    only allocated (as `replace_linears` does). head_weight (V, D), e.g. from
    `awq_ref.awq.head.clipped_head`, is rounded in place of lm_head.weight (and of the token
    table too when the two are tied)."""
    if not parts or set(parts) - {"embed", "head"}:
        raise ValueError(f"quantize_embeddings: parts must name 'embed' and/or 'head', "
                         f"got {parts!r}")
    if isinstance(model.model.embed_tokens, QuantEmbedding):
        raise ValueError("quantize_embeddings: the embeddings are already quantized")
    table = model.model.embed_tokens.weight  # (V, D)
    v, d = table.shape
    group_size = default_group_size(model) if group_size is None else group_size
    if group_size == 0:
        raise ValueError(f"quantize_embeddings: none of the group sizes 128, 64, 32 divides the "
                         f"hidden size {d}; pass group_size")
    if group_size <= 0 or d % group_size:
        raise ValueError(f"quantize_embeddings: group_size {group_size} does not divide the "
                         f"hidden size {d}")
    if v % PACK_NUM:
        raise ValueError(f"quantize_embeddings: vocab size {v} is not a multiple of {PACK_NUM}")
    dtype = table.dtype
    head_fp = getattr(model.lm_head, "weight", None)  # None: already quantized (e.g. 8-bit)
    if "head" in parts and (head_fp is None or isinstance(model.lm_head, QuantLinear)):
        raise ValueError("quantize_embeddings: the lm_head is already quantized")
    tied = head_fp is table

    def pack(weight: torch.Tensor, name: str) -> QuantLinear:
        if init_only:
            return QuantLinear(d, v, group_size, device=weight.device)
        return _pack_table(weight, group_size, name)

    if head_weight is not None and head_weight.shape != table.shape:
        raise ValueError(f"quantize_embeddings: head_weight has shape {tuple(head_weight.shape)}, "
                         f"lm_head.weight {tuple(table.shape)}")
    head = head_fp if head_weight is None else head_weight
    embed = pack(head if tied else table, "model.embed_tokens") if "embed" in parts else None
    if "head" in parts:
        model.lm_head = embed if tied and embed is not None else pack(head, "lm_head")
    if embed is not None:
        model.model.embed_tokens = QuantEmbedding(embed, dtype)
    return model

