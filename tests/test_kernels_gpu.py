"""awq_kernels on a CUDA device: every kernel path against the fp32 reference x @ dequantize(W),
over decode to prefill sizes, Llama and odd shapes, all group sizes, fp16 and bf16.

Each call writes into an output poisoned with NaN (so unwritten elements show), is repeated to
check bit-identical results (no races, no atomics), and its inputs are random codes, zeros,
scales and activations (never zeros)."""

from __future__ import annotations

import functools

import pytest
import torch

import awq_kernels
from awq_kernels import build, reference, runtime
from awq_kernels.dispatch import Choice, Dispatch
from awq_kernels.plan import GEMV_DIRECT_MAX_M, GEMV_MAX_M, MMA_DIRECT_AUTO_MAX_M, overlap_slices

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the kernels cannot run here", allow_module_level=True)
pytest.importorskip("cupy", reason="CuPy is needed to compile and launch the kernels")

MS = (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 127, 128, 129, 255, 256, 1024, 4096)
# (K, N, G): Llama-3-8B q/o and down projections, SmolLM2-135M k/v and down (N = 3 x 64,
# N = 4.5 x 128), and odd multiples of every tile (K = 5 x 32, N = 5 x 64).
SHAPES = ((4096, 4096, 128), (14336, 4096, 64), (576, 192, 64), (1536, 576, 32), (160, 320, 32))
DTYPES = (torch.float16, torch.bfloat16)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@functools.lru_cache(maxsize=8)
def _weights(k: int, n: int, g: int):
    """Packed random weights on the GPU and their exact fp32 dequantization."""
    qweight, qzeros, scales = reference.random_packed(k, n, g, seed=k + n + g, device="cuda")
    q = reference.unpack_int4(qweight.cpu())
    z = reference.unpack_int4(qzeros.cpu()).repeat_interleave(g, 0)
    s = scales.cpu().float().repeat_interleave(g, 0)
    return qweight, qzeros, scales, ((q - z).float() * s).cuda()  # (K, N) exact in fp32


def _kernels_for(m: int) -> list[str]:
    """auto, plus each explicit path that auto does not already take at this M."""
    kernels = ["auto", "mma"]
    if m <= GEMV_MAX_M:
        kernels.append("gemv")
    if m <= GEMV_DIRECT_MAX_M:
        kernels.append("gemv_direct")
    if m <= 2 * MMA_DIRECT_AUTO_MAX_M:  # launches of 64 rows beyond 64 (127, 129, 255, 256)
        kernels.extend(["mma_direct", "auto_direct"])
    if GEMV_MAX_M < m <= 64:
        kernels.append("mma_split")
    if m >= 256:
        kernels.extend(["dequant", "dequant_overlap"])
    return kernels


def _check(x: torch.Tensor, k: int, n: int, g: int, kernel: str, **options) -> None:
    qweight, qzeros, scales, w32 = _weights(k, n, g)
    out = torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype, device="cuda")
    y = awq_kernels.gemm(x, qweight, qzeros, scales, g, out=out, kernel=kernel, **options)
    assert y is out
    assert torch.isfinite(y).all(), "NaN/inf in the output: unwritten elements or overflow"
    ref = x.float().reshape(-1, k) @ w32  # (M, N) fp32 reference
    err = ((y.float().reshape(-1, n) - ref).norm() / ref.norm()).item()
    assert err <= TOLERANCE[x.dtype], f"relative error {err:.2e} (kernel={kernel})"
    again = torch.full_like(out, float("nan"))
    awq_kernels.gemm(x, qweight, qzeros, scales, g, out=again, kernel=kernel, **options)
    assert torch.equal(again.view(torch.int16), y.view(torch.int16)), "runs differ in bits"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("k,n,g", SHAPES, ids=[f"{k}x{n}g{g}" for k, n, g in SHAPES])
@pytest.mark.parametrize("m", MS)
def test_gemm_matches_fp32_reference(m, k, n, g, dtype):
    x = torch.randn(m, k, device="cuda").to(dtype)
    for kernel in _kernels_for(m):
        _check(x, k, n, g, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g", (32, 64, 128))
@pytest.mark.parametrize("m", (1, 5, 16, 40, 300))
def test_every_group_size(m, g, dtype):
    x = torch.randn(m, 1024, device="cuda").to(dtype)
    for kernel in _kernels_for(m):
        _check(x, 1024, 1280, g, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("tile", build.MMA_SWEEP_TILES, ids=str)
def test_every_mma_tile(tile, dtype):
    """The tiles only the benchmark's sweep picks, plain and split over K, on every shape
    their BK allows (ragged M and N tiles included)."""
    for k, n, g in (*SHAPES, (1024, 1280, 64)):
        if g % tile.bk:
            continue
        for m in (1, 16, 17, 64, 129):
            x = torch.randn(m, k, device="cuda").to(dtype)
            for kernel in ("mma", "mma_split"):
                _check(x, k, n, g, kernel, mma_tile=tile)


@pytest.mark.parametrize("cap", (1, 2, 5))
@pytest.mark.parametrize("kernel,m", [("gemv_direct", 1), ("gemv_direct", 2), ("mma_direct", 5),
                                      ("mma_split", 16), ("gemv", 3)])
def test_split_caps(kernel, m, cap):
    """The sweep's split caps (1: no split-K at all) on shapes that split 16 ways uncapped."""
    for k, n, g in ((4096, 4096, 128), (1536, 576, 32)):
        x = torch.randn(m, k, device="cuda").half()
        _check(x, k, n, g, kernel, max_splits=cap)


def test_a_dispatch_other_than_the_default():
    """`auto` under a rule like one a sweep derives: sweep tiles with a split cap, one whose
    BK = 64 falls back to the tile by M at G = 32, gemv_direct capped, dequantize at M = 9."""
    d = Dispatch(((1, Choice("gemv_direct", max_splits=2)),
                  (8, Choice("mma", build.MmaTile(16, 1, 4, 64), 4)),
                  (9, Choice("dequant")),
                  (None, Choice("mma_split", build.MmaTile(64, 1, 4, 32), 3))))
    for k, n, g in ((4096, 4096, 128), (1536, 576, 32)):
        for m in (1, 5, 9, 33):
            x = torch.randn(m, k, device="cuda").half()
            _check(x, k, n, g, "auto", dispatch=d)


def test_split_planners_know_the_resident_blocks():
    """plan.py's resident-block tables (checked on CPU against ptxas for sm_90) against the
    driver's occupancy on this device: the planners fill one wave with them."""
    from cupy.cuda import driver

    from awq_kernels.plan import (
        GEMV_DIRECT_BLOCKS_PER_SM,
        MMA_DIRECT_BLOCKS_PER_SM,
        mma_blocks_per_sm,
    )

    arch, _ = build.device_info(torch.cuda.current_device())
    wrong = []  # every mismatch, not only the first: one GPU run must show them all
    for tile in build.MMA_TILES:
        counts = []
        for tag in build.DTYPE_TAGS:
            kernel = build.get_kernel("mma", arch, tile.expr(tag))
            counts.append(driver.occupancyMaxActiveBlocksPerMultiprocessor(
                kernel.kernel.ptr, tile.threads, 0))
        if min(counts) < 1 or (arch == "90" and min(counts) != mma_blocks_per_sm(tile)):
            wrong.append(("mma", tile, counts, mma_blocks_per_sm(tile)))
    for family, table, expr in (("gemv_direct", GEMV_DIRECT_BLOCKS_PER_SM, build.gemv_direct_expr),
                                ("mma_direct", MMA_DIRECT_BLOCKS_PER_SM, build.mma_direct_expr)):
        for mt, blocks in table.items():
            for tag in build.DTYPE_TAGS:
                kernel = build.get_kernel(family, arch, expr(tag, mt))  # a cupy.RawKernel
                got = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, 256, 0)
                if got < 1 or (arch == "90" and got != blocks):
                    wrong.append((family, tag, mt, got, blocks))
    assert not wrong, f"driver's resident blocks (got, table): {wrong}"

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dequantize_is_bit_exact(dtype):
    for k, n, g in SHAPES:
        qweight, qzeros, scales, _ = _weights(k, n, g)
        w = awq_kernels.dequantize(qweight, qzeros, scales, g, dtype=dtype)
        ref = reference.dequantize_like_kernel(qweight.cpu(), qzeros.cpu(), scales.cpu(), g, dtype)
        assert torch.equal(w.cpu().view(torch.int16), ref.view(torch.int16))

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dequantize_column_slices_and_overlap(dtype):
    """dequantize(columns=) is the slice of the whole W bit for bit; "dequant_overlap" (its
    slices dequantized on a side stream) on a ragged last slice and 2 slices of 2048."""
    for k, n, g in ((128, 8256, 32), (4096, 4096, 128)):
        qweight, qzeros, scales, _ = _weights(k, n, g)
        whole = awq_kernels.dequantize(qweight, qzeros, scales, g, dtype=dtype)
        for n0, nc in overlap_slices(n):
            part = torch.full((k, nc), float("nan"), dtype=dtype, device="cuda")
            got = awq_kernels.dequantize(qweight, qzeros, scales, g, dtype=dtype,
                                         columns=(n0, nc), out=part)
            assert got is part
            assert torch.equal(part.view(torch.int16), whole[:, n0:n0 + nc].view(torch.int16))
        for m in (65, 1024):
            _check(torch.randn(m, k, device="cuda").to(dtype), k, n, g, "dequant_overlap")


def test_leading_dims_empty_input_and_allocation():
    qweight, qzeros, scales, w32 = _weights(576, 192, 64)
    x = torch.randn(2, 3, 576, device="cuda").half()
    y = awq_kernels.gemm(x, qweight, qzeros, scales, 64)
    assert y.shape == (2, 3, 192) and y.dtype == torch.float16
    ref = x.float() @ w32
    assert ((y.float() - ref).norm() / ref.norm()).item() <= 2e-3
    empty = awq_kernels.gemm(x[:0], qweight, qzeros, scales, 64)
    assert empty.shape == (0, 3, 192)


def test_runs_on_torchs_current_stream():
    qweight, qzeros, scales, w32 = _weights(4096, 4096, 128)
    x = torch.randn(16, 4096, device="cuda").half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = awq_kernels.gemm(x, qweight, qzeros, scales, 128)
        z = y.float() @ torch.eye(4096, device="cuda")  # ordered after the kernel on `stream`
    stream.synchronize()
    ref = x.float() @ w32
    assert ((z - ref).norm() / ref.norm()).item() <= 2e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel,m", [("gemv_direct", 1), ("gemv_direct", 2), ("gemv_direct", 3),
                                      ("gemv_direct", 4), ("mma_direct", 1),
                                      ("mma_direct", 5), ("mma_direct", 16), ("mma_direct", 32),
                                      ("mma_direct", 64), ("mma_split", 9), ("mma_split", 40),
                                      ("mma_split", 130), ("mma", 16)])
def test_fused_splitk_equals_two_launches(kernel, m, dtype):
    """The last block of a tile adds the splits in the reduce kernel's order: same bits; and
    it leaves the stream's counters at zero for the next launch."""
    from awq_kernels import runtime

    qweight, qzeros, scales, _ = _weights(14336, 4096, 64)  # K long enough to split
    x = torch.randn(m, 14336, device="cuda").to(dtype)
    two = awq_kernels.gemm(x, qweight, qzeros, scales, 64, kernel=kernel, fuse_splitk=False)
    for _ in range(3):  # counters reused across launches
        one = awq_kernels.gemm(x, qweight, qzeros, scales, 64, kernel=kernel)
        assert torch.equal(one.view(torch.int16), two.view(torch.int16))
    stream = torch.cuda.current_stream()
    counters = runtime._splitk_counter_sets[(stream.device_index, stream.cuda_stream)]
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("kernel,m", [("gemv_direct", 1), ("mma_direct", 4), ("mma_split", 16)])
def test_direct_kernels_under_cuda_graph_capture(kernel, m):
    """A capturing stream without counters falls back to the reduce kernel; one warmed up
    eagerly first captures the fused launch. Both replay to the eager bits."""
    qweight, qzeros, scales, _ = _weights(4096, 4096, 128)
    x = torch.randn(m, 4096, device="cuda").half()
    want = awq_kernels.gemm(x, qweight, qzeros, scales, 128, kernel=kernel)
    # the reduce kernel compiled before any capture (compiling inside one would fail)
    awq_kernels.gemm(x, qweight, qzeros, scales, 128, kernel=kernel, fuse_splitk=False)
    for warm_up in (False, True):
        side = torch.cuda.Stream()
        # torch hands out pooled streams: this one may have counters from an earlier test
        runtime._splitk_counter_sets.pop((side.device_index, side.cuda_stream), None)
        side.wait_stream(torch.cuda.current_stream())
        if warm_up:
            with torch.cuda.stream(side):
                awq_kernels.gemm(x, qweight, qzeros, scales, 128, kernel=kernel)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            y = awq_kernels.gemm(x, qweight, qzeros, scales, 128, kernel=kernel)
        for _ in range(2):
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"warm_up={warm_up}"


def test_bad_cuda_inputs_raise():
    qweight, qzeros, scales, _ = _weights(576, 192, 64)
    x = torch.randn(4, 576, device="cuda").half()
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        awq_kernels.gemm(x, qweight.cpu(), qzeros, scales, 64)
    with pytest.raises(ValueError, match="contiguous"):
        awq_kernels.gemm(torch.randn(576, 4, device="cuda").half().t(), qweight, qzeros, scales, 64)
    with pytest.raises(ValueError, match="aligned"):
        buf = torch.randn(4 * 576 + 1, device="cuda").half()
        awq_kernels.gemm(buf[1:].view(4, 576), qweight, qzeros, scales, 64)
    with pytest.raises(ValueError, match="group_size"):
        awq_kernels.gemm(x, qweight, qzeros, scales, 48)
    with pytest.raises(TypeError, match="dtype"):
        awq_kernels.gemm(x.float(), qweight, qzeros, scales, 64)



# RMSNorm kernels vs torch in fp16: one rounding apart before the weight's product (the fp32
# sums run in another order), up to ~1.5e-3 relative (H100, 2026-12-05: unseeded inputs once
# gave 1.4e-3); bf16 keeps assert_close's defaults.
NORM_TOL_FP16 = {"rtol": 2e-3, "atol": 1e-5}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_elementwise_ops_match_torch(dtype):
    """awq_kernels.ops against the model's torch expressions on Llama-3-8B shapes, on strided
    views as the model passes them: the rotary embedding bit for bit (same roundings), SwiGLU
    and RMSNorm within the dtype's tolerance (RMSNorm sums in another order)."""
    import torch.nn.functional as F

    from awq_kernels import ops
    from awq_ref.model import rotary_tables, rotate_heads

    torch.manual_seed(0)
    b, t, h, hkv, dh = 2, 5, 32, 8, 128
    parent = torch.randn(b, t, (h + 2 * hkv) * dh, device="cuda").to(dtype)  # a q/k/v output
    qk = parent[..., :(h + hkv) * dh].view(b, t, -1, dh)  # strided: rows of the whole output
    dims = torch.arange(0, dh, 2, device="cuda") / dh
    freqs = torch.outer(torch.arange(100.0, 100.0 + t, device="cuda"), 1.0 / 500000.0 ** dims)
    cos, sin = rotary_tables(freqs, dtype)
    got = ops.rotary(qk, cos, sin)
    assert torch.equal(got.view(torch.int16),
                       rotate_heads(qk, cos, sin).contiguous().view(torch.int16))

    gate_up = (torch.randn(3, 2 * 14336, device="cuda") * 3).to(dtype)
    gate, up = gate_up.split(14336, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up)

    x = torch.randn(b, t, 4096, device="cuda").to(dtype)
    w = (torch.rand(4096, device="cuda") + 0.5).to(dtype)
    norm_tol = NORM_TOL_FP16 if dtype == torch.float16 else {}
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (4096,), eps=1e-5),
                               **norm_tol)
    x = torch.randn(7, 576, device="cuda").to(dtype)  # SmolLM2's width: 72 of 256 threads work
    w = torch.ones(576, device="cuda", dtype=dtype)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (576,), eps=1e-5),
                               **norm_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_fused_elementwise_ops_match_torch(dtype):
    """add_rms_norm: the residual sum bit for bit, the norm as rms_norm's; rotary_into_cache:
    q rotated and the cache written bit for bit as rotate_heads + index_copy_ do, at a position
    read from the device, and nothing else of the cache touched."""
    import torch.nn.functional as F

    from awq_kernels import ops
    from awq_ref.model import rotary_tables, rotate_heads

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    delta = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    w = (torch.rand(4096, device="cuda") + 0.5).to(dtype)
    s, y = ops.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(s.view(torch.int16), (x + delta).view(torch.int16))
    norm_tol = NORM_TOL_FP16 if dtype == torch.float16 else {}
    torch.testing.assert_close(y, w * F.rms_norm(x + delta, (4096,), eps=1e-5), **norm_tol)

    b, h, hkv, dh, s_len = 1, 32, 8, 128, 64
    for t, p0 in ((1, 0), (1, 63), (5, 17)):
        parent = torch.randn(b, t, (h + 2 * hkv) * dh, device="cuda").to(dtype)
        q, k, v = (part.view(b, t, -1, dh)
                   for part in parent.split([h * dh, hkv * dh, hkv * dh], dim=-1))
        dims = torch.arange(0, dh, 2, device="cuda") / dh
        freqs = torch.outer(torch.arange(p0, p0 + t, device="cuda", dtype=torch.float32),
                            1.0 / 500000.0 ** dims)
        cos, sin = rotary_tables(freqs, dtype)
        keys = torch.randn(b, hkv, s_len, dh, device="cuda").to(dtype)
        values = torch.randn(b, hkv, s_len, dh, device="cuda").to(dtype)
        want_k, want_v = keys.clone(), values.clone()
        slots = torch.arange(p0, p0 + t, device="cuda")
        want_k.index_copy_(2, slots, rotate_heads(k, cos, sin).transpose(1, 2))
        want_v.index_copy_(2, slots, v.transpose(1, 2))
        got_q = ops.rotary_into_cache(q, k, v, cos, sin, keys, values,
                                      torch.tensor([p0], device="cuda"))
        assert torch.equal(got_q.view(torch.int16),
                           rotate_heads(q, cos, sin).contiguous().view(torch.int16))
        assert torch.equal(keys.view(torch.int16), want_k.view(torch.int16)), f"keys t={t} p0={p0}"
        assert torch.equal(values.view(torch.int16), want_v.view(torch.int16)), f"values t={t}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("h,hkv,dh", [(32, 8, 128), (9, 3, 64), (32, 4, 128), (8, 8, 64)],
                         ids=["llama3-8b", "smollm2", "group8", "mha"])
def test_decode_attention_matches_masked_sdpa(dtype, h, hkv, dh):
    """One token over cache slots 0..p: the masked SDPA of the decode step, within the dtype's
    tolerance, for p in the first slot, mid-split, the last slot; twice the same bits."""
    import torch.nn.functional as F

    from awq_kernels import ops

    s_len = 200
    keys = (torch.randn(2, hkv, s_len, dh, device="cuda") * 2).to(dtype)
    values = torch.randn(2, hkv, s_len, dh, device="cuda").to(dtype)
    q = torch.randn(2, 1, h, dh, device="cuda").to(dtype)
    for p in (0, 63, 64, 100, s_len - 1):  # splits past p only count their arrival
        position = torch.tensor([p], device="cuda")
        got = ops.decode_attention(q, keys, values, position)
        visible = (torch.arange(s_len, device="cuda") <= p)[None, :]
        want = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible,
                                              enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=2e-3,
                                   rtol=2e-3 if dtype == torch.float16 else 2e-2)
        again = ops.decode_attention(q, keys, values, position)
        assert torch.equal(again.view(torch.int16), got.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_a_position_outside_the_cache_gives_nan_and_writes_no_slot(dtype):
    """The position is read on the device, so only the kernels can see it outside the cache:
    attention gives NaN (then works again: no split counter was left moved), rotary_into_cache
    leaves the cache as it was and returns q as NaN."""
    from awq_kernels import ops

    h, hkv, dh, s_len = 8, 2, 64, 130
    keys = torch.randn(1, hkv, s_len, dh, device="cuda").to(dtype)
    values = torch.randn(1, hkv, s_len, dh, device="cuda").to(dtype)
    q = torch.randn(1, 1, h, dh, device="cuda").to(dtype)
    good = ops.decode_attention(q, keys, values, torch.tensor([100], device="cuda"))
    outside = [ops.decode_attention(q, keys, values, torch.tensor([p], device="cuda"))
               for p in (-1, s_len, 200)]  # kept: a fresh output must not reuse a NaN one
    for p, y in zip((-1, s_len, 200), outside):
        assert torch.isnan(y).all(), p
    again = ops.decode_attention(q, keys, values, torch.tensor([100], device="cuda"))
    assert torch.equal(again.view(torch.int16), good.view(torch.int16))
    k_before, v_before = keys.clone(), values.clone()
    k = torch.randn(1, 2, hkv, dh, device="cuda").to(dtype)
    qq = torch.randn(1, 2, h, dh, device="cuda").to(dtype)
    cos = torch.ones(2, dh, device="cuda", dtype=dtype)
    for p0 in (-1, s_len - 1):
        got = ops.rotary_into_cache(qq, k, k, cos, cos, keys, values,
                                    torch.tensor([p0], device="cuda"))
        assert torch.isnan(got).all(), p0
        assert torch.equal(keys.view(torch.int16), k_before.view(torch.int16)), p0
        assert torch.equal(values.view(torch.int16), v_before.view(torch.int16)), p0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9])
def test_int8_head_kernel_matches_its_reference(m, dtype):
    """awq_kernels.int8.gemm_int8 (gemv_int8.cu for M <= 8, 16-bit dequant + matmul above)
    against awq_ref's Int8Linear reference in fp32, Llama-3-8B's hidden size, a ragged N."""
    from awq_kernels.int8 import gemm_int8
    from awq_ref.quant.int8_head import Int8Linear

    head = Int8Linear.from_weight(torch.randn(1000, 4096, device="cuda"))
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    got = gemm_int8(x, head.qweight, head.scales)
    want = head(x.float())
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e}"
    assert torch.equal(gemm_int8(x, head.qweight, head.scales).view(torch.int16),
                       got.view(torch.int16))
    # empty products return without a launch (CUDA refuses an empty grid)
    assert gemm_int8(x, head.qweight[:0], head.scales[:0]).shape == (m, 0)
    assert gemm_int8(x[:0], head.qweight, head.scales).shape == (0, 1000)
