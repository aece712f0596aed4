"""Independent oracle: AutoAWQ 0.2.9's own unpack/dequantize and its GEMM packing loop.

`awq/utils/packing_utils.py` (pure torch) is taken from the PyPI sdist, never installed: the
package `awq` itself pulls in transformers. packing_utils has no GEMM pack function, so the
packing side is a line-for-line reimplementation of `WQLinear_GEMM.from_linear`'s loop.
"""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awq_ref.api import quantize
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized
from awq_ref.quant.packing import dequantize_packed, pack_weight, quantize_with_fp16_scales
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight

ROOT = Path(__file__).resolve().parents[1]
SDIST = "autoawq-0.2.9.tar.gz"
MEMBER = "autoawq-0.2.9/awq/utils/packing_utils.py"


@pytest.fixture(scope="module")
def awq_utils():
    cache = ROOT / ".cache" / "autoawq"
    target = cache / "packing_utils.py"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "autoawq==0.2.9", "-d", str(cache)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                                  check=False)
        except subprocess.TimeoutExpired:
            pytest.skip("PyPI unreachable: pip download autoawq==0.2.9 timed out")
        if done.returncode != 0 or not (cache / SDIST).exists():
            pytest.skip(f"PyPI unreachable: pip download autoawq==0.2.9 failed: "
                        f"{done.stderr[-300:]}")
        with tarfile.open(cache / SDIST) as tar:
            target.write_bytes(tar.extractfile(MEMBER).read())
    spec = importlib.util.spec_from_file_location("autoawq_packing_utils", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def autoawq_gemm_pack(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """WQLinear_GEMM.from_linear (AutoAWQ 0.2.9), packing part: weight (N, K) already
    fake-quantized, scales/zeros [K/G, N] -> qweight [K, N/8], qzeros [K/G, N/8]."""
    scale_zeros = zeros * scales
    scales = scales.clone().half()
    intweight = []
    for idx in range(weight.shape[1]):
        intweight.append(torch.round((weight[:, idx] + scale_zeros[idx // group_size])
                                     / scales[idx // group_size]).to(torch.int)[:, None])
    intweight = torch.cat(intweight, dim=1).t().contiguous().to(torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    zeros = zeros.to(torch.int32)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + order_map[i]] << (i * 4)
    return qweight, qzeros


@pytest.mark.parametrize("g", [16, 64])
@pytest.mark.parametrize("zero_point", [True, False])
def test_their_dequantize_of_our_packing(awq_utils, g, zero_point):
    w = torch.randn(48, 128) * 0.02  # (N, K)
    qweight, qzeros, scales = pack_weight(w, QuantSpec(4, g, zero_point))
    theirs = awq_utils.dequantize_gemm(qweight, qzeros, scales, 4, g)  # (K, N) fp16
    assert theirs.dtype == torch.float16
    assert torch.equal(theirs, dequantize_packed(qweight, qzeros, scales, g, torch.float16))
    assert torch.equal(theirs.float(),
                       fake_quantize_weight(w, QuantSpec(4, g, zero_point)).T.half().float())
    iweight, izeros = awq_utils.reverse_awq_order(*awq_utils.unpack_awq(qweight, qzeros, 4), 4)
    q, z, _ = quantize_with_fp16_scales(w, QuantSpec(4, g, zero_point))
    assert torch.equal(torch.bitwise_and(iweight, 15).int(), q.T)
    assert torch.equal(torch.bitwise_and(izeros, 15).int(), z.T)


def test_their_packing_equals_ours():
    spec = QuantSpec(4, 32)
    w = torch.randn(40, 96)  # (N, K)
    _, z, s16 = quantize_with_fp16_scales(w, spec)
    w_hat = fake_quantize_weight(w, spec)
    qweight, qzeros = autoawq_gemm_pack(w_hat, s16.T.float(), z.T.float(), 32)
    ours = pack_weight(w, spec)
    assert torch.equal(qweight, ours[0]) and torch.equal(qzeros, ours[1])


def test_checkpoint_packed_by_their_loop_runs_in_our_model(tmp_path):
    """A folder written without our writer, tensors packed by AutoAWQ's loop, config by hand."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Llama(cfg).half().float().eval()  # fp16-exact weights: AutoAWQ stores fp16
    spec = QuantSpec(4, 32)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            _, z, s16 = quantize_with_fp16_scales(t, spec)
            qweight, qzeros = autoawq_gemm_pack(fake_quantize_weight(t, spec), s16.T.float(),
                                                z.T.float(), 32)
            tensors.update({f"{module}.qweight": qweight, f"{module}.qzeros": qzeros,
                            f"{module}.scales": s16.T.contiguous()})
        else:
            tensors[name] = t.half()
    folder = tmp_path / "theirs"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {**cfg.to_hf_dict(), "torch_dtype": "float16", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "GEMM",
        "modules_to_not_convert": None}}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_quantized_model(folder)

    ours = quantize(model, group_size=32)
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), ours(tokens))
    ours_dir = save_quantized(ours, tmp_path / "ours")
    mine = load_file(ours_dir / "model.safetensors")
    for key, t in tensors.items():
        if key.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(mine[key], t), key
