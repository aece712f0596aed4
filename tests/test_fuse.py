"""Fused q/k/v and gate/up projections (awq_ref.fuse) against the separate layers."""

import pytest
import torch

from awq_ref.api import quantize
from awq_ref.cuda_graph import static_decode_step
from awq_ref.fuse import FusedProjections, fuse_projections, is_fused, use_elementwise_kernels
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
    # inference only: the stacked fp weights join no autograd graph (nor did packed ones)
    assert not any(p.requires_grad for p in block.self_attn.qkv.parameters())
    assert not any(p.requires_grad for p in block.mlp.gate_up.parameters())
    for got, ref in zip(_outputs(model, tokens), want):
        # each output column is the same dot product; only BLAS blocking may differ
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # already fused


class _TorchOps:
    """The model's own expressions behind the ElementwiseOps interface, counting calls: what a
    kernel backend (awq_kernels.ops) must compute, and where the model calls it."""

    HEAD_DIMS = (16, 64, 128)  # tiny_llama's, and what the GPU tests' models have
    MAX_GROUP = 8

    def __init__(self):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0, "silu_mul": 0, "rotary": 0,
                      "rotary_into_cache": 0, "decode_attention": 0}

    def rms_norm(self, x, weight, eps):
        self.calls["rms_norm"] += 1
        return weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)

    def add_rms_norm(self, x, delta, weight, eps):
        self.calls["add_rms_norm"] += 1
        s = x + delta
        return s, weight * torch.nn.functional.rms_norm(s, (s.shape[-1],), eps=eps)

    def rotary_into_cache(self, q, k, v, cos, sin, keys, values, position):
        from awq_ref.model import rotate_heads

        self.calls["rotary_into_cache"] += 1
        slots = position + torch.arange(k.shape[1])  # T positions from `position`
        keys.index_copy_(2, slots, rotate_heads(k, cos, sin).transpose(1, 2))
        values.index_copy_(2, slots, v.transpose(1, 2))
        return rotate_heads(q, cos, sin)

    def silu_mul(self, gate, up):
        self.calls["silu_mul"] += 1
        return torch.nn.functional.silu(gate) * up

    def decode_attention(self, q, keys, values, position):
        self.calls["decode_attention"] += 1
        visible = (torch.arange(keys.shape[2]) <= position)[None, :]
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=visible,
            enable_gqa=q.shape[2] != keys.shape[1]).transpose(1, 2)

    def rotary(self, x, cos, sin):
        from awq_ref.model import rotate_heads

        assert x.dim() == 4 and cos.shape == (x.shape[1], x.shape[3])  # (B, T, H, Dh), (T, Dh)
        self.calls["rotary"] += 1
        return rotate_heads(x, cos, sin)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_elementwise_ops_are_used_everywhere_with_the_same_bits(fused, model_type):
    """Every RMSNorm (+ residual add), SwiGLU and rotary (+ cache write) of the full forward,
    the cached prefill and the CUDA graph's static step goes through the installed ops; with the
    model's own expressions installed, the logits keep their bits. Qwen3's per-head q/k norms
    stay on torch (strided views); with them q and k are rotated apart even when fused."""
    model = tiny_llama(model_type=model_type)
    qk_norm = model.config.qk_norm
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_()
    if fused:
        fuse_projections(model)
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    want = _outputs(model, tokens)
    ops = _TorchOps()
    layers = len(model.model.layers)
    assert use_elementwise_kernels(model, ops) == 2 * layers + 1 + layers + layers
    got = _outputs(model, tokens)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # 3 passes (full, cached prefill, static step): per block one norm and one add + norm, and
    # the final norm; one SwiGLU per block; the static step's rotary writes the cache, the
    # others rotate q and k together when fused, apart when not
    assert ops.calls == {"rms_norm": 3 * (layers + 1), "add_rms_norm": 3 * layers,
                         "silu_mul": 3 * layers,
                         "rotary": 2 * layers * (1 if fused and not qk_norm else 2),
                         "rotary_into_cache": layers, "decode_attention": layers}
    assert use_elementwise_kernels(model, None) == 4 * layers + 1
    assert all(m.kernel is None for m in model.modules() if hasattr(m, "kernel")
               and not isinstance(m, QuantLinear))
    before = dict(ops.calls)
    for a, b in zip(_outputs(model, tokens), want):
        assert torch.equal(a, b)
    assert ops.calls == before, "uninstalled ops were still called"


def test_elementwise_ops_refuse_a_head_dim_they_lack():
    ops = _TorchOps()
    ops.HEAD_DIMS = (64, 128)
    with pytest.raises(ValueError, match=r"head dims \(64, 128\); the model's is 16"):
        use_elementwise_kernels(tiny_llama(), ops)
    ops = _TorchOps()
    ops.MAX_GROUP = 1  # tiny_llama has 2 query heads per KV head
    with pytest.raises(ValueError, match="at most 1 query heads per KV head; the model has 2"):
        use_elementwise_kernels(tiny_llama(), ops)


def test_mixed_layers_stay_apart_and_fused_models_are_refused(tmp_path):
    fp = tiny_llama()
    model = quantize(fp, method="rtn", w_bit=4, group_size=32)
    # As in a checkpoint another writer made: block 0's k_proj left fp (ours refuse to write it)
    model.model.layers[0].self_attn.k_proj = fp.model.layers[0].self_attn.k_proj
    assert fuse_projections(model) == 2 * 2 - 1  # block 0's q/k/v mix packed and fp layers
    assert model.model.layers[0].self_attn.qkv is None
    assert is_fused(model)
    with pytest.raises(ValueError, match="fused"):
        save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="fused"):
        quantize(model, method="rtn")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("packed", [False, True])
def test_layers_with_and_without_bias_stay_apart(packed):
    """One bias among q/k/v (a hand-edited model): stacking would drop or misplace it."""
    model = tiny_llama(attention_bias=True)
    if packed:
        model = quantize(model, method="rtn", w_bit=4, group_size=32)
    model.model.layers[1].self_attn.k_proj.bias = None
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    want = _outputs(model, tokens)
    assert fuse_projections(model) == 2 * 2 - 1
    assert model.model.layers[1].self_attn.qkv is None
    for got, ref in zip(_outputs(model, tokens), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cli_ppl_fused_equals_unfused(stories_dir, tmp_path, capsys, monkeypatch):
    from awq_ref import fuse
    from awq_ref.cli import main

    fused_blocks = []  # what --fuse-projections fused: the flag must not be a no-op
    real = fuse.fuse_projections
    monkeypatch.setattr(fuse, "fuse_projections", lambda m: fused_blocks.append(real(m)) or
                        fused_blocks[-1])

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park. " * 8)
    base = ["ppl", "--model", str(stories_dir / "stories260K.bin"), "--text", str(text),
            "--seqlen", "64"]
    assert main(base) == 0
    plain = float(capsys.readouterr().out.split()[1])
    assert main(base + ["--fuse-projections"]) == 0
    fused = float(capsys.readouterr().out.split()[1])
    assert fused == pytest.approx(plain, rel=1e-5)
    assert fused_blocks == [2 * 5]  # q/k/v and gate/up in each of stories260K's 5 blocks


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
        parts = [p.view(2, 5, -1, attn.head_dim).transpose(1, 2)
                 for p in y.split(attn.qkv.sizes, -1)]
    assert torch.equal(q, apply_rotary(parts[0], cos, sin))
    assert torch.equal(k, apply_rotary(parts[1], cos, sin))
    assert torch.equal(v, parts[2])
    assert q.shape == (2, 4, 5, 16) and k.shape == v.shape == (2, 2, 5, 16)
