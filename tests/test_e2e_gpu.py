"""The quantized model end to end on the two backends, and CUDA-graph decode, on a CUDA device
with CuPy: the RTN W4 g64 packed model in fp16 gives the same logits on awq_kernels (cupy) as on
the dequantize + matmul reference (torch), the same greedy tokens, and CUDA-graph decode gives
the same tokens as eager decode. Their refusals on any machine: tests/test_backend_checks.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from awq_ref.backend import (
    backend_elementwise_ops,
    backend_int8_kernel,
    backend_kernel,
)
from awq_ref.config import LlamaConfig
from awq_ref.cuda_graph import CudaGraphDecoder
from awq_ref.fuse import fuse_projections, use_elementwise_kernels
from awq_ref.generate import generate
from awq_ref.model import Llama
from awq_ref.quant.embedding import quantize_embeddings
from awq_ref.quant.int8_head import apply_int8_kernel, quantize_head_int8
from awq_ref.quant.qlinear import apply_kernel, replace_linears
from awq_ref.quant.quantizer import QuantSpec

HAS_CUDA = torch.cuda.is_available()
HAS_GPU_STACK = HAS_CUDA and importlib.util.find_spec("cupy") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU_STACK, reason="needs a CUDA device and CuPy "
                               "(torch.cuda.is_available() and import cupy)")

REL_TOL_FP16 = 2e-3  # ||cupy - torch|| / ||torch|| on logits
PROMPTS = ("The capital of France is", "Once upon a time, there was a little",
           "def fibonacci(n):")
GREEDY_TOKENS = 32
# The default model's logits: the fp16 model itself is 0.6-3% (relative) from the same weights in
# fp32, and cupy and the torch reference round differently (2.2e-3 and 2.7e-3 apart on two of
# the three prompts, H100, 2026-12-05). So both are measured against fp32: cupy must be about
# as close to it as the fp16 reference is (measured: 1.01-1.11x its distance).
FP32_DISTANCE_RATIO = 1.25
# bf16 (not yet run on a GPU): the torch reference's bf16 logits of the random model are
# 1.4-1.5e-2 (relative) from fp32 on this CPU; the kernels' bf16 scale is rounded twice (see
# awq_kernels/NOTES.md (e)), so cupy gets a looser margin than fp16's; a wrong dequantization
# is many times further.
BF16_DISTANCE_RATIO = 1.5
# Greedy tokens with the elementwise kernels may part from the reference only where the
# reference's own top two logits are this close (fp16 logits of 10-30 have steps of 0.008-0.016).
NEAR_TIE = 0.1


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class _Backend:
    """Context: every QuantLinear of `model` on the named backend, the reference afterwards."""

    def __init__(self, model: Llama, name: str):
        dtype = model.model.norm.weight.dtype  # the activations' (a 4-bit table has no .weight)
        self.model, self.kernel = model, backend_kernel(name, model.device, dtype)

    def __enter__(self) -> Llama:
        assert apply_kernel(self.model, self.kernel) > 0
        return self.model

    def __exit__(self, *exc) -> None:
        apply_kernel(self.model, None)


def _quantized_default(gguf: Path, dtype: torch.dtype) -> Llama:
    from awq_ref.api import quantize
    from awq_ref.loaders import load_model

    model = load_model(gguf, device="cuda", dtype=dtype)
    return quantize(model, method="rtn", w_bit=4, group_size=64, inplace=True)


@pytest.fixture(scope="module")
def quantized_default(default_gguf):
    """SmolLM2-135M-Instruct, RTN W4 g64 packed, fp16 on the GPU, and its tokenizer."""
    if not HAS_GPU_STACK:
        pytest.skip("needs a CUDA device and CuPy")
    from awq_ref.loaders import load_tokenizer

    return _quantized_default(default_gguf, torch.float16), load_tokenizer(default_gguf)


@pytest.fixture(scope="module")
def quantized_default_fp32(default_gguf):
    """RTN W4 g64 in fp32 (the torch reference) that both fp16 backends approximate."""
    if not HAS_GPU_STACK:
        pytest.skip("needs a CUDA device and CuPy")
    return _quantized_default(default_gguf, torch.float32)


def _random_smollm2(quantized: bool, dtype: torch.dtype = torch.float16) -> Llama:
    """A SmolLM2-shaped model with random weights (RTN W4 g64 packed if `quantized`), in `dtype`
    on the GPU: runs where the default model's file is absent (no network). The same seed, so
    the same packed weights in every dtype."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      rope_theta=100000.0, tie_word_embeddings=True)
    model = Llama(cfg).eval()
    if quantized:
        replace_linears(model, QuantSpec(4, 64))
    return model.to("cuda", dtype)


@pytest.fixture(scope="module")
def quantized_random():
    if not HAS_GPU_STACK:
        pytest.skip("needs a CUDA device and CuPy")
    return _random_smollm2(quantized=True)


def _direct_kernel(x, qweight, qzeros, scales, group_size):
    import awq_kernels

    return awq_kernels.gemm(x, qweight, qzeros, scales, group_size, kernel="auto_direct")


def _logits(model: Llama, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits (T, V), logits of one cached decode step (V,)) for ids (1, T)."""
    with torch.no_grad():
        cache = model.new_cache(1, ids.shape[1] + 1)
        prefill = model(ids, cache)[0]
        decode = model(ids[:, -1:], cache)[0, -1]
    return prefill, decode


def _forced_logits(model: Llama, ids: list[int], tokens: list[int], graph: bool) -> torch.Tensor:
    """(n, V) fp32 logits predicting tokens[i] after ids + tokens[:i] (teacher forcing):
    cached decode steps, eager or replayed from a CUDA graph."""
    with torch.no_grad():
        cache = model.new_cache(1, len(ids) + len(tokens) + 1)
        rows = [model(torch.tensor([ids], device="cuda"), cache)[0, -1].float()]
        decoder = CudaGraphDecoder(model, cache) if graph else None
        for token in tokens[:-1]:
            if decoder is not None:
                rows.append(decoder.step(token).float())  # a copy: the buffer is reused
            else:
                rows.append(model(torch.tensor([[token]], device="cuda"), cache)[0, -1].float())
    return torch.stack(rows)


def _backend_logits(model: Llama, ids: torch.Tensor) -> tuple[tuple, tuple]:
    """_logits on the torch reference, then on cupy: (want, got)."""
    with _Backend(model, "torch"):
        want = _logits(model, ids)
    with _Backend(model, "cupy"):
        got = _logits(model, ids)
    return want, got


def _check_backends_agree(model: Llama, ids: torch.Tensor) -> None:
    want, got = _backend_logits(model, ids)
    for what, a, b in zip(("prefill", "decode"), got, want):
        err = _rel_err(a, b)
        assert err <= REL_TOL_FP16, f"{what} logits: relative error {err:.2e} cupy vs torch"


@needs_gpu
def test_random_model_cupy_logits_match_torch(quantized_random):
    ids = torch.randint(0, 49152, (1, 100), generator=torch.Generator().manual_seed(1))
    _check_backends_agree(quantized_random, ids.cuda())


@needs_gpu
def test_random_model_in_bfloat16_cupy_as_close_to_fp32_as_torch():
    """A bf16 model end to end (the kernels' bf16 path is tested GEMM by GEMM in
    test_kernels_gpu.py; here every layer, prefill and a cached decode step): the cupy logits
    are about as far from the same packed model in fp32 as the torch reference's bf16 logits
    (bf16 rounds too coarsely for a fixed cupy-vs-torch bound over 30 random layers)."""
    ids = torch.randint(0, 49152, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()
    exact = _logits(_random_smollm2(quantized=True, dtype=torch.float32), ids)
    want, got = _backend_logits(_random_smollm2(quantized=True, dtype=torch.bfloat16), ids)
    for what, ref, a, b in zip(("prefill", "decode"), exact, got, want):
        assert torch.isfinite(a).all(), what
        ours, theirs = _rel_err(a, ref), _rel_err(b, ref)
        assert ours <= BF16_DISTANCE_RATIO * theirs, (
            f"{what}: cupy bf16 {ours:.2e} from fp32, the torch reference {theirs:.2e}")


@needs_gpu
def test_random_model_with_4bit_embeddings_cupy_matches_torch_and_graph():
    """Token table and lm_head in 4 bits too (awq_ref.quant.embedding): the lm_head runs on the
    kernels like any QuantLinear, the table lookup is captured in the decode graph."""
    model = quantize_embeddings(_random_smollm2(quantized=True))
    ids = torch.randint(0, 49152, (1, 60), generator=torch.Generator().manual_seed(3)).cuda()
    _check_backends_agree(model, ids)
    apply_kernel(model, backend_kernel("cupy", "cuda", torch.float16))
    with torch.no_grad():
        eager, graphed = model.new_cache(1, 70), model.new_cache(1, 70)
        model(ids, eager)
        model(ids, graphed)
        decoder = CudaGraphDecoder(model, graphed)
        for token in (5, 49151, 800, 8):
            want = model(torch.tensor([[token]], device="cuda"), eager)[0, -1]
            assert _rel_err(decoder.step(token).clone(), want) <= 1e-3


def _check_agree_then_graph(model: Llama, ids: torch.Tensor, want: tuple, got: tuple,
                            graph_tol: float = 1e-3) -> None:
    """`got` (prefill, decode) logits within the backends' tolerance of `want`; then CUDA-graph
    decode steps of `model` as it is now against its eager steps, within graph_tol."""
    for what, a, b in zip(("prefill", "decode"), got, want):
        err = _rel_err(a, b)
        assert err <= REL_TOL_FP16, f"{what} logits: relative error {err:.2e}"
    with torch.no_grad():
        eager, graphed = (model.new_cache(1, ids.shape[1] + 10) for _ in range(2))
        model(ids, eager)
        model(ids, graphed)
        decoder = CudaGraphDecoder(model, graphed)
        for token in (5, 49151, 800):
            want_step = model(torch.tensor([[token]], device="cuda"), eager)[0, -1]
            assert _rel_err(decoder.step(token).clone(), want_step) <= graph_tol


@needs_gpu
def test_random_model_with_an_8bit_head_cupy_matches_torch_and_graph():
    """The 4-bit token table with the 8-bit lm_head: gemv_int8.cu (decode) and its dequantize +
    matmul path (prefill) against Int8Linear's reference, and under a CUDA graph."""
    model = quantize_head_int8(_random_smollm2(quantized=True))
    quantize_embeddings(model, parts=("embed",))
    ids = torch.randint(0, 49152, (1, 60), generator=torch.Generator().manual_seed(5)).cuda()
    with _Backend(model, "torch"):
        want = _logits(model, ids)
    apply_int8_kernel(model, backend_int8_kernel("cupy", "cuda", torch.float16))
    with _Backend(model, "cupy"):
        got = _logits(model, ids)
        _check_agree_then_graph(model, ids, want, got)


@needs_gpu
@pytest.mark.parametrize("fused_projections", [False, True])
def test_random_model_elementwise_kernels_match_torch_ops(fused_projections):
    """awq_kernels.ops for RMSNorm, SwiGLU and the rotary embedding (--fuse-elementwise): the
    same logits as the model's torch code within the backends' tolerance, eager and graphed."""
    model = _random_smollm2(quantized=True)
    if fused_projections:
        fuse_projections(model)
    ids = torch.randint(0, 49152, (1, 80), generator=torch.Generator().manual_seed(4)).cuda()
    with _Backend(model, "cupy"):
        want = _logits(model, ids)
        use_elementwise_kernels(model, backend_elementwise_ops("cupy", "cuda", torch.float16))
        got = _logits(model, ids)
        # The graph's step attends with ops.decode_attention (flash-decoding: fp32 online
        # softmax over splits), the eager step with SDPA: two algorithms, so the backends'
        # tolerance (measured 1.5e-3 on an H100, 2026-12-05), not the 1e-3 of equal kernels.
        _check_agree_then_graph(model, ids, want, got, graph_tol=REL_TOL_FP16)


@needs_gpu
@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_cupy_logits_match_torch(quantized_default, quantized_default_fp32, prompt):
    """cupy's prefill and decode logits about as close to fp32 as the fp16 torch reference's."""
    model, tok = quantized_default
    ids = torch.tensor([tok.encode(prompt)], device="cuda")
    exact = _logits(quantized_default_fp32, ids)
    want, got = _backend_logits(model, ids)
    for what, a, b, ref in zip(("prefill", "decode"), got, want, exact):
        ours, theirs = _rel_err(a.float(), ref), _rel_err(b.float(), ref)
        assert ours <= FP32_DISTANCE_RATIO * theirs, (
            f"{what}: cupy {ours:.2e} from fp32, the torch reference {theirs:.2e}")


@needs_gpu
@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_greedy_tokens_match(quantized_default, prompt):
    model, tok = quantized_default
    ids = tok.encode(prompt)
    with _Backend(model, "torch"):
        want = generate(model, ids, GREEDY_TOKENS)
    with _Backend(model, "cupy"):
        got = generate(model, ids, GREEDY_TOKENS)
        graphed = generate(model, ids, GREEDY_TOKENS, cuda_graph=True)
    if got != want:  # the acceptance: equal; a failure says how near a tie it was
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with _Backend(model, "torch"):
            row = _forced_logits(model, ids, want, graph=False)[i]
        pytest.fail(f"cupy backend: greedy token {i} is {got[i]}, the torch reference's "
                    f"{want[i]}; the reference's own logits of the two are "
                    f"{float(row[want[i]] - row[got[i]]):.4f} apart (fp16 steps: 0.008-0.016)")
    assert graphed == got, "CUDA-graph decode: greedy tokens differ from eager decode"


@needs_gpu
def test_default_model_elementwise_kernels_greedy_tokens(quantized_default):
    """--fuse-elementwise on the real model under a CUDA graph: the torch reference's greedy
    tokens, except at near ties of the reference."""
    model, tok = quantized_default
    ids = tok.encode(PROMPTS[0])
    with _Backend(model, "torch"):
        want = generate(model, ids, GREEDY_TOKENS)
        want_logits = _forced_logits(model, ids, want, graph=False)
    with _Backend(model, "cupy"):
        use_elementwise_kernels(model, backend_elementwise_ops("cupy", "cuda", torch.float16))
        try:
            got_logits = _forced_logits(model, ids, want, graph=True)
        finally:
            use_elementwise_kernels(model, None)
    # Fed the reference's tokens (so one near tie does not derail the rest), each step's choice
    # is the reference's or a near tie there (measured: free-running, the tokens part at 25).
    for i, (row, token) in enumerate(zip(want_logits, want)):
        choice = int(got_logits[i].argmax())
        gap = float(row[token] - row[choice])
        if choice != token:
            print(f"token {i}: {choice} instead of {token}, reference gap {gap:.4f}")
        assert choice == token or gap <= NEAR_TIE, f"token {i}: {choice} != {token}, gap {gap:.3f}"


# Last in the file: a capture that fails might disturb the CUDA tests after it.
@needs_gpu
@pytest.mark.parametrize("variant", [
    # "torch": the reference unpack once indexed with a host list, which capture refused (H200,
    # 2026-12-04); as a view it captures (passed 5 runs on an H100, 2026-12-05).
    "fp16", "cupy", "cupy-direct", "torch",
])
def test_random_model_cuda_graph_steps_match_eager(quantized_random, variant):
    model = _random_smollm2(quantized=False) if variant == "fp16" else quantized_random
    tokens = [11, 4000, 123, 49151, 7, 7, 300, 2]
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(2)).cuda()
    if variant == "cupy-direct":  # gemv_direct.cu with its split-K fused (counters per stream)
        apply_kernel(model, _direct_kernel)
    elif variant != "fp16":
        apply_kernel(model, backend_kernel(variant, "cuda", torch.float16))
    try:
        with torch.no_grad():
            eager, graphed = model.new_cache(1, 32), model.new_cache(1, 32)
            model(ids, eager)
            model(ids, graphed)
            decoder = CudaGraphDecoder(model, graphed)
            for token in tokens:
                want = model(torch.tensor([[token]], device="cuda"), eager)[0, -1]
                got = decoder.step(token).clone()
                assert _rel_err(got, want) <= 1e-3
    finally:
        apply_kernel(model, None)
    assert graphed.length == eager.length
