"""The 8-bit lm_head (awq_ref.quant.int8_head) against the float head it rounds."""

import pytest
import torch

from awq_ref.cli import main
from awq_ref.quant.checkpoint import save_quantized
from awq_ref.quant.embedding import QuantEmbedding, quantize_embeddings
from awq_ref.quant.int8_head import Int8Linear, apply_int8_kernel, quantize_head_int8
from tests.test_qlinear import tiny_llama


def test_rounding_per_row():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row stays zero (scale 1, not 0 / 0)
    head = Int8Linear.from_weight(w)
    assert head.qweight.dtype == torch.int8 and head.scales.shape == (6,)
    assert (head.qweight.abs().amax(dim=1)[[0, 1, 2, 4, 5]] == 127).all()  # the row max maps to 127
    assert not head.qweight[3].any() and head.scales[3] == 1
    back = head.qweight.float() * head.scales[:, None]
    assert ((back - w).abs() <= head.scales[:, None] / 2 + 1e-7).all()  # half a step at most
    x = torch.randn(3, 32)
    torch.testing.assert_close(head(x), x @ back.T)


def test_dtype_moves_keep_fp32_scales():
    """model.half() / .to(bfloat16) must not round the per-row scales (the kernel takes fp32)."""
    head = Int8Linear.from_weight(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)))
    scales = head.scales.clone()
    for dtype in (torch.float16, torch.bfloat16):
        moved = head.to(dtype)
        assert moved.scales.dtype == torch.float32 and torch.equal(moved.scales, scales)
        assert moved.qweight.dtype == torch.int8


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D int8"):
        Int8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"scales must have shape \[4\]"):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("tied", [True, False])
def test_model_head_and_4bit_table(tied, tmp_path):
    model = tiny_llama(tie_word_embeddings=tied)
    tokens = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_head_int8(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, table)  # a tied table keeps its weights
    with torch.no_grad():
        got = model(tokens)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    with pytest.raises(ValueError, match="the lm_head is already quantized"):
        quantize_embeddings(model, 32, parts=("head",))
    quantize_embeddings(model, 32, parts=("embed",))  # then the table in 4 bits
    assert (isinstance(model.model.embed_tokens, QuantEmbedding)
            and isinstance(model.lm_head, Int8Linear))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_embeddings(model, 32, parts=("head",))
    with pytest.raises(ValueError, match="already 8-bit"):
        quantize_head_int8(model)
    calls = []
    assert apply_int8_kernel(
        model, lambda x, q, s: calls.append(x.shape) or x @ q.T.float() * s) == 1
    with torch.no_grad():
        model(tokens)
    assert calls == [(1, 10, 64)]


def test_save_refuses_an_8bit_head(tmp_path):
    from awq_ref.api import quantize

    model = quantize(tiny_llama(), method="rtn", w_bit=4, group_size=32)
    quantize_head_int8(model)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        save_quantized(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_cli_ppl_with_an_8bit_head(stories_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park. " * 8)
    ckpt = str(stories_dir / "stories260K.bin")
    base = ["ppl", "--model", ckpt, "--text", str(text), "--seqlen", "64", "--reference", ckpt,
            "--quantize-embeddings"]
    kls = []
    for extra in ([], ["--head-bits", "8"]):
        assert main(base + extra) == 0
        out = capsys.readouterr().out.split()
        kls.append(float(out[out.index("KL") + 1].rstrip(",")))
    assert 0 < kls[1] < kls[0], kls  # 8-bit head + 4-bit table: closer than both in 4 bits
    assert main(base + ["--head-bits", "8", "--head-calib", str(text)]) == 2
    assert "the 8-bit one needs no clip" in capsys.readouterr().err
    assert main(base[:-1] + ["--head-bits", "8"]) == 2
    assert "needs --quantize-embeddings" in capsys.readouterr().err
