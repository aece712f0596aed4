"""CUDA int4 x fp16/bf16 kernels for the AWQ "gemm" packed format, compiled through CuPy.

    y = awq_kernels.gemm(x, qweight, qzeros, scales, group_size)

Nothing is compiled and no device is probed at import time (CuPy is imported on first launch).

How to read it:
1. FORMAT.md's packed word, then common.cuh: 16-bit pairs, the lop3 / magic-number int4 ->
   fp16/bf16 conversion (dequant_pair, dequant_nibbles), the PTX wrappers (mma, cp.async, prmt).
2. dequant.cu: the conversion alone, one thread per packed word (+ cuBLAS for large M).
3. gemv.cu: a CUDA-core GEMV through a cp.async shared-memory pipeline (kept for comparison;
   `auto` no longer picks it).
4. gemm_mma.cu: the tensor-core GEMM. Its header's data mapping (an mma column = a packed word)
   is the key idea; then StageCopies (cp.async), ldmatrix for x, store_tile.
5. gemv_direct.cu, mma_direct.cu: the decode kernels `auto` uses at M <= 8 (no shared memory;
   mma_direct swaps the operands so that the weights are the A fragment).
6. splitk_fused.cuh, splitk_reduce.cu: deterministic sums of the K splits.
Python, in call order: api.gemm (check, allocate, launch) -> dispatch.resolve (kernel by M) ->
plan.plan_* (tile, grid, splits) -> build (template instance, NVRTC through CuPy) -> runtime
(torch's stream, raw pointers). emulate.py / emulate_direct.py replay each kernel's lanes in
NumPy: read them beside the .cu; reference.py states the result in torch. benchmark.py and
sweep.py time kernels on a GPU. elementwise.cu and attention.cu (behind `awq_kernels.ops`:
RMSNorm, SwiGLU, rotary embedding, one token's attention over the KV cache) and gemv_int8.cu
(behind `awq_kernels.int8`: the 8-bit lm_head) are the decoder's other kernels. Each file's
header gives its layout and thread mapping; NOTES.md is a dated log of what each was predicted
to do and what was measured, not a guide.
"""

from .api import check_gemm_args, check_packed, dequantize, gemm

__all__ = ["check_gemm_args", "check_packed", "dequantize", "gemm"]
