"""llama2.c's binary tokenizer (tok512.bin, tokenizer.bin).

File: int32 max_token_length, then per token: float32 score, int32 byte length, bytes (no count;
the tokens run to the end of the file). Ids 0/1/2 are <unk>, <s>, </s>; byte-fallback tokens are
spelled "<0x00>".."<0xFF>"; a leading space is a real space (SentencePiece's U+2581 replaced).

Encoding (llama2.c `encode`): prepend a dummy " " when the text is not empty, look up each UTF-8
character (unknown ones become their byte tokens), then repeatedly merge the adjacent pair whose
concatenation is the vocabulary entry with the highest score, the leftmost on ties. Ranking the
merges by that score gives the same result in `tokenizers`' BPE, which does it in O(n log n).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

from awq_ref.loaders.vocab_splits import vocab_splits

SPECIAL_IDS = (0, 1, 2)  # <unk>, <s>, </s>
BOS_ID, EOS_ID = 1, 2
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def parse_llama2c_vocab(data: bytes, source: str) -> tuple[int, list[bytes], list[float]]:
    """(max_token_length, tokens, scores) from the file's bytes, every length checked."""
    if len(data) < 4:
        raise ValueError(f"{source}: too short for a llama2.c tokenizer ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise ValueError(f"{source}: max_token_length {max_len} is not plausible; "
                         f"not a llama2.c tokenizer?")
    tokens, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError(f"{source}: truncated at token {len(tokens)} (offset {off})")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 <= n <= max_len or off + n > len(data):
            raise ValueError(f"{source}: truncated or corrupt: token {len(tokens)} claims {n} "
                             f"bytes at offset {off} (max_token_length {max_len}, file size "
                             f"{len(data)})")
        tokens.append(data[off:off + n])
        scores.append(score)
        off += n
    if len(tokens) <= EOS_ID:
        raise ValueError(f"{source}: only {len(tokens)} tokens; expected <unk>, <s>, </s> and more")
    return max_len, tokens, scores


class Llama2cBackend:
    """Backend for `awq_ref.tokenizer.Tokenizer` over a llama2.c vocabulary."""

    file_name = "tokenizer.bin"

    def __init__(self, data: bytes, source: str):
        self.data = data
        _, self.tokens, self.scores = parse_llama2c_vocab(data, source)
        self.ids = {}
        for i, t in enumerate(self.tokens):
            self.ids.setdefault(t, i)  # llama2.c's binary search finds one of equal strings
        self.tk = self._build_bpe(source)

    def _build_bpe(self, source: str):
        """A `tokenizers` BPE whose merge ranks follow the vocabulary scores (best first)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        texts = [t.decode("utf-8", errors="replace") for t in self.tokens]
        vocab = {}
        for i, t in enumerate(texts):
            vocab.setdefault(t, i)
        pieces = [(i, t) for i, t in enumerate(texts)
                  if i not in SPECIAL_IDS and not _BYTE_TOKEN.fullmatch(self.tokens[i])
                  and vocab[t] == i]
        splits = vocab_splits(pieces, vocab, len(texts), source)
        merges = sorted((-self.scores[i], i, len(a), a, b)
                        for i, a, b in splits)  # best score first
        bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                         unk_token=texts[0], byte_fallback=True, fuse_unk=False)
        return HFTokenizer(bpe)  # no normalizer, no pre-tokenizer: the whole text is one word

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(" " + text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """Byte tokens become their byte; the dummy-prefix space of the first piece is dropped;
        <unk>, <s>, </s> are written as such unless skipped."""
        out, first = bytearray(), True
        for i in ids:
            if i in SPECIAL_IDS:
                out += b"" if skip_special_tokens else self.tokens[i].strip()
                continue
            piece = self.tokens[i]
            m = _BYTE_TOKEN.fullmatch(piece)
            piece = bytes([int(m.group(1), 16)]) if m else piece
            if first and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            first = False
        return out.decode("utf-8", errors="replace")

    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token.encode("utf-8"))

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens[token_id].decode("utf-8", errors="replace").strip()

    def save(self, path: Path) -> None:
        path.write_bytes(self.data)


def read_llama2c_tokenizer(path: str | Path) -> Llama2cBackend:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read tokenizer file ({e})") from e
    return Llama2cBackend(data, str(path))
