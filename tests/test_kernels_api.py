"""awq_kernels on CPU: argument validation (before anything touches CUDA), the sweep's tables,
the torch reference against awq_ref's packing, and import-time hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import awq_kernels
from awq_kernels import build, reference

K, N, G = 256, 192, 64


def _args(m: int = 4, dtype=torch.float16, k: int = K, n: int = N, g: int = G):
    qweight, qzeros, scales = reference.random_packed(k, n, g)
    return torch.randn(m, k).to(dtype), qweight, qzeros, scales, g


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        awq_kernels.gemm(*args, **kwargs)


def test_cpu_tensors_are_refused_before_cuda():
    _raises(ValueError, "x must be a CUDA tensor", *_args())


def test_dtypes():
    x, qw, qz, s, g = _args()
    _raises(TypeError, "x must have dtype", x.float(), qw, qz, s, g)
    _raises(TypeError, "qweight must have dtype", x, qw.to(torch.int64), qz, s, g)
    _raises(TypeError, "qzeros must have dtype", x, qw, qz.to(torch.int16), s, g)
    _raises(TypeError, "scales must have dtype", x, qw, qz, s.to(torch.bfloat16), g)
    _raises(TypeError, "x must be a torch.Tensor", x.numpy(), qw, qz, s, g)
    _raises(TypeError, "group_size must be an int", x, qw, qz, s, 64.0)
    _raises(TypeError, "group_size must be an int, got bool", x, qw, qz, s, True)
    _raises(ValueError, "x must be a CUDA tensor", x, qw, qz, s, np.int64(64))  # accepted
    _raises(TypeError, "out must have dtype", x, qw, qz, s, g, out=torch.empty(4, N))
    _raises(TypeError, "out must have dtype torch.float16", x, qw, qz, s, g,
            out=torch.empty(4, N, dtype=torch.bfloat16))  # an activation dtype, not x's


def test_shapes():
    x, qw, qz, s, g = _args()
    _raises(ValueError, "group_size must be one of", x, qw, qz, s, 16)
    _raises(ValueError, r"x must have shape \[..., K = 256\]",
            x[:, :128].contiguous(), qw, qz, s, g)
    _raises(ValueError, "qzeros must have shape", x, qw, qz[:2].contiguous(), s, g)
    _raises(ValueError, "scales must have shape", x, qw, qz, s[:, :64].contiguous(), g)
    _raises(ValueError, "qweight must be 2-D", x, qw.flatten(), qz, s, g)
    _raises(ValueError, "out must have shape", x, qw, qz, s, g, out=torch.empty(4, 64).half())
    xs, qws, qzs, ss, gs = _args(k=256, n=256)  # K = N: x itself has y's shape
    _raises(ValueError, "out must not share memory with x", xs, qws, qzs, ss, gs, out=xs)
    both = torch.empty(8, 256).half()  # y's rows 0..3 over x's rows 2..5
    _raises(ValueError, "out must not share memory with x", both[2:6], qws, qzs, ss, gs,
            out=both[:4])
    _raises(ValueError, "x must be a CUDA tensor", both[4:], qws, qzs, ss, gs, out=both[:4])
    _raises(ValueError, "x must be a CUDA tensor", both[:4], qws, qzs, ss, gs, out=both[4:])
    _raises(ValueError, r"x must have shape \[..., K = 256\]", torch.tensor(1.0).half(), qw, qz,
            s, g)  # 0-d x
    empty = torch.empty(0, N // 8, dtype=torch.int32)  # K = 0
    _raises(ValueError, "K = 0 .* must be a positive multiple", x[:, :0], empty, empty,
            torch.empty(0, N).half(), g)
    _raises(ValueError, "kernel must be one of", x, qw, qz, s, g, kernel="fast")
    x2, qw2, qz2, s2, _ = _args(k=96, g=32)  # K = 96 is not a multiple of 64
    _raises(ValueError, "must be a positive multiple of group_size", x2, qw2, qz2, s2, 64)
    x3, qw3, qz3, s3, _ = _args(n=96)  # N must be a multiple of 64
    _raises(ValueError, "N = 96", x3, qw3, qz3, s3, G)


def test_layout():
    x, qw, qz, s, g = _args()
    _raises(ValueError, "x must be contiguous", x.t().contiguous().t(), qw, qz, s, g)
    _raises(ValueError, "scales must be contiguous", x, qw, qz, s.t().contiguous().t(), g)
    misaligned = torch.empty(4 * K + 1, dtype=torch.float16)[1:].view(4, K)  # 2-byte offset
    _raises(ValueError, "16-byte aligned", misaligned, qw, qz, s, g)


def test_mma_tile_is_checked_before_cuda():
    wide, deep = build.MmaTile(16, 1, 4, 32), build.MmaTile(16, 1, 4, 64)
    _raises(ValueError, "mma_tile applies to kernel 'mma' or 'mma_split'", *_args(),
            mma_tile=wide)
    _raises(ValueError, "is not compiled", *_args(), kernel="mma",
            mma_tile=build.MmaTile(16, 1, 8, 64))
    _raises(ValueError, "multiple of BK = 64, got 32", *_args(g=32), kernel="mma_split",
            mma_tile=deep)
    _raises(ValueError, "x must be a CUDA tensor", *_args(), kernel="mma", mma_tile=deep)


def test_max_splits_is_checked_before_cuda():
    _raises(TypeError, "max_splits must be an int", *_args(), max_splits=2.0)
    _raises(ValueError, "max_splits must be in 1..16, got 0", *_args(), max_splits=0)
    _raises(ValueError, "max_splits must be in 1..16, got 17", *_args(), max_splits=17)
    _raises(ValueError, "x must be a CUDA tensor", *_args(), max_splits=1)
    _raises(ValueError, "x must be a CUDA tensor", *_args(), max_splits=np.int32(4))


def test_sweep_ranking_and_tiles():
    from awq_kernels import sweep

    assert all(t.bk == 32 for t in sweep.valid_tiles(32))
    assert [m for m in sweep.SWEEP_MS if m in sweep.DECODE_KERNELS["gemv_direct"]] == [1, 2]
    assert [m for m in sweep.SWEEP_MS if m in sweep.DECODE_KERNELS["mma_direct"]] == [1, 2, 4, 8]
    assert len(sweep.valid_tiles(128)) == len(build.MMA_TILES) > len(sweep.valid_tiles(32))
    rows = [{"k": k, "n": 64, "m": 16, "variant": v, "us": us, "vs_best": r,
             "speedup_vs_fp16": 1.0}
            for k, v, us, r in [(64, "a", 1.0, 1.0), (64, "b", 2.0, 2.0), (64, "fp16", 3, 3),
                                (128, "a", 4.0, 2.0), (128, "b", 2.0, 1.0), (128, "c", 2, 1),
                                (128, "fp16", 1.0, 0.5)]]
    ranked = sweep.ranking({"rows": rows})
    assert [name for name, _ in ranked[16]] == ["a", "b"]  # "c" lacks a shape; fp16 is no variant
    assert ranked[16][0][1] == pytest.approx(2 ** 0.5)
    text = sweep.markdown({"device": "GPU", "torch": "x", "group_size": 128, "reps": 50,
                           "rows": rows})
    assert "| 128x64 | 16 | b | 2.0 | 1.00 | 1.00 |" in text and "- M = 16: a 1.41, b 1.41" in text


def test_gemv_refuses_large_m():
    _raises(ValueError, "kernel='gemv' handles at most 8 rows", *_args(m=9), kernel="gemv")
    _raises(ValueError, "kernel='gemv_direct' handles at most 8 rows", *_args(m=9),
            kernel="gemv_direct")
    for kernel in ("gemv", "gemv_direct"):  # 8 rows are theirs
        _raises(ValueError, "x must be a CUDA tensor", *_args(m=8), kernel=kernel)


def test_dequantize_validates():
    with pytest.raises(ValueError, match="qweight must be a CUDA tensor"):
        awq_kernels.dequantize(*_args()[1:])
    with pytest.raises(TypeError, match="dtype must be"):
        awq_kernels.dequantize(*_args()[1:], dtype=torch.float32)
    n = _args()[1].shape[1] * 8
    for columns in ((32, 64), (0, 0), (64, n), (-64, 128), (0, n + 64)):
        with pytest.raises(ValueError, match="must be multiples of 64"):
            awq_kernels.dequantize(*_args()[1:], columns=columns)
    with pytest.raises(ValueError, match="qweight must be a CUDA tensor"):
        awq_kernels.dequantize(*_args()[1:], columns=(0, 64))
    k = _args()[1].shape[0]
    with pytest.raises(ValueError, match=rf"out must have shape \[{k}, 64\]"):
        awq_kernels.dequantize(*_args()[1:], columns=(0, 64), out=torch.empty(k, 128).half())
    with pytest.raises(TypeError, match="out must have dtype"):
        awq_kernels.dequantize(*_args()[1:], columns=(0, 64), out=torch.empty(k, 64))
    _, qweight, qzeros, scales, g = _args()
    buffer = torch.empty(k * 64 + scales.numel()).half()  # out and scales in one allocation
    shared = buffer[:scales.numel()].view(scales.shape).copy_(scales)
    with pytest.raises(ValueError, match="out must not share memory with scales"):
        awq_kernels.dequantize(qweight, qzeros, shared, g, columns=(0, 64),
                               out=buffer[:k * 64].view(k, 64))


def test_import_compiles_nothing_and_imports_no_cupy():
    """Every module of the package imports without CuPy and without compiling a kernel (in a
    fresh interpreter: this one may have compiled kernels in other tests)."""
    modules = sorted(p.stem for p in Path(awq_kernels.__file__).parent.glob("*.py")
                     if p.stem != "__init__")
    assert {"api", "build", "ops", "int8", "plan", "emulate"} <= set(modules)
    code = ("import importlib, sys, awq_kernels\n"
            f"for name in {modules!r}: importlib.import_module('awq_kernels.' + name)\n"
            "assert 'cupy' not in sys.modules, 'cupy imported'\n"
            "from awq_kernels import build\n"
            "assert build.get_kernel.cache_info().currsize == 0, 'a kernel was compiled'\n"
            "assert build.device_info.cache_info().currsize == 0, 'a device was probed'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ torch reference vs awq_ref

def test_pack_roundtrip():
    codes = torch.randint(0, 16, (32, 64))
    assert torch.equal(reference.unpack_int4(reference.pack_int4(codes)), codes)
    word = reference.pack_int4(torch.arange(8).view(1, 8))  # columns 0..7 hold codes 0..7
    assert int(word) & 0xFFFFFFFF == 0x75316420  # nibble i holds column [0,2,4,6,1,3,5,7][i]


def test_reference_matches_awq_ref_packing():
    packing = pytest.importorskip("awq_ref.quant.packing")
    codes = torch.randint(0, 16, (128, 192))
    assert torch.equal(reference.pack_int4(codes), packing.pack_int4(codes))
    qw, qz, s = reference.random_packed(256, 192, 64, seed=3)
    ours = reference.dequantize_like_kernel(qw, qz, s, 64, torch.float16)
    theirs = packing.dequantize_packed(qw, qz, s, 64, dtype=torch.float16)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    w32 = packing.dequantize_packed(qw, qz, s, 64)
    bf = reference.dequantize_like_kernel(qw, qz, s, 64, torch.bfloat16).float()
    assert ((bf - w32).abs() <= w32.abs() * 2**-7 + 1e-12).all()  # two bf16 roundings


def test_benchmark_tables_and_bytes():
    from awq_kernels import benchmark

    assert benchmark.awq_bytes(1, 4096, 4096, 128) == (
        2 * 4096 + 4096 * 4096 * (0.5 + 2 / 128 + 0.5 / 128) + 2 * 4096)
    row = {"k": 64, "n": 64, "m": 1, "us": 2.0, "host_us": 9.0, "gb_per_s": 1.0,
           "speedup_vs_fp16": 1.5, "pct_of_floor": 50.0}
    result = {"device": "GPU", "torch": "x", "group_size": 128, "reps": 50,
              "ceilings": {"hbm_bytes_per_s": 3e12, "tensor_flops": 8e14},
              "rows": [dict(row, impl="awq"), dict(row, impl="fp16", us=3.0)]}
    assert "| 64x64 | 1 | awq | 2.0 |" in benchmark.markdown(result)
    assert "measured HBM 3.00 TB/s, fp16 tensor 800 TFLOP/s" in benchmark.markdown(result)
    assert "floor%  50.0" in benchmark.summary(result)


def test_benchmark_ceilings_and_weight_copies(monkeypatch):
    """The ceilings count a copy's bytes read and written and a matmul's 2 K^3 flops; the weight
    copies together hold more than 2 x L2 (every call streams from HBM). CUDA faked."""
    from types import SimpleNamespace

    from awq_kernels import benchmark

    monkeypatch.setattr(benchmark, "_copy_us", lambda reps: 1000.0)
    monkeypatch.setattr(benchmark, "_matmul_us", lambda reps: 2000.0)
    ceil = benchmark.measure_ceilings()
    assert ceil.hbm_bytes_per_s == pytest.approx(2 * 2**30 / 1e-3)
    assert ceil.tensor_flops == pytest.approx(2 * 8192**3 / 2e-3)
    l2 = 50 * 2**20
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(L2_cache_size=l2))
    for nbytes in (2**20, 8 * 2**20, 30 * 2**20, 100 * 2**20, 2**30):
        copies = benchmark.weight_copies(nbytes)
        assert copies >= 2 and copies * nbytes > 2 * l2, nbytes


# ------------------------------------------------------------------ awq_kernels.ops (elementwise)

def test_elementwise_ops_validate_before_touching_cuda():
    from awq_kernels import ops

    x = torch.randn(2, 3, 64).half()
    w = torch.ones(64).half()
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ops.rms_norm(x, w, 1e-5)
    with pytest.raises(TypeError, match="weight must have dtype torch.float16"):
        ops.rms_norm(x, w.bfloat16(), 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \[64\]"):
        ops.rms_norm(x, torch.ones(32).half(), 1e-5)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.rms_norm(x.float(), w, 1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.rms_norm(torch.randn(2, 60).half(), torch.ones(60).half(), 1e-5)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        ops.silu_mul(x[..., ::2], x[..., ::2])
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        ops.silu_mul(x, x[:, :2])
    shifted = torch.randn(1, 72).half()[:, 4:68]  # starts 8 bytes into its storage
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.silu_mul(shifted, shifted)
    q = torch.randn(1, 5, 4, 32).half()
    cos = torch.randn(5, 32).half()
    with pytest.raises(ValueError, match=r"x must be \(B, T, H, Dh\)"):
        ops.rotary(q[0], cos, cos)
    with pytest.raises(ValueError, match=r"cos must be a contiguous \(5, 32\) table"):
        ops.rotary(q, cos[:4], cos)
    with pytest.raises(ValueError, match="Dh = 8 must be a multiple of 16"):
        ops.rotary(torch.randn(1, 5, 4, 8).half(), cos[:, :8].contiguous(), cos[:, :8].contiguous())
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ops.rotary(q, cos, cos)


def test_fused_elementwise_ops_validate_before_touching_cuda():
    from awq_kernels import ops

    x = torch.randn(2, 64).half()
    w = torch.ones(64).half()
    with pytest.raises(ValueError, match="delta must have x's shape"):
        ops.add_rms_norm(x, x[:1], w, 1e-5)
    with pytest.raises(TypeError, match="delta must have dtype torch.float16"):
        ops.add_rms_norm(x, x.bfloat16(), w, 1e-5)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ops.add_rms_norm(x, x, w, 1e-5)
    with pytest.raises(ValueError, match="last dimension must be a positive multiple of 8"):
        ops.rms_norm(x[:, :0], w[:0], 1e-5)  # D = 0 (was a ZeroDivisionError)
    q, k = torch.randn(1, 1, 4, 32).half(), torch.randn(1, 1, 2, 32).half()
    cos = torch.randn(1, 32).half()
    cache = torch.zeros(1, 2, 8, 32).half()
    pos = torch.tensor([3])
    args = (q, k, k, cos, cos, cache, cache.clone(), pos)
    with pytest.raises(ValueError, match=r"k and v must be \(1, 1, Hkv, 32\)"):
        ops.rotary_into_cache(q, k, q, *args[3:])
    with pytest.raises(ValueError, match=r"keys must be a contiguous \(1, 2, S, 32\) cache"):
        ops.rotary_into_cache(*args[:5], cache[:, :1], cache, pos)
    with pytest.raises(TypeError, match="position must be int64"):
        ops.rotary_into_cache(*args[:7], pos.int())
    with pytest.raises(ValueError, match="position must hold one value"):
        ops.rotary_into_cache(*args[:7], torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="9 new tokens do not fit a cache of 8 slots"):
        q9, k9 = torch.randn(1, 9, 4, 32).half(), torch.randn(1, 9, 2, 32).half()
        ops.rotary_into_cache(q9, k9, k9, cos.expand(9, 32).contiguous(),
                              cos.expand(9, 32).contiguous(), cache, cache.clone(), pos)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        ops.rotary_into_cache(*args)


def test_decode_attention_validates_before_touching_cuda():
    from awq_kernels import ops

    q = torch.randn(1, 1, 8, 64).half()
    cache = torch.zeros(1, 2, 16, 64).half()
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match=r"q must be \(B, 1, H, Dh\): one new token"):
        ops.decode_attention(torch.randn(1, 2, 8, 64).half(), cache, cache, pos)
    with pytest.raises(ValueError, match="Dh = 32 is not one of the compiled head dims"):
        ops.decode_attention(q[..., :32], cache[..., :32].contiguous(),
                             cache[..., :32].contiguous(), pos)
    with pytest.raises(ValueError, match="must be a multiple of Hkv = 3 KV heads"):
        ops.decode_attention(q, torch.zeros(1, 3, 16, 64).half(),
                             torch.zeros(1, 3, 16, 64).half(), pos)
    with pytest.raises(ValueError, match="16 query heads per KV head: at most 8"):
        ops.decode_attention(torch.randn(1, 1, 16, 64).half(), cache[:, :1].contiguous(),
                             cache[:, :1].contiguous(), pos)
    with pytest.raises(ValueError, match="values must be contiguous with keys' shape"):
        ops.decode_attention(q, cache, cache[:, :, :8].contiguous(), pos)
    with pytest.raises(ValueError, match=r"no cache slots \(S = 0\)"):
        ops.decode_attention(q, cache[:, :, :0], cache[:, :, :0], pos)
    with pytest.raises(ValueError, match="multiple of Hkv = 0"):
        ops.decode_attention(q, cache[:, :0], cache[:, :0], pos)
    with pytest.raises(TypeError, match="position must be int64"):
        ops.decode_attention(q, cache, cache, pos.float())
    huge = torch.empty(1, 2, 64 * 65535 + 1, 64, dtype=torch.float16, device="meta")  # no memory
    with pytest.raises(ValueError, match="at most 4194240"):  # gridDim.y's 65535 block rows
        ops.decode_attention(q, huge, huge, pos)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        ops.decode_attention(q, cache, cache, pos)


def test_gemm_int8_validates_before_touching_cuda():
    from awq_kernels.int8 import gemm_int8

    q = torch.zeros(24, 64, dtype=torch.int8)
    s = torch.ones(24)
    x = torch.randn(2, 64).half()
    with pytest.raises(TypeError, match="qweight must have dtype torch.int8"):
        gemm_int8(x, q.int(), s)
    with pytest.raises(TypeError, match="scales must have dtype torch.float32"):
        gemm_int8(x, q, s.half())
    with pytest.raises(ValueError, match="K a positive multiple of 16"):
        gemm_int8(x[:, :40], q[:, :40].contiguous(), s)
    with pytest.raises(ValueError, match="K a positive multiple of 16"):
        gemm_int8(x[:, :0], q[:, :0].contiguous(), s)
    with pytest.raises(ValueError, match=r"scales must have shape \[24\]"):
        gemm_int8(x, q, s[:8])
    with pytest.raises(ValueError, match=r"x must have shape \[..., K = 64\]"):
        gemm_int8(x[:, :32], q, s)
    with pytest.raises(ValueError, match=r"x must have shape \[..., K = 64\]"):
        gemm_int8(torch.tensor(1.0).half(), q, s)  # 0-d x
    with pytest.raises(ValueError, match=r"scales must have shape \[24\]"):
        gemm_int8(x, q, s[:, None])  # N values, but not [N]
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        gemm_int8(x, q, s)


def test_kernel_int_arguments_past_int32_are_refused():
    """A stride past 2**31-1 (a fused projection's q view at ~350k tokens of Llama-3-8B) must not
    reach a kernel: numpy 1.x would wrap it to a wrong address, numpy 2 raise an OverflowError."""
    from awq_kernels.runtime import i32

    assert int(i32(2**31 - 1)) == 2**31 - 1 and int(i32(-(2**31))) == -(2**31)
    for bad in (2**31, 349_526 * 6144, -(2**31) - 1):
        with pytest.raises(ValueError, match="does not fit a kernel's 32-bit int argument"):
            i32(bad)
