"""The packed format: pack/unpack round trips, nibble order, packed vs unpacked dequantization."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ref.quant.packing import (
    AWQ_ORDER,
    dequantize_packed,
    pack_codes,
    pack_int4,
    pack_weight,
    quantize_with_fp16_scales,
    unpack_int4,
)
from awq_ref.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quantize
from awq_ref.quant.rtn import fake_quantize_weight


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 9), words=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows, words, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, 8 * words), generator=gen, dtype=torch.int32)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("value", [0, 15])
def test_edge_codes(value):
    codes = torch.full((3, 16), value, dtype=torch.int32)
    packed = pack_int4(codes)
    assert (packed == (0 if value == 0 else -1)).all()  # 0xFFFFFFFF is -1 as int32
    assert torch.equal(unpack_int4(packed), codes)


def test_nibble_order_is_awq_order():
    for col in range(8):
        codes = torch.zeros(1, 8, dtype=torch.int32)
        codes[0, col] = 1
        nibble = AWQ_ORDER.index(col)
        assert int(pack_int4(codes)) == 1 << (4 * nibble)
    # columns 0..7 hold 0..7: nibbles read 0,2,4,6,1,3,5,7 from the least significant end
    assert int(pack_int4(torch.arange(8)[None])) == 0x75316420


def test_sign_bit_set_when_top_nibble_large():
    codes = torch.zeros(1, 8, dtype=torch.int32)
    codes[0, 7] = 8  # column 7 sits in nibble 7, bits 28..31
    assert int(pack_int4(codes)) == -(2**31)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("g", [8, 32, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_dequantize_packed_equals_unpacked_bit_for_bit(g, zero_point):
    spec = QuantSpec(4, g, zero_point)
    w = torch.randn(24, 64) * 0.05  # (N, K)
    q, z, s16 = quantize_with_fp16_scales(w, spec)  # (N, K), (N, K/G), (N, K/G)
    qweight, qzeros, scales = pack_codes(q, z, s16)
    unpacked = dequantize(q, s16.float(), z)  # (N, K) fp32
    packed = dequantize_packed(qweight, qzeros, scales, g)  # (K, N) fp32
    assert torch.equal(packed, unpacked.T)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_packed(qweight, qzeros, scales, g, dtype),
                           unpacked.T.to(dtype))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("zero_point", [True, False])
def test_codes_and_zeros_come_from_the_fp16_rounded_scales(bits, zero_point):
    """The docstring's formulas written out: the scale is rounded to fp16 first, and the zero
    point and codes use that rounded scale (as every reader dequantizes with it)."""
    spec = QuantSpec(bits, 128, zero_point)
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))  # (N, K)
    q, z, s16 = quantize_with_fp16_scales(w, spec)
    wg = w.reshape(256, 8, 128)  # (N, K/G, G)
    top = 2**bits - 1
    if zero_point:
        s = ((wg.amax(-1) - wg.amin(-1)).clamp(min=1e-5) / top).half()
        want_z = (-torch.round(wg.amin(-1) / s.float())).clamp(0, top)
    else:
        s = (wg.abs().amax(-1).clamp(min=1e-5) / (2 ** (bits - 1) - 1)).half()
        want_z = torch.full_like(s, 2 ** (bits - 1), dtype=torch.float32)
    want_q = (torch.round(wg / s.float()[..., None]) + want_z[..., None]).clamp(0, top)
    assert s16.dtype == torch.float16 and torch.equal(s16, s)
    assert torch.equal(z, want_z.to(torch.int32))
    assert torch.equal(q, want_q.reshape(256, 1024).to(torch.int32))
    scales, zeros = compute_qparams(w, spec, scale_dtype=torch.float16)
    assert torch.equal(scales, s.float()) and torch.equal(zeros, z)


@pytest.mark.parametrize("zero_point", [True, False])
def test_pack_weight_matches_fake_quant_exactly(zero_point):
    spec = QuantSpec(4, 16, zero_point)
    w = torch.randn(16, 48)
    qweight, qzeros, scales = pack_weight(w, spec)
    assert qweight.shape == (48, 2) and qzeros.shape == (3, 2) and scales.shape == (3, 16)
    assert scales.dtype == torch.float16
    assert torch.equal(dequantize_packed(qweight, qzeros, scales, 16),
                       fake_quantize_weight(w, spec).T)
    if not zero_point:
        assert (unpack_int4(qzeros) == 8).all()


def test_fp16_scales_barely_move_the_weights():
    """fp16-rounded scales (relative error <= 2^-11) vs fp32 ones: codes flip only at near-ties."""
    spec = QuantSpec(4, 32)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    diff = (fake_quantize_weight(w, spec) - fake_quantize(w, spec)).abs()
    scales, _ = compute_qparams(w, spec)  # (N, K/G)
    assert (diff <= scales.repeat_interleave(32, dim=1) * 1.01).all()  # at most one step
    assert (diff > 1e-2 * scales.repeat_interleave(32, dim=1)).float().mean() < 0.01


def test_pack_refuses_other_bit_widths():
    with pytest.raises(ValueError, match=r"4-bit.*bits=3.*fake quantization"):
        pack_weight(torch.randn(8, 32), QuantSpec(3, 16), "model.layers.0.self_attn.q_proj")


def test_pack_refuses_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int32))
    for bad in (16, -1):  # one code out of range among good ones: -1 would spill into a neighbour
        codes = torch.arange(8)[None].repeat(2, 1)
        codes[1, 3] = bad
        with pytest.raises(ValueError, match=rf"0..15, got range {min(bad, 0)}..{max(bad, 7)}"):
            pack_int4(codes)
    with pytest.raises(ValueError, match="out_features 12"):
        pack_weight(torch.randn(12, 32), QuantSpec(4, 16), "layer")
    with pytest.raises(ValueError, match="layer: group_size 24 does not divide in_features 32"):
        pack_weight(torch.randn(8, 32), QuantSpec(4, 24), "layer")


@pytest.mark.parametrize("g", [0, 24])
def test_dequantize_packed_refuses_a_group_size_not_dividing_k(g):
    qweight, qzeros, scales = pack_weight(torch.randn(16, 32), QuantSpec(4, 16))
    with pytest.raises(ValueError, match=f"group_size {g} does not divide in_features 32"):
        dequantize_packed(qweight, qzeros, scales, g)


def test_groups_of_one_pack_and_dequantize():
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))  # (N, K)
    qweight, qzeros, scales = pack_weight(w, QuantSpec(4, 1, zero_point=False))
    assert qzeros.shape == (4, 1) and scales.shape == (4, 8)  # one group per input channel
    torch.testing.assert_close(dequantize_packed(qweight, qzeros, scales, 1), w.T, rtol=1e-3,
                               atol=0)


def test_dequantize_packed_checks_shapes():
    qweight, qzeros, scales = pack_weight(torch.randn(16, 32), QuantSpec(4, 16))
    with pytest.raises(ValueError, match=r"qzeros: shape \(2, 2\).*\(4, 2\)"):
        dequantize_packed(qweight, qzeros, scales, 8)
    with pytest.raises(ValueError, match="scales: dtype"):
        dequantize_packed(qweight, qzeros, scales.float(), 16)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(qweight.to(torch.int64))
