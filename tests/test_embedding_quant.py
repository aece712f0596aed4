"""4-bit embeddings and lm_head (awq_ref.quant.embedding) against the plain packed format."""

import pytest
import torch

from awq_ref.api import quantize
from awq_ref.cli import main
from awq_ref.quant.checkpoint import save_quantized
from awq_ref.quant.embedding import QuantEmbedding, quantize_embeddings
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight
from tests.test_qlinear import tiny_llama


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_are_the_heads_columns_and_the_rtn_table(tied, dtype):
    model = tiny_llama(tie_word_embeddings=tied).to(dtype)
    table = model.model.embed_tokens.weight.detach().clone()  # (V, D)
    head = model.lm_head.weight.detach().clone()
    quantize_embeddings(model, group_size=32)
    emb, lm = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(lm, QuantLinear)
    assert (lm is emb.packed) == tied
    tokens = torch.tensor([[0, 1, 7, 8, 95], [50, 9, 9, 63, 2]])  # (B, T), every nibble slot
    rows = emb(tokens)  # (B, T, D)
    assert rows.shape == (2, 5, 64) and rows.dtype == dtype
    assert rows.is_contiguous()  # as nn.Embedding's: the elementwise CUDA kernels need that
    # Bit for bit: row v is column v of the packed table, dequantized as the format says.
    w_emb = emb.packed.weight_kn(dtype)  # (D, V)
    assert torch.equal(rows, w_emb[:, tokens].permute(1, 2, 0))
    # ... and that table is the RTN (4 bits, zero point, groups of 32 along D) of the original.
    expected = fake_quantize_weight(table.float(), QuantSpec(4, 32)).to(dtype)  # (V, D)
    assert torch.allclose(w_emb.T.float(), expected.float(), rtol=0, atol=2e-3)
    if not tied:  # the head has its own table, the RTN of the head's weight
        got = lm.weight_kn(torch.float32).T
        assert torch.allclose(got, fake_quantize_weight(head.float(), QuantSpec(4, 32)), atol=2e-3)


def test_logits_stay_close_and_ties_survive_moves():
    model = tiny_llama(tie_word_embeddings=True)
    tokens = torch.randint(0, 96, (2, 12))
    ref = model(tokens)
    quantize_embeddings(model)  # no QuantLinear: the largest of 128/64/32 dividing D = 64
    assert model.lm_head.group_size == 64
    out = model(tokens)
    assert (out - ref).norm() / ref.norm() < 0.2  # 4-bit table, random weights
    assert not torch.equal(out, ref)
    model.to(torch.bfloat16)
    assert model.lm_head is model.model.embed_tokens.packed
    assert model.lm_head.scales.dtype == torch.float16  # the format's scales stay fp16
    assert model(tokens).dtype == torch.bfloat16


def test_one_part_only():
    model = tiny_llama(tie_word_embeddings=True)
    table = model.model.embed_tokens.weight  # (V, D)
    quantize_embeddings(model, parts=("head",))
    assert isinstance(model.lm_head, QuantLinear) and model.model.embed_tokens.weight is table
    model = tiny_llama(tie_word_embeddings=True)
    table = model.model.embed_tokens.weight
    quantize_embeddings(model, parts=("embed",))
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.weight is table  # the 16-bit table stays for the head
    with pytest.raises(ValueError, match="parts must name"):
        quantize_embeddings(tiny_llama(), parts=("embedding",))


def test_decoder_group_size_is_the_default():
    model = quantize(tiny_llama(tie_word_embeddings=False), method="rtn", w_bit=4, group_size=32)
    quantize_embeddings(model)
    assert model.lm_head.group_size == 32 == model.model.embed_tokens.packed.group_size


def test_without_a_quantized_decoder_the_largest_group_that_divides_is_the_default():
    from awq_ref.quant.embedding import default_group_size

    for hidden, heads, group in ((128, 4, 128), (192, 4, 64), (96, 3, 32), (48, 3, 0)):
        model = tiny_llama(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=1)
        assert default_group_size(model) == group


def test_the_table_holds_only_the_packed_tensors_and_takes_no_tokens():
    """The dtype marker and the nibble shifts are derived, not state (a state dict or a saved
    work folder holds the packed table only); zero tokens give zero rows, as nn.Embedding."""
    model = quantize_embeddings(tiny_llama(tie_word_embeddings=False), 32, parts=("embed",))
    emb = model.model.embed_tokens
    assert sorted(emb.state_dict()) == ["packed.qweight", "packed.qzeros", "packed.scales"]
    assert emb(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 64)


def test_bad_inputs_raise(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="group_size 48 does not divide the hidden size 64"):
        quantize_embeddings(model, group_size=48)
    with pytest.raises(ValueError, match="none of the group sizes"):
        quantize_embeddings(tiny_llama(hidden_size=48, num_attention_heads=3,
                                       num_key_value_heads=1))
    with pytest.raises(ValueError, match="vocab size 90 is not a multiple of 8"):
        quantize_embeddings(tiny_llama(vocab_size=90))
    quantize_embeddings(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_embeddings(model)
    for bad in ([[-1, 3]], [[5, 96]]):  # as nn.Embedding: no silent wrap-around
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 96\)"):
            model.model.embed_tokens(torch.tensor(bad))
    q = quantize(tiny_llama(), method="rtn", w_bit=4, group_size=32)
    quantize_embeddings(q)
    with pytest.raises(ValueError, match="does not store"):
        save_quantized(q, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_cli_ppl_with_quantized_embeddings(stories_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park. " * 8)
    ckpt = str(stories_dir / "stories260K.bin")
    base = ["ppl", "--model", ckpt, "--text", str(text), "--seqlen", "64"]
    assert main(base) == 0
    plain = float(capsys.readouterr().out.split()[1])
    kls = {}
    for extra in (["--quantize-embeddings"], ["--quantize-embeddings", "embed"]):
        assert main(base + extra + ["--reference", ckpt]) == 0
        out = capsys.readouterr().out.split()
        ppl, kl = float(out[1]), float(out[out.index("KL") + 1].rstrip(","))
        assert ppl != plain and 0 < kl < 0.5
        kls[len(extra)] = kl
    assert kls[2] < kls[1]  # the token table alone changes less than table + head
    with pytest.raises(SystemExit):
        main(base + ["--quantize-embeddings", "all"])


def test_clipped_head_lowers_the_logit_error_on_calibration_tokens():
    from awq_ref.awq.head import clipped_head, head_gram

    model = tiny_llama(tie_word_embeddings=True)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(5))
    w = model.lm_head.weight.detach().clone()
    clipped = clipped_head(model, calib, group_size=32)
    assert clipped.shape == w.shape and not torch.equal(clipped, w)
    assert (clipped.abs() <= w.abs().amax(dim=1, keepdim=True)).all()  # only shrinks ranges
    gram = head_gram(model, calib)

    def logit_error(table):  # sum over tokens of ||h (q(W) - W)^T||^2 = sum_v e_v^T H e_v
        e = fake_quantize_weight(table, QuantSpec(4, 32)) - w
        return torch.einsum("vi,ij,vj->", e, gram, e).item()

    assert logit_error(clipped) < logit_error(w)
    quantize_embeddings(model, 32, head_weight=clipped)
    got = model.lm_head.weight_kn(torch.float32).T
    torch.testing.assert_close(got, fake_quantize_weight(clipped, QuantSpec(4, 32)), rtol=0,
                               atol=2e-3)
    assert model.lm_head is model.model.embed_tokens.packed  # tied: one clipped table
    with pytest.raises(ValueError, match="head_weight has shape"):
        quantize_embeddings(tiny_llama(), 32, head_weight=clipped[:8])


def test_head_gram_sums_every_calibration_token():
    """H = sum of h^T h over every token of every sequence (final norm outputs), whatever the
    batching: 7 sequences in batches of 3, the last one short."""
    from awq_ref.awq.head import head_gram

    model = tiny_llama()
    calib = torch.randint(0, 96, (7, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = model.hidden(calib).reshape(-1, model.config.hidden_size)  # (7 * 16, D)
    torch.testing.assert_close(head_gram(model, calib, batch=3), h.T @ h, rtol=1e-5, atol=1e-4)


def test_cli_head_calib_clips_the_head(stories_dir, shared_data, tmp_path, capsys):
    stories = shared_data / "text" / "tinystories" / "tinystories_val_prefix.txt"
    text = tmp_path / "t.txt"
    text.write_text(stories.read_text()[-8000:])  # in-domain text, away from the start
    ckpt = str(stories_dir / "stories260K.bin")
    base = ["ppl", "--model", ckpt, "--text", str(text), "--seqlen", "256", "--reference", ckpt,
            "--quantize-embeddings", "head"]
    calib = tmp_path / "calib.txt"
    calib.write_text(stories.read_text()[:150000])  # enough for 128 x 512 tokens of 512 ids
    kls = []
    for extra in ([], ["--head-calib", str(calib)]):
        assert main(base + extra) == 0
        printed = capsys.readouterr()
        out = printed.out.split()
        kls.append(float(out[out.index("KL") + 1].rstrip(",")))
        assert ("searching the 4-bit lm_head's clip boxes on 128 x 512 tokens" in printed.err
                ) == bool(extra)  # minutes on a real model: said, not silent
    assert kls[1] < kls[0], kls
    assert main(["ppl", "--model", ckpt, "--text", str(text), "--head-calib", str(calib)]) == 2
    assert "needs --quantize-embeddings" in capsys.readouterr().err


def test_clipped_head_searches_with_the_decoders_clip_settings():
    """clipped_head runs the decoder's clip search (AwqConfig's grid, shrink, mode and joint
    sweeps) on the head's Gram: each setting reaches it, and each changes the boxes here."""
    from awq_ref.awq.head import clipped_head, head_gram
    from awq_ref.awq.pipeline import AwqConfig
    from awq_ref.awq.search_clip import search_clip
    from awq_ref.quant.quantizer import clamp_groups

    model = tiny_llama(tie_word_embeddings=False)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(5))
    w = model.lm_head.weight.detach().float()
    gram = head_gram(model, calib)
    default = AwqConfig()
    variants = [default] + [AwqConfig(**{k: v}) for k, v in
                            {"clip_grid": 20, "max_shrink": 0.1, "clip_mode": "range",
                             "clip_joint": 0}.items()]
    got = []
    for c in variants:
        lo, hi, _, _ = search_clip(w, gram, QuantSpec(4, 32), n_grid=c.clip_grid,
                                   max_shrink=c.max_shrink, mode=c.clip_mode, joint=c.clip_joint)
        got.append(clipped_head(model, calib, 32, c))
        assert torch.equal(got[-1], clamp_groups(w, lo, hi)), c
    assert all(not torch.equal(g, got[0]) for g in got[1:])  # each setting matters here
