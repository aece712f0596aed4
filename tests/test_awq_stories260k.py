"""AWQ on a real trained model: stories260K (GQA, per-channel groups since down_proj K = 172).

Calibrate on the first half of the TinyStories text, evaluate on the second half (PROTOCOL.md)."""

import copy

import pytest
import torch

from awq_ref.api import quantize
from awq_ref.awq.apply import apply_awq
from awq_ref.awq.calibration import calibration_tokens
from awq_ref.awq.pipeline import AwqConfig, search_awq
from awq_ref.eval import evaluate, read_text
from awq_ref.quant.quantizer import QuantSpec


@pytest.fixture(scope="module")
def setup(shared_data):
    from awq_ref.loaders import load_model, load_tokenizer

    path = shared_data / "stories260K" / "stories260K.bin"
    model, tok = load_model(path), load_tokenizer(path)
    text = read_text(shared_data / "text" / "tinystories" / "tinystories_val_prefix.txt")
    half = len(text) // 2
    calib = calibration_tokens(tok, [text[:half]], n=64, seqlen=256, seed=0)
    evals = torch.tensor(tok.encode(text[half:]), dtype=torch.int64)
    return model, calib, evals


@torch.no_grad()
def test_scales_leave_blocks_unchanged(setup):
    model, calib, _ = setup
    result = search_awq(model, calib[:16], QuantSpec(4, -1, True), AwqConfig(progress=False))
    scaled = copy.deepcopy(model)
    apply_awq(scaled, result, clip=False)
    x = model.model.embed_tokens(calib[16:20])
    cos, sin = model.rotary(0, calib.shape[1], x.dtype)
    for i, (a, b) in enumerate(zip(model.model.layers, scaled.model.layers)):
        y = a(x, cos, sin)
        assert float((b(x, cos, sin) - y).norm() / y.norm()) <= 1e-5, f"block {i}"
        x = y


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn(setup, bits):
    """KL to the fp model (sharper than perplexity, which at W4 per-channel moves by < 1%)."""
    model, calib, evals = setup
    kw = {"w_bit": bits, "group_size": -1, "pack": False}
    rtn = evaluate(quantize(model, "rtn", **kw), evals, 512, 16, model, progress=False)
    awq_model = quantize(model, "awq", calib_tokens=calib, progress=False, **kw)
    awq = evaluate(awq_model, evals, 512, 16, model, progress=False)
    assert awq["kl"] < rtn["kl"] and awq["top1"] > rtn["top1"], (awq, rtn)
    if bits == 3:
        assert awq["ppl"] < rtn["ppl"], (awq, rtn)
