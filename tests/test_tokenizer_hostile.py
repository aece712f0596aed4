"""Hostile tokenizer files, one regression test per bug found: padding/truncation in a
tokenizer.json (a huge padding length aborted the process in Rust), vocabularies whose rebuilt
merges grow cubically (llama2.c tokenizer.bin, GGUF "llama"), tokens too long to split, and a
pre-tokenizer regex that gives up (a Rust panic at encode). Each builds its file in tmp_path."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from awq_ref.loaders import load_tokenizer
from awq_ref.loaders.vocab_splits import MAX_TOKEN_LENGTH, MERGE_CHARS_PER_TOKEN

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["a" * k for k in range(1, 301)]  # 300 tokens; their merges hold ~9M characters


def write_tokenizer_json(folder: Path, **fields) -> Path:
    """A tiny byte-level BPE tokenizer.json with `fields` overwritten in its JSON."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from awq_ref.loaders.gguf_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate([*alphabet, "ab"])},
                              merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    folder.mkdir(parents=True, exist_ok=True)
    obj = json.loads(tk.to_str())
    obj.update(fields)
    (folder / "tokenizer.json").write_text(json.dumps(obj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "!", "eos_token": "\""}))
    return folder


def write_llama2c_vocab(path: Path, tokens: list[str]) -> Path:
    """tokenizer.bin: <unk>, <s>, </s>, then `tokens`, each scored minus its length."""
    raw = [b"<unk>", b"<s>", b"</s>", *(t.encode() for t in tokens)]
    body = b"".join(struct.pack("<fi", -float(len(t)), len(t)) + t for t in raw)
    path.write_bytes(struct.pack("<i", max(map(len, raw))) + body)
    return path


def write_gguf_vocab(path: Path, tokens: list[str]) -> Path:
    """A GGUF holding only a "llama" (SentencePiece-style) vocabulary: <unk>, <s>, </s>, tokens."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>", *tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(len(t)) for t in tokens])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_json_padding_and_truncation_are_ignored(tmp_path):
    plain = load_tokenizer(write_tokenizer_json(tmp_path / "plain"))
    truncation = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    padding = {"strategy": {"Fixed": 50}, "direction": "Right", "pad_to_multiple_of": None,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}
    padded = load_tokenizer(write_tokenizer_json(tmp_path / "padded", truncation=truncation,
                                                 padding=padding))
    text = "ab abc hello world"
    assert padded.encode(text) == plain.encode(text)
    assert len(plain.encode(text, add_bos=False)) > 2
    padded.save_pretrained(tmp_path / "saved")  # the file as it came, for the checkpoint's users
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["padding"]["pad_token"] == "!" and saved["truncation"]["max_length"] == 2


def test_tokenizer_json_huge_padding_does_not_abort(tmp_path):
    """Padding to 10^12 tokens aborted the process in Rust (SIGABRT) at the first encode."""
    folder = write_tokenizer_json(tmp_path, padding={
        "strategy": {"Fixed": 10**12}, "direction": "Right", "pad_to_multiple_of": 2**40,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "!"})
    code = ("from awq_ref.loaders import load_tokenizer; "
            f"print(load_tokenizer({str(folder)!r}).encode('ab'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[256]"  # "ab", and no BOS: the file's post-processor adds none


@pytest.mark.parametrize("write", [write_llama2c_vocab, write_gguf_vocab], ids=["llama2c", "gguf"])
def test_merge_chain_is_rejected(tmp_path, write):
    """"a", "aa", ..., "a" * N: ~N^2/2 merges of ~N^3/6 characters (N=2000 ran out of memory)."""
    path = write(tmp_path / "vocab.bin", CHAIN)
    words = f"{re.escape(str(path))}: .*{MERGE_CHARS_PER_TOKEN} characters per token"
    with pytest.raises(ValueError, match=words):
        load_tokenizer(path)


@pytest.mark.parametrize("write", [write_llama2c_vocab, write_gguf_vocab], ids=["llama2c", "gguf"])
def test_long_token_is_rejected(tmp_path, write):
    """Splitting a token of length L costs O(L^2): 16 tokens of 64 KiB took 8 s."""
    path = write(tmp_path / "vocab.bin", ["a", "b" * (MAX_TOKEN_LENGTH + 1)])
    words = f"{re.escape(str(path))}: token 4 .* limit of {MAX_TOKEN_LENGTH}"
    with pytest.raises(ValueError, match=words):
        load_tokenizer(path)


@pytest.mark.parametrize("write", [write_llama2c_vocab, write_gguf_vocab], ids=["llama2c", "gguf"])
def test_tokens_at_the_limits_load(tmp_path, write):
    tokens = ["a", "b" * MAX_TOKEN_LENGTH, *CHAIN[1:20]]  # ids 3, 4, then "aa" = 5, "aaa" = 6, ...
    tok = load_tokenizer(write(tmp_path / "vocab.bin", tokens))
    assert tok.encode("aaaa", add_bos=False) == [0, 7]  # the dummy-prefix space is <unk> here


def test_regex_that_gives_up_is_a_value_error(tmp_path):
    """A catastrophic-backtracking Split regex: Oniguruma gives up, `tokenizers` panics."""
    hostile = {"type": "Split", "pattern": {"Regex": "(\\w+\\s?)*$"}, "behavior": "Isolated",
               "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    folder = write_tokenizer_json(tmp_path, pre_tokenizer={"type": "Sequence",
                                                           "pretokenizers": [hostile, byte_level]})
    tok = load_tokenizer(folder)
    assert tok.encode("ab!", add_bos=False) == [256, 0]
    words = f"{re.escape(str(folder))}: the tokenizer failed on this input .*retry-limit"
    with pytest.raises(ValueError, match=words):
        tok.encode("ab" * 50 + "!")
