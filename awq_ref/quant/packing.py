"""The packed 4-bit format ("AWQ GEMM"): the one module that defines it.

Notation: K = in_features, N = out_features, G = group size (G divides K; G = -1 means G = K),
W = nn.Linear.weight.T, so y = x @ W with x [M, K] and W [K, N].

| tensor  | dtype   | shape        | meaning                                          |
|---------|---------|--------------|--------------------------------------------------|
| qweight | int32   | [K, N/8]     | 8 unsigned 4-bit codes per int32 along N         |
| qzeros  | int32   | [K/G, N/8]   | unsigned 4-bit zero points, packed like qweight  |
| scales  | float16 | [K/G, N]     | per-group scales                                 |

Dequantization: W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].

Nibble order ("AWQ order"): within the int32 holding columns 8c..8c+7, bits [4i, 4i+4) hold column
8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; unpacking shifts by 4j and maps back with the
inverse order [0, 4, 1, 5, 2, 6, 3, 7]. (The interleave lets fast kernels turn one 32-bit word
into fp16 pairs with the lop3 / magic-number trick.)

Codes come from the group-wise quantizer (`awq_ref.quant.quantizer`), with one extra step: the
scales are rounded to fp16 FIRST and the zero points and codes are computed with those rounded
scales, so dequantizing the packed tensors in fp32 equals the fake-quantized weight bit for bit.
Symmetric quantization (zero_point=False) packs too: its fixed zero point 2^(b-1) = 8 is stored
in qzeros, so any reader of the format gets the right weights.

Only 4 bits are packed: other bit widths (2..8) work as fake quantization
(`awq_ref.quant.rtn.fake_quantize_weight`), and packing them raises ValueError.
"""

from __future__ import annotations

import torch

from awq_ref.quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize

PACK_BITS = 4
PACK_NUM = 32 // PACK_BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble REVERSE[j]
FP16_MAX = 65504.0  # largest finite float16


class Fp16OverflowError(ValueError):
    """A group's scale or quantized weights exceed float16, which the format stores and its
    kernels compute in; the AWQ search treats a scale candidate raising it as infeasible."""


def check_packable(spec: QuantSpec, name: str = "weight") -> None:
    """Raise ValueError unless `spec` is representable in the packed format."""
    if spec.bits != PACK_BITS:
        raise ValueError(
            f"{name}: the packed format holds {PACK_BITS}-bit codes only, got bits={spec.bits}; "
            f"fake quantization (pack=False) supports 2..8 bits")


def check_linear(spec: QuantSpec, name: str, in_features: int, out_features: int,
                 pack: bool = True, hint: str = "") -> None:
    """Raise ValueError unless the linear `name` can be quantized with `spec`: G divides its
    in_features and, packed, its out_features are whole words of PACK_NUM codes."""
    spec.group_for(in_features, name)
    if pack and out_features % PACK_NUM:
        raise ValueError(f"{name}: out_features {out_features} is not a multiple of {PACK_NUM}, "
                         f"so it cannot be packed{hint}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, N] with values in 0..15 -> int32 [R, N/8], AWQ nibble order along N."""
    r, n = codes.shape
    if n % PACK_NUM:
        raise ValueError(f"cannot pack {n} columns: the count must be a multiple of {PACK_NUM}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"codes must lie in 0..15, got range "
                         f"{int(codes.min())}..{int(codes.max())}")
    c = codes.to(torch.int64).reshape(r, n // PACK_NUM, PACK_NUM)[
        ..., list(AWQ_ORDER)]  # (R, N/8, 8)
    shifts = torch.arange(0, 32, PACK_BITS, device=codes.device, dtype=torch.int64)  # (8,)
    words = (c << shifts).sum(dim=-1)  # (R, N/8), values in 0..2^32-1: nibbles do not overlap
    # Reinterpret as signed 32-bit (two's complement): words >= 2^31 become negative.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> codes [R, N] (int32, 0..15), undoing `pack_int4`."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    r, c = packed.shape
    shifts = torch.arange(0, 32, PACK_BITS, device=packed.device, dtype=torch.int32)  # (8,)
    # Arithmetic right shift drags the sign bit along; the mask keeps only the 4 code bits.
    nib = (packed[..., None] >> shifts) & 0xF  # (R, N/8, 8), nibble i = column ORDER[i]
    # Columns in order = nibbles REVERSE = (0, 4, 1, 5, 2, 6, 3, 7): the two halves of the
    # nibbles interleaved, i.e. a (2, 4) -> (4, 2) transpose. A view, not an index list, so no
    # host-to-device copy (CUDA-graph capture refuses those).
    cols = nib.view(r, c, 2, PACK_NUM // 2).transpose(-1, -2)  # (R, N/8, 4, 2)
    return cols.reshape(r, c * PACK_NUM)


def quantize_with_fp16_scales(w: torch.Tensor, spec: QuantSpec, name: str = "weight"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN codes for w (N, K) whose scales are exactly representable in fp16 (any bits 2..8).

    s16 = fp16(s(w)), z = clamp(-round(min / s16), 0, 2^b - 1) (asymmetric) or 2^(b-1),
    q = clamp(round(w / s16) + z, 0, 2^b - 1). Returns q (N, K) int32, z (N, K/G) int32,
    s16 (N, K/G) float16.
    """
    w32 = w.detach().to(torch.float32)
    s, zeros = compute_qparams(w32, spec, name, scale_dtype=torch.float16)  # (N, K/G) each
    s16 = s.to(torch.float16)
    if not torch.isfinite(s16).all():
        if not torch.isfinite(w32).all():  # not an overflow: NaN or inf makes its group's s so
            raise ValueError(f"{name}: the weight holds NaN or inf")
        raise Fp16OverflowError(f"{name}: a group's range overflows the fp16 scales (max |w| = "
                         f"{w32.abs().max().item():.4g})")
    return quantize(w32, s, zeros, spec), zeros, s16


def check_fp16_range(w_hat: torch.Tensor, name: str = "weight") -> None:
    """Fp16OverflowError if a quantized weight exceeds fp16: fp16 scales hold groups up to
    65504 * (2^bits - 1) wide, but the kernels dequantize into fp16, where |w| > 65504 becomes
    inf."""
    w_max = w_hat.abs().max().item()
    if w_max > FP16_MAX:
        raise Fp16OverflowError(
            f"{name}: quantized weights reach |w| = {w_max:.4g}, beyond fp16's {FP16_MAX:.0f} "
            "(fp16 kernels would read inf); keep the layer unquantized (modules_to_not_convert)")


def pack_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.Linear weight w (N, K) -> (qweight [K, N/8] int32, qzeros [K/G, N/8] int32,
    scales [K/G, N] float16), with codes from `quantize_with_fp16_scales`."""
    check_packable(spec, name)
    n = w.shape[0]
    if n % PACK_NUM:
        raise ValueError(f"{name}: out_features {n} is not a multiple of {PACK_NUM}, cannot pack")
    q, z, s16 = quantize_with_fp16_scales(w, spec, name)  # (N, K), (N, K/G), (N, K/G)
    check_fp16_range(dequantize(q, s16.to(torch.float32), z), name)
    return pack_codes(q, z, s16)


def pack_codes(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizer-layout codes q (N, K), zeros (N, K/G), scales (N, K/G) -> packed tensors.

    The scales must already be the fp16 values the codes were computed with, or the packed
    weight will differ from theirs.
    """
    return pack_int4(q.T), pack_int4(zeros.T), scales.T.to(torch.float16).contiguous()


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [K, N] = (q - z) * s from the packed tensors, in `dtype`.

    Computed in fp32, where (q - z) * s is exact for fp16 s and |q - z| <= 15, then cast once:
    the result is the correctly rounded weight in any dtype.
    """
    k = qweight.shape[0]
    g = k if group_size == -1 else group_size
    check_packed_shapes(qweight, qzeros, scales, k, scales.shape[1], g)
    q = unpack_int4(qweight)  # (K, N)
    z = unpack_int4(qzeros)  # (K/G, N)
    s = scales.to(torch.float32)  # (K/G, N)
    w = dequantize(q.T, s.T, z.T)  # (N, K) fp32, via the quantizer's own formula
    return w.T.to(dtype)


def check_packed_shapes(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        k: int, n: int, g: int, name: str = "layer") -> None:
    """Raise ValueError naming the tensor when shapes/dtypes differ from the format table."""
    if g <= 0 or k % g:
        raise ValueError(f"{name}: group_size {g} does not divide in_features {k}")
    if n % PACK_NUM:
        raise ValueError(f"{name}: out_features {n} is not a multiple of {PACK_NUM}")
    expected = {
        "qweight": ((k, n // PACK_NUM), torch.int32, qweight),
        "qzeros": ((k // g, n // PACK_NUM), torch.int32, qzeros),
        "scales": ((k // g, n), torch.float16, scales),
    }
    for key, (shape, dtype, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{key}: shape {tuple(t.shape)} does not match the expected "
                             f"{shape} for in_features={k}, out_features={n}, group_size={g}")
        if t.dtype != dtype:
            raise ValueError(f"{name}.{key}: dtype {t.dtype}, expected {dtype}")
