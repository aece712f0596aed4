"""QuantLinear vs x @ fake-quantized W, the kernel hook, the layer swap, the public quantize()."""

import pytest
import torch
from torch import nn

from awq_ref.api import quantize
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.packing import dequantize_packed
from awq_ref.quant.qlinear import QuantLinear, apply_kernel, decoder_linears, replace_linears
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight

LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
    return Llama(LlamaConfig(**{**cfg, **overrides})).eval()


def random_linear(k: int, n: int, bias: bool) -> nn.Linear:
    torch.manual_seed(k * n)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64, False), QuantSpec(4, -1)])
def test_output_equals_x_at_fake_quantized_weight(bias, spec):
    lin = random_linear(128, 40, bias)
    ql = QuantLinear.from_linear(lin, spec)
    assert (ql.in_features, ql.out_features) == (128, 40)
    assert ql.group_size == (128 if spec.group_size == -1 else spec.group_size)
    x = torch.randn(3, 5, 128)  # (B, T, K)
    ref = x @ fake_quantize_weight(lin.weight, spec).T + (lin.bias if bias else 0)
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    lin = random_linear(64, 16, True)
    ql = QuantLinear.from_linear(lin, QuantSpec(4, 32)).to(dtype)
    assert ql.scales.dtype == torch.float16  # scales keep their stored values under .to(dtype)
    x = torch.randn(4, 64).to(dtype)
    y = ql(x)
    assert y.dtype == dtype
    ref = x.float() @ ql.weight_kn() + ql.bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_to_bfloat16_keeps_fp16_scales_exact():
    ql = QuantLinear.from_linear(random_linear(64, 16, False), QuantSpec(4, 16))
    before = ql.scales.clone()
    ql.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and torch.equal(ql.scales, before)


def test_kernel_hook_called_with_packed_tensors_and_bias_added():
    ql = QuantLinear.from_linear(random_linear(64, 16, True), QuantSpec(4, 32))
    calls = []

    def fake_kernel(x, qweight, qzeros, scales, group_size):
        calls.append((qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), group_size))
        return x @ dequantize_packed(qweight, qzeros, scales, group_size, x.dtype)

    x = torch.randn(2, 64)
    reference = ql(x)
    model = nn.Sequential(ql, nn.ReLU())
    assert apply_kernel(model, fake_kernel) == 1
    assert "fake_kernel" in repr(ql)
    torch.testing.assert_close(ql(x), reference, rtol=0, atol=0)
    assert calls == [(ql.qweight.data_ptr(), ql.qzeros.data_ptr(), ql.scales.data_ptr(), 32)]
    apply_kernel(model, None)
    ql(x)
    assert len(calls) == 1


def test_refuses_bits_other_than_4():
    with pytest.raises(ValueError, match=r"bits=3.*fake quantization"):
        QuantLinear.from_linear(random_linear(64, 16, False), QuantSpec(3, 32), "q_proj")


def test_group_not_dividing_k_names_layer():
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*48.*64"):
        replace_linears(tiny_llama(), QuantSpec(4, 48))


def test_replace_linears_swaps_decoder_linears_only():
    model = replace_linears(tiny_llama(), QuantSpec(4, 32), modules_to_not_convert=["down_proj"])
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * (LINEARS_PER_BLOCK - 1)
    assert (isinstance(model.lm_head, nn.Linear)
            and isinstance(model.model.embed_tokens, nn.Embedding))
    assert all(isinstance(b.mlp.down_proj, nn.Linear) for b in model.model.layers)
    assert "model.layers.1.self_attn.q_proj" in quantized
    assert decoder_linears(model) == [(f"model.layers.{i}.mlp.down_proj", b.mlp.down_proj)
                                      for i, b in enumerate(model.model.layers)]


def test_quantize_returns_a_copy_with_quantization_config():
    model = tiny_llama()
    q = quantize(model, w_bit=4, group_size=32)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 2 * LINEARS_PER_BLOCK
    assert q.quantization_config == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                     "zero_point": True, "sym": False, "version": "gemm",
                                     "modules_to_not_convert": ["lm_head"]}
    same = quantize(model, group_size=32, inplace=True)
    assert same is model and isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_packed_and_fake_give_the_same_logits():
    model = tiny_llama()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        packed = quantize(model, group_size=32)(tokens)
        fake = quantize(model, group_size=32, pack=False)(tokens)
        full = model(tokens)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)
    assert (packed - full).abs().max() > 1e-3  # it did quantize


def test_fake_w3_changes_weights_on_the_3_bit_grid():
    model = tiny_llama()
    q = quantize(model, w_bit=3, group_size=32, pack=False)
    w = q.model.layers[0].self_attn.q_proj.weight  # (N, K)
    assert torch.equal(w, fake_quantize_weight(model.model.layers[0].self_attn.q_proj.weight,
                                               QuantSpec(3, 32)))
    assert all(len(torch.unique(row)) <= 8 for row in w.view(-1, 32))
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)


def test_quantize_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="bits=3.*fake quantization"):
        quantize(model, w_bit=3, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        quantize(model, w_bit=9, group_size=32, pack=False)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(model, method="gptq")
    with pytest.raises(TypeError, match="n_grid"):
        quantize(model, group_size=32, n_grid=20)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: group_size 96 does not "
                                         r"divide in_features 128"):
        quantize(model, group_size=96, modules_to_not_convert=["self_attn", "gate", "up"],
                 inplace=True)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-done


def test_group_size_error_names_one_that_fits_every_layer():
    model = tiny_llama(hidden_size=96, intermediate_size=128)  # K: 96 and 128
    with pytest.raises(ValueError, match=r"q_proj: group_size 128 does not divide in_features 96; "
                                         r"group_size 32 fits every layer"):
        quantize(model)
    model = tiny_llama(hidden_size=80, intermediate_size=128)  # 80 = 16 x 5: only per channel
    with pytest.raises(ValueError, match="group_size -1 fits every layer"):
        quantize(model, group_size=64)
    quantize(model, group_size=-1)


def test_awq_dispatch_search_then_reapply():
    pipeline = pytest.importorskip("awq_ref.awq.pipeline")
    model = tiny_llama()
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    options = {"n_grid": 4, "clip_grid": 4, "progress": False}
    searched = quantize(model, method="awq", group_size=32, calib_tokens=calib, **options)
    result = pipeline.search_awq(model, calib, QuantSpec(4, 32), pipeline.AwqConfig(**options))
    reapplied = quantize(model, method="awq", group_size=32, result=result)
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(searched(tokens), reapplied(tokens))
        assert not torch.equal(searched(tokens), quantize(model, group_size=32)(tokens))
    assert sum(isinstance(m, QuantLinear) for m in searched.modules()) == 2 * LINEARS_PER_BLOCK
    with pytest.raises(TypeError, match="result"):
        quantize(model, method="awq", group_size=32, result=result, n_grid=4)


def test_from_packed_wraps_random_codes_and_checks_shapes():
    gen = torch.Generator().manual_seed(0)
    k, n, g = 64, 24, 16
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), generator=gen, dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // g, n, generator=gen) * 0.01).half()
    bias = torch.randn(n)
    ql = QuantLinear.from_packed(qweight, qzeros, scales, g, bias)
    assert ql.qweight is qweight and (ql.in_features, ql.out_features, ql.group_size) == (k, n, g)
    x = torch.randn(3, k)
    torch.testing.assert_close(ql(x), x @ dequantize_packed(qweight, qzeros, scales, g) + bias)
    with pytest.raises(ValueError, match=r"q_proj.qweight: shape \(64, 3\).*\(64, 2\)"):
        QuantLinear.from_packed(qweight, qzeros, scales[:, :16], g, name="q_proj")
    with pytest.raises(ValueError, match=r"layer.bias: shape \(5,\)"):
        QuantLinear.from_packed(qweight, qzeros, scales, g, torch.zeros(5))


@pytest.mark.parametrize("bias", [False, True])
def test_buffers_are_the_checkpoint_keys_and_follow_the_module(bias):
    """qweight, qzeros, scales (and bias only when the linear has one) are registered buffers:
    the state dict a checkpoint is written from, and what .to() moves; the fp16 scales and int32
    codes keep their dtype when the model's changes."""
    ql = QuantLinear.from_linear(random_linear(64, 16, bias), QuantSpec(4, 32))
    keys = {"qweight", "qzeros", "scales"} | ({"bias"} if bias else set())
    assert set(ql.state_dict()) == keys
    ql.double()
    assert (ql.qweight.dtype, ql.qzeros.dtype, ql.scales.dtype) == (torch.int32, torch.int32,
                                                                      torch.float16)
    assert not bias or ql.bias.dtype == torch.float64
    ql.to("meta")
    assert all(t.is_meta for t in ql.state_dict().values())
    fresh = QuantLinear(64, 16, 32, bias=bias)  # allocated, to be loaded into
    assert {k: (tuple(t.shape), t.dtype) for k, t in fresh.state_dict().items()} == {
        "qweight": ((64, 2), torch.int32), "qzeros": ((2, 2), torch.int32),
        "scales": ((2, 16), torch.float16), **({"bias": ((16,), torch.float32)} if bias else {})}


def test_group_size_minus_one_is_one_group_over_k():
    assert QuantLinear(64, 16, -1).qzeros.shape == (1, 2)
    ql = QuantLinear.from_linear(random_linear(64, 16, False), QuantSpec(4, -1))
    again = QuantLinear.from_packed(ql.qweight, ql.qzeros, ql.scales, -1)
    assert again.group_size == 64 and "bias" not in again.state_dict()
    for g in (0, 24):
        with pytest.raises(ValueError, match=f"group_size {g} does not divide in_features 64"):
            QuantLinear(64, 16, g)
