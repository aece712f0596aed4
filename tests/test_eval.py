"""awq_ref/eval.py: PROTOCOL.md's perplexity, KL and top-1 against a direct computation, and
evaluate_many against evaluate model by model."""

import math

import numpy as np
import pytest
import torch
from test_awq_search import tiny_llama

from awq_ref.eval import _CHUNK, evaluate, evaluate_many, read_text, windows_of


@torch.no_grad()
def direct(model, reference, tokens, seqlen, n):
    """The formulas of eval.py's docstring over whole windows, in float64."""
    nll = kl = top1 = 0.0
    for w in tokens[: n * seqlen].view(n, seqlen):
        logp = torch.log_softmax(model(w[None])[0, :-1].double(), -1)  # (T-1, V)
        ref = torch.log_softmax(reference(w[None])[0, :-1].double(), -1)
        nll -= logp.gather(1, w[1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        top1 += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
    count = n * (seqlen - 1)
    return math.exp(nll / count), kl / count, top1 / count


def test_scores_match_the_formulas():
    model, reference = tiny_llama(seed=1), tiny_llama(seed=2)
    tokens = torch.randint(0, 97, (3 * (_CHUNK + 40) + 5,))  # windows longer than one chunk
    seqlen = _CHUNK + 40
    got = evaluate(model, tokens, seqlen, None, reference, progress=False)
    ppl, kl, top1 = direct(model, reference, tokens, seqlen, 3)
    assert got["windows"] == 3 and got["tokens"] == 3 * (seqlen - 1)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(ppl), rel=1e-5)  # the mean NLL, per token
    assert got["kl"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert got["top1"] == pytest.approx(top1, abs=1 / got["tokens"])


def test_evaluate_many_gives_each_model_its_own_numbers():
    a, b, ref = tiny_llama(seed=1), tiny_llama(seed=2), tiny_llama(seed=3)
    tokens = torch.randint(0, 97, (400,))
    many = evaluate_many({"a": a, "b": b, "ref": ref}, tokens, 64, 5, ref, progress=False)
    assert many["a"] == evaluate(a, tokens, 64, 5, ref, progress=False)
    assert many["b"] == evaluate(b, tokens, 64, 5, ref, progress=False)
    assert many["ref"]["kl"] == 0 and many["ref"]["top1"] == 1
    assert many["ref"]["ppl"] == evaluate(ref, tokens, 64, 5, progress=False)["ppl"]
    alone = evaluate_many({"a": a}, tokens, 64, 5, progress=False)["a"]
    assert "kl" not in alone and alone["ppl"] == many["a"]["ppl"]


def test_reference_runs_once_per_window():
    a, b, ref = tiny_llama(seed=1), tiny_llama(seed=2), tiny_llama(seed=3)
    calls = []
    ref.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, 97, (400,))
    evaluate_many({"a": a, "b": b, "ref": ref}, tokens, 64, 5, ref, progress=False)
    assert len(calls) == 5


def test_windows_errors():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        windows_of(torch.arange(10), 1, None)
    with pytest.raises(ValueError, match="asked for 3 windows"):
        windows_of(torch.arange(10), 4, 3)
    for n in (0, -1):  # a negative count would slice from the end
        with pytest.raises(ValueError, match=f"asked for {n} windows"):
            windows_of(torch.arange(10), 4, n)
    assert windows_of(torch.arange(10), 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_of(torch.arange(4), 4, None).tolist() == [[0, 1, 2, 3]]  # exactly one window
    assert windows_of(torch.arange(5), 2, None).shape == (2, 2)  # the shortest: one to predict
    # A float count or length failed in Python's own TypeError (slice indices), a bool ran as 1
    for seqlen, n, name in ((4.0, None, "seqlen"), (4, 2.0, "windows"), (4, True, "windows"),
                            (None, 1, "seqlen")):
        with pytest.raises(TypeError, match=f"evaluate: {name} must be an integer, got"):
            windows_of(torch.arange(10), seqlen, n)
    assert windows_of(torch.arange(10), np.int64(4), np.int32(1)).tolist() == [[0, 1, 2, 3]]


def test_read_text_reads_crlf_files_as_lf(tmp_path):
    """Some copies of WikiText-2 have CRLF line ends: the tokens must not depend on them."""
    (tmp_path / "crlf.txt").write_bytes("one\r\ntwo \u00e9\r\n\r\nthree\r".encode())
    assert read_text(tmp_path / "crlf.txt") == "one\ntwo \u00e9\n\nthree\r"


def test_vocabularies_must_agree_only_where_logits_are_compared():
    """KL and top-1 compare the reference's logits with each model's token by token: refused
    across vocabularies; perplexities alone may come from models of different vocabularies."""
    from awq_ref.config import LlamaConfig
    from awq_ref.model import Llama

    other = Llama(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2)).eval()
    a, tokens = tiny_llama(seed=1), torch.randint(0, 97, (128,))
    with pytest.raises(ValueError, match=r"vocabularies differ \(\[97, 100\] tokens\)"):
        evaluate_many({"a": a}, tokens, 64, 2, reference=other, progress=False)
    both = evaluate_many({"a": a, "other": other}, tokens, 64, 2, progress=False)
    assert both["other"] == evaluate(other, tokens, 64, 2, progress=False)
