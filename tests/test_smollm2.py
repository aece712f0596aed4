"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file
(test-only oracle: it dequantizes and un-permutes on its own, and converts the tokenizer)."""

import pytest
import torch

from awq_ref.generate import generate
from awq_ref.loaders import load_model, load_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived",
]
TEXTS = PROMPTS + [
    "", " ", "Hello world", "   three leading spaces", "tabs\tand\nnewlines\n\n\n",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3068\u4e2d\u6587\u53e5\u5b50\u3002\ud55c\uad6d\uc5b4",
    ("emoji \U0001f600\U0001f680\U0001f44d\U0001f3fd family "
     "\U0001f468\u200d\U0001f469\u200d\U0001f467"),
    "x = [1, 22, 333, 4444, 55555]  # digits 3.14159 and 2024-06-01",
    "I'm sure they'll say it's fine; we've done what we'd planned.",
    "URL: https://example.com/path?q=a+b&c=%20  email@example.org",
    "    indented code\n\t\tand tabs\r\nCRLF",
    "<|endoftext|> special <|im_end|>",
]


@pytest.fixture(scope="module")
def ours(default_gguf):
    # default_gguf has fetched the file (or skipped); "default" names the same cached file.
    return load_model("default"), load_tokenizer("default")


@pytest.fixture(scope="module")
def oracle(default_gguf):
    kw = {"gguf_file": default_gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_gguf.parent,
                                                              dtype=torch.float32, **kw)
    return model.eval(), tok


def test_config(ours):
    model, tok = ours
    c = model.config
    assert ((c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)
            == (30, 576, 1536, 49152))
    assert ((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta)
            == (9, 3, 64, 100000.0))
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, (2,), False, 49152)


@pytest.mark.slow
def test_token_ids_match_transformers(ours, oracle):
    tok, hf_tok = ours[1], oracle[1]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert ids == hf_tok(text)["input_ids"], text  # same default: no BOS
        assert tok.decode(ids) == hf_tok.decode(ids), text


@pytest.mark.slow
def test_logits_match_transformers(ours, oracle):
    model, tok = ours
    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tok.encode(text)])  # (1, T)
            diff = (model(ids) - oracle[0](ids).logits).abs().max().item()
            worst = max(worst, diff)
    print(f"SmolLM2 max |logits - transformers| over {len(PROMPTS)} prompts: {worst:.3g}")
    assert worst <= 1e-3


@pytest.mark.slow
def test_greedy_paris(ours):
    model, tok = ours
    new = generate(model, tok.encode("The capital of France is"), 4, eos_ids=tok.eos_ids)
    assert tok.decode(new).startswith(" Paris")


def test_tokenizer_save_round_trip(ours, tmp_path):
    tok = ours[1]
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_ids, again.add_bos) == (tok.bos_id, tok.eos_ids, tok.add_bos)
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)

