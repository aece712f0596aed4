"""The group-wise quantizer's maths: error bound, ranges, symmetric and per-channel variants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ref.quant.quantizer import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    grouped,
    quantize,
)


def mixed_sign_weight(n: int, k: int, g: int, seed: int) -> torch.Tensor:
    """Random (N, K) weight whose every group holds a negative and a positive value.

    The s/2 bound needs 0 inside the group's range: otherwise z = clamp(.., 0, ..) = 0 cannot
    shift the grid and the far end of the group is clipped (a property of the format).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    wg = w.view(n, k // g, g)
    wg[..., 0] = -wg[..., 0].abs() - 0.01
    wg[..., -1] = wg[..., -1].abs() + 0.01
    return w


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 6), groups=st.integers(1, 4),
       g=st.sampled_from([2, 8, 32]), zero_point=st.booleans(), seed=st.integers(0, 2**16))
def test_error_at_most_half_a_step(bits, n, groups, g, zero_point, seed):
    spec = QuantSpec(bits, g, zero_point)
    w = mixed_sign_weight(n, groups * g, g, seed)
    scales, _zeros = compute_qparams(w, spec)  # (N, K/G)
    err = (grouped(w, g) - grouped(fake_quantize(w, spec), g)).abs()  # (N, K/G, G)
    bound = scales[..., None] / 2 * (1 + 1e-5) + 1e-7
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_point", [True, False])
def test_codes_and_zeros_in_range(bits, zero_point):
    spec = QuantSpec(bits, 16, zero_point)
    w = torch.randn(8, 64) * 5 + 1  # offset: some groups are all of one sign
    scales, zeros = compute_qparams(w, spec)
    q = quantize(w, scales, zeros, spec)
    assert zeros.dtype == q.dtype == torch.int32
    assert 0 <= int(zeros.min()) and int(zeros.max()) <= 2**bits - 1
    assert 0 <= int(q.min()) and int(q.max()) <= 2**bits - 1
    assert (scales > 0).all()


def test_symmetric_uses_fixed_zero_and_absmax_scale():
    spec = QuantSpec(4, 8, zero_point=False)
    w = torch.randn(4, 32)
    scales, zeros = compute_qparams(w, spec)
    assert (zeros == 8).all()
    torch.testing.assert_close(scales, grouped(w, 8).abs().amax(-1) / 7)
    w_hat = fake_quantize(w, spec)
    assert (grouped(w - w_hat, 8).abs() <= scales[..., None] / 2 + 1e-6).all()


def test_per_channel_is_one_group_spanning_k():
    w = torch.randn(5, 48)
    per_channel = QuantSpec(4, -1)
    scales, zeros = compute_qparams(w, per_channel)
    assert scales.shape == zeros.shape == (5, 1)
    torch.testing.assert_close(fake_quantize(w, per_channel), fake_quantize(w, QuantSpec(4, 48)),
                               rtol=0, atol=0)


def test_exact_grid_values_survive():
    spec = QuantSpec(4, 16)
    codes = torch.randint(0, 16, (3, 32), dtype=torch.int32)
    codes[:, ::16] = 0
    codes[:, 1::16] = 15  # every group spans the full code range
    s, z = torch.rand(3, 2) + 0.5, torch.randint(0, 16, (3, 2), dtype=torch.int32)
    w = dequantize(codes, s, z)
    assert torch.equal(quantize(w, *compute_qparams(w, spec), spec), codes)


def test_constant_group_does_not_divide_by_zero():
    w = torch.zeros(2, 16)
    assert torch.equal(fake_quantize(w, QuantSpec(4, 8)), w)
    assert torch.equal(fake_quantize(w, QuantSpec(4, 8, zero_point=False)), w)


@pytest.mark.parametrize("bits", [1, 9, 4.0, "4"])
def test_bits_outside_2_to_8_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group", [0, -2, 1.5])
def test_bad_group_size_rejected(group):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=group)


def test_group_not_dividing_k_names_layer_and_numbers():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.*128.*576"):
        fake_quantize(torch.randn(4, 576), QuantSpec(4, 128), "model.layers.0.mlp.down_proj")


def test_defaults_are_4_bit_groups_of_128_asymmetric_and_frozen():
    """The documented defaults (quantize()'s too); frozen: a spec is checked once, when made, so
    a later `spec.bits = 9` must not slip past __post_init__."""
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.zero_point) == (4, 128, True)
    with pytest.raises(AttributeError):
        spec.bits = 9


def test_groups_of_one_weight_each():
    """G = 1, the smallest group: symmetric quantization gives each weight its own scale
    |w| / 7, so every weight comes back (to a rounding of s)."""
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fake_quantize(w, QuantSpec(4, 1, zero_point=False)), w)


@pytest.mark.parametrize("zero_point, steps", [(True, 15), (False, 7)])
def test_a_flat_group_gets_the_floor_scale(zero_point, steps):
    """A group narrower than 1e-5 gets the scale 1e-5 / steps (llm-awq's floor, kept so the
    codes match its checkpoints), not 0."""
    w = torch.full((2, 8), 3e-6)
    scales, _ = compute_qparams(w, QuantSpec(4, 8, zero_point))
    assert torch.equal(scales, torch.full((2, 1), 1e-5 / steps))
