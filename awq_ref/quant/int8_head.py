"""An 8-bit lm_head at run time: the memory of the output table at a small fraction of the 4-bit
head's quality cost.

The 4-bit token table costs little quality, the 4-bit lm_head much more (docs/quantize-your-
model.md: SmolLM2 AWQ W4 24.159 ppl; + both tables in 4 bits 27.022, clipped 25.940; + 4-bit
table and this 8-bit head 24.424). Llama-3-8B's shape with the 4-bit table and an 8-bit head
weighs 27.6% of fp16 (target 30%).

    y = (x @ q^T) * s     q int8 [N, K] = round(W / s), s [N] = max |W[n, :]| / 127

Symmetric, one scale per output row (vocabulary entry), round to nearest. Run time only, like
the 4-bit tables (awq_ref.quant.embedding): `save_quantized` refuses it. `kernel` (set by
`apply_int8_kernel`, e.g. awq_kernels.gemm_int8) replaces the reference forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Int8Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights [N, K] and fp32 per-row scales [N]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} "
                             f"{list(qweight.shape)}")
        if scales.shape != (qweight.shape[0],):
            raise ValueError(f"scales must have shape [{qweight.shape[0]}], "
                             f"got {list(scales.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(torch.float32))
        self.kernel: Int8Kernel | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Round a float weight [N, K] to int8 with one scale per row."""
        w = weight.detach().to(torch.float32)
        s = w.abs().amax(dim=1) / 127  # (N,)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
        q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
        return cls(q, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., N)
        if self.kernel is not None:
            return self.kernel(x, self.qweight, self.scales)
        # The reference: in fp32 (x @ q^T reaches 127 * sum |x|, past fp16's range).
        y = x.to(torch.float32) @ self.qweight.T.to(torch.float32)
        return (y * self.scales).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) would round the fp32 scales (and the kernel takes fp32 only): keep
        # their values and let them follow only the device move, as QuantLinear's scales do.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


def quantize_head_int8(model: nn.Module) -> nn.Module:
    """Replace (in place) model.lm_head by its Int8Linear; returns `model`. A tied token table
    keeps its own (16-bit, or later 4-bit) weights."""
    if isinstance(model.lm_head, Int8Linear):
        raise ValueError("quantize_head_int8: the lm_head is already 8-bit")
    weight = getattr(model.lm_head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"quantize_head_int8: lm_head is a {type(model.lm_head).__name__}, not "
                         "a 16/32-bit linear layer (quantize the head in one way only)")
    head = Int8Linear.from_weight(weight)
    model.lm_head = head.to(weight.device)
    return model


def apply_int8_kernel(model: nn.Module, kernel: Int8Kernel | None) -> int:
    """Set (in place) the backend of every Int8Linear; None = the reference. Returns how many."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in layers:
        m.kernel = kernel
    return len(layers)
