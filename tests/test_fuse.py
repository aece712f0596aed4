"""Fused q/k/v and gate/up projections (awq_ref.fuse) against the separate layers."""

import pytest
import torch

from awq_ref.api import quantize
from awq_ref.cuda_graph import static_decode_step
from awq_ref.fuse import FusedProjections, fuse_projections, is_fused
from awq_ref.quant.checkpoint import save_quantized
from awq_ref.quant.qlinear import QuantLinear
from tests.test_qlinear import tiny_llama


def _outputs(model, tokens):
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, tokens.shape[1] + 1)
        model(tokens, cache)
        step = static_decode_step(model, cache, tokens[:, -1:], torch.tensor([cache.length]),
                                  model.inv_freq())
    return full, step


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_gives_the_same_logits(packed, bias):
    model = tiny_llama(attention_bias=bias, mlp_bias=bias)
    if packed:
        model = quantize(model, method="rtn", w_bit=4, group_size=32)
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    want = _outputs(model, tokens)
    assert fuse_projections(model) == 2 * len(model.model.layers)
    block = model.model.layers[0]
    assert isinstance(block.self_attn.qkv, FusedProjections) and block.self_attn.q_proj is None
    assert isinstance(block.mlp.gate_up, FusedProjections) and block.mlp.up_proj is None
    if packed:
        assert isinstance(block.self_attn.qkv.linear, QuantLinear)
        assert block.self_attn.qkv.linear.out_features == 64 + 32 + 32  # H*Dh + 2 * Hkv*Dh
    for got, ref in zip(_outputs(model, tokens), want):
        # each output column is the same dot product; only BLAS blocking may differ
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # already fused


def test_mixed_layers_stay_apart_and_fused_models_are_refused(tmp_path):
    model = quantize(tiny_llama(), method="rtn", w_bit=4, group_size=32,
                     modules_to_not_convert=["layers.0.self_attn.k_proj"])
    assert fuse_projections(model) == 2 * 2 - 1  # block 0's q/k/v mix packed and fp layers
    assert model.model.layers[0].self_attn.qkv is None
    assert is_fused(model)
    with pytest.raises(ValueError, match="fused"):
        save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="fused"):
        quantize(model, method="rtn")
    assert not (tmp_path / "ckpt").exists()


def test_cli_ppl_fused_equals_unfused(stories_dir, tmp_path, capsys):
    from awq_ref.cli import main

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park. " * 8)
    base = ["ppl", "--model", str(stories_dir / "stories260K.bin"), "--text", str(text),
            "--seqlen", "64"]
    assert main(base) == 0
    plain = float(capsys.readouterr().out.split()[1])
    assert main(base + ["--fuse-projections"]) == 0
    fused = float(capsys.readouterr().out.split()[1])
    assert fused == pytest.approx(plain, rel=1e-5)


def test_fused_heads_rotate_q_and_k_together_with_the_same_bits():
    from awq_ref.model import apply_rotary

    model = tiny_llama()
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    cos, sin = model.rotary(3, 5, torch.float32)
    with torch.no_grad():
        q, k, v = attn.heads(x, cos, sin)
        y = attn.qkv.linear(x)  # (B, T, Nq + Nk + Nv)
        parts = [p.view(2, 5, -1, attn.head_dim).transpose(1, 2) for p in y.split(attn.qkv.sizes, -1)]
    assert torch.equal(q, apply_rotary(parts[0], cos, sin))
    assert torch.equal(k, apply_rotary(parts[1], cos, sin))
    assert torch.equal(v, parts[2])
    assert q.shape == (2, 4, 5, 16) and k.shape == v.shape == (2, 2, 5, 16)
