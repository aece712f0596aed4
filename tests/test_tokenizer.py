"""Tokenizers: llama2.c's BPE against a literal port of its encode(), SentencePiece models trained
here on WikiText (through tokenizer.model and GGUF metadata), save_pretrained round trips."""

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


def _gguf_from_sentencepiece(sp, path, eot_id=None):
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
    if eot_id is not None:
        w.add_eot_token_id(eot_id)
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
    # a padded embedding table's rows hold no text: skipped as special tokens are
    assert tok512.decode([65, 512, 66], skip_special_tokens=True) == tok512.decode([65, 66])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok512.decode([-1], skip_special_tokens=True)


def test_gguf_eos_ids_include_the_end_of_turn_token(sp_model, tmp_path):
    """Chat models' GGUF files name an end-of-turn token beside EOS: generation stops at both."""
    pytest.importorskip("gguf")
    from awq_ref.loaders.gguf_file import config_from_gguf
    from awq_ref.loaders.gguf_header import read_header

    _, sp = sp_model
    _gguf_from_sentencepiece(sp, tmp_path / "vocab.gguf", eot_id=7)
    assert load_tokenizer(tmp_path / "vocab.gguf").eos_ids == (2, 7)
    meta = {"general.architecture": "llama", "llama.context_length": 64,
            "llama.embedding_length": 64, "llama.block_count": 1, "llama.feed_forward_length": 96,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
            "llama.attention.layer_norm_rms_epsilon": 1e-5,
            **read_header(tmp_path / "vocab.gguf").metadata}
    assert config_from_gguf(meta, set(), "t").eos_token_ids == (2, 7)


def test_merges_of_tied_scores_in_transformers_order():
    """SentencePiece vocabularies often tie scores: the merges' order then decides the encoding,
    and must be transformers' (`generate_merges`, which its GGUF conversion uses)."""
    transformers = pytest.importorskip("transformers")
    from awq_ref.loaders.gguf_tokenizer import merges_from_scores

    rng = random.Random(0)
    tokens = list("abcde")
    while len(tokens) < 120:
        piece = "".join(rng.choice("abcde") for _ in range(rng.randint(2, 4)))
        if piece not in tokens:
            tokens.append(piece)
    for scores in ([0.0] * len(tokens), [float(rng.choice((0, -1, -2))) for _ in tokens]):
        want = transformers.tokenization_utils_base.generate_merges(
            {t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
        assert merges_from_scores(tokens, scores, "t") == want


def _bpe_folder(folder, post_bos: bool, generation_eos):
    """A tokenizer.json (BPE over a few pieces; its post-processor adds <s> or not) with a
    tokenizer_config.json that does not say add_bos_token, and a generation_config.json."""
    from tokenizers import Tokenizer, models, processors

    folder.mkdir()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", "ab", "<|eot|>"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    if post_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                          special_tokens=[("<s>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                              "eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


def test_tokenizer_json_folder_reads_bos_from_its_post_processor_and_every_eos(tmp_path):
    tok = load_tokenizer(_bpe_folder(tmp_path / "a", True, [2, 6]))
    assert (tok.bos_id, tok.add_bos, set(tok.eos_ids)) == (1, True, {2, 6})
    assert tok.encode("ab") == [1, 5]
    tok = load_tokenizer(_bpe_folder(tmp_path / "b", False, 6))
    assert (tok.add_bos, set(tok.eos_ids)) == (False, {2, 6})
    assert tok.encode("ab") == [5]
    tok.save_pretrained(tmp_path / "saved")  # as save_quantized does: the EOS list survives
    assert set(load_tokenizer(tmp_path / "saved").eos_ids) == {2, 6}


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "llama3", "llama-v3"])
def test_gguf_llama3_vocabulary_as_llama_cpp_reads_it(pre):
    """Llama-3's pre-tokenizers (llama.cpp's LLAMA3 group): a word that is a token is one token
    even when no merge reaches it, and BOS is added when the file has no add_bos_token flag;
    other byte-level vocabularies keep merging and add no BOS."""
    from awq_ref.loaders.gguf_tokenizer import bytes_to_unicode, tokenizer_from_gguf_metadata

    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, "ab", "abc", "<s>"]  # no merge makes "abc": only "a b"
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [1] * 258 + [3],
            "tokenizer.ggml.bos_token_id": 258, "tokenizer.ggml.eos_token_id": 258}
    tok = tokenizer_from_gguf_metadata(meta, "test.gguf")
    llama3 = pre != "smollm"
    assert tok.encode("abc") == ([258, 257] if llama3 else [256, alphabet.index("c")])
    flagged = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": False}, "x")
    assert flagged.encode("abc")[0] != 258  # the file's flag wins
