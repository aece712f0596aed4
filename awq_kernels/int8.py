"""y = (x @ q^T) * s for an 8-bit lm_head (awq_ref.quant.int8_head): gemv_int8.cu at decode
sizes (M <= 8), a 16-bit dequantization + torch.matmul above.

    y = awq_kernels.int8.gemm_int8(x, qweight, scales)

x [..., K] fp16 or bf16; qweight int8 [N, K] (one row per output, K contiguous); scales fp32
[N]; K % 16 == 0; every tensor contiguous, 16-byte aligned, on one CUDA device. M <= 8: the
kernel, accumulating in fp32, y rounded once to x's dtype; above, W is rounded to x's dtype
first, then one matmul.
"""

from __future__ import annotations

import torch

from .build import GEMV_INT8_ROWS, gemv_int8_expr
from .plan import Launch, cdiv
from .runtime import (
    ACTIVATION_DTYPES,
    i32,
    on_torch_stream,
    require_dtype,
    require_layout_and_device,
    require_tensor,
    run,
)

ROWS_PER_BLOCK = 8    # G8_WARPS: one warp per output row
K_MULTIPLE = 16       # one 16-byte load of int8 per lane
DEQUANT_ROWS = 8192   # rows of the head widened to fp32 at a time (M > 8; 128 MB at K = 4096)


def gemm_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [..., N] of x's dtype = (x @ qweight^T) * scales, for x [..., K] fp16/bf16, qweight
    [N, K] int8 and scales [N] fp32 (the module docstring's layout); ValueError / TypeError on
    anything else, before any CUDA call."""
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        require_tensor(name, t)
    require_dtype("x", x, tuple(ACTIVATION_DTYPES))
    require_dtype("qweight", qweight, (torch.int8,))
    require_dtype("scales", scales, (torch.float32,))
    if qweight.dim() != 2 or qweight.shape[1] == 0 or qweight.shape[1] % K_MULTIPLE:
        raise ValueError(f"qweight must be [N, K] with K a positive multiple of {K_MULTIPLE}, got "
                         f"{list(qweight.shape)}")
    n, k = qweight.shape
    if scales.shape != (n,):
        raise ValueError(f"scales must have shape [{n}], got {list(scales.shape)}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K = {k}], got {list(x.shape)}")
    require_layout_and_device({"x": x, "qweight": qweight, "scales": scales})
    m = x.numel() // k
    if m == 0 or n == 0:  # nothing to compute (CUDA refuses an empty grid)
        return torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    # prefill / evaluation: a 16-bit copy of the weights, then one matmul
    if m > max(GEMV_INT8_ROWS):
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)  # (N, K)
        for r in range(0, n, DEQUANT_ROWS):  # in slices: no fp32 copy of the whole head
            rows = slice(r, r + DEQUANT_ROWS)
            w[rows] = qweight[rows].to(torch.float32) * scales[rows, None]
        return x @ w.T
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    mt = next(r for r in GEMV_INT8_ROWS if r >= m)
    tag = ACTIVATION_DTYPES[x.dtype]
    with on_torch_stream(x.device) as (arch, _):
        launch = Launch("gemv_int8", mt, (cdiv(n, ROWS_PER_BLOCK), 1, 1),
                        (32 * ROWS_PER_BLOCK, 1, 1))
        run(launch, arch, gemv_int8_expr(tag, mt),
             (x, qweight, scales, y, i32(m), i32(n), i32(k)))
    return y
