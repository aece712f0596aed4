"""Every kernel path on small shapes, for compute-sanitizer (issue 5: memcheck clean).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/gpu_memcheck.py

Small shapes keep the instrumented run short; they still cover partial M tiles, split-K with the
fp32 reduce, every group size, fp16 and bf16. Prints one line per call and exits 1 on a wrong
result (the sanitizer's own exit code reports memory errors).
"""

from __future__ import annotations

import sys

import torch

import awq_kernels
from awq_kernels import reference

CASES = [  # (M, K, N, G, kernel)
    (1, 576, 192, 64, "gemv"), (5, 160, 320, 32, "gemv"), (8, 1536, 576, 128, "gemv"),
    (1, 576, 192, 64, "gemv_direct"), (2, 160, 320, 32, "gemv_direct"),
    (3, 1536, 576, 128, "gemv_direct"), (7, 576, 192, 32, "gemv_direct"),
    (17, 1536, 576, 64, "mma_split"),
    (1, 576, 192, 64, "mma_direct"), (6, 160, 320, 32, "mma_direct"),
    (16, 1536, 576, 128, "mma_direct"), (29, 576, 192, 32, "mma_direct"),
    (1, 576, 192, 64, "mma"), (17, 160, 320, 32, "mma"), (40, 1536, 576, 128, "mma"),
    (300, 576, 192, 64, "dequant"), (33, 1536, 576, 32, "auto"),
    (70, 128, 4160, 32, "dequant_overlap"),  # 2 column slices: 2112 and 2048 columns
]


def main() -> int:
    failures = 0
    for m, k, n, g, kernel in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            qweight, qzeros, scales = reference.random_packed(k, n, g, seed=m, device="cuda")
            w = reference.dequantize_like_kernel(qweight.cpu(), qzeros.cpu(), scales.cpu(), g,
                                                 dtype).float().cuda()  # (K, N)
            x = torch.randn(m, k, device="cuda").to(dtype)
            y = awq_kernels.gemm(x, qweight, qzeros, scales, g, kernel=kernel)
            ref = x.float() @ w
            err = ((y.float() - ref).norm() / ref.norm()).item()
            ok = err <= 1e-2 and bool(torch.isfinite(y).all())
            failures += not ok
            print(f"M={m:<4} K={k:<5} N={n:<4} G={g:<3} {kernel:11s} {dtype!s:15s} "
                  f"rel err {err:.1e} {'ok' if ok else 'WRONG'}")
    failures += _mma_tiles()
    failures += _elementwise_ops()
    failures += _int8_head()
    torch.cuda.synchronize()
    return 1 if failures else 0


def _mma_tiles() -> int:
    """Each sweep tile of gemm_mma.cu once, split over K, ragged M and N (N = 320 leaves a
    256-column tile one warp of 64 columns)."""
    from awq_kernels import build

    failures = 0
    for tile in build.MMA_SWEEP_TILES:
        g = 64 if tile.bk == 64 else 32
        qweight, qzeros, scales = reference.random_packed(256, 320, g, seed=tile.bm, device="cuda")
        w = reference.dequantize_like_kernel(qweight.cpu(), qzeros.cpu(), scales.cpu(), g,
                                             torch.float16).float().cuda()
        x = torch.randn(tile.bm + 3, 256, device="cuda").half()
        y = awq_kernels.gemm(x, qweight, qzeros, scales, g, kernel="mma_split", mma_tile=tile)
        ref = x.float() @ w
        err = ((y.float() - ref).norm() / ref.norm()).item()
        ok = err <= 1e-2 and bool(torch.isfinite(y).all())
        failures += not ok
        print(f"mma tile {tile} rel err {err:.1e} {'ok' if ok else 'WRONG'}")
    return failures


def _int8_head() -> int:
    """gemv_int8.cu at every row capacity, a ragged N (not a multiple of 8 rows per block)."""
    from awq_kernels.int8 import gemm_int8
    from awq_ref.quant.int8_head import Int8Linear

    failures = 0
    head = Int8Linear.from_weight(torch.randn(203, 576, device="cuda"))
    for m in (1, 2, 3, 8):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, 576, device="cuda").to(dtype)
            want = head(x.float())
            err = ((gemm_int8(x, head.qweight, head.scales).float() - want).norm()
                   / want.norm()).item()
            ok = err <= 1e-2
            failures += not ok
            print(f"int8 head M={m} {dtype!s:15s} rel err {err:.1e} {'ok' if ok else 'WRONG'}")
    return failures


def _elementwise_ops() -> int:
    """awq_kernels.ops on strided views and ragged widths (SmolLM2's 576 = 72 chunks of 8)."""
    import torch.nn.functional as F

    from awq_kernels import ops
    from awq_ref.model import rotary_tables, rotate_heads

    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 576, device="cuda").to(dtype)
        w = torch.rand(576, device="cuda").to(dtype)
        gate, up = torch.randn(3, 2 * 1536, device="cuda").to(dtype).split(1536, dim=-1)
        qk_v = torch.randn(1, 5, 15 * 64, device="cuda").to(dtype)  # SmolLM2: 9 + 3 + 3 heads
        qk = qk_v[..., :12 * 64].view(1, 5, 12, 64)
        cos, sin = rotary_tables(torch.rand(5, 32, device="cuda") * 9, dtype)
        keys, values = (torch.zeros(1, 3, 9, 64, device="cuda", dtype=dtype) for _ in range(2))
        q, k, v = (p.view(1, 5, -1, 64) for p in qk_v.split([9 * 64, 3 * 64, 3 * 64], dim=-1))
        rotated = ops.rotary_into_cache(q, k, v, cos, sin, keys, values,
                                        torch.tensor([4], device="cuda"))  # last slot: 8
        checks = {"rms_norm": (ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (576,), eps=1e-5)),
                  "add_rms_norm": (ops.add_rms_norm(x, x, w, 1e-5)[1],
                                   w * F.rms_norm(x + x, (576,), eps=1e-5)),
                  "decode_attention": (ops.decode_attention(rotated[:, :1], keys, values,
                                                            torch.tensor([6], device="cuda")),
                                       F.scaled_dot_product_attention(
                                           rotated[:, :1].transpose(1, 2), keys, values,
                                           attn_mask=(torch.arange(9, device="cuda") <= 6)[None],
                                           enable_gqa=True).transpose(1, 2)),
                  "rotary_into_cache": (torch.cat([rotated.flatten(), keys[:, :, 4:].flatten()]),
                                        torch.cat([
                                            rotate_heads(q, cos, sin).flatten(),
                                            rotate_heads(k, cos, sin).transpose(1, 2).flatten()])),
                  "silu_mul": (ops.silu_mul(gate, up), F.silu(gate) * up),
                  "rotary": (ops.rotary(qk, cos, sin), rotate_heads(qk, cos, sin))}
        for name, (got, want) in checks.items():
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            ok = err <= 1e-2 and bool(torch.isfinite(got).all())
            failures += not ok
            print(f"ops.{name:17s} {dtype!s:15s} rel err {err:.1e} {'ok' if ok else 'WRONG'}")
        # A position outside the 9-slot cache: NaN out, and (memcheck's part) no slot read or
        # written past the cache (9 is not a multiple of the 64-slot chunk).
        before = keys.clone()
        past_q = ops.rotary_into_cache(q, k, v, cos, sin, keys, values,
                                       torch.tensor([7], device="cuda"))  # slots 7..11
        past_y = ops.decode_attention(rotated[:, :1], keys, values,
                                      torch.tensor([40], device="cuda"))
        ok = (bool(torch.isnan(past_q).all()) and bool(torch.isnan(past_y).all())
              and torch.equal(keys, before))
        failures += not ok
        print(f"ops position outside   {dtype!s:15s} {'ok' if ok else 'WRONG'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
