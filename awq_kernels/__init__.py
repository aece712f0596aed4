"""CUDA int4 x fp16/bf16 kernels for the AWQ "gemm" packed format, compiled through CuPy.

    y = awq_kernels.gemm(x, qweight, qzeros, scales, group_size)

Nothing is compiled and no device is probed at import time (CuPy is imported on first launch).
Kernels: gemv.cu and gemv_direct.cu (M <= 8, CUDA cores), mma_direct.cu (64 rows per launch) and
gemm_mma.cu (tensor cores), dequant.cu (+ cuBLAS for large M), splitk_reduce.cu; elementwise.cu
and attention.cu behind `awq_kernels.ops` (RMSNorm, SwiGLU, rotary embedding, one token's
attention over the KV cache), and gemv_int8.cu behind `awq_kernels.int8` (the 8-bit lm_head). See
each file's header for layout and thread mapping, NOTES.md for what each is predicted to do and
what has been measured.
"""

from .api import check_gemm_args, check_packed, dequantize, gemm

__all__ = ["check_gemm_args", "check_packed", "dequantize", "gemm"]
