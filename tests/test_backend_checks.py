"""The backend's and CUDA-graph decode's checks, on any machine: the static decode step (what
the CUDA graph captures) equals the eager cached decode; the CUDA-graph path, `--backend cupy`
and tools/bench_e2e.py refuse a machine without CUDA, a CPU model, fp32 activations, GPUs
before Ampere, layers the kernels cannot run and a full cache, each with a clear message. The
same paths on a GPU: tests/test_e2e_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awq_ref import cli
from awq_ref.backend import backend_kernel, check_backend, check_kernel_layers
from awq_ref.config import LlamaConfig
from awq_ref.cuda_graph import CudaGraphDecoder, static_decode_step
from awq_ref.generate import generate
from awq_ref.model import Llama
from awq_ref.quant.qlinear import replace_linears
from awq_ref.quant.quantizer import QuantSpec

REPO = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="checks the message on a machine without CUDA")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def _tiny_llama(quantized: bool) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg).eval()
    return replace_linears(model, QuantSpec(4, 32)) if quantized else model


@pytest.mark.parametrize("quantized", [False, True])
def test_static_decode_step_equals_eager_cached_decode(quantized):
    model = _tiny_llama(quantized)
    prompt, steps = torch.tensor([[5, 17, 3, 88, 41]]), [7, 60, 2, 95]
    eager, static = model.new_cache(1, 16), model.new_cache(1, 16)
    with torch.no_grad():
        model(prompt, eager)
        model(prompt, static)
        for token in steps:
            position = torch.tensor([static.length])
            got = static_decode_step(model, static, torch.tensor([[token]]), position,
                                     model._inv_freq)  # (1, V)
            static.length += 1
            want = model(torch.tensor([[token]]), eager)[:, -1]  # (1, V)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n = eager.length
    for layer in range(len(model.model.layers)):
        torch.testing.assert_close(static.k[layer][:, :, :n], eager.k[layer][:, :, :n])
        torch.testing.assert_close(static.v[layer][:, :, :n], eager.v[layer][:, :, :n])


def test_cuda_graph_refuses_a_cpu_model():
    model = _tiny_llama(quantized=False)
    with pytest.raises(ValueError, match="CUDA-graph decode needs a model on a CUDA device"):
        CudaGraphDecoder(model, model.new_cache(1, 8))
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(model, [1, 2, 3], 4, cuda_graph=True)
    full = model.new_cache(1, 3)
    model(torch.zeros(1, 3, dtype=torch.long), full)  # every slot written
    with pytest.raises(ValueError, match="KV cache overflow: position 3 >= max_len 3"):
        CudaGraphDecoder(model, full)  # checked before the warm-up steps write slot 3


def test_backend_names():
    assert backend_kernel("torch", "cpu", torch.float32) is None
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        backend_kernel("triton", "cpu", torch.float16)


@needs_no_cuda
@pytest.mark.parametrize("command", ["generate", "ppl"])
def test_cli_backend_cupy_without_cuda_says_so(command, capsys):
    extra = ["--prompt", "hi"] if command == "generate" else ["--text", "absent.txt"]
    argv = [command, "--model", "absent-model", "--backend", "cupy", "--device", "cuda",
            "--dtype", "float16", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # --device cuda is refused first, before the backend
    assert (err.startswith("error: --device cuda: torch sees no CUDA device")
            and "Traceback" not in err)


@needs_no_cuda
def test_cli_exits_cleanly_without_traceback():
    done = _run([sys.executable, "-m", "awq_ref", "generate", "--model", "default",
                 "--prompt", "hi", "--backend", "cupy"])
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_cli_fuse_elementwise_needs_the_cupy_backend(capsys):
    argv = ["generate", "--model", "absent-model", "--prompt", "hi", "--fuse-elementwise"]
    assert cli.main(argv) == 2
    assert "--fuse-elementwise runs awq_kernels' CUDA kernels" in capsys.readouterr().err


def test_cupy_backend_refuses_gpus_before_ampere(monkeypatch):
    """The kernels' PTX (cp.async, L2 hints, f16x2 conversions) needs sm_80: an older GPU is
    refused by name before loading, not by a ptxas log at the first forward."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"compute capability 8\.0 or later .*Tesla T4 has 7\.5"):
        backend_kernel("cupy", "cuda", torch.float16)


def test_cupy_backend_names_a_layer_its_kernels_cannot_run():
    """The format allows any group size dividing K and N % 8 == 0; the kernels G in 32/64/128
    and N % 64 == 0: said for the layer, when the backend is chosen (CPU tensors suffice)."""
    def packed(group_size: int, kv_heads: int) -> Llama:
        cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=kv_heads)
        return replace_linears(Llama(cfg), QuantSpec(4, group_size))

    check_kernel_layers("cupy", packed(32, 2))  # G 32, N 64..256: runs
    check_kernel_layers("torch", packed(16, 1))  # the reference runs anything packed
    with pytest.raises(ValueError, match=r"cannot run model\.layers\.0\.self_attn\.q_proj: "
                                         "group_size must be one of"):
        check_kernel_layers("cupy", packed(16, 2))
    with pytest.raises(ValueError, match=r"cannot run model\.layers\.0\.self_attn\.k_proj: "
                                         "N = 32"):
        check_kernel_layers("cupy", packed(32, 1))


def test_cli_cuda_graph_needs_cuda_device(capsys):
    argv = ["generate", "--model", "absent-model", "--prompt", "hi", "--cuda-graph"]
    assert cli.main(argv) == 2
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


@needs_no_cuda
def test_bench_e2e_exits_2_without_cuda():
    done = _run([sys.executable, "tools/bench_e2e.py", "--quick"])
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_backend_cupy_refuses_a_cpu_model_and_fp32_activations(monkeypatch):
    """Past torch's CUDA check (faked here), --backend cupy still needs the model on the GPU and
    fp16/bf16 activations: the int4 kernels take no fp32 inputs and no CPU tensors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        check_backend("cupy", "cpu", torch.float16)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 activations"):
        check_backend("cupy", "cuda", torch.float32)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 activations"):
        check_backend("cupy", "cuda:0", torch.float32)


def test_cuda_graph_step_refuses_a_full_cache():
    """The step checks the cache's room before touching the GPU: a replay at position max_len
    would write past the cache (the check runs here on an instance built without a graph)."""
    model = _tiny_llama(quantized=False)
    cache = model.new_cache(1, 4)
    cache.length = 4
    decoder = CudaGraphDecoder.__new__(CudaGraphDecoder)  # no capture: a CPU machine has no graph
    decoder.model, decoder.cache = model, cache
    with pytest.raises(ValueError, match="KV cache overflow: position 4 >= max_len 4"):
        decoder.step(1)
