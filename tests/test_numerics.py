"""Numerical edge cases of quantization and the AWQ search: fp16 overflow of the packed format,
all-zero and constant groups, input channels that never activate. Never inf or NaN: either a
finite result or a ValueError naming the layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from awq_ref.api import quantize
from awq_ref.awq.pipeline import AwqConfig, search_awq
from awq_ref.awq.search_scale import candidate_scale, gram_loss, grid_search, weight_mean
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.packing import FP16_MAX, Fp16OverflowError
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight

SPEC = QuantSpec(group_size=32)
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def linear_with(row: torch.Tensor) -> nn.Linear:
    """A (8, 64) linear, random but for its first row's first group, set to `row` (32,)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight[0, :32] = row
    return lin


def test_group_range_beyond_fp16_scales_is_an_error():
    lin = linear_with(torch.linspace(-6e5, 6e5, 32))  # range / 15 = 8e4 > 65504
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj: a group's range overflows"):
        QuantLinear.from_linear(lin, SPEC, "layers.0.mlp.up_proj")


def test_weights_beyond_fp16_are_an_error():
    """Scales fit fp16 (1e5 / 15), but the fp16 kernels would dequantize w = 1e5 to inf."""
    lin = linear_with(torch.linspace(0, 1e5, 32))
    with pytest.raises(Fp16OverflowError, match=r"layers.0.q_proj: quantized weights reach"):
        QuantLinear.from_linear(lin, SPEC, "layers.0.q_proj")
    with pytest.raises(Fp16OverflowError, match="beyond fp16"):
        fake_quantize_weight(lin.weight, SPEC, "layers.0.q_proj")


def test_the_largest_fp16_value_itself_is_in_range():
    from awq_ref.quant.packing import check_fp16_range

    check_fp16_range(torch.tensor([-FP16_MAX, FP16_MAX]))  # finite in fp16: allowed
    with pytest.raises(Fp16OverflowError):
        check_fp16_range(torch.tensor([FP16_MAX * (1 + 2**-20)]))


def test_largest_fp16_weights_still_pack_and_run_in_fp16():
    lin = linear_with(torch.linspace(-60000, 60000, 32))
    q = QuantLinear.from_linear(lin, SPEC, "big")
    assert q.weight_kn().abs().max() <= FP16_MAX
    y = q(torch.full((2, 64), 1e-3, dtype=torch.float16))
    assert torch.isfinite(y).all()


def test_all_zero_group_is_exact():
    q = QuantLinear.from_linear(linear_with(torch.zeros(32)), SPEC, "zero")
    w = q.weight_kn().T  # (N, K)
    assert torch.isfinite(w).all() and torch.equal(w[0, :32], torch.zeros(32))
    assert torch.isfinite(q.scales.float()).all() and (q.scales.float() > 0).all()


@pytest.mark.parametrize("value", [0.5, -0.5, 1e4])
def test_constant_group_is_finite(value):
    q = QuantLinear.from_linear(linear_with(torch.full((32,), value)), SPEC, "const")
    assert torch.isfinite(q.weight_kn()).all()


@pytest.mark.xfail(strict=True, reason="the AWQ/AutoAWQ quantizer: a group that does not span 0 "
                   "is quantized with range max - min and a zero point clamped to [0, 15], so a "
                   "constant group c != 0 becomes ~1e-5 (bit-compatible with AutoAWQ; known)")
def test_constant_group_is_accurate():
    q = QuantLinear.from_linear(linear_with(torch.full((32,), 0.5)), SPEC, "const")
    assert torch.allclose(q.weight_kn().T[0, :32], torch.full((32,), 0.5), rtol=0.1)


@pytest.mark.parametrize("duo", [None, "w"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.95])
def test_candidate_scale_with_dead_channels(ratio, duo):
    """mean|x| = 0 on some channels: clamped, so s stays finite, positive, max * min = 1."""
    x_mean = torch.rand(64) + 0.1
    x_mean[:5] = 0
    w_mean = torch.zeros(64) if duo else None  # an all-zero weight column for duo scaling
    for xm in (x_mean, torch.zeros(64)):
        s = candidate_scale(xm, ratio, w_mean)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-4)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_candidate_scale_is_the_docstrings_formula(ratio):
    """s = x^a (plain) or x^a / (w^(1-a) + 1e-4) (duo), scaled so that max(s) min(s) = 1."""
    x_mean = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    w_mean = torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=torch.float64)
    for w, raw in ((None, x_mean ** ratio),
                   (w_mean, x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4))):
        s = candidate_scale(x_mean, ratio, w)
        assert torch.allclose(s / s[0], raw / raw[0], rtol=1e-12)
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-12)


def test_weight_mean_is_relative_to_each_groups_max():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-4.0, 2.0, 1.0, 1.0]])  # (N = 2, K = 4), G = 2
    # |w| / group max: [[0.5, 1, 0.75, 1], [1, 0.5, 1, 1]]; mean over rows
    assert torch.allclose(weight_mean([w], QuantSpec(4, 2, True)),
                          torch.tensor([0.75, 0.75, 0.875, 1.0]), rtol=1e-5)
    assert torch.allclose(weight_mean([w[:1], w[1:]], QuantSpec(4, 2, True)),  # stacked rows
                          torch.tensor([0.75, 0.75, 0.875, 1.0]), rtol=1e-5)


def test_a_dead_channel_gets_the_floor_before_normalising():
    """mean|x| = 0 gives s = 1e-4 (llm-awq's floor) before the max * min = 1 normalisation, in
    both forms: the dead channel's scale is exactly 1e-4 / sqrt(max * 1e-4)."""
    x_mean = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    for w_mean in (None, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)):
        s = candidate_scale(x_mean, 0.5, w_mean)
        top = 2.0 if w_mean is None else 2.0 / (1.0 + 1e-4)
        raw = torch.tensor([1e-4, 1.0 if w_mean is None else 1 / (1.0 + 1e-4), top],
                           dtype=torch.float64)
        torch.testing.assert_close(s, raw / (top * 1e-4) ** 0.5, rtol=1e-12, atol=0)


@pytest.mark.parametrize("g", [4, -1])
def test_weight_mean_is_the_formula_on_a_wide_weight(g):
    """mean over rows of |w| / (its group's max |w| + 1e-6), per input channel, for N != K."""
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    width = 8 if g == -1 else g
    expected = torch.stack([torch.cat([row[i:i + width].abs() / (row[i:i + width].abs().max()
                                                                   + 1e-6)
                                       for i in range(0, 8, width)]) for row in w]).mean(0)
    torch.testing.assert_close(weight_mean([w], QuantSpec(4, g, True)), expected, rtol=1e-12,
                               atol=0)


def test_grid_search_skips_candidates_that_overflow_fp16():
    """A massive channel next to dead ones: large ratios push w * s past fp16 -> L = inf."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] = 300
    x_mean = torch.ones(64)
    x_mean[0], x_mean[1:5] = 1e4, 0
    x = torch.randn(100, 64) * x_mean  # (T, K)
    choice = grid_search(lambda s: gram_loss(w, x.T @ x, 100, s, SPEC), x_mean, None, 20)
    assert torch.isinf(torch.tensor(choice.losses)).any()  # some candidates were infeasible
    assert choice.loss == min(choice.losses)  # the best feasible candidate, finite
    # a = 0 is s = 1: plain round-to-nearest, the same loss computed directly
    assert choice.loss0 == gram_loss(w, x.T @ x, 100, torch.ones(64), SPEC)


def test_grid_search_judges_a_quantized_prev_by_its_rows_divided_by_s():
    """prev (v_proj, up_proj) is itself quantized: a candidate s that pushes one of prev's rows
    max|w| / s past fp16 is infeasible (L = inf) before its loss is computed; if every one
    does, the error says why."""
    x_mean = torch.tensor([1.0, 100.0])  # s(a) = [100^-a/2, 100^a/2]: s_0 falls as a grows
    calls = []
    choice = grid_search(lambda s: calls.append(s) or 1.0, x_mean, None, 4,
                         prev_max=torch.tensor([30000.0, 1.0]))  # reach 30000 / s_0
    # s_0 = 1, 0.56, 0.32, 0.18 for a = 0, 1/4, 1/2, 3/4: 30000 / s_0 passes 65504 at a = 1/2
    assert choice.losses == (1.0, 1.0, math.inf, math.inf) and len(calls) == 2
    with pytest.raises(Fp16OverflowError, match=r"every scale candidate overflows fp16 \(at "
                                                r"a = 0: prev's rows divided by s reach \|w\| ="
                                                r" 1e\+05, beyond fp16's 65504\)"):
        grid_search(lambda s: 1.0, x_mean, None, 4, prev_max=torch.tensor([1e5, 1.0]))


@pytest.mark.parametrize("duo", [False, True])
def test_awq_with_dead_input_channels_and_zero_weights(duo):
    """Norm weights 0 on 5 channels (their linears' inputs never activate) and an all-zero
    o_proj: the search, the packed model and its outputs stay finite."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:5] = 0
            block.post_attention_layernorm.weight[:5] = 0
            block.self_attn.o_proj.weight.zero_()
    tokens = torch.randint(0, TINY["vocab_size"], (4, 32),
                           generator=torch.Generator().manual_seed(1))
    result = search_awq(model, tokens, SPEC, AwqConfig(n_grid=10, duo_scaling=duo, progress=False))
    for s in result.scales.values():
        assert torch.isfinite(s).all() and (s > 0).all()
    q = quantize(model, method="awq", group_size=32, result=result)
    assert torch.isfinite(q(tokens)).all()


def test_grid_search_keeps_the_first_of_equal_losses():
    """A tie keeps the smallest ratio: with losses flat from a = 0 on, s = 1 (round-to-nearest,
    no scaling), not the strongest scaling that happens to tie."""
    x_mean = torch.linspace(0.5, 4.0, 16)
    choice = grid_search(lambda s: 1.0, x_mean, None, 10)
    assert choice.ratio == 0 and torch.equal(choice.s, torch.ones(16))

    def two_minima(s: torch.Tensor) -> float:  # equal least losses at a = 0.3 and a = 0.6
        a = round(float(torch.log(s[-1] / s[0]) / torch.log(x_mean[-1] / x_mean[0])), 6)
        return 0.5 if a in (0.3, 0.6) else 1.0

    assert grid_search(two_minima, x_mean, None, 10).ratio == pytest.approx(0.3)
