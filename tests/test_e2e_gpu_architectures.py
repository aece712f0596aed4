"""The architectures beyond Llama on the GPU (needs a CUDA device and CuPy; skipped otherwise):
Qwen2's q/k/v biases and Qwen3's per-head q/k norms on the cupy backend, fused and not, eager
and from a CUDA graph, with awq_kernels' element-wise kernels too. Helpers: test_e2e_gpu.py."""

from __future__ import annotations

import pytest
import torch

from awq_ref.backend import backend_elementwise_ops
from awq_ref.config import LlamaConfig
from awq_ref.fuse import fuse_projections, use_elementwise_kernels
from awq_ref.model import Llama
from awq_ref.quant.qlinear import replace_linears
from awq_ref.quant.quantizer import QuantSpec
from tests.test_e2e_gpu import (
    REL_TOL_FP16,
    _Backend,
    _check_agree_then_graph,
    _logits,
    needs_gpu,
)

# Qwen2.5-0.5B and Qwen3-0.6B shapes, 4 layers: biases on q/k/v (Qwen2), per-head q/k norms
# and H * Dh = 2048 > hidden 1024 (Qwen3); the vocabulary kept at 49152 for the shared helpers.
QWEN_SHAPES = {
    "qwen2": {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "head_dim": 64},
    "qwen3": {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128},
}


def _random_qwen(arch: str) -> Llama:
    """A packed (RTN W4 g64, random) Qwen-shaped model, fp16 on the GPU, with random biases
    and q/k norm weights so that they count."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=4, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, model_type=arch, **QWEN_SHAPES[arch])
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 2)
    replace_linears(model, QuantSpec(4, 64))
    return model.to("cuda", torch.float16)


@needs_gpu
@pytest.mark.parametrize("fused_projections", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_random_qwen_model_cupy_and_elementwise_kernels_match_torch(arch, fused_projections):
    """The Qwen architectures on the kernels: cupy against the torch reference (biases added
    after the packed product; q/k norms before the fused rotary + cache write), eager and
    graphed; then with the element-wise kernels, which leave the per-head norms to torch."""
    model = _random_qwen(arch)
    if fused_projections:
        fuse_projections(model)
    ids = torch.randint(0, 49152, (1, 80), generator=torch.Generator().manual_seed(6)).cuda()
    with _Backend(model, "torch"):
        want = _logits(model, ids)
    with _Backend(model, "cupy"):
        got = _logits(model, ids)
        _check_agree_then_graph(model, ids, want, got)
        use_elementwise_kernels(model, backend_elementwise_ops("cupy", "cuda", torch.float16))
        got = _logits(model, ids)
        _check_agree_then_graph(model, ids, want, got, graph_tol=REL_TOL_FP16)
