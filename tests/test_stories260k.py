"""stories260K (llama2.c legacy checkpoint + tok512.bin) against float64 reference outputs."""

import json

import pytest
import torch

from awq_ref.generate import generate
from awq_ref.loaders import load_model, load_tokenizer


@pytest.fixture(scope="module")
def reference(stories_dir):
    return json.loads((stories_dir / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def model(stories_dir):
    return load_model(stories_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def tok(stories_dir):
    # Given the model .bin, the tokenizer is found beside it (tok512.bin).
    return load_tokenizer(stories_dir / "stories260K.bin")


def test_config(model):
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_prompt_tokens(tok, reference):
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 512)
    assert tok.encode(reference["prompt"]) == reference["prompt_tokens_with_bos"]
    assert tok.encode(reference["prompt"], add_bos=False) == reference["prompt_tokens_with_bos"][1:]


def test_logits(model, reference):
    ids = torch.tensor([reference["prompt_tokens_with_bos"]])
    with torch.no_grad():
        logits = model(ids)  # (1, T, V)
    values, index = logits[0, -1].topk(5)
    expected = reference["last_position_top5"]
    assert index.tolist() == [e[0] for e in expected]
    assert values.tolist() == pytest.approx([e[2] for e in expected], abs=1e-4)
    assert logits.double().sum().item() == pytest.approx(reference["logits_sum_all_positions"],
                                                         rel=1e-6)


def test_greedy(model, tok, reference):
    prompt = reference["prompt_tokens_with_bos"]
    new = generate(model, prompt, 48)
    assert new == reference["greedy_48_new_tokens"]
    assert tok.decode(prompt + new, skip_special_tokens=True) == reference["greedy_text"]
