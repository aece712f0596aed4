"""Round-to-nearest (RTN): quantize every decoder linear with no search, packed or fake.

    s16 = fp16(s(w)),  q = clamp(round(w / s16) + z, 0, 2^b - 1),  w_hat = (q - z) * s16

(s, z from `awq_ref.quant.quantizer`; the fp16 rounding of s is what the packed format stores.)
Packed (4 bits only): nn.Linear -> QuantLinear. Fake (any bits 2..8): the nn.Linear keeps its
place and gets w_hat as its weight, so W3 and other unpackable widths can be evaluated; for 4
bits both give the same weights, bit for bit in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from awq_ref.quant.packing import check_fp16_range, quantize_with_fp16_scales
from awq_ref.quant.qlinear import decoder_linears, replace_linears
from awq_ref.quant.quantizer import QuantSpec, dequantize


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """w_hat (N, K) in w's dtype: dequantize(quantize(w)) with fp16-rounded scales, in fp32."""
    q, z, s16 = quantize_with_fp16_scales(w, spec, name)  # (N, K), (N, K/G), (N, K/G)
    w_hat = dequantize(q, s16.to(torch.float32), z)
    check_fp16_range(w_hat, name)
    return w_hat.to(w.dtype)


@torch.no_grad()
def apply_rtn_fake(model: nn.Module, spec: QuantSpec, modules_to_not_convert: Iterable[str] = (),
                   block: int | None = None) -> nn.Module:
    """Replace (in place) each decoder linear weight by its fake-quantized value; returns model.
    block: only that block's linears."""
    for name, lin in decoder_linears(model, modules_to_not_convert, block):
        lin.weight.copy_(fake_quantize_weight(lin.weight, spec, name))
    return model


def apply_rtn(model: nn.Module, spec: QuantSpec, modules_to_not_convert: Iterable[str] = (),
              pack: bool = True, block: int | None = None) -> nn.Module:
    """RTN-quantize (in place) every decoder linear (block: only that block's): QuantLinear
    layers if `pack`, else fake."""
    if pack:
        return replace_linears(model, spec, modules_to_not_convert, block=block)
    return apply_rtn_fake(model, spec, modules_to_not_convert, block)
