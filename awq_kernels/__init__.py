"""CUDA int4 x fp16/bf16 kernels for the AWQ "gemm" packed format, compiled through CuPy.

Nothing is compiled and no device is probed at import time.
"""
