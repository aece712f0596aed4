"""Hypothesis strategies and the byte / JSON mutations they describe: truncation, byte flips,
header fields overwritten with adversarial integers, JSON values replaced by wrong types / NaN /
huge numbers, GGUF metadata values of the wrong type, tensors of the wrong dtype or shape."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
gguf = pytest.importorskip("gguf")
from hypothesis import strategies as st

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
    items = (list(obj.items()) if isinstance(obj, dict)
             else list(enumerate(obj)) if isinstance(obj, list) else [])
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
    structural = json_edits(header, extra=ST_DTYPES).map(
        lambda e: safetensors_join(apply_json(header, e), body))
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
        parts = [(p.ctypes.data - start, p.nbytes) for p in field.parts[:64]
                 if p.nbytes in (1, 2, 4, 8)]
        groups.append(parts)
    del reader
    return [g for g in groups if g]


def gguf_cases(data: bytes, groups):
    hot = max(off + w for g in groups for off, w in g)
    fields = st.sampled_from(groups).flatmap(st.sampled_from)
    put = st.lists(st.tuples(st.just("put"), fields, ints()), min_size=1, max_size=3)
    return st.one_of(put, byte_edits(len(data), [(4, 4), (8, 8), (16, 8)], hot))



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
        st.tuples(st.text(max_size=8) | st.sampled_from(["llama", "gpt2", "none", "linear"]),
                  st.just(t.STRING)),
        st.tuples(st.lists(st.text(max_size=4), min_size=1, max_size=6), st.just(t.ARRAY)),
        st.tuples(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=6),
                  st.just(t.ARRAY)),
        st.tuples(st.lists(small_floats, min_size=1, max_size=6), st.just(t.ARRAY)))



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
        st.tuples(st.sampled_from(packed) | st.sampled_from(names), st.sampled_from(Q_DTYPES),
                  shape_op),
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

