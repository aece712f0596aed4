"""The kernels' index math emulated in NumPy (awq_kernels/emulate*.py, instruction for
instruction where it matters): every weight reaches the fragment the kernel gives it, bit for
bit, and the emulated outputs equal the reference products and the model's torch code. No GPU
needed; the GPU tests (test_kernels_gpu.py) run the kernels themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from awq_kernels import build, emulate, emulate_direct, emulate_ops, reference
from awq_kernels.plan import (
    GEMV_NT,
    Launch,
    cdiv,
    plan_gemv,
    plan_gemv_direct,
    plan_mma_direct,
)


def _bits16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _bits32(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint32)


def _problem(m: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int):
    qweight, qzeros, scales = reference.random_packed(k, n, g, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    w = reference.dequantize_like_kernel(qweight, qzeros, scales, g, dtype)  # (K, N)
    args = (_bits16(x), _bits32(qweight), _bits32(qzeros), _bits16(scales), g)
    return x, w, args


def _check_records(records, w_bits: np.ndarray) -> set:
    """Every dequantized fragment element equals W at the (k, n) the kernel assigns it to;
    columns past N (zero-filled copies) dequantize to exact zeros. Returns the (k, n) seen."""
    n = w_bits.shape[1]
    seen = set()
    for k_idx, n_idx, bits in records:
        k_idx = np.broadcast_to(k_idx, n_idx.shape)
        ok = n_idx < n
        np.testing.assert_array_equal(bits[ok], w_bits[k_idx[ok], n_idx[ok]])
        assert not bits[~ok].any()
        seen.update(zip(k_idx[ok].tolist(), n_idx[ok].tolist()))
    return seen


def _check_product(partials: np.ndarray, x: torch.Tensor, w: torch.Tensor, tag: str,
                   sum_tol: float = 1e-5) -> float:
    """The summed partials vs x @ W in float64 (relative error < sum_tol: fp32 accumulation
    only, unless the kernel forms products in 16 bits), and the rounded output within the GPU
    tests' tolerance. Returns the output's relative error."""
    y = partials[0].copy()
    for s in range(1, partials.shape[0]):  # the reduce kernel's order
        y += partials[s]
    assert not np.isnan(y).any(), "some outputs were never written"
    ref = (x.double() @ w.double()).numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < sum_tol
    final = emulate.to_f32(tag, emulate.from_f64(tag, y))
    err = np.linalg.norm(final - ref) / np.linalg.norm(ref)
    assert err < (2e-3 if tag == "F16" else 1e-2)
    return err


# (M, K, N, G, SMs): every row capacity (1, 2, 4, 8), a ragged column tile (N = 320), splits whose
# rows start inside a group; the (1, 2048, 64) case gives each warp 32 steps (four flushes) and a
# group reload every 8 steps.
GEMV_DIRECT_CASES = [(1, 512, 320, 64, 2), (1, 2048, 64, 32, 1), (2, 256, 192, 32, 2),
                     (3, 1024, 256, 128, 2), (4, 256, 320, 32, 2), (6, 256, 192, 64, 2),
                     (8, 512, 64, 32, 2)]


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("m,k,n,g,sms", GEMV_DIRECT_CASES)
def test_emulated_gemv_direct_kernel_mapping(dtype, tag, m, k, n, g, sms):
    x, w, args = _problem(m, k, n, g, dtype, seed=11 * m + k)
    launch = plan_gemv_direct(m, n, k, num_sms=sms)  # few SMs -> split-K
    assert launch.grid[0] == cdiv(n, GEMV_NT) and launch.splits > 1
    records: list = []
    partials = emulate_direct.emulate_gemv_direct(tag, *args, launch, record=records)
    assert len(_check_records(records, _bits16(w))) == k * n
    # Products rounded to 16 bits, summed in 16 bits for U steps (gemv_direct.cu's header).
    err = _check_product(partials, x, w, tag, sum_tol=1e-3 if tag == "F16" else 6e-3)
    print(f"gemv_direct {tag} M={m} K={k} N={n} G={g}: output relative error {err:.1e}")


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_emulated_dequant_kernel_is_bit_exact(dtype, tag, g):
    _, w, (_, qw, qz, s, _) = _problem(1, 256, 192, g, dtype, seed=g)
    np.testing.assert_array_equal(emulate.emulate_dequant(tag, qw, qz, s, g), _bits16(w))
    for n0, nc in ((0, 64), (64, 128), (128, 64)):  # column slices (the overlapped path's)
        np.testing.assert_array_equal(emulate.emulate_dequant(tag, qw, qz, s, g, n0, nc),
                                      _bits16(w)[:, n0:n0 + nc])


# (M, K, N, G, tile, splits): ragged M and N tiles, split starts inside a group, every tile.
MMA_CASES = [(20, 256, 192, 64, build.MMA_CONFIGS[16], 3),
             (40, 128, 128, 32, build.MMA_CONFIGS[32], 1),
             (70, 256, 320, 128, build.MMA_CONFIGS[64], 2),
             (130, 128, 128, 32, build.MMA_CONFIGS[128], 1)]
# The sweep tiles, in build.MMA_SWEEP_TILES order: N = 320 or 576 leaves the last block of a
# BN = 256 tile one valid warp of 4 (of a BN = 128 tile, 320: one of 2); splits start in groups.
MMA_CASES += [(m, k, n, g, tile, splits) for (m, k, n, g, splits), tile in zip(
    [(9, 384, 576, 128, 2), (20, 384, 320, 32, 3), (17, 256, 320, 64, 1), (33, 384, 576, 32, 2),
     (40, 384, 320, 64, 3), (65, 256, 320, 128, 3), (70, 256, 576, 64, 2),
     (130, 128, 320, 32, 1)], build.MMA_SWEEP_TILES, strict=True)]


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("m,k,n,g,tile,splits", MMA_CASES, ids=lambda v: str(v) if not
                         isinstance(v, build.MmaTile) else f"{v.bm}x{v.bn}x{v.bk}w{v.warps_m}")
def test_emulated_mma_kernel_mapping(dtype, tag, m, k, n, g, tile, splits):
    x, w, args = _problem(m, k, n, g, dtype, seed=m + n)
    per_split = cdiv(k // tile.bk, splits)
    splits = cdiv(k // tile.bk, per_split)
    launch = Launch("mma", tile.bm, (cdiv(n, tile.bn), cdiv(m, tile.bm), splits), (0, 1, 1),
                    splits, per_split, tile)
    records: list = []
    partials = emulate.emulate_mma(tag, *args, launch, record=records)
    seen = _check_records(records, _bits16(w))
    assert len(seen) == k * n, "every weight must reach some B fragment"
    _check_product(partials, x, w, tag)


@pytest.mark.parametrize("bk", [32, 64])
def test_mma_x_tile_swizzle_is_bank_conflict_free(bk):
    """Each 8x8 matrix of an ldmatrix.x4 reads 8 rows' 16-byte chunks at one logical chunk:
    after the swizzle the 8 chunks must sit in 8 different 16-byte bank groups (of 8)."""
    for row0 in range(0, 128, 8):
        for c in range(bk // 8):
            words = [emulate.a_chunk_offset(r, c, bk) for r in range(row0, row0 + 8)]
            assert len({(w // 4) % 8 for w in words}) == 8, (row0, c)
            assert all(w % 4 == 0 for w in words)


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("m,k,n,g", [(1, 256, 320, 64), (3, 512, 192, 128), (8, 256, 256, 32)])
def test_emulated_gemv_kernel_mapping(dtype, tag, m, k, n, g):
    x, w, args = _problem(m, k, n, g, dtype, seed=7 * m)
    launch = plan_gemv(m, n, k, num_sms=4)  # few SMs -> split-K even for these small shapes
    assert launch.grid[0] == cdiv(n, GEMV_NT) and launch.splits > 1
    records: list = []
    partials = emulate.emulate_gemv(tag, *args, launch, record=records)
    assert len(_check_records(records, _bits16(w))) == k * n
    _check_product(partials, x, w, tag)


# (M, K, N, G, SMs): every row capacity (M <= 8, 16, 32 and 64: two warps along M), a ragged
# column tile (N = 320: one of the second tile's four warps in range; N = 64: one warp), odd
# chunk counts (K = 320: two splits of 5 chunks, the two K warps take 3 and 2; no other case
# has one since the planners changed), splits that start inside a group (K = 384, G = 128;
# K = 320, G = 64), no split (M = 17, M = 40), rows past M in the second row of warps.
MMA_DIRECT_CASES = [(1, 512, 320, 64, 2), (3, 384, 192, 128, 1), (8, 256, 64, 32, 1),
                    (12, 512, 256, 128, 2), (17, 256, 320, 64, 1), (32, 1024, 128, 32, 2),
                    (40, 256, 320, 64, 1), (64, 2048, 64, 128, 2), (1, 320, 64, 64, 1)]


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("m,k,n,g,sms", MMA_DIRECT_CASES)
def test_emulated_mma_direct_kernel_mapping(dtype, tag, m, k, n, g, sms):
    x, w, args = _problem(m, k, n, g, dtype, seed=13 * m + n)
    launch = plan_mma_direct(m, n, k, num_sms=sms)
    assert launch.grid[0] == cdiv(n, GEMV_NT) and (launch.splits > 1) == (m not in (17, 40))
    if k == 320:  # the odd case: chunks per split as its comment says
        assert (launch.splits, launch.k_per_split) == (2, 5)
    records: list = []
    partials = emulate_direct.emulate_mma_direct(tag, *args, launch, record=records)
    assert len(_check_records(records, _bits16(w))) == k * n, "every weight in some A fragment"
    err = _check_product(partials, x, w, tag)
    print(f"mma_direct {tag} M={m} K={k} N={n} G={g} splits={launch.splits}: "
          f"output relative error {err:.1e}")


# ----------------------------------------------------------------- elementwise.cu (awq_kernels.ops)

def _flat_bits(parent: torch.Tensor) -> np.ndarray:
    return _bits16(parent.reshape(-1))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("fused", [True, False])
def test_emulated_rotary_gives_the_models_bits(dtype, tag, fused):
    """The kernel's index math over a strided view (q and k inside a fused q/k/v output, or one
    projection's output), and its roundings: the same bits as awq_ref's rotate_heads."""
    from awq_ref.model import rotary_tables, rotate_heads

    b, t, h, hkv, dh = 2, 3, 4, 2, 32
    gen = torch.Generator().manual_seed(5)
    parent = torch.randn(b, t, (h + 2 * hkv) * dh, generator=gen).to(dtype)  # a q/k/v output
    x = (parent[..., :(h + hkv) * dh] if fused else parent).view(b, t, -1, dh)
    freqs = torch.outer(torch.arange(7.0, 7.0 + t), 1.0 / 10000 ** (torch.arange(0, dh, 2) / dh))
    cos, sin = rotary_tables(freqs, dtype)
    got = emulate_ops.emulate_rotary(tag, _flat_bits(parent), x.storage_offset(), tuple(x.shape),
                                 x.stride()[:3], _bits16(cos), _bits16(sin))
    np.testing.assert_array_equal(got, _bits16(rotate_heads(x, cos, sin)))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_emulated_silu_mul_matches_torch(dtype, tag):
    """gate and up as the two halves of a fused gate/up output (row stride 2F)."""
    rows, f = 3, 48
    parent = (torch.randn(rows, 2 * f, generator=torch.Generator().manual_seed(6)) * 3).to(dtype)
    gate, up = parent.split(f, dim=-1)
    got = emulate_ops.emulate_silu_mul(tag, _flat_bits(parent), 0, 2 * f, _flat_bits(parent), f,
                                   2 * f, rows, f)
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(torch.from_numpy(emulate.to_f32(tag, got)), want.float(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("d", [64, 576, 4096 + 2048 + 8])
def test_emulated_rms_norm_matches_the_model(dtype, tag, d):
    """One block per row, the kernel's reduction order; within one rounding of RMSNorm."""
    from awq_ref.model import RMSNorm

    rows = 2
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=gen).to(dtype)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    got = emulate_ops.emulate_rms_norm(tag, _flat_bits(x), 0, d, _bits16(norm.weight.data), rows, d,
                                   1e-5)
    want = norm(x)
    torch.testing.assert_close(torch.from_numpy(emulate.to_f32(tag, got)), want.float(),
                               **({"rtol": 2e-3, "atol": 1e-3} if tag == "F16" else
                                  {"rtol": 1.6e-2, "atol": 1e-2}))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_emulated_add_rms_norm_matches_the_model(dtype, tag):
    """The residual sum bit for bit (x + delta in T), the norm within one rounding."""
    from awq_ref.model import RMSNorm

    rows, d = 3, 576
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(rows, d, generator=gen).to(dtype)
    parent = torch.randn(rows, 2 * d, generator=gen).to(dtype)  # delta: a strided view
    delta = parent[:, d:]
    norm = RMSNorm(d, 1e-6)
    norm.weight.data = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    s, y = emulate_ops.emulate_add_rms_norm(tag, _flat_bits(x), 0, d, _flat_bits(parent), d, 2 * d,
                                        _bits16(norm.weight.data), rows, d, 1e-6)
    want_s, want_y = norm.add_and_norm(x, delta)
    np.testing.assert_array_equal(s, _bits16(want_s))
    torch.testing.assert_close(torch.from_numpy(emulate.to_f32(tag, y)), want_y.float(),
                               **({"rtol": 2e-3, "atol": 1e-3} if tag == "F16" else
                                  {"rtol": 1.6e-2, "atol": 1e-2}))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("t", [1, 3])
def test_emulated_rotary_into_cache_gives_the_models_bits(dtype, tag, t):
    """q, k, v as views of one fused q/k/v output; k and v land in the cache at positions
    p0 .. p0 + T - 1 exactly as rotate_heads + index_copy_ put them, q comes back rotated."""
    from awq_ref.model import rotary_tables, rotate_heads

    b, h, hkv, dh, s_len, p0 = 2, 4, 2, 32, 8, 3
    gen = torch.Generator().manual_seed(9 + t)
    parent = torch.randn(b, t, (h + 2 * hkv) * dh, generator=gen).to(dtype)
    q, k, v = (part.view(b, t, -1, dh) for part in parent.split([h * dh, hkv * dh, hkv * dh], -1))
    freqs = torch.outer(torch.arange(p0, p0 + t, dtype=torch.float32),
                        1.0 / 10000 ** (torch.arange(0, dh, 2) / dh))
    cos, sin = rotary_tables(freqs, dtype)
    keys = torch.randn(b, hkv, s_len, dh, generator=gen).to(dtype)
    values = torch.randn(b, hkv, s_len, dh, generator=gen).to(dtype)
    flat = _flat_bits(parent)
    got_q, got_k, got_v = emulate_ops.emulate_rotary_into_cache(
        tag, (flat, flat, flat), (q.storage_offset(), k.storage_offset(), v.storage_offset()),
        (q.stride()[:3], k.stride()[:3], v.stride()[:3]), (b, t, h, hkv, dh), _bits16(cos),
        _bits16(sin), _bits16(keys), _bits16(values), p0)
    slots = torch.arange(p0, p0 + t)
    keys.index_copy_(2, slots, rotate_heads(k, cos, sin).transpose(1, 2))
    values.index_copy_(2, slots, v.transpose(1, 2))
    np.testing.assert_array_equal(got_q, _bits16(rotate_heads(q, cos, sin)))
    np.testing.assert_array_equal(got_k, _bits16(keys))
    np.testing.assert_array_equal(got_v, _bits16(values))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("p,s_len,dh", [(0, 64, 64), (70, 130, 128), (129, 130, 64),
                                        (5, 300, 64)])
def test_emulated_decode_attention_matches_sdpa(dtype, tag, p, s_len, dh):
    """Splits of 64 slots, 4 warps of 16, online softmax and both merges: softmax attention
    over slots 0..p (GQA, 4 query heads per KV head), within the output's rounding."""
    b, h, hkv = 2, 8, 2
    gen = torch.Generator().manual_seed(p + dh)
    q = torch.randn(b, 1, h, dh, generator=gen).to(dtype)
    keys = (torch.randn(b, hkv, s_len, dh, generator=gen) * 2).to(dtype)
    values = torch.randn(b, hkv, s_len, dh, generator=gen).to(dtype)
    got = emulate_ops.emulate_decode_attention(tag, _bits16(q), _bits16(keys), _bits16(values), p)
    visible = (torch.arange(s_len) <= p)[None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), keys.double(), values.double(), attn_mask=visible,
        enable_gqa=True).transpose(1, 2)  # (B, 1, H, Dh)
    got_f = torch.from_numpy(emulate.to_f32(tag, got)).double()
    err = ((got_f - want).norm() / want.norm()).item()
    assert err < (1e-3 if tag == "F16" else 8e-3), err


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_decode_attention_leaving_out_the_splits_past_p_keeps_every_bit(dtype, tag):
    """A graph decode step launches one split per 64 slots of the whole cache; the splits past
    the position are empty (m = -inf, weight 0), so merging only the used ones gives the bits
    of merging all of them."""
    gen = torch.Generator().manual_seed(7)
    q = _bits16(torch.randn(1, 1, 4, 64, generator=gen).to(dtype))
    keys = _bits16((torch.randn(1, 2, 512, 64, generator=gen) * 2).to(dtype))
    values = _bits16(torch.randn(1, 2, 512, 64, generator=gen).to(dtype))
    for p in (0, 63, 64, 200, 511):
        used = emulate_ops.emulate_decode_attention(tag, q, keys, values, p)
        every = emulate_ops.emulate_decode_attention(tag, q, keys, values, p, skip_empty=False)
        np.testing.assert_array_equal(used, every)


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_a_position_outside_the_cache_gives_nan_and_writes_no_slot(dtype, tag):
    """The callers keep 0 <= p < S (p + T <= S for the cache writes); a direct call past that
    read and wrote other heads' slots. Now: attention NaN, the cache untouched, q NaN."""
    gen = torch.Generator().manual_seed(3)
    keys = _bits16(torch.randn(1, 2, 130, 64, generator=gen).to(dtype))
    values = _bits16(torch.randn(1, 2, 130, 64, generator=gen).to(dtype))
    q = _bits16(torch.randn(1, 1, 4, 64, generator=gen).to(dtype))
    for p in (-1, 130, 200):
        y = emulate_ops.emulate_decode_attention(tag, q, keys, values, p)
        assert np.isnan(emulate.to_f32(tag, y)).all(), p
    parent = _flat_bits(torch.randn(1, 2, (4 + 2 * 2) * 64, generator=gen).to(dtype))
    cos = sin = _bits16(torch.ones(2, 64, dtype=dtype))
    strides = ((2 * 512, 512, 64),) * 3
    for p0 in (-1, 129):  # T = 2: slots p0, p0 + 1, one of them outside
        got_q, got_k, got_v = emulate_ops.emulate_rotary_into_cache(
            tag, (parent,) * 3, (0, 256, 384), strides, (1, 2, 4, 2, 64), cos, sin, keys, values,
            p0)
        assert np.isnan(emulate.to_f32(tag, got_q)).all(), p0
        np.testing.assert_array_equal(got_k, keys)
        np.testing.assert_array_equal(got_v, values)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_mma_direct_buffer_rotation_computes_every_chunk_once_in_order(depth):
    for mine in range(20):
        assert emulate_direct.rotation_order(mine, depth) == list(range(mine))


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("m,k,n", [(1, 576, 40), (3, 1024, 24), (8, 16, 8)])
def test_emulated_gemv_int8_matches_the_int8_head(dtype, tag, m, k, n):
    """The kernel's lane mapping and fp32 sums against awq_ref's Int8Linear reference."""
    from awq_ref.quant.int8_head import Int8Linear

    gen = torch.Generator().manual_seed(k + n)
    head = Int8Linear.from_weight(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = emulate_ops.emulate_gemv_int8(tag, _bits16(x), head.qweight.numpy(), head.scales.numpy())
    want = (x.double() @ head.qweight.double().T) * head.scales.double()
    err = (torch.from_numpy(emulate.to_f32(tag, got)).double() - want).norm() / want.norm()
    assert err < (1e-3 if tag == "F16" else 8e-3), err
    ref = head(x.float()).to(dtype)  # the reference forward, in fp32 then rounded
    torch.testing.assert_close(torch.from_numpy(emulate.to_f32(tag, got)), ref.float(),
                               rtol=2e-3 if tag == "F16" else 1.6e-2, atol=1e-3)
