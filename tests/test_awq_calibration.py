"""Calibration windows from text (seeded), the too-little-text error, and data-free sampling."""

import dataclasses
import re

import pytest
import torch
from test_awq_search import tiny_llama

from awq_ref.awq.calibration import calibration_tokens, random_windows, sample_from_model


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def test_windows_are_seeded_and_inside_the_stream():
    stream = torch.arange(1000)
    a, b = random_windows(stream, 16, 50, seed=0), random_windows(stream, 16, 50, seed=0)
    assert a.shape == (16, 50) and torch.equal(a, b)
    assert not torch.equal(a, random_windows(stream, 16, 50, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 49, dtype=torch.int64))  # contiguous
    assert int(a.max()) < 1000


def test_too_little_text_says_how_many_tokens(tmp_path):
    with pytest.raises(ValueError, match=r"has 11 tokens; one window needs 512"):
        calibration_tokens(ByteTokenizer(), ["hello world"])


def test_a_file_name_given_as_text_is_pointed_out(tmp_path):
    """In a list, a str is text: the name of an existing file there is read as its own few
    tokens. Too few tokens then say so, and which entry looks like a file; texts that are no
    file names (long, multi-line, or naming nothing) are not suspected."""
    path = tmp_path / "a.txt"
    path.write_text("one two three\n" * 40)
    named = re.escape(f"['{path}']")
    with pytest.raises(ValueError, match=rf"from 1 file\(s\) {named} and 1 text\(s\)\); "
                                         rf"{named} in the list was read as text, not as a "
                                         rf"file: in a list, give files as pathlib.Path"):
        calibration_tokens(ByteTokenizer(), [path, str(path)], n=1, seqlen=4096)
    for text in ("short text", f"{path}\n", str(tmp_path / "missing.txt")):
        with pytest.raises(ValueError) as err:
            calibration_tokens(ByteTokenizer(), [text], n=1, seqlen=4096)
        assert "read as text" not in str(err.value)


def test_the_defaults_are_the_protocols():
    """PROTOCOL.md's calibration: 128 windows of 512 tokens at random starts, seed 0."""
    text = "".join(chr(32 + i % 90) for i in range(5000))
    windows = calibration_tokens(ByteTokenizer(), [text])
    assert windows.shape == (128, 512)
    assert torch.equal(windows, random_windows(torch.tensor(list(text.encode())), 128, 512, 0))


def test_one_window_of_one_token_is_enough():
    assert calibration_tokens(ByteTokenizer(), ["x"], n=1, seqlen=1).tolist() == [[ord("x")]]


def test_files_and_strings(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one two three\r\n" * 40)
    from_file = calibration_tokens(ByteTokenizer(), path, n=4, seqlen=64)
    from_text = calibration_tokens(ByteTokenizer(), ["one two three\n" * 40], n=4, seqlen=64)
    assert torch.equal(from_file, calibration_tokens(ByteTokenizer(), str(path), n=4, seqlen=64))
    assert torch.equal(from_file, from_text)
    with pytest.raises(ValueError, match="not found"):
        calibration_tokens(ByteTokenizer(), [tmp_path / "missing.txt"])


def test_data_free_windows_start_with_bos_and_repeat():
    model = tiny_llama()
    a = sample_from_model(model, n=3, seqlen=12, seed=0, batch=2)
    assert a.shape == (3, 12) and (a[:, 0] == 1).all()
    assert torch.equal(a, sample_from_model(model, n=3, seqlen=12, seed=0, batch=2))


@pytest.mark.parametrize("bos, start", [(5, 5), (None, 1)])
def test_data_free_windows_are_the_models_own_continuations(bos, start):
    """Each window starts with the config's BOS (1 when it names none) and every later token,
    the last one too, is sampled from softmax(logits / temperature): near temperature 0, the
    model's greedy continuation, the same in every window."""
    model = tiny_llama()
    model.config = dataclasses.replace(model.config, bos_token_id=bos)
    windows = sample_from_model(model, n=3, seqlen=6, seed=0, batch=2, temperature=1e-4)
    greedy = [start]
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    assert windows.tolist() == [greedy] * 3


def test_data_free_cache_holds_only_the_tokens_fed(monkeypatch):
    """The window's last token is sampled, never fed back: seqlen - 1 cache slots."""
    model = tiny_llama()
    lengths, new_cache = [], model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, n: lengths.append(n) or new_cache(b, n))
    sample_from_model(model, n=3, seqlen=12, seed=0, batch=2)
    assert lengths == [11, 11]


def test_tinystories_protocol_windows(shared_data):
    from awq_ref.loaders import load_tokenizer

    tok = load_tokenizer(shared_data / "stories260K" / "stories260K.bin")
    path = shared_data / "text" / "tinystories" / "tinystories_val_prefix.txt"
    w = calibration_tokens(tok, path, n=128, seqlen=512, seed=0)
    assert w.shape == (128, 512) and torch.equal(w, calibration_tokens(tok, path, 128, 512, 0))


def test_every_window_start_is_drawn():
    """Starts 0 .. len - seqlen, the last included: a stream of exactly one window gives it."""
    stream = torch.arange(10)
    assert torch.equal(random_windows(stream, 3, 10), stream.repeat(3, 1))
    starts = set(random_windows(torch.arange(12), 200, 10)[:, 0].tolist())
    assert starts == {0, 1, 2}


def test_texts_are_joined_by_blank_lines():
    """PROTOCOL.md: the texts joined by blank lines, then tokenized once as one stream."""
    got = calibration_tokens(ByteTokenizer(), ["ab", "cd"], n=2, seqlen=6)
    assert bytes(got[0].tolist()) == b"ab\n\ncd" and torch.equal(got[0], got[1])
