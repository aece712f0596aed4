"""Hostile input, one deterministic test per bug found (by fuzzing: tests/test_hostile_input.py,
or by review): each file once made a loader raise something other than a ValueError naming the
file, hang, or allocate far beyond the file's size. Each load runs in the fuzz harness's worker
subprocess (capped memory, a timeout)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

gguf = pytest.importorskip("gguf")
from fuzzing import fixtures
from fuzzing.files import (
    byte_level_tokens,
    gguf_metadata,
    tiny_model,
    write_gguf,
    write_hf_tokenizer,
)
from fuzzing.mutations import INF, NAN, dump_json
from fuzzing.worker import expect_value_error
from safetensors.torch import save_file

worker, base, case = fixtures.worker, fixtures.base, fixtures.case  # the harness's fixtures


@pytest.mark.parametrize(("changes", "words"), [
    ({"num_attention_heads": 0, "head_dim": 0}, ["num_attention_heads"]),  # ZeroDivisionError
    ({"architectures": 5}, ["architectures"]),  # was TypeError
    ({"hidden_size": 2**30, "num_attention_heads": 1, "num_key_value_heads": 1},
     ["weights"]),  # was a RoPE table of GBs
    ({"head_dim": 2**30}, ["weights"]),  # was a RoPE table of GBs
    ({"num_hidden_layers": 10**7}, ["weights"]),  # was minutes building meta layers
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": INF}},
     ["original_max_position_embeddings"]),  # was OverflowError
    ({"rope_scaling": {"rope_type": "llama3", "factor": NAN, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     ["factor"]),  # was accepted: NaN frequencies
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),  # was read as true
    ({"eos_token_id": "x"}, ["eos"]),  # was accepted into the config
    ({"num_key_value_heads": 0}, ["num_key_value_heads"]),  # was read as MHA
    ({"bos_token_id": 10**6}, ["bos_token_id", "past the vocabulary"]),  # IndexError in AWQ
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
    ("llama.attention.layer_norm_rms_epsilon", True, "model",
     ["layer_norm_rms_epsilon", "float32"]),  # was 1.0
    ("llama.rope.freq_base", "1e4", "model", ["freq_base", "float32"]),  # was parsed
    ("llama.rope.freq_base", 1e300, "model", ["freq_base", "float32"]),  # a numpy overflow warning
])
def test_gguf_metadata_regressions(worker, base, case, key, value, kind, words):
    model = base["gguf_model"]
    t = gguf.GGUFValueType
    vtype = {int: t.UINT32, str: t.STRING, list: t.ARRAY, bool: t.BOOL,
             float: t.FLOAT64}[type(value)]
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
    """hidden_size 2^30 in a quantized checkpoint's config: rejected before the meta build."""
    folder = case()
    config = {**base["quant_config"], "hidden_size": 2**30, "num_attention_heads": 1,
              "num_key_value_heads": 1}
    (folder / "config.json").write_bytes(dump_json(config))
    (folder / "model.safetensors").write_bytes(base["quant_safetensors"])
    expect_value_error(worker, "model", folder, "weights")



# Found by a review on 2026-12-06: resource bombs (a small file making a loader allocate or
# compute far beyond its size), paths that are not regular files, JSON the parser cannot take.

def test_paths_that_are_not_regular_files(worker, case):
    """A FIFO blocked the first read forever; a link to /dev/zero read until memory ran out.
    (Evaluation text may come from a pipe the user names: only devices are refused there.)"""
    folder = case()
    fifo = folder / "m.gguf"
    os.mkfifo(fifo)
    for kind in ("model", "tokenizer"):
        expect_value_error(worker, kind, fifo, "not a regular file")
    zero = folder / "tok.bin"
    zero.symlink_to("/dev/zero")
    for kind in ("model", "tokenizer"):
        expect_value_error(worker, kind, zero, "not a regular file")
    expect_value_error(worker, "text", zero, "a device, not a text file")


@pytest.mark.parametrize(("config_text", "words"), [
    (b"[" * 100_000 + b"]" * 100_000, ["config.json", "RecursionError"]),
    (b'{"hidden_size": 1' + b"0" * 5000 + b"}", ["config.json", "4300"]),
])
def test_config_json_the_parser_cannot_take(worker, base, case, config_text, words):
    folder = case()
    (folder / "config.json").write_bytes(config_text)
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    expect_value_error(worker, "model", folder, *words)


@pytest.mark.parametrize(("changes", "words"), [
    ({"rope_theta": 10**400}, ["rope_theta"]),  # OverflowError in isfinite
    ({"hidden_size": 2**40}, ["hidden_size", "below 2**31"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 2**64}},
     ["original_max_position_embeddings"]),  # "int too big to convert" in the model
])
def test_config_numbers_past_float_and_int32(worker, base, case, changes, words):
    folder = case()
    (folder / "config.json").write_text(json.dumps({**base["config"], **changes}))
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    expect_value_error(worker, "model", folder, *words)


@pytest.mark.parametrize("changes", [
    {"num_hidden_layers": 2**31 - 1},  # was a meta Llama of 2**31 blocks: GBs, then a timeout
    {"hidden_size": 2**27, "num_attention_heads": 1, "num_key_value_heads": 1},  # its RoPE table
])
def test_quantize_checks_a_config_without_building_the_model(worker, base, case, changes):
    """`python -m awq_ref quantize` checks the group size from config.json before loading; a
    config's claims cost nothing there (one block on the meta device stands for all)."""
    folder = case()
    (folder / "config.json").write_text(json.dumps({**base["config"], **changes}))
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    assert worker.call("quantize_check", folder)[0] == "ok"


def test_rope_theta_past_int64_loads(worker, base, case):
    """2**64 is a finite rope_theta (a useless one): the model loads; torch.pow once raised
    OverflowError ("int too big to convert") on the int (found by AWQ_FUZZ_RANDOM=1)."""
    folder = case()
    (folder / "config.json").write_text(json.dumps({**base["config"], "rope_theta": 2**64}))
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    outcome, detail = worker.call("model", folder)
    assert outcome == "ok", detail


def test_llama2c_header_whose_size_overflows_int64(worker, case):
    """np.prod wrapped around to the file's size; the reshape then failed unnamed."""
    path = case() / "m.bin"
    path.write_bytes(struct.pack("<7i", 48, 715827818, 2**30, 1, 1, 1, 1) + bytes(576))
    expect_value_error(worker, "model", path, "m.bin", "implies")


def _gguf_tensors(infos: list[tuple[str, int]], data: bytes, n_tensors: int | None = None
                  ) -> bytes:
    """A llama GGUF (2 x 32 F32 tensors named by `infos`, each (name, data offset))."""
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kv = [("general.architecture", 8, s("llama"))]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors, len(kv))
    head += b"".join(s(k) + struct.pack("<I", t) + v for k, t, v in kv)
    head += b"".join(s(name) + struct.pack("<IQQIQ", 2, 32, 2, 0, offset) for name, offset in infos)
    return head + bytes(-len(head) % 32) + data


def test_gguf_tensors_sharing_bytes(worker, case):
    """A 1 MB file of many tensor infos at one offset dequantized to GBs before any check."""
    path = case() / "m.gguf"
    path.write_bytes(_gguf_tensors([("token_embd.weight", 0), ("output.weight", 0)], bytes(256)))
    expect_value_error(worker, "model", path, "overlap")


def test_gguf_header_counts_past_the_caps(worker, case):
    """150K tensor infos took 11 s and 1 GB in the gguf reader; 4M array items GBs."""
    path = case() / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**14 + 1, 0) + bytes(24 * (2**14 + 2)))
    expect_value_error(worker, "model", path, "16385 tensors")
    arrays = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    for key in ("a", "b"):  # 2 x (2^20 + 1) uint8 items: past 2^21 for the file
        arrays += struct.pack("<Q", 1) + key.encode() + struct.pack("<IIQ", 9, 0, 2**20 + 1)
        arrays += bytes(2**20 + 1)
    path.write_bytes(arrays + bytes(64))
    expect_value_error(worker, "model", path, "array items in the file")
    # 10^6 one-byte metadata entries: 5.6 s and 145 MB to read (a review, 2026-12-06)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 10**6) + bytes(13 * 10**6))
    expect_value_error(worker, "model", path, "1000000 metadata entries")


def test_gguf_dimension_of_zero_beside_a_huge_one(worker, case):
    """Dims (32, 0, 2^64 - 1): a product of 0 passed the size check, then torch.empty raised a
    TypeError (a review, 2026-12-06)."""
    def s(b):
        return struct.pack("<Q", len(b)) + b
    kv = [s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama")]
    kv += [s(k) + struct.pack("<II", 4, v) for k, v in [
        (b"llama.embedding_length", 32), (b"llama.feed_forward_length", 64),
        (b"llama.block_count", 1), (b"llama.attention.head_count", 2), (b"llama.vocab_size", 8)]]
    kv += [s(b"llama.attention.layer_norm_rms_epsilon") + struct.pack("<If", 6, 1e-5)]
    info = s(b"token_embd.weight") + struct.pack("<I3QIQ", 3, 32, 0, 2**64 - 1, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + info
    path = case() / "m.gguf"
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(32))
    expect_value_error(worker, "model", path, "a dimension of 0")


def _safetensors(entries: dict[str, dict], data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def test_safetensors_headers_for_the_streaming_index(worker, base, case):
    """lazy.py (quantize --stream) accepted tensors sharing bytes, and a dimension past int64
    raised an OverflowError in torch."""
    f32 = {"dtype": "F32", "shape": [2]}
    for entries, words in [
        ({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [0, 8]}}, ["overlap"]),
        ({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, ["bad shape"]),
    ]:
        folder = case()
        (folder / "config.json").write_text(json.dumps(base["config"]))
        (folder / "model.safetensors").write_bytes(_safetensors(entries, bytes(8)))
        expect_value_error(worker, "lazy", folder, "model.safetensors", *words)


def test_safetensors_with_too_many_tensors(worker, base, case):
    """A million empty entries took 15 s and 1.4 GB before any name was checked."""
    folder = case()
    (folder / "config.json").write_text(json.dumps(base["config"]))
    empty = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
             for i in range(2**16 + 1)}
    (folder / "model.safetensors").write_bytes(_safetensors(empty, b""))
    for kind in ("model", "lazy"):
        expect_value_error(worker, kind, folder, "65537 tensors")


def test_awq_result_files_that_are_not(worker, case):
    """AwqResult.load (quantize --result) raised SafetensorError and KeyError tracebacks."""
    path = case() / "result.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    expect_value_error(worker, "awq_result", path, "result.safetensors", "not a readable")
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "awq_ref.AwqResult/1"})
    expect_value_error(worker, "awq_result", path, "result.safetensors", "lacks 'bits'")
