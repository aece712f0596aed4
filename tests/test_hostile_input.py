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
Deterministic regression tests for each bug found are in test_hostile_regressions.py.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
gguf = pytest.importorskip("gguf")
from fuzzing import fixtures
from fuzzing.files import (
    gguf_metadata,
    write_gguf,
    write_hf_tokenizer,
)
from fuzzing.mutations import (
    GGUF_KEYS,
    Q_EXTRA,
    apply_bytes,
    apply_json,
    byte_edits,
    dump_json,
    gguf_cases,
    gguf_fields,
    gguf_values,
    json_edits,
    quant_tensor_cases,
    safetensors_cases,
)
from fuzzing.worker import expect_clean, print_counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

worker, base, case = fixtures.worker, fixtures.base, fixtures.case  # the harness's fixtures

EXAMPLES = int(os.environ.get("AWQ_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("AWQ_FUZZ_RANDOM"),
                deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print_counts()


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
    # The other architectures' keys too, present so that edits reach them (config.ARCHITECTURES)
    config = {**base["config"], "sliding_window": None, "use_sliding_window": False,
              "max_window_layers": 1, "layer_types": ["full_attention"] * 2}
    text = dump_json(config)
    names = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "mistral", "qwen2",
             "sliding_attention", 64]
    content = data.draw(st.one_of(
        json_edits(config, extra=names).map(lambda e: dump_json(apply_json(config, e))),
        byte_edits(len(text)).map(lambda e: apply_bytes(text, e))))
    (folder / "config.json").write_bytes(content)
    (folder / "model.safetensors").write_bytes(base["safetensors"])
    expect_clean(worker, "hf config.json", "model", folder)
    expect_clean(worker, "hf config.json", "quantize_check", folder)


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
