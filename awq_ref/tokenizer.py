"""Tokenizer: text <-> token ids with the model's own BOS/EOS conventions, over three backends.

Backends: a `tokenizers` Tokenizer (tokenizer.json, and everything we build from GGUF metadata),
a SentencePiece model (tokenizer.model), and llama2.c's binary vocabulary (tokenizer.bin, see
`awq_ref.loaders.llama2c_tokenizer`). `save_pretrained` writes back an HF folder's own tokenizer
files, or else the backend's file plus a tokenizer_config.json built for transformers and vLLM
to read the same way, so `awq_ref.loaders.load_tokenizer(folder)` gives the same tokenizer back.

The chat template (a Jinja text that chat front ends such as vLLM's and transformers'
`apply_chat_template` render; GGUF's `tokenizer.chat_template`, HF's tokenizer_config.json
"chat_template", chat_template.jinja and additional_chat_templates/NAME.jinja) is carried from
the source to the saved folder unread:
without it an instruct checkpoint cannot be served as a chat model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from awq_ref.files import atomic_write, atomic_write_text, parse_json

CONFIG_FILE = "tokenizer_config.json"
# An HF tokenizer folder's files, which a tokenizer read from such a folder writes back verbatim
# (see Tokenizer.save_pretrained); generation_config.json among them, whose EOS ids the
# tokenizer reads too (special_ids_from_folder), so a saved checkpoint stops where the source did.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", CONFIG_FILE, "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json",
                      "generation_config.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers 5's named templates, NAME.jinja


class Backend(Protocol):
    """What the Tokenizer needs from a backend; none of these add BOS/EOS."""

    file_name: str  # the file save() writes inside a folder

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def vocab_size(self) -> int: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def save(self, path: Path) -> None: ...


# A chat template as HF's tokenizer_config.json holds one: a Jinja text, or named texts
# [{"name": "default", "template": ...}, {"name": "tool_use", ...}]; None when there is none.
ChatTemplate = str | list[dict[str, str]] | None


def check_chat_template(value: Any, source: str) -> ChatTemplate:
    """`value` if it is a ChatTemplate (see there), else ValueError naming `source`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and set(t) == {"name", "template"}
            and all(isinstance(v, str) for v in t.values()) for t in value):
        return [dict(t) for t in value]
    raise ValueError(f"{source}: chat_template must be a string or a non-empty list of "
                     f"{{\"name\": ..., \"template\": ...}} strings, got {str(value)[:80]!r}")


def tokenizer_file_names(folder: Path) -> list[str]:
    """The HF_TOKENIZER_FILES in `folder`, then its named chat templates (transformers 5 writes
    each as additional_chat_templates/NAME.jinja), as paths relative to `folder`."""
    names = [f for f in HF_TOKENIZER_FILES if (folder / f).is_file()]
    extra = folder / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            try:  # a file name that is not UTF-8 arrives with surrogate escapes
                f.name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{extra}: the chat template file {f.name!r} is not named in "
                                 "UTF-8") from None
            if f.is_file():
                names.append(f"{CHAT_TEMPLATE_DIR}/{f.name}")
    return names


def _template_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def chat_template_from_folder(folder: Path) -> ChatTemplate:
    """The folder's chat template(s) as transformers 5 reads them: the template files win
    (chat_template.jinja, the default, and additional_chat_templates/NAME.jinja); one default
    is a string, several are HF's list of named ones. Without files, tokenizer_config.json's
    "chat_template", else chat_template.json's; None without any."""
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = _template_text(folder / "chat_template.jinja")
    for name in tokenizer_file_names(folder):
        if name.startswith(CHAT_TEMPLATE_DIR + "/"):
            files[name[len(CHAT_TEMPLATE_DIR) + 1:].removesuffix(".jinja")] = \
                _template_text(folder / name)
    if list(files) == ["default"]:
        return files["default"]
    if files:
        return [{"name": n, "template": t} for n, t in files.items()]
    config = read_json(folder / CONFIG_FILE)
    if config.get("chat_template") is not None:
        return check_chat_template(config["chat_template"], str(folder / CONFIG_FILE))
    path = folder / "chat_template.json"
    return check_chat_template(read_json(path).get("chat_template"), str(path))


class Tokenizer:
    """encode/decode plus `bos_id`, `eos_ids` and whether the model expects a BOS first."""

    def __init__(self, backend: Backend, bos_id: int | None, eos_ids: Sequence[int],
                 add_bos: bool, source: str = "", chat_template: ChatTemplate = None):
        self.backend = backend
        self.files: dict[str, bytes] = {}  # an HF folder's files, written back as they were
        self.chat_template = check_chat_template(chat_template, source)
        self.source = source
        n = backend.vocab_size()
        for name, ids in (("bos", () if bos_id is None else (bos_id,)), ("eos", tuple(eos_ids))):
            if any(not _is_int(i) or not 0 <= i < n for i in ids):
                raise ValueError(f"{source}: {name} id(s) {ids} are not token ids of the "
                                 f"vocabulary of {n}")
        if not isinstance(add_bos, bool):
            raise ValueError(f"{source}: add_bos_token={add_bos!r} must be true or false")
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos=None follows the model's own default (`self.add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = guarded_call(self.source, self.backend.encode, text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. With skip_special_tokens, ids past the vocabulary are skipped too: a
        model whose embedding table is padded past its tokenizer (Qwen2.5: 151,936 rows for
        151,665 tokens) may sample them, and they hold no text. Otherwise they raise."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.vocab_size]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token id(s) {bad[:5]} outside the vocabulary of "
                             f"{self.vocab_size}")
        return guarded_call(self.source, self.backend.decode, ids, skip_special_tokens)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the tokenizer into `folder` (created if needed), each file atomically.

        Read from an HF folder: that folder's tokenizer files as they were (tokenizer_file_names:
        pad token, model_max_length, tokenizer class and all, which we do not model). Otherwise
        (GGUF, llama2.c, a bare file): the backend's file and a tokenizer_config.json built here."""
        folder = Path(folder)
        if self.files:
            for name, data in self.files.items():
                atomic_write(folder / name, lambda p, data=data: p.write_bytes(data))
            return
        save = self.backend.save
        if (self.add_bos and self.bos_id is not None and isinstance(self.backend, TokenizersBackend)
                and not guarded_call(self.source, self.backend.adds_bos, self.bos_id)):
            save = functools.partial(self.backend.save_adding_bos, bos_id=self.bos_id)
        atomic_write(folder / self.backend.file_name, save)
        token = self.backend.id_to_token
        config = {
            "bos_token": None if self.bos_id is None else token(self.bos_id),
            "eos_token": token(self.eos_ids[0]) if self.eos_ids else None,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token_id": self.bos_id,
            "eos_token_ids": list(self.eos_ids),
        }
        if isinstance(self.backend, TokenizersBackend):
            # tokenizer.json as it is (BOS included, see save_adding_bos): without a class named,
            # transformers 4.x builds the model type's (LlamaTokenizerFast), which appends an
            # "<unk>" the vocabulary lacks as one id past it (49152 for SmolLM2's 49152 tokens)
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / CONFIG_FILE,
                          json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return (f"Tokenizer({type(self.backend).__name__}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, add_bos={self.add_bos})")


class TokenizersBackend:
    """A `tokenizers.Tokenizer`; special tokens are never added by its post-processor here."""

    file_name = "tokenizer.json"

    def __init__(self, tk: Any):
        # Padding would append pad ids to every encode (a hostile length aborts the process in
        # Rust), truncation would silently shorten perplexity and calibration text: never wanted
        # here; `save` writes the file as it came (its pad token serves the checkpoint's users).
        self._as_loaded = tk.to_str(pretty=True) if tk.padding or tk.truncation else None
        tk.no_padding()
        tk.no_truncation()
        self.tk = tk
        # Highest id + 1, not the entry count: a vocabulary listing one string twice (GGUF
        # files may) has fewer entries than ids, and every id it can emit must count.
        self._size = max(tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tk.id_to_token(token_id)

    def save(self, path: Path) -> None:
        # Written here, not by tk.save: the library takes only paths that are valid UTF-8.
        path.write_text(self._as_loaded or self.tk.to_str(pretty=True), encoding="utf-8")

    def save_adding_bos(self, path: Path, bos_id: int) -> None:
        """`save`, with a post-processor that puts BOS first (after the file's own, if any).

        For a vocabulary whose model expects BOS (a SentencePiece-style GGUF vocabulary:
        Llama-2, Mistral) but whose file does not add it: readers that take tokenizer.json as it
        is (transformers 5.x's TokenizersBackend, hence vLLM) ignore tokenizer_config.json's
        add_bos_token and would encode every prompt without BOS. Our encode never runs the
        post-processor (add_special_tokens=False), so this changes nothing here."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        tk = HFTokenizer.from_str(self._as_loaded or self.tk.to_str())
        bos = self.tk.id_to_token(bos_id)
        template = processors.TemplateProcessing(single=f"{bos}:0 $A:0",
                                                 pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, bos_id)])
        own = tk.post_processor
        tk.post_processor = template if own is None else processors.Sequence([own, template])
        path.write_text(tk.to_str(pretty=True), encoding="utf-8")

    def adds_bos(self, bos_id: int | None) -> bool:
        """Whether the file's own post-processor puts BOS first (Llama-2/3 tokenizer.json do)."""
        ids = self.tk.encode("a", add_special_tokens=True).ids
        return bos_id is not None and bool(ids) and ids[0] == bos_id


class SentencePieceBackend:
    file_name = "tokenizer.model"

    def __init__(self, sp: Any):
        self.sp = sp

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # SentencePiece renders control tokens (BOS/EOS) as "" either way.
        return self.sp.decode(list(ids))

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id)

    def save(self, path: Path) -> None:
        path.write_bytes(self.sp.serialized_model_proto())


def load_tokenizers_file(path: Path) -> TokenizersBackend:
    """The file is read here, not by the library, which takes only paths that are valid UTF-8
    (a folder named in Latin-1, or any non-ASCII name under a non-UTF-8 locale, is not)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return TokenizersBackend(HFTokenizer.from_str(path.read_bytes().decode("utf-8")))
    except BaseException as e:
        if not is_error_or_rust_panic(e):
            raise
        raise ValueError(f"{path}: cannot read tokenizer.json ({type(e).__name__}: {e})") from e


def is_error_or_rust_panic(e: BaseException) -> bool:
    """Any Exception, or a Rust panic: pyo3's PanicException, what `tokenizers` raises on some
    malformed input, is a BaseException (so `except Exception` misses it) but no
    KeyboardInterrupt or SystemExit, which must pass. Callers wrap a call on file data with it."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def guarded_call(source: str, call: Callable[..., Any], *args: Any) -> Any:
    """call(*args) on a backend; a library error or Rust panic there (a regex in the file that
    gives up on this text, say) becomes a ValueError naming the tokenizer `source`."""
    try:
        return call(*args)
    except BaseException as e:
        if not is_error_or_rust_panic(e):
            raise
        raise ValueError(f"{source}: the tokenizer failed on this input "
                         f"({type(e).__name__}: {e})") from e


def load_sentencepiece_file(path: Path) -> SentencePieceBackend:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:  # the bytes read here: the library takes only paths that are valid UTF-8
        sp.LoadFromSerializedProto(path.read_bytes())
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read SentencePiece model ({e})") from e
    return SentencePieceBackend(sp)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    d = parse_json(path.read_bytes(), str(path))
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _token_id(backend: Backend, token: Any) -> int | None:
    """HF writes special tokens as a string or as {"content": string}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_ids(value: Any, source: Path) -> list[int]:
    """A token id or a list of them, as the JSON files write them; ValueError naming `source`."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{source}: token id(s) {value!r} must be non-negative integers")
    return ids


def special_ids_from_folder(folder: Path, backend: Backend, default_bos: int | None = None,
                            default_eos: Sequence[int] = ()
                            ) -> tuple[int | None, list[int], bool | None]:
    """(bos_id, eos_ids, add_bos or None when unstated). BOS: tokenizer_config.json's (with
    special_tokens_map.json's tokens over its own, as transformers reads a folder whose config
    has no added_tokens_decoder), else
    generation_config.json's, else config.json's, else default_bos. EOS: tokenizer_config's
    plus generation_config's; config.json's only if neither gives one; else default_eos."""
    files = {name: (folder / name, read_json(folder / name))
             for name in (CONFIG_FILE, "generation_config.json", "config.json")}
    tok_path, tok_cfg = files[CONFIG_FILE]
    if "added_tokens_decoder" not in tok_cfg:  # an older folder: as transformers reads one,
        # special_tokens_map.json's tokens replace tokenizer_config.json's
        tokens_map = read_json(folder / "special_tokens_map.json")
        tok_cfg = {**tok_cfg, **{k: tokens_map[k] for k in ("bos_token", "eos_token")
                                 if k in tokens_map}}
    bos = tok_cfg.get("bos_token_id", _token_id(backend, tok_cfg.get("bos_token")))
    bos_source = tok_path
    eos = (_as_ids(tok_cfg.get("eos_token_ids"), tok_path)
           or _as_ids(_token_id(backend, tok_cfg.get("eos_token")), tok_path))
    gen_path, gen_cfg = files["generation_config.json"]
    eos += _as_ids(gen_cfg.get("eos_token_id"), gen_path)
    for path, cfg in (files["generation_config.json"], files["config.json"]):
        if bos is None:
            bos, bos_source = cfg.get("bos_token_id"), path
        eos = eos or _as_ids(cfg.get("eos_token_id"), path)
    if bos is not None:
        _as_ids(bos, bos_source)  # checks its type
        if isinstance(bos, list):
            raise ValueError(f"{bos_source}: bos_token_id={bos!r} must be one token id")
    bos = default_bos if bos is None else bos
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(f"{tok_path}: add_bos_token={add_bos!r} must be true or false")
    return bos, eos or list(default_eos), add_bos


def tokenizer_from_file(path: Path, source: str | None = None) -> Tokenizer:
    """A tokenizer.json or SentencePiece .model file with the special-token files beside it
    (special_ids_from_folder), the same whether the file or its folder is named."""
    folder = path.parent
    if path.suffix == ".json":
        backend = load_tokenizers_file(path)
        bos, eos, add_bos = special_ids_from_folder(folder, backend)
        if add_bos is None:
            add_bos = guarded_call(str(path), backend.adds_bos, bos)
        return Tokenizer(backend, bos, eos, add_bos, source=source or str(path),
                         chat_template=chat_template_from_folder(folder))
    sp_backend = load_sentencepiece_file(path)
    sp = sp_backend.sp
    bos, eos, add_bos = special_ids_from_folder(
        folder, sp_backend, default_bos=sp.bos_id() if sp.bos_id() >= 0 else None,
        default_eos=[sp.eos_id()] if sp.eos_id() >= 0 else [])
    # Llama's SentencePiece convention: BOS first unless the config says otherwise.
    return Tokenizer(sp_backend, bos, eos, True if add_bos is None else add_bos,
                     source=source or str(path), chat_template=chat_template_from_folder(folder))


def tokenizer_from_folder(folder: Path) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model in `folder`, with its special-token files;
    it keeps the folder's tokenizer files (tokenizer_file_names) to save them back as they were."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            tok = tokenizer_from_file(folder / name, source=str(folder))
            tok.files = {f: (folder / f).read_bytes() for f in tokenizer_file_names(folder)}
            return tok
    raise ValueError(f"{folder}: no tokenizer.json, tokenizer.model or tokenizer.bin in this "
                     f"folder")
