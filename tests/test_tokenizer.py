"""Tokenizers: llama2.c's BPE against a literal port of its encode(), SentencePiece models trained
here on WikiText (through tokenizer.model and through GGUF metadata), save_pretrained round trips."""

import json
import random

import pytest

from awq_ref.loaders import load_tokenizer

TEXTS = [
    "Once upon a time",
    "",
    " ",
    "Hello world",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
    "emoji \U0001f600\U0001f680 end",
    "def f(x):\n    return x ** 2  # square",
    "Numbers 1234567 and 3.14159, 2024-01-01",
    "<s> literal </s> markers",
]


def llama2c_encode_reference(tokens: list[bytes], scores: list[float], text: str) -> list[int]:
    """llama2.c run.c encode(), line for line (no BOS/EOS): quadratic, so only for short texts."""
    lookup = {}
    for i, t in enumerate(tokens):
        lookup.setdefault(t, i)
    ids = [lookup[b" "]] if text else []
    for ch in text:
        b = ch.encode("utf-8")
        ids += [lookup[b]] if b in lookup else [x + 3 for x in b]
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            j = lookup.get(tokens[ids[i]] + tokens[ids[i + 1]], -1)
            if j != -1 and scores[j] > best:
                best, best_id, best_idx = scores[j], j, i
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


@pytest.fixture(scope="module")
def tok512(stories_dir):
    return load_tokenizer(stories_dir / "tok512.bin")


def test_llama2c_matches_reference_encode(tok512):
    backend = tok512.backend
    rng = random.Random(0)
    alphabet = "abcdefghijklmnop qrstuvwxyzTHE.,!?'\n\u00e9\u4e2d\U0001f600"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in TEXTS + randoms:
        expected = llama2c_encode_reference(backend.tokens, backend.scores, text)
        assert tok512.encode(text, add_bos=False) == expected, text


def test_llama2c_decode_and_round_trip(tok512, tmp_path):
    for text in TEXTS:
        ids = tok512.encode(text)
        assert ids[0] == 1 and tok512.decode(ids, skip_special_tokens=True) == text
    tok512.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.bin").read_bytes() == tok512.backend.data
    assert (again.bos_id, again.eos_ids, again.add_bos) == (1, (2,), True)
    assert all(again.encode(t) == tok512.encode(t) for t in TEXTS)


def test_llama2c_long_text_round_trips(tok512, wikitext_test):
    """200 kB of WikiText (many lines, every kind of piece) survive encode then decode."""
    text = wikitext_test.read_bytes().replace(b"\r\n", b"\n").decode()[:200_000]
    ids = tok512.encode(text, add_bos=False)
    assert tok512.decode(ids) == text


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, wikitext_test):
    """A 1000-piece BPE SentencePiece model trained on WikiText with the library's own trainer."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    text = wikitext_test.read_bytes().replace(b"\r\n", b"\n").decode()[:400_000]
    (folder / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "train.txt").unlink()
    return folder, sp


def test_sentencepiece_folder_matches_library(sp_model, tmp_path):
    folder, sp = sp_model
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (1, (2,), 1000, True)
    for text in TEXTS:
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)
    assert load_tokenizer(folder / "tokenizer.model").encode("Hello") == tok.encode("Hello")


def _gguf_from_sentencepiece(sp, path):
    """A GGUF holding only the SentencePiece vocabulary, as llama.cpp's converter writes it."""
    gguf = pytest.importorskip("gguf")
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(kinds)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_sentencepiece_vocab_matches_library(sp_model, tmp_path, wikitext_test):
    _, sp = sp_model
    held_out = wikitext_test.read_bytes().replace(b"\r\n", b"\n").decode()[600_000:700_000]
    lines = held_out.split("\n")[1:-1]
    _gguf_from_sentencepiece(sp, tmp_path / "vocab.gguf")
    tok = load_tokenizer(tmp_path / "vocab.gguf")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    # Control tokens written in the text ("<s>") stay whole here, as in llama.cpp; SentencePiece
    # spells them out, so that one text is left out.
    for text in [t for t in TEXTS if "<s>" not in t] + lines:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)
    assert (again.bos_id, again.eos_ids, again.add_bos) == (1, (2,), True)
    _check_transformers_reads_it(tok, tmp_path / "saved")


def _check_transformers_reads_it(tok, folder):
    """transformers' AutoTokenizer on a saved folder encodes and decodes as `tok` does, BOS
    included: 5.x reads tokenizer.json as it is (the post-processor must add BOS), 4.x builds the
    model type's class (hence the config.json beside it, as in a checkpoint)."""
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert json.loads((folder / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "PreTrainedTokenizerFast"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(hf) == tok.vocab_size  # no token appended past the vocabulary (4.x added <unk>)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids), text


def test_saved_byte_level_vocab_reads_the_same_in_transformers(default_gguf, tmp_path):
    """The default model's (GPT-2 style, no BOS): its tokenizer.json is saved as loaded."""
    tok = load_tokenizer(default_gguf)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"] == \
        json.loads(tok.backend.tk.to_str())["post_processor"]
    _check_transformers_reads_it(tok, tmp_path)


def test_encode_rejects_bytes(tok512):
    with pytest.raises(TypeError):
        tok512.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok512.decode([512])
