"""Hostile input: every loader, fed truncated, corrupt or adversarial files, either gives a
well-formed model / tokenizer or raises a ValueError naming the file; never another exception,
a hang or a huge allocation.

Valid tiny files are written once (HF folder, GGUF with either tokenizer kind, llama2.c model
and tokenizer, tokenizer.json folder, SentencePiece model, quantized checkpoint), and hypothesis
mutates them: truncation, byte flips, header fields overwritten with adversarial integers, JSON
values replaced by wrong types / NaN / huge numbers, tensors re-saved with wrong dtype or shape.

Every load runs in one worker subprocess whose address space is capped (RLIMIT_AS, baseline +
WORKER_SLACK) and whose peak RSS is watched, with a per-load timeout: a MemoryError anywhere in
the exception chain, RSS growth past RSS_LIMIT_MB, a timeout or a dead worker fail the case.
Examples per target: AWQ_FUZZ_EXAMPLES (default 100, about 30 s on 2 cores; 1000 locally takes
about 3 min). Deterministic (derandomize=True) unless AWQ_FUZZ_RANDOM=1 asks for fresh examples.
Deterministic regression tests for each bug found are at the end.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import resource
import select
import shutil
import struct
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
gguf = pytest.importorskip("gguf")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("AWQ_FUZZ_EXAMPLES", "100"))
CALL_TIMEOUT_S = 20.0  # one load of a tiny file takes milliseconds; this means a hang
WORKER_SLACK = 1 << 30  # address space a load may add to the worker's baseline
RSS_LIMIT_MB = 300  # peak RSS growth of one load of a file of a few KB
CASE = "fuzzcase"  # the case folder's name: every ValueError must name the file or folder
FUZZ = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("AWQ_FUZZ_RANDOM"), deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


# ---------------------------------------------------------------- worker (subprocess) side

def _check_model(model) -> None:
    from awq_ref.loaders.state_dict import expected_shapes
    from awq_ref.model import Llama

    assert isinstance(model, Llama), type(model)
    cfg = model.config
    state = model.state_dict()
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".weight") and name in state and state[name].dtype != torch.int32:
            assert tuple(state[name].shape) == shape, (name, state[name].shape, shape)
    assert all(t.device.type == "cpu" for t in state.values())
    with torch.no_grad():
        out = model(torch.tensor([[0, cfg.vocab_size - 1]]))  # (B, T)
    assert out.shape == (1, 2, cfg.vocab_size), out.shape


def _check_tokenizer(tok) -> None:
    ids = tok.encode("Hello world, 123 \u00e9\u4e16!")
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids), ids
    assert isinstance(tok.decode(ids), str)
    assert isinstance(tok.decode(ids, skip_special_tokens=True), str)


def _load(kind: str, path: Path) -> None:
    from awq_ref.loaders import load_model, load_tokenizer

    if kind == "model":
        _check_model(load_model(path))
    else:
        _check_tokenizer(load_tokenizer(path))


def _memory_failure(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _run_case(kind: str, path: str) -> tuple[str, str]:
    """(outcome, detail): outcome "ok" or "ValueError" pass; anything else is a failure."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        _load(kind, Path(path))
        outcome = ("ok", "")
    except ValueError as e:
        if _memory_failure(e):
            return "allocation", traceback.format_exc()
        if CASE not in str(e):
            return "unnamed ValueError", traceback.format_exc()
        outcome = ("ValueError", str(e)[:600])
    except BaseException as e:  # noqa: BLE001 (reporting any other exception is the point)
        what = "allocation" if _memory_failure(e) else f"crash ({type(e).__name__})"
        return what, traceback.format_exc()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    if grown > RSS_LIMIT_MB:
        return "allocation", f"peak RSS grew by {grown} MB"
    return outcome


def _worker_main() -> None:
    """Serve (kind, path) requests from stdin, pickled answers on the original stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    torch.set_num_threads(1)
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401

    import awq_ref.loaders  # noqa: F401  (imports before the baseline is measured)

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + WORKER_SLACK, resource.RLIM_INFINITY))
    while True:
        try:
            kind, path = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        answer = ("ok", "") if kind == "ping" else _run_case(kind, path)
        pickle.dump(answer, out)
        out.flush()


# ---------------------------------------------------------------- test (pytest) side

class Worker:
    """One long-lived worker; restarted after a hang or a death."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.call("ping", "", timeout=120) == ("ok", ""), "worker did not start"

    def call(self, kind: str, path: str | Path, timeout: float = CALL_TIMEOUT_S) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        pickle.dump((kind, str(path)), self.proc.stdin)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "hang", f"no answer in {timeout} s"
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            rc = self.proc.wait()
            self.proc = None
            return "worker died", f"exit status {rc}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if COUNTS:
        lines = [f"  {target}: {n}" for target, n in sorted(COUNTS.items())]
        print("\nhostile-input cases per target/outcome:\n" + "\n".join(lines))


def expect_clean(worker: Worker, target: str, kind: str, path: Path) -> None:
    outcome, detail = worker.call(kind, path)
    COUNTS[f"{target} {outcome}"] += 1
    if outcome not in ("ok", "ValueError"):
        pytest.fail(f"{target}: {kind} load of {path}: {outcome}\n{detail}")


# ---------------------------------------------------------------- valid tiny files

def tiny_model(vocab: int, seed: int = 0):
    from awq_ref.config import LlamaConfig
    from awq_ref.model import Llama

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(cfg).eval()


def byte_level_tokens() -> tuple[list[str], list[str]]:
    from awq_ref.loaders.gguf_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["H e", "l l", "o r", "He ll", "\u0120 w"]
    return alphabet + [m.replace(" ", "") for m in merges], merges


def sentencepiece_tokens() -> tuple[list[str], list[float], list[int]]:
    pieces = ["\u2581", "e", "l", "o", "H", "w", "r", "d", "ll", "He", "\u2581w", "Hell"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def gguf_metadata(model, kind: str) -> dict[str, tuple[object, object]]:
    """key -> (value, GGUFValueType) of a GGUF holding `model` and a `kind` tokenizer."""
    t = gguf.GGUFValueType
    c = model.config
    meta = {
        "general.architecture": ("llama", t.STRING),
        "llama.context_length": (c.max_position_embeddings, t.UINT32),
        "llama.embedding_length": (c.hidden_size, t.UINT32),
        "llama.block_count": (c.num_hidden_layers, t.UINT32),
        "llama.feed_forward_length": (c.intermediate_size, t.UINT32),
        "llama.attention.head_count": (c.num_attention_heads, t.UINT32),
        "llama.attention.head_count_kv": (c.num_key_value_heads, t.UINT32),
        "llama.rope.freq_base": (c.rope_theta, t.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, t.FLOAT32),
        "llama.vocab_size": (c.vocab_size, t.UINT32),
        "tokenizer.ggml.model": (kind, t.STRING),
        "tokenizer.ggml.bos_token_id": (1, t.UINT32),
        "tokenizer.ggml.eos_token_id": (2, t.UINT32),
    }
    if kind == "gpt2":
        tokens, merges = byte_level_tokens()
        meta |= {"tokenizer.ggml.tokens": (tokens, t.ARRAY), "tokenizer.ggml.merges": (merges, t.ARRAY),
                 "tokenizer.ggml.pre": ("smollm", t.STRING),
                 "tokenizer.ggml.token_type": ([1] * len(tokens), t.ARRAY)}
    else:
        tokens, scores, types = sentencepiece_tokens()
        meta |= {"tokenizer.ggml.tokens": (tokens, t.ARRAY), "tokenizer.ggml.scores": (scores, t.ARRAY),
                 "tokenizer.ggml.token_type": (types, t.ARRAY),
                 "tokenizer.ggml.add_bos_token": (True, t.BOOL)}
    return meta


def write_gguf(path: Path, model, meta: dict, qtype: str = "F32") -> Path:
    from awq_ref.loaders.gguf_file import NAME_MAP
    from awq_ref.loaders.state_dict import half_to_interleaved

    to_gguf = {hf.format(n=i): g.format(n=i) for g, hf in NAME_MAP.items()
               for i in range(model.config.num_hidden_layers)}
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)  # it warns on every override
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    for name, tensor in model.state_dict().items():
        arr = tensor.detach()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = model.config.num_attention_heads if "q_proj" in name else model.config.num_key_value_heads
            arr = half_to_interleaved(arr, heads)
        arr = arr.numpy().astype(np.float32)
        if qtype == "F32" or arr.ndim == 1:
            w.add_tensor(to_gguf[name], arr)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(to_gguf[name], gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges = byte_level_tokens()
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "!", "eos_token": "\"", "add_bos_token": True, "eos_token_ids": [2]}))


def write_hf_folder(folder: Path, model) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def write_llama2c(path: Path, model) -> Path:
    from awq_ref.loaders.llama2c import HEADER
    from awq_ref.loaders.state_dict import half_to_interleaved

    c, layers = model.config, model.model.layers
    head = HEADER.pack(c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, -c.vocab_size,
                       c.max_position_embeddings)
    stack = lambda f: torch.stack([f(b) for b in layers])
    parts = [model.model.embed_tokens.weight, stack(lambda b: b.input_layernorm.weight),
             stack(lambda b: half_to_interleaved(b.self_attn.q_proj.weight, c.num_attention_heads)),
             stack(lambda b: half_to_interleaved(b.self_attn.k_proj.weight, c.num_key_value_heads)),
             stack(lambda b: b.self_attn.v_proj.weight), stack(lambda b: b.self_attn.o_proj.weight),
             stack(lambda b: b.post_attention_layernorm.weight), stack(lambda b: b.mlp.gate_proj.weight),
             stack(lambda b: b.mlp.down_proj.weight), stack(lambda b: b.mlp.up_proj.weight),
             model.model.norm.weight, torch.zeros(2 * c.max_position_embeddings * c.head_dim // 2),
             model.lm_head.weight]
    body = b"".join(p.detach().float().numpy().astype("<f4").tobytes() for p in parts)
    path.write_bytes(head + body)
    return path


def llama2c_tokenizer_bytes() -> bytes:
    tokens, scores, _ = sentencepiece_tokens()
    tokens = [t.replace("\u2581", " ").encode() for t in tokens]
    body = b"".join(struct.pack("<fi", s, len(t)) + t for t, s in zip(tokens, scores))
    return struct.pack("<i", max(len(t) for t in tokens)) + body


def sentencepiece_model_bytes() -> bytes:
    import io

    import sentencepiece as spm

    text = ["Hello world, hello there.", "The quick brown fox jumps over the lazy dog."] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=40,
                                   model_type="bpe", byte_fallback=False, minloglevel=2)
    return out.getvalue()


class Files(dict):
    """The base files; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<base files: {', '.join(self)}>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Files:
    """The valid files every target mutates (bytes / parsed objects)."""
    from awq_ref.api import quantize
    from awq_ref.quant.checkpoint import save_quantized

    root = tmp_path_factory.mktemp("hostile-base")
    gpt2_model = tiny_model(len(byte_level_tokens()[0]))
    sp_model = tiny_model(len(sentencepiece_tokens()[0]), seed=1)
    hf = write_hf_folder(root / "hf", gpt2_model)
    q = save_quantized(quantize(tiny_model(64, seed=2), group_size=32), root / "quant")
    return Files({
        "config": json.loads((hf / "config.json").read_text()),
        "safetensors": (hf / "model.safetensors").read_bytes(),
        "gguf_gpt2": write_gguf(root / "a.gguf", gpt2_model, gguf_metadata(gpt2_model, "gpt2")).read_bytes(),
        "gguf_llama": write_gguf(root / "b.gguf", sp_model, gguf_metadata(sp_model, "llama"),
                                 "Q8_0").read_bytes(),
        "gguf_model": sp_model,
        "llama2c": write_llama2c(root / "m.bin", sp_model).read_bytes(),
        "llama2c_tok": llama2c_tokenizer_bytes(),
        "spm": sentencepiece_model_bytes(),
        "quant_config": json.loads((q / "config.json").read_text()),
        "quant_tensors": load_file(str(q / "model.safetensors")),
        "quant_safetensors": (q / "model.safetensors").read_bytes(),
    })


@pytest.fixture
def case(tmp_path_factory):
    """A fresh, empty folder named CASE for each example (function scope is not per example)."""
    root = tmp_path_factory.mktemp("hostile")

    def fresh() -> Path:
        folder = root / CASE
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    yield fresh
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- mutations

INTERESTING = [0, 1, 2, 3, 7, 8, 12, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
NAN, INF = float("nan"), float("inf")
WEIRD_JSON = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**40, 2**63, 2**64, 10**30, 0.5, 1e308,
              -1e308, NAN, INF, -INF, "", "x", "llama", [], [0], [-1, 2**40], [[1]], {}, {"a": 1}]


def ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(INTERESTING), st.integers(-(2**63), 2**64 - 1))


def byte_edits(size: int, fields: list[tuple[int, int]] = (), hot: int | None = None):
    """Truncations, byte flips, and little-endian integers written over header fields (offset,
    width) or anywhere; `hot` biases offsets towards the first `hot` bytes (the header)."""
    hot = max(1, min(size, hot or size))
    where = st.one_of(st.integers(0, hot - 1), st.integers(0, size - 1))
    ops = [st.tuples(st.just("cut"), st.integers(0, size - 1)),
           st.tuples(st.just("flip"), where, st.integers(1, 255)),
           st.tuples(st.just("put"), st.tuples(where, st.sampled_from([1, 2, 4, 8])), ints())]
    if fields:
        field = st.sampled_from(fields)
        ops += [st.tuples(st.just("put"), field, ints())] * 2
    return st.lists(st.one_of(ops), min_size=1, max_size=4)


def apply_bytes(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, where, arg in ((*e, None) if len(e) == 2 else e for e in edits):
        if op == "cut":
            del b[where:]
        elif op == "flip" and where < len(b):
            b[where] ^= arg
        elif op == "put" and where[0] + where[1] <= len(b):
            off, width = where
            b[off:off + width] = (arg % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(b)


def json_paths(obj, depth: int = 3, prefix: tuple = (), per_level: int = 12) -> list[tuple]:
    items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj)) if isinstance(obj, list) else []
    paths = []
    for key, value in items[:per_level] if prefix else items:  # every top-level key
        paths.append((*prefix, key))
        if depth > 1:
            paths += json_paths(value, depth - 1, (*prefix, key), per_level)
    return paths


def json_edits(obj, extra=()):
    """Set a value somewhere (wrong types, NaN, inf, huge or negative numbers) or delete it."""
    paths = json_paths(obj)
    value = st.one_of(st.sampled_from([*WEIRD_JSON, *extra]), st.integers(), st.floats(),
                      st.text(max_size=4))
    return st.lists(st.one_of(st.tuples(st.just("set"), st.sampled_from(paths), value),
                              st.tuples(st.just("del"), st.sampled_from(paths), st.none())),
                    min_size=1, max_size=3)


def apply_json(obj, edits):
    obj = json.loads(json.dumps(obj))  # a deep copy
    for op, path, value in edits:
        parent = obj
        try:
            for key in path[:-1]:
                parent = parent[key]
            if op == "set":
                parent[path[-1]] = value
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or retyped this path
    return obj


def dump_json(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def safetensors_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_join(header: dict, body: bytes) -> bytes:
    h = dump_json(header)
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U64", "BOOL",
             "F8_E4M3", "Q4", "f32"]


def safetensors_cases(data: bytes):
    """Raw byte edits, or the JSON header edited (dtype, shape, data_offsets) and re-joined."""
    header, body = safetensors_split(data)
    hot = 8 + struct.unpack("<Q", data[:8])[0]
    structural = json_edits(header, extra=ST_DTYPES).map(lambda e: safetensors_join(apply_json(header, e), body))
    raw = byte_edits(len(data), [(0, 8)], hot).map(lambda e: apply_bytes(data, e))
    return st.one_of(structural, raw)


def gguf_fields(data: bytes, folder: Path) -> list[list[tuple[int, int]]]:
    """Per metadata entry / tensor info: (offset, width) of its integers (types, string
    lengths, array counts, dims, offsets) and numbers, for targeted overwrites."""
    path = folder / "fields.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    start = reader.data.ctypes.data
    groups = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        parts = [(p.ctypes.data - start, p.nbytes) for p in field.parts[:64] if p.nbytes in (1, 2, 4, 8)]
        groups.append(parts)
    del reader
    return [g for g in groups if g]


def gguf_cases(data: bytes, groups):
    hot = max(off + w for g in groups for off, w in g)
    fields = st.sampled_from(groups).flatmap(st.sampled_from)
    put = st.lists(st.tuples(st.just("put"), fields, ints()), min_size=1, max_size=3)
    return st.one_of(put, byte_edits(len(data), [(4, 4), (8, 8), (16, 8)], hot))


# ---------------------------------------------------------------- the fuzz targets

@FUZZ
@given(data=st.data())
def test_fuzz_hf_safetensors(worker, base, case, data):
    folder = case()
    (folder / "config.json").write_text(json.dumps(base["config"]))
    (folder / "model.safetensors").write_bytes(data.draw(safetensors_cases(base["safetensors"])))
    expect_clean(worker, "hf safetensors", "model", folder)


@FUZZ
@given(data=st.data())
def test_fuzz_hf_config(worker, base, case, data):
    folder = case()
    text = dump_json(base["config"])
    content = data.draw(st.one_of(
        json_edits(base["config"], extra=["LlamaForCausalLM", 64]).map(
            lambda e: dump_json(apply_json(base["config"], e))),
        byte_edits(len(text)).map(lambda e: apply_bytes(text, e))))
    (folder / "config.json").write_bytes(content)
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    expect_clean(worker, "hf config.json", "model", folder)


@pytest.mark.parametrize("which", ["gguf_gpt2", "gguf_llama"])
def test_fuzz_gguf_bytes(worker, base, case, tmp_path, which):
    groups = gguf_fields(base[which], tmp_path)

    @FUZZ
    @given(edits=gguf_cases(base[which], groups))
    def run(edits):
        path = case() / "m.gguf"
        path.write_bytes(apply_bytes(base[which], edits))
        expect_clean(worker, f"{which} bytes", "model", path)
        expect_clean(worker, f"{which} bytes", "tokenizer", path)

    run()


GGUF_KEYS = ["llama.rope.scaling.type", "llama.expert_count", "llama.attention.key_length",
             "llama.attention.value_length", "llama.rope.dimension_count", "general.alignment",
             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix",
             "tokenizer.ggml.eot_token_id", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
             "tokenizer.ggml.pre"]


def gguf_values():
    t = gguf.GGUFValueType
    small_floats = st.floats(width=32)
    return st.one_of(
        st.tuples(st.sampled_from(INTERESTING[:15]) | st.integers(0, 2**32 - 1), st.just(t.UINT32)),
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.just(t.INT32)),
        st.tuples(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1), st.just(t.UINT64)),
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.just(t.INT64)),
        st.tuples(small_floats, st.just(t.FLOAT32)), st.tuples(st.floats(), st.just(t.FLOAT64)),
        st.tuples(st.booleans(), st.just(t.BOOL)),
        st.tuples(st.text(max_size=8) | st.sampled_from(["llama", "gpt2", "none", "linear"]), st.just(t.STRING)),
        st.tuples(st.lists(st.text(max_size=4), min_size=1, max_size=6), st.just(t.ARRAY)),
        st.tuples(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=6), st.just(t.ARRAY)),
        st.tuples(st.lists(small_floats, min_size=1, max_size=6), st.just(t.ARRAY)))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fuzz_gguf_metadata(worker, base, case, kind):
    """Metadata values of the wrong type or out of range, written by gguf's own writer."""
    model = base["gguf_model"]
    meta = gguf_metadata(model, kind)
    keys = st.sampled_from(sorted(meta) + GGUF_KEYS)
    edits = st.lists(st.tuples(keys, st.one_of(gguf_values(), st.none())), min_size=1, max_size=3)

    @FUZZ
    @given(edits=edits)
    def run(edits):
        edited = dict(meta)
        for key, value in edits:
            if value is None:
                edited.pop(key, None)
            else:
                edited[key] = value
        edited.setdefault("general.architecture", meta["general.architecture"])
        path = write_gguf(case() / "m.gguf", model, edited)
        expect_clean(worker, f"gguf {kind} metadata", "model", path)
        expect_clean(worker, f"gguf {kind} metadata", "tokenizer", path)

    run()


@FUZZ
@given(data=st.data())
def test_fuzz_llama2c_model(worker, base, case, data):
    raw = base["llama2c"]
    header = [(4 * i, 4) for i in range(7)]
    path = case() / "model.bin"
    path.write_bytes(apply_bytes(raw, data.draw(byte_edits(len(raw), header, hot=28))))
    expect_clean(worker, "llama2.c model", "model", path)


@FUZZ
@given(data=st.data())
def test_fuzz_llama2c_tokenizer(worker, base, case, data):
    raw = base["llama2c_tok"]
    fields, off = [(0, 4)], 4
    while off < len(raw) and len(fields) < 40:  # (score, length) of the first tokens
        n = struct.unpack_from("<i", raw, off + 4)[0]
        fields += [(off, 4), (off + 4, 4)]
        off += 8 + n
    path = case() / "tok.bin"
    path.write_bytes(apply_bytes(raw, data.draw(byte_edits(len(raw), fields, hot=off))))
    expect_clean(worker, "llama2.c tokenizer", "tokenizer", path)


@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_folder(worker, base, case, data):
    """tokenizer.json, tokenizer_config.json and config.json beside it, one of them mutated."""
    folder = case()
    write_hf_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(base["config"]))
    name = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "config.json"]))
    obj = json.loads((folder / name).read_text())
    text = dump_json(obj)
    content = data.draw(st.one_of(
        json_edits(obj, extra=["<s>", "!", {"content": "!"}, [2, 2**40]]).map(
            lambda e: dump_json(apply_json(obj, e))),
        byte_edits(len(text)).map(lambda e: apply_bytes(text, e))))
    (folder / name).write_bytes(content)
    expect_clean(worker, f"tokenizer folder {name}", "tokenizer", folder)


@FUZZ
@given(data=st.data())
def test_fuzz_sentencepiece(worker, base, case, data):
    raw = base["spm"]
    path = case() / "tokenizer.model"
    path.write_bytes(apply_bytes(raw, data.draw(byte_edits(len(raw), hot=256))))
    expect_clean(worker, "sentencepiece", "tokenizer", path)


Q_EXTRA = ["awq", "gemm", "GEMM", "gemv", 4, 8, 32, -1, 64, 128, ["lm_head"], ["q_proj"]]
Q_DTYPES = [torch.int32, torch.int16, torch.int64, torch.uint8, torch.float16, torch.float32,
            torch.bfloat16, torch.bool]


def retyped(t: torch.Tensor, dtype: torch.dtype, shape_op: tuple) -> torch.Tensor:
    """A tensor like `t` with another dtype and/or a changed shape (small sizes only)."""
    shape = list(t.shape)
    op, i, delta = shape_op
    if op == "drop" and shape:
        shape.pop(i % len(shape))
    elif op == "add":
        shape.insert(i % (len(shape) + 1), 1 + abs(delta))
    elif op == "resize" and shape:
        shape[i % len(shape)] = max(0, shape[i % len(shape)] + delta)
    return torch.zeros(shape).to(dtype)


def quant_tensor_cases(base: dict):
    tensors = base["quant_tensors"]
    names = sorted(tensors)
    packed = [n for n in names if n.endswith((".qweight", ".qzeros", ".scales"))]
    shape_op = st.tuples(st.sampled_from(["same", "drop", "add", "resize"]), st.integers(0, 3),
                         st.sampled_from([-8, -1, 1, 8, 64]))
    edit = st.one_of(
        st.tuples(st.sampled_from(packed) | st.sampled_from(names), st.sampled_from(Q_DTYPES), shape_op),
        st.tuples(st.sampled_from(names), st.none(), st.none()))  # tensor removed

    def apply(edits):
        out = dict(tensors)
        for name, dtype, op in edits:
            if dtype is None:
                out.pop(name, None)
            elif name in out:
                out[name] = retyped(out[name], dtype, op)
        return out

    return st.lists(edit, min_size=1, max_size=3).map(apply)


@FUZZ
@given(data=st.data())
def test_fuzz_quantized_checkpoint(worker, base, case, data):
    """quantization_config / config values, packed tensors of the wrong dtype or shape, bytes."""
    folder = case()
    config, raw = base["quant_config"], base["quant_safetensors"]
    what = data.draw(st.sampled_from(["config", "tensors", "bytes"]))
    if what == "config":
        config = apply_json(config, data.draw(json_edits(config, extra=Q_EXTRA)))
    (folder / "config.json").write_bytes(dump_json(config))
    if what == "tensors":
        save_file(data.draw(quant_tensor_cases(base)), str(folder / "model.safetensors"))
    else:
        content = raw if what == "config" else data.draw(safetensors_cases(raw))
        (folder / "model.safetensors").write_bytes(content)
    expect_clean(worker, f"quantized {what}", "model", folder)


# ---------------------------------------------------------------- regressions (one per bug found)

def expect_value_error(worker: Worker, kind: str, path: Path, *words: str) -> None:
    outcome, detail = worker.call(kind, path)
    assert outcome == "ValueError", f"{outcome}: {detail}"
    for w in words:
        assert w in detail, detail


@pytest.mark.parametrize(("changes", "words"), [
    ({"num_attention_heads": 0, "head_dim": 0}, ["num_attention_heads"]),  # ZeroDivisionError
    ({"architectures": 5}, ["architectures"]),  # was TypeError
    ({"hidden_size": 2**40, "num_attention_heads": 1, "num_key_value_heads": 1}, ["weights"]),  # was a 4 TB RoPE table
    ({"head_dim": 2**31}, ["weights"]),  # was an 8 GB RoPE table
    ({"num_hidden_layers": 10**7}, ["weights"]),  # was minutes building meta layers
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": INF}},
     ["original_max_position_embeddings"]),  # was OverflowError
    ({"rope_scaling": {"rope_type": "llama3", "factor": NAN, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     ["factor"]),  # was accepted: NaN frequencies
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),  # was read as true
    ({"eos_token_id": "x"}, ["eos"]),  # was accepted into the config
])
def test_config_json_regressions(worker, base, case, changes, words):
    folder = case()
    (folder / "config.json").write_bytes(dump_json({**base["config"], **changes}))
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    expect_value_error(worker, "model", folder, *words)


@pytest.mark.parametrize(("name", "changes", "words"), [
    ("tokenizer_config.json", {"bos_token_id": "x"}, ["tokenizer_config.json", "'x'"]),  # TypeError
    ("tokenizer_config.json", {"eos_token_ids": ["a"]}, ["tokenizer_config.json"]),  # unnamed
    ("tokenizer_config.json", {"eos_token_ids": [INF]}, ["tokenizer_config.json"]),  # OverflowError
    ("tokenizer_config.json", {"add_bos_token": "no"}, ["add_bos_token"]),  # was read as true
    ("config.json", {"eos_token_id": [1.5]}, ["config.json"]),  # was truncated to 1
])
def test_tokenizer_config_regressions(worker, base, case, name, changes, words):
    folder = case()
    write_hf_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(base["config"]))
    if name == "config.json":
        (folder / "tokenizer_config.json").write_text("{}")
    obj = json.loads((folder / name).read_text())
    (folder / name).write_bytes(dump_json({**obj, **changes}))
    expect_value_error(worker, "tokenizer", folder, *words)


def test_tokenizer_json_panic_is_a_value_error(worker, case):
    """This tokenizer.json makes `tokenizers` panic (pyo3's PanicException, a BaseException)."""
    folder = case()
    write_hf_tokenizer(folder)
    obj = json.loads((folder / "tokenizer.json").read_text())
    obj["model"]["continuing_subword_prefix"] = "00"
    (folder / "tokenizer.json").write_bytes(dump_json(obj))
    expect_value_error(worker, "tokenizer", folder, "tokenizer.json", "PanicException")


def gguf_one_entry(value_type: int, payload: bytes) -> bytes:
    """A GGUF with no tensors and one metadata entry "k" (padded to pass the count check)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    return head + struct.pack("<Q", 1) + b"k" + struct.pack("<I", value_type) + payload + bytes(64)


@pytest.mark.parametrize(("content", "words"), [
    # uint8 array claiming 2^40 items: the reader looped 2^40 times (a hang)
    (gguf_one_entry(9, struct.pack("<IQ", 0, 2**40)), ["2^40 items"]),
    # 2^22 + 1 items, all in the file: the reader would build a view per item
    (gguf_one_entry(9, struct.pack("<IQ", 0, 2**22 + 1) + bytes(2**22 + 1)), ["4194305 items"]),
    # arrays nested 2000 deep: RecursionError in the reader
    (gguf_one_entry(9, struct.pack("<IQ", 9, 1) * 2000), ["value type 9"]),
    # a string claiming 2^63 bytes
    (gguf_one_entry(8, struct.pack("<Q", 2**63)), ["past the end"]),
])
def test_gguf_header_regressions(worker, case, content, words):
    path = case() / "m.gguf"
    path.write_bytes(content)
    words = [w.replace("2^40", str(2**40)) for w in words]  # ids read better with the power
    for kind in ("model", "tokenizer"):
        expect_value_error(worker, kind, path, "corrupt GGUF header", *words)


@pytest.mark.parametrize(("key", "value", "kind", "words"), [
    ("tokenizer.ggml.unknown_token_id", 32767, "tokenizer", ["unknown_token_id"]),  # IndexError
    ("tokenizer.ggml.tokens", 7, "tokenizer", ["tokenizer.ggml.tokens"]),  # TypeError
    ("tokenizer.ggml.bos_token_id", "x", "tokenizer", ["bos_token_id"]),  # TypeError
    ("tokenizer.ggml.add_bos_token", 2, "tokenizer", ["add_bos_token"]),  # was read as true
    ("tokenizer.ggml.scores", ["a"], "tokenizer", ["scores"]),  # now checked before use
    ("llama.attention.head_count", 0, "model", ["num_attention_heads"]),  # ZeroDivisionError
    ("llama.embedding_length", "x", "model", ["llama.embedding_length"]),  # TypeError
    ("llama.block_count", 10**6, "model", ["weights"]),  # minutes building meta layers
])
def test_gguf_metadata_regressions(worker, base, case, key, value, kind, words):
    model = base["gguf_model"]
    t = gguf.GGUFValueType
    vtype = {int: t.UINT32, str: t.STRING, list: t.ARRAY}[type(value)]
    meta = {**gguf_metadata(model, "llama"), key: (value, vtype)}
    path = write_gguf(case() / "m.gguf", model, meta)
    expect_value_error(worker, kind, path, *words)


def test_gguf_duplicate_token_ids_stay_in_vocabulary(worker, base, case):
    """A token listed twice made the vocabulary size (unique strings) smaller than the ids the
    tokenizer emits; encode gave ids >= vocab_size and decode of them failed."""
    model = tiny_model(len(byte_level_tokens()[0]))
    meta = gguf_metadata(model, "gpt2")
    tokens = list(meta["tokenizer.ggml.tokens"][0])
    tokens[100] = tokens[101]
    meta["tokenizer.ggml.tokens"] = (tokens, gguf.GGUFValueType.ARRAY)
    path = write_gguf(case() / "m.gguf", model, meta)
    assert worker.call("tokenizer", path) == ("ok", "")


@pytest.mark.parametrize(("changes", "words"), [
    ({"zero_point": "false"}, ["zero_point"]),  # was read as true
    ({"group_size": 2**40}, ["group_size"]),  # ValueError did not name the checkpoint
])
def test_quantization_config_regressions(worker, base, case, changes, words):
    folder = case()
    config = base["quant_config"]
    config = {**config, "quantization_config": {**config["quantization_config"], **changes}}
    (folder / "config.json").write_bytes(dump_json(config))
    (folder / "model.safetensors").write_bytes(base["quant_safetensors"])
    expect_value_error(worker, "model", folder, *words)


def test_quantized_checkpoint_rejects_int_embedding(worker, base, case):
    """A non-packed tensor stored as integers was silently cast to float."""
    folder = case()
    tensors = dict(base["quant_tensors"])
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int32)
    (folder / "config.json").write_bytes(dump_json(base["quant_config"]))
    save_file(tensors, str(folder / "model.safetensors"))
    expect_value_error(worker, "model", folder, "model.embed_tokens.weight", "dtype")


def test_huge_claims_in_quantized_config(worker, base, case):
    """hidden_size 2^40 in a quantized checkpoint's config: rejected before the meta build."""
    folder = case()
    config = {**base["quant_config"], "hidden_size": 2**40, "num_attention_heads": 1,
              "num_key_value_heads": 1}
    (folder / "config.json").write_bytes(dump_json(config))
    (folder / "model.safetensors").write_bytes(base["quant_safetensors"])
    expect_value_error(worker, "model", folder, "weights")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
