"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, as a `tokenizers` BPE.

- `gpt2`: byte-level BPE with the file's merges; the pre-tokenizer (how text is split before
  merging) is chosen by `tokenizer.ggml.pre` (see `_pre_tokenizer`).
- `llama`: SentencePiece-style BPE with byte fallback; merges are rebuilt from the token scores
  (merge the pair whose joined token scores highest), a "\u2581" prefix marks word starts.

`gpt2` follows transformers' GGUF conversion (integrations/gguf), so token ids match it, except
for Llama-3's pre-tokenizers (LLAMA3_PRES), where it follows llama.cpp and Llama-3's own
tokenizer.json: a word that is a token is one token even when no merge reaches it
(`ignore_merges`), and BOS is added unless the file says otherwise (transformers' conversion
does neither). `llama` follows transformers too, except that text starting with a space gets its
dummy prefix anyway, as in SentencePiece and llama.cpp (transformers' Metaspace leaves it out).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from awq_ref.loaders.vocab_splits import vocab_splits
from awq_ref.tokenizer import ChatTemplate, Tokenizer, TokenizersBackend, is_error_or_rust_panic

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's LLAMA3 pre-tokenizer group
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str, source: str) -> Any:
    """The split a `tokenizer.ggml.pre` value names; ValueError for the ones we do not know."""
    from tokenizers import Regex, pre_tokenizers

    if pre in ("default", "gpt2"):  # GPT-2's own regex inside ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    if pre in LLAMA3_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT),
                                                             behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=False)])
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported "
                     "(supported: default, gpt2, smollm, llama-bpe, llama3)")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_level_bpe(meta: dict[str, Any], source: str) -> Any:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, token in enumerate(meta["tokenizer.ggml.tokens"]):
        if not set(token) <= alphabet:  # a token written in plain text: respell its bytes
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = i
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{source}: tokenizer.ggml.merges holds an entry without a space")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False, ignore_merges=pre in LLAMA3_PRES))
    tk.pre_tokenizer = _pre_tokenizer(pre, source)
    tk.decoder = decoders.ByteLevel()
    return tk


def merges_from_scores(tokens: list[str], scores: list[float], source: str
                       ) -> list[tuple[str, str]]:
    """Every split a + b of a token into two tokens, best joined score first (ties: longer left
    piece, then longer right piece, then the token listed first), as transformers'
    `generate_merges` orders them; ValueError past the limits of `vocab_splits`."""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores))  # a token listed twice keeps its last score (and last id)
    merges = [(a, b, score[a + b]) for _, a, b in
              vocab_splits(((vocab[t], t) for t in score), vocab, len(tokens), source)]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sentencepiece_bpe(meta: dict[str, Any], source: str) -> Any:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.scores missing or not one per token")
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                merges=merges_from_scores(tokens, scores, source),
                                unk_token=tokens[unk],
                                fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Spaces become U+2581 and, like SentencePiece and llama.cpp, every text piece gets one in
    # front, even one that starts with a space (HF's Metaspace would skip it there).
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


def _add_special_tokens(tk: Any, meta: dict[str, Any], byte_level: bool) -> None:
    """Control tokens (like <|im_start|>) become special, user-defined ones plain added tokens,
    so both are matched whole in the text instead of being cut into pieces."""
    from tokenizers import AddedToken

    alphabet = set(bytes_to_unicode().values())
    types = meta.get("tokenizer.ggml.token_type") or []
    pairs = list(zip(meta["tokenizer.ggml.tokens"], types))
    # A byte-level "control" token outside the byte alphabet is a llama.cpp mislabel: skip it.
    control = [AddedToken(t, normalized=False, special=True) for t, kind in pairs
               if kind == CONTROL and (not byte_level or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, kind in pairs
            if kind == USER_DEFINED and tk.token_to_id(t) is not None]
    tk.add_special_tokens(control)
    tk.add_tokens(user)


def _check_metadata(meta: dict[str, Any], source: str) -> None:
    """Types and ranges of the `tokenizer.ggml.*` values we use, before any of them is used."""
    lists = {"tokens": (str, "strings"), "merges": (str, "strings"),
             "scores": ((int, float), "numbers"), "token_type": (int, "integers")}
    for key, (kind, name) in lists.items():
        value = meta.get(f"tokenizer.ggml.{key}", [])
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                  for v in value):
            raise ValueError(f"{source}: tokenizer.ggml.{key} must be a list of {name}")
    n = len(meta.get("tokenizer.ggml.tokens", []))
    if n == 0:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "unknown_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}", 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise ValueError(f"{source}: tokenizer.ggml.{key}={value!r} is not a token id (< {n})")
    for key in ("add_bos_token", "add_space_prefix"):
        if not isinstance(meta.get(f"tokenizer.ggml.{key}", True), bool):
            raise ValueError(f"{source}: tokenizer.ggml.{key} must be a boolean")
    if not isinstance(meta.get("tokenizer.ggml.pre", ""), str):
        raise ValueError(f"{source}: tokenizer.ggml.pre must be a string")


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    _check_metadata(meta, source)
    try:
        if kind == "gpt2":
            tk = byte_level_bpe(meta, source)
        elif kind == "llama":
            tk = sentencepiece_bpe(meta, source)
        else:
            raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                             f"(gpt2, llama)")
        _add_special_tokens(tk, meta, byte_level=kind == "gpt2")
    except BaseException as e:
        if not is_error_or_rust_panic(e) or isinstance(e, ValueError) and source in str(e):
            raise
        raise ValueError(f"{source}: the GGUF vocabulary does not form a tokenizer ({e})") from e
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in meta]
    # llama.cpp adds BOS to a SentencePiece vocabulary and to Llama-3's unless the file says
    # otherwise.
    usual = kind == "llama" or meta.get("tokenizer.ggml.pre") in LLAMA3_PRES
    add_bos = meta.get("tokenizer.ggml.add_bos_token", usual)
    return Tokenizer(TokenizersBackend(tk), meta.get("tokenizer.ggml.bos_token_id"), eos,
                     add_bos, source=source, chat_template=gguf_chat_template(meta))


def gguf_chat_template(meta: dict[str, Any]) -> ChatTemplate:
    """`tokenizer.chat_template`, with any named `tokenizer.chat_template.<name>` beside it as
    HF's list of named templates (the unnamed one as "default"); None when the file has none."""
    prefix = "tokenizer.chat_template"
    named = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
    default = meta.get(prefix)
    if not named:
        return default
    templates = ([{"name": "default", "template": default}] if default is not None else [])
    return templates + [{"name": n, "template": t} for n, t in sorted(named.items())]


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    from awq_ref.loaders.gguf_file import open_gguf

    return tokenizer_from_gguf_metadata(open_gguf(path).metadata, str(path))
