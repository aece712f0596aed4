"""Group-wise integer quantization of a linear weight: the maths shared by RTN and AWQ.

A weight w (N, K) (nn.Linear layout: N out_features, K in_features) is cut along K into groups
of G input channels; each (output channel, group) pair gets its own scale s and zero point z:

    asymmetric (zero_point=True):  s = (max - min).clamp(min=1e-5) / (2^b - 1)
                                   z = clamp(-round(min / s), 0, 2^b - 1)
    symmetric  (zero_point=False): s = max|w|.clamp(min=1e-5) / (2^(b-1) - 1),  z = 2^(b-1)
    codes:                         q = clamp(round(w / s) + z, 0, 2^b - 1)
    dequantize:                    w_hat = (q - z) * s

A group whose weights all have one sign (it does not contain 0) is quantized badly in the
asymmetric variant: z is clamped to [0, 2^b - 1], so the grid cannot reach the group's values
(a constant group c != 0 comes back as ~1e-5; relative MSE at 4 bits on N(0, 1) weights 1.0
at G = 1, 0.13 at G = 2, 0.005 at G = 16). This is the llm-awq / AutoAWQ quantizer, kept
bit-compatible (tests/test_numerics.py holds the case as a known failure); groups of 32 or more
real weights almost always span 0.

Codes are unsigned in both variants (symmetric stores the fixed z = 2^(b-1)), so one packed
layout serves both. Round-to-nearest (RTN, rtn.py) is this with no search, the scales rounded
to fp16 first as a checkpoint stores them (compute_qparams' scale_dtype). G = -1 means one
group spanning all of K (per-output-channel quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # G; -1 = one group per output channel
    zero_point: bool = True  # asymmetric when True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or (
                self.group_size <= 0 and self.group_size != -1):  # True would be a group of 1
            raise ValueError(f"group_size must be a positive integer or -1, "
                             f"got {self.group_size!r}")
        if not isinstance(self.zero_point, bool):  # a truthy "false" would quantize asymmetric
            raise ValueError(f"zero_point must be True or False, got {self.zero_point!r}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def group_for(self, k: int, name: str = "weight") -> int:
        """The group size for a layer with K = k inputs; raises if G does not divide K."""
        g = k if self.group_size == -1 else self.group_size
        if k % g:
            raise ValueError(f"{name}: group_size {g} does not divide in_features {k}")
        return g


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(N, K) -> (N, K/G, G): one row per (output channel, group)."""
    n, k = w.shape
    return w.reshape(n, k // g, g)


def clamp_groups(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """w (N, K) with each (output channel, group) clamped to its box [lo, hi] (N, K/G)."""
    wg = grouped(w, w.shape[1] // lo.shape[1])  # (N, K/G, G)
    return torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None]).view_as(w)


def compute_qparams(w: torch.Tensor, spec: QuantSpec, name: str = "weight",
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (N, K/G) in w's dtype and integer zero points (N, K/G) (int32) for w (N, K).

    scale_dtype (e.g. torch.float16, as a checkpoint stores them): round the scales to it
    before the zero points are computed from them. Callers pass w in fp32, where the rounded
    values stay exact; in bf16 they would be rounded a second time."""
    wg = grouped(w, spec.group_for(w.shape[1], name))  # (N, K/G, G)
    if spec.zero_point:
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scales = (hi - lo).clamp(min=1e-5) / spec.max_code
        if scale_dtype is not None:
            scales = scales.to(scale_dtype).to(w.dtype)
        zeros = (-torch.round(lo / scales)).clamp(0, spec.max_code)
    else:
        scales = wg.abs().amax(dim=-1).clamp(min=1e-5) / (2 ** (spec.bits - 1) - 1)
        if scale_dtype is not None:
            scales = scales.to(scale_dtype).to(w.dtype)
        zeros = torch.full_like(scales, 2 ** (spec.bits - 1))
    return scales, zeros.to(torch.int32)


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
             ) -> torch.Tensor:
    """Integer codes (N, K) in [0, 2^b - 1] (int32) for w (N, K) with scales/zeros (N, K/G)."""
    g = w.shape[1] // scales.shape[1]
    q = torch.round(grouped(w, g) / scales[..., None]) + zeros[..., None].to(w.dtype)
    return q.clamp(0, spec.max_code).to(torch.int32).reshape(w.shape)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w_hat (N, K) = (q - z) * s in the dtype of `scales`."""
    g = q.shape[1] // scales.shape[1]
    w = (grouped(q, g) - zeros[..., None]).to(scales.dtype) * scales[..., None]  # (N, K/G, G)
    return w.reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """Quantize then dequantize with unrounded scales, in w's dtype (the packed model's weights,
    with fp16-rounded scales, are rtn.fake_quantize_weight's)."""
    scales, zeros = compute_qparams(w, spec, name)
    return dequantize(quantize(w, scales, zeros, spec), scales, zeros).to(w.dtype)
