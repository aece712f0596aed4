"""llama2.c files at their edges: a versioned export named as such, every implausible header
field refused by name before the size is compared, and the special tokens skipped on decode."""

import struct

import pytest

from awq_ref.loaders import load_model, load_tokenizer

GOOD = {"dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
        "vocab_size": 4, "seq_len": 4}  # the header's 7 int32 in file order


def write(path, **fields):
    path.write_bytes(struct.pack("<7i", *{**GOOD, **fields}.values()) + bytes(4096))
    return path


def test_a_versioned_export_is_named(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("<II", 0x616B3432, 2) + bytes(256))
    with pytest.raises(ValueError, match="a versioned llama2.c export .magic 'ak42'."):
        load_model(path)


@pytest.mark.parametrize("fields", [
    {"dim": -8}, {"n_layers": 0}, {"seq_len": -1}, {"vocab_size": 0},
    {"dim": 9}, {"n_kv_heads": 3, "n_heads": 2}, {"dim": 6, "n_heads": 2},  # head_dim 3: odd
], ids=["negative-dim", "no-layers", "negative-seq", "no-vocab", "dim-not-heads",
        "heads-not-kv", "odd-head-dim"])
def test_implausible_headers_are_refused_before_the_size(tmp_path, fields):
    with pytest.raises(ValueError, match="not a llama2.c checkpoint: implausible header"):
        load_model(write(tmp_path / "m.bin", **fields))


def test_special_tokens_are_bos_1_eos_2_and_skipped_on_decode(stories_dir):
    """llama2.c's ids: <s> 1 first, </s> 2 to stop; <unk> (0), <s> and </s> are written as
    such, or dropped with skip_special_tokens; no other id is."""
    tok = load_tokenizer(stories_dir / "tok512.bin")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    ids = tok.encode("Hello", add_bos=False)
    assert tok.encode("Hello") == [1, *ids]
    assert tok.decode([1, 0, *ids, 2], skip_special_tokens=True) == "Hello"
    assert tok.decode([0, 1, 2]) == "<unk><s></s>"
    assert tok.decode([3], skip_special_tokens=True) == tok.decode([3]) != ""
    config = load_model(stories_dir / "stories260K.bin").config
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def vocab(max_len: int, tokens: list[bytes]) -> bytes:
    return struct.pack("<i", max_len) + b"".join(struct.pack("<fi", -1.0, len(t)) + t
                                                 for t in tokens)


SPECIALS = [b"<unk>", b"<s>", b"</s>"]


@pytest.mark.parametrize("max_len", [5, 1 << 16])
def test_tokenizer_lengths_up_to_their_limits_are_read(max_len):
    """max_token_length from 1 to 2**16; a token of exactly that length; an empty token as the
    file's last record."""
    from awq_ref.loaders.llama2c_tokenizer import parse_llama2c_vocab

    tokens = [*SPECIALS, b"x" * 5, b""]
    assert parse_llama2c_vocab(vocab(max_len, tokens), "t") == (max_len, tokens, [-1.0] * 5)
    assert parse_llama2c_vocab(vocab(1, [b"", b"a", b"b"]), "t")[0] == 1


@pytest.mark.parametrize("data, message", [
    (b"\x05\x00\x00", "too short for a llama2.c tokenizer .3 bytes."),
    (vocab(5, []), "only 0 tokens"),
    (vocab(5, SPECIALS[:2]), "only 2 tokens; expected <unk>, <s>, </s>"),
    (vocab(0, SPECIALS), "max_token_length 0 is not plausible"),
    (vocab((1 << 16) + 1, SPECIALS), "max_token_length 65537 is not plausible"),
    (vocab(5, SPECIALS) + bytes(7), r"truncated at token 3 \(offset 40\)"),
    (vocab(5, [*SPECIALS, b"x" * 6]), "token 3 claims 6 bytes"),
], ids=["3-bytes", "no-tokens", "two-tokens", "max-0", "max-65537", "record-cut", "token-past-max"])
def test_tokenizer_files_refused_at_each_edge(data, message):
    from awq_ref.loaders.llama2c_tokenizer import parse_llama2c_vocab

    with pytest.raises(ValueError, match=f"t: {message}"):
        parse_llama2c_vocab(data, "t")


def test_token_to_id_finds_the_first_of_equal_strings(tmp_path):
    tokens = [*SPECIALS, b"a", b"b", b"a"]
    (tmp_path / "tokenizer.bin").write_bytes(vocab(5, tokens))
    backend = load_tokenizer(tmp_path / "tokenizer.bin").backend
    assert [backend.token_to_id(t) for t in ("<s>", "a", "b", "c")] == [1, 3, 4, None]
