"""Tokenizer edges the main tokenizer tests leave out: a bare tokenizer.json that adds BOS itself
saved once, special tokens a file names but the vocabulary lacks, which file's BOS wins, GGUF
user-defined and plain-text tokens, the evaluation stream's BOS, and the llama2.c tokenizer
picked beside a model."""

import json
import shutil
import struct

import pytest

from awq_ref.eval import load_wikitext_tokens
from awq_ref.loaders import load_tokenizer
from awq_ref.loaders.gguf_tokenizer import tokenizer_from_gguf_metadata
from awq_ref.tokenizer import Tokenizer


def test_saved_tokenizer_json_that_adds_bos_keeps_one_bos(tmp_path):
    """A bare tokenizer.json (read as a file, so save_pretrained builds the folder) whose
    post-processor already puts <s> first: the saved file must not add a second one, as
    transformers and vLLM run the saved post-processor as it is."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "<unk>": 5}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0",
                                                      special_tokens=[("<s>", 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = load_tokenizer(tmp_path / "tokenizer.json")  # the file, not the folder
    assert (tok.bos_id, tok.add_bos, tok.encode("ab")) == (0, True, [0, 4])
    tok.save_pretrained(tmp_path / "saved")
    again = HFTokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    assert again.encode("ab").ids == [0, 4]  # add_special_tokens=True, as the readers run it


def test_sentencepiece_eos_token_the_model_lacks_keeps_the_model_eos(sp_model, tmp_path):
    """A chat fine-tune's tokenizer_config naming "<|im_end|>", which the .model lacks:
    SentencePiece maps unknown pieces to <unk> (id 0), which must not become an EOS id."""
    shutil.copy(sp_model[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == (2,) and tok.backend.sp.unk_id() == 0
    assert tok.backend.token_to_id("<|im_end|>") is None


def test_tokenizer_config_bos_wins_over_config_json(tmp_path):
    """config.json's bos_token_id (0, stale) against tokenizer_config's bos_token ("<|begin|>",
    id 1): the tokenizer's own file wins, as transformers reads it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {"<s>": 0, "<|begin|>": 1, "a": 2, "<unk>": 3}
    HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>",
                                                                "add_bos_token": True}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1 and tok.encode("a") == [1, 2]


@pytest.mark.parametrize("config", [
    {},  # the folder names its tokens only in special_tokens_map.json
    {"bos_token": "b", "eos_token": "b"},  # the map's replace the config's
    {"bos_token": "b", "eos_token": "b", "added_tokens_decoder": {}},  # a newer folder: config's
], ids=["map-only", "map-wins", "config-with-decoder"])
def test_special_tokens_map_is_read_as_transformers_reads_it(tmp_path, config):
    """An older folder (no added_tokens_decoder in tokenizer_config.json): transformers takes
    bos_token and eos_token from special_tokens_map.json; a folder naming EOS only there had no
    EOS here, so generation never stopped."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tk = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4},
                                      unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    (tmp_path / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = load_tokenizer(tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_ids) == (hf.bos_token_id, (hf.eos_token_id,))
    assert tok.bos_id == (3 if "added_tokens_decoder" in config else 0)


def test_gguf_user_defined_tokens_encode_whole():
    """User-defined tokens (llama.cpp type 4, e.g. "<tool>") are matched whole in the text, not
    cut into the pieces that spell them."""
    tokens = ["<", "t", "o", "l", ">", " ", "<tool>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 6 + [4]}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("<tool>") == [6]
    assert tok.encode("<tool> <tool>") == [6, 5, 6]
    assert tok.encode("<too>") == [0, 1, 2, 2, 4]


def test_gguf_byte_level_vocab_with_plain_text_tokens():
    """Some GGUF byte-level vocabularies spell " " and "\\n" as they are, not in GPT-2's byte
    alphabet (U+0120, U+010A): respelled, they encode and decode as the byte-level ones do."""
    meta = {"tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": ["a", "b", " ", "\n", "\u0120a"],
            "tokenizer.ggml.merges": ["\u0120 a"]}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("a\nb") == [0, 3, 1]
    assert tok.encode("b a") == [1, 4]  # " a" merges to "\u0120a"
    assert tok.decode([0, 3, 1]) == "a\nb"


def test_wikitext_tokens_start_with_the_tokenizers_own_bos(stories_dir, tmp_path):
    """PROTOCOL: the evaluation stream is encoded with the tokenizer's own BOS default: BOS
    first for llama2.c's tok512 (add_bos), none for a tokenizer that does not add it."""
    text = "Once upon a time, there was a cat.\nIt sat on a mat.\n"
    (tmp_path / "t.txt").write_text(text)
    tok = load_tokenizer(stories_dir / "tok512.bin")
    body = tok.encode(text, add_bos=False)
    assert load_wikitext_tokens(tok, tmp_path / "t.txt").tolist() == [1, *body]
    no_bos = Tokenizer(tok.backend, 1, (2,), add_bos=False)
    assert load_wikitext_tokens(no_bos, tmp_path / "t.txt").tolist() == body


def test_llama2c_tokenizer_with_the_models_vocab_size_is_picked(stories_dir, tmp_path):
    """Beside stories260K.bin (vocabulary 512): its tok512.bin and another model's 513-token
    tokenizer.bin; the one whose size matches the model is picked, though tokenizer.bin is
    looked at first."""
    (tmp_path / "stories260K.bin").symlink_to(stories_dir / "stories260K.bin")
    tok512 = (stories_dir / "tok512.bin").read_bytes()
    (tmp_path / "tok512.bin").write_bytes(tok512)
    (tmp_path / "tokenizer.bin").write_bytes(tok512 + struct.pack("<fi", -1e9, 3) + b"xyz")
    assert load_tokenizer(tmp_path / "tokenizer.bin").vocab_size == 513
    tok = load_tokenizer(tmp_path / "stories260K.bin")
    assert tok.source == str(tmp_path / "tok512.bin") and tok.vocab_size == 512


def test_folder_with_sentencepiece_and_llama2c_tokenizers_reads_sentencepiece(sp_model, stories_dir,
                                                                             tmp_path):
    """tokenizer.json > tokenizer.model > tokenizer.bin: a folder holding a .model and a llama2.c
    .bin reads the SentencePiece model."""
    shutil.copy(sp_model[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copy(stories_dir / "tok512.bin", tmp_path / "tokenizer.bin")
    assert load_tokenizer(tmp_path).vocab_size == 1000  # tok512.bin's is 512


def test_llama2c_token_longer_than_max_token_length_is_refused(stories_dir, tmp_path):
    """Each token's byte length is checked against the file's max_token_length, not only
    against the file's end."""
    tok512 = (stories_dir / "tok512.bin").read_bytes()
    (max_len,) = struct.unpack_from("<i", tok512, 0)
    long = b"x" * (max_len + 1)
    (tmp_path / "tok.bin").write_bytes(tok512 + struct.pack("<fi", 0.0, len(long)) + long)
    with pytest.raises(ValueError, match=f"token 512 claims {max_len + 1} bytes"):
        load_tokenizer(tmp_path / "tok.bin")


@pytest.mark.parametrize("pre, text, want", [
    ("gpt2", "a a", [0, 1, 0]),  # GPT-2's regex: "a", " a"; no merge across the two words
    ("default", "a a", [0, 1, 0]),
    ("smollm", "1 12", [3, 1, 3, 4]),  # every digit alone: "12" is never merged
    ("smollm", "a a", [0, 1, 0]),  # then GPT-2's regex
    ("llama3", "$a", [7]),  # Llama 3's regex keeps one non-letter before letters...
    ("gpt2", "$a", [6, 0]),  # ...GPT-2's does not
])
def test_gguf_byte_level_pre_tokenizers_split_before_merging(pre, text, want):
    """tokenizer.ggml.pre's split runs before the merges: "a" + "\u0120" (a space) never merge
    across GPT-2's word boundary, SmolLM's digits stay one per token, and Llama 3's split
    (only its own: no GPT-2 split after it) keeps "$a" whole."""
    tokens = ["a", "\u0120", "a\u0120", "1", "2", "12", "$", "$a"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["a \u0120", "1 2", "$ a"], "tokenizer.ggml.pre": pre}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode(text, add_bos=False) == want


def test_gpt2_byte_alphabet_is_gpt2s():
    """Printable Latin-1 bytes spell themselves (0xFF included), the others the characters from
    U+0100 on in byte order: space U+0120, newline U+010A, soft hyphen 0xAD U+0143."""
    from awq_ref.loaders.gguf_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert len(table) == len(set(table.values())) == 256
    assert [table[b] for b in (0x20, 0x0A, 0xAD, 0xAE, 0xFF, ord("!"), 0x00)] == [
        "\u0120", "\u010a", "\u0143", "\u00ae", "\u00ff", "!", "\u0100"]


def test_gguf_sentencepiece_vocab_unknown_token_defaults_to_id_0():
    """Without tokenizer.ggml.unknown_token_id, <unk> is token 0 (llama.cpp's default); text the
    vocabulary cannot spell (no byte tokens here) becomes it."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -1.0, -2.0]}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("a", add_bos=False) == [5]
    assert tok.encode("z", add_bos=False) == [3, 0]
    assert tok.encode("zz", add_bos=False) == [3, 0]  # one <unk> for the run, as SentencePiece
    for scores in ([0.0] * 5, None):
        bad = {k: v for k, v in {**meta, "tokenizer.ggml.scores": scores}.items()
               if v is not None}
        with pytest.raises(ValueError, match="t.gguf: tokenizer.ggml.scores missing or not one "
                                             "per token"):
            tokenizer_from_gguf_metadata(bad, "t.gguf")


def test_gguf_control_tokens_are_special_and_user_defined_ones_are_text():
    """On decode with skip_special_tokens a control token (type 3) goes, a user-defined one
    (type 4) stays: it is text the model writes, like "<tool>"."""
    tokens = ["<", "t", "o", "l", ">", "<tool>", "<|end|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 5 + [4, 3]}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("<tool><|end|>", add_bos=False) == [5, 6]
    assert tok.decode([5, 6], skip_special_tokens=True) == "<tool>"
    assert tok.decode([5, 6]) == "<tool><|end|>"


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.scores": ["x"]}, "tokenizer.ggml.scores must be a list of numbers"),
    ({"tokenizer.ggml.token_type": [True]}, "tokenizer.ggml.token_type must be a list of int"),
    ({"tokenizer.ggml.bos_token_id": 1},
     r"tokenizer.ggml.bos_token_id=1 is not a token id \(< 1\)"),
    ({"tokenizer.ggml.merges": ["x y"]}, "the GGUF vocabulary does not form a tokenizer"),
    ({"tokenizer.ggml.merges": ["ab"]}, "tokenizer.ggml.merges holds an entry without a space$"),
])
def test_gguf_vocabulary_metadata_refusals(changes, message):
    """A one-token vocabulary is a vocabulary (its ids default to 0, which it has); each
    refusal is a ValueError naming the file, the library's own errors included."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
            "tokenizer.ggml.merges": []}
    assert tokenizer_from_gguf_metadata(meta, "t.gguf").encode("aa") == [0, 0]
    with pytest.raises(ValueError, match=f"^t.gguf: {message}"):  # our own errors: not wrapped
        tokenizer_from_gguf_metadata({**meta, **changes}, "t.gguf")


def test_gguf_sentencepiece_control_tokens_outside_the_byte_alphabet_are_special():
    """The byte-alphabet filter on control tokens is for byte-level vocabularies only (where
    llama.cpp mislabels some); a SentencePiece vocabulary's "<\uff5cend\uff5c>" is special."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "<\uff5cend\uff5c>"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 6, "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 3]}
    tok = tokenizer_from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("<\uff5cend\uff5c>", add_bos=False) == [5]
