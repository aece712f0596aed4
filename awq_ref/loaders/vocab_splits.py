"""Every split of a vocabulary entry into two entries: the merges that llama2.c and SentencePiece
vocabularies (GGUF "llama") leave implicit, rebuilt for the `tokenizers` BPE.

A hostile vocabulary makes this blow up: "a", "aa", ..., "a" * N has ~N^2/2 splits holding
~N^3/6 characters, and looking up every split of one token of length L costs O(L^2). Both the
token length and the text the merges hold are capped, so the work stays linear in the file.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator

# the longest vocabulary entry, in characters; real pieces are under ~50, and splitting one
# costs O(length^2)
MAX_TOKEN_LENGTH = 1024
MERGE_CHARS_PER_TOKEN = 256  # text the merges may hold per vocabulary entry; real ones need < ~20


def vocab_splits(pieces: Iterable[tuple[int, str]], vocab: Container[str], n_tokens: int,
                 source: str) -> Iterator[tuple[int, str, str]]:
    """(id, left, right) for each (id, piece) and each split piece == left + right with both
    halves in `vocab`, leftmost split first. ValueError naming `source` for a piece longer than
    MAX_TOKEN_LENGTH, or once the splits hold over MERGE_CHARS_PER_TOKEN * n_tokens characters."""
    budget = MERGE_CHARS_PER_TOKEN * n_tokens
    for i, piece in pieces:
        if len(piece) > MAX_TOKEN_LENGTH:
            raise ValueError(f"{source}: token {i} is {len(piece)} characters long, over the "
                             f"limit of {MAX_TOKEN_LENGTH}; not a real vocabulary")
        for k in range(1, len(piece)):
            left = piece[:k]
            if left in vocab and (right := piece[k:]) in vocab:
                budget -= len(piece)
                if budget < 0:
                    raise ValueError(
                        f"{source}: the BPE merges (splits of a token into two tokens) hold over "
                        f"{MERGE_CHARS_PER_TOKEN} characters per token, the limit; not a real "
                        "vocabulary (a chain like 'a', 'aa', 'aaa', ...?)")
                yield i, left, right
