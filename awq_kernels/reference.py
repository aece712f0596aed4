"""Pure-torch statement of what the kernels compute, for tests and benchmarks.

The kernel package does not import the project's reference package (`awq_ref`); tests check
that this small packer and dequantizer agree with `awq_ref.quant.packing` bit for bit (float16;
for bfloat16 the kernels round the scale first, which dequantize_like_kernel models).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, N] in 0..15 -> int32 [R, N/8] in AWQ nibble order."""
    r, n = codes.shape
    c = codes.to(torch.int64).reshape(r, n // 8, 8)[..., list(AWQ_ORDER)]  # (R, N/8, 8)
    words = (c << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)      # (R, N/8)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> codes [R, N] (int64, 0..15)."""
    r, c = packed.shape
    nib = (packed.to(torch.int64)[..., None] >> torch.arange(0, 32, 4)) & 0xF  # (R, N/8, 8)
    return nib[..., list(AWQ_REVERSE_ORDER)].reshape(r, 8 * c)


def dequantize_like_kernel(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in `dtype` with the kernels' rounding: (q - z) * s' rounded once, where s' is
    the fp16 scale itself (float16) or the scale rounded to bfloat16 first (bfloat16)."""
    q = unpack_int4(qweight)                                       # (K, N)
    z = unpack_int4(qzeros).repeat_interleave(group_size, 0)       # (K, N)
    s = scales.to(dtype).float().repeat_interleave(group_size, 0)  # (K, N)
    return ((q - z).float() * s).to(dtype)  # exact in fp32, one rounding


def random_packed(k: int, n: int, group_size: int, *, seed: int = 0, device: str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes, zeros and positive scales (typical magnitude 1e-2) in the packed format."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group_size, n), generator=gen)
    s = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.002).to(torch.float16)
    return pack_int4(q).to(device), pack_int4(z).to(device), s.to(device)
