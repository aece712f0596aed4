"""Quantized checkpoints: save -> load round trip, layout, atomic writes, bad folders."""

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from awq_ref.api import quantize
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import (
    load_quantized_model,
    parse_quant_config,
    quant_config_dict,
    save_quantized,
)
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.quant.quantizer import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}


def tiny_quantized(seed: int = 0, group_size: int = 32, skip=(), **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**TINY, **overrides})).eval()
    if model.config.qkv_bias:
        with torch.no_grad():
            for b in model.model.layers:
                b.self_attn.q_proj.bias.normal_()
    return quantize(model, group_size=group_size, modules_to_not_convert=skip, inplace=True)


def logits(model: nn.Module, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16),
                           generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False, "attention_bias": True},
    {"skip": ("mlp.down_proj",)},
    {"group_size": -1},
    {"model_type": "mistral", "sliding_window": 64},
    {"model_type": "qwen2", "tie_word_embeddings": True},  # q, k, v biases (set in tiny_quantized)
    {"model_type": "qwen3", "head_dim": 32},  # q/k norms; H * Dh = 128, not the hidden 64
])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000])
def test_save_load_identical_logits(tmp_path, overrides, max_shard_bytes):
    model = tiny_quantized(**overrides)
    out = save_quantized(model, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    loaded = load_quantized_model(out)
    assert torch.equal(logits(loaded), logits(model))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            other = loaded.get_submodule(name)
            assert isinstance(other, QuantLinear) and not hasattr(other, "weight")
            assert torch.equal(other.qweight, m.qweight) and torch.equal(other.scales, m.scales)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.quantization_config == model.quantization_config
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 10**9) and sharded != (out / "model.safetensors").exists()


def test_folder_layout_and_config(tmp_path):
    model = tiny_quantized(tie_word_embeddings=True)
    out = save_quantized(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                             "zero_point": True, "sym": False, "version": "gemm",
                                             "modules_to_not_convert": ["lm_head"]}
    assert config["torch_dtype"] == "float16"  # what AWQ readers compute in, see CONFIG_DTYPE
    assert LlamaConfig.from_hf_dict(config) == model.config
    assert config["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / f))
    assert set(tensors) == set(index["weight_map"])
    shard_bytes = [sum(t.numel() * t.element_size() for t in load_file(out / f).values())
                   for f in sorted(set(index["weight_map"].values()))]
    assert len(shard_bytes) > 2
    # greedy: no two neighbours would have fit in one shard; over the limit only a lone tensor
    assert all(a + b > 20_000 for a, b in itertools.pairwise(shard_bytes))
    assert all(b <= 20_000 or len(load_file(out / f)) == 1 for b, f in
               zip(shard_bytes, sorted(set(index["weight_map"].values())), strict=True))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    assert "lm_head.weight" not in tensors  # tied
    q = "model.layers.1.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].dtype == torch.int32 and tensors[f"{q}.qweight"].shape == (64, 8)
    assert tensors[f"{q}.qzeros"].shape == (2, 8) and tensors[f"{q}.scales"].dtype == torch.float16
    assert f"{q}.weight" not in tensors and "model.norm.weight" in tensors
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    assert out.stat().st_mode & 0o777 == 0o755


def test_checkpoint_size_vs_fp16(tmp_path):
    """Bytes per weight of a quantized linear: 4/8 (codes) + (2 + 0.5) / G (scale + zero)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 768}))
    n_linear = sum(lin.weight.numel() for b in model.model.layers for lin in b.modules()
                   if isinstance(lin, nn.Linear))
    fp16 = sum(t.numel() * 2 for t in model.state_dict().values())
    out = save_quantized(quantize(model, group_size=64), tmp_path / "ckpt")
    size = sum(p.stat().st_size for p in out.iterdir())
    linear_q = n_linear * (0.5 + 2.5 / 64)
    print(f"\ncheckpoint {size} B vs fp16 {fp16} B ({size / fp16:.3f}x); decoder linears "
          f"{linear_q:.0f} B vs {2 * n_linear} B fp16 ({linear_q / (2 * n_linear):.3f}x)")
    non_linear_fp32 = (fp16 - 2 * n_linear) * 2  # embeddings, norms stay in the model's fp32
    assert abs(size - (linear_q + non_linear_fp32)) < 20_000  # headers and config.json


_KILL_SCRIPT = """
import sys, time, torch
import awq_ref.quant.checkpoint as ck
from awq_ref.api import quantize
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
torch.manual_seed(0)
model = quantize(Llama(LlamaConfig(**{tiny!r})), group_size=32)
write_shard = ck.write_shard
def slow_write_shard(tensors, path):
    write_shard(tensors, path)
    print("one shard written", flush=True)
    time.sleep(120)
ck.write_shard = slow_write_shard
ck.save_quantized(model, sys.argv[1], max_shard_bytes=20_000)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_killed_save_leaves_no_target(tmp_path):
    target = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(tiny=TINY), str(target)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "one shard written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ckpt.tmp-")  # died midway
    save_quantized(tiny_quantized(), target)  # the next write of the name sweeps it
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_existing_target_needs_overwrite(tmp_path):
    first, second = tiny_quantized(seed=0), tiny_quantized(seed=1)
    out = save_quantized(first, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(second, out)
    save_quantized(second, out, overwrite=True)
    assert torch.equal(logits(load_quantized_model(out)), logits(second))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_fp16_storage_of_unquantized_tensors(tmp_path):
    model = tiny_quantized(attention_bias=True)
    out = save_quantized(model, tmp_path / "ckpt", dtype=torch.float16)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model.half().float()  # the same rounding, in place (scales stay fp16)
    assert torch.equal(logits(load_quantized_model(out)), logits(model))


def test_tokenizer_files_written(tmp_path):
    class Tok:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    out = save_quantized(tiny_quantized(), tmp_path / "ckpt", tokenizer=Tok())
    assert (out / "tokenizer.json").read_text() == "{}"


def test_load_in_bfloat16(tmp_path):
    """Loaded in bf16 (packed tensors as stored), the logits stay within bf16's rounding of the
    fp32 model's: measured max 0.012 on logits of std ~0.56; 0.025 allows twice that."""
    model = tiny_quantized()
    out = save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized_model(out, device="cpu", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ql = loaded.model.layers[0].mlp.up_proj
    assert ql.scales.dtype == torch.float16 and ql.qweight.dtype == torch.int32
    torch.testing.assert_close(logits(loaded).float(), logits(model), rtol=0, atol=0.025)


def test_save_refuses_unquantized_model(tmp_path):
    model = Llama(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="quantization_config"):
        save_quantized(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(model, tmp_path / "b", quant_config={"quant_method": "awq", "bits": 4,
                                                            "group_size": 32})


def test_save_refuses_config_disagreeing_with_layers(tmp_path):
    model = tiny_quantized(skip=("down_proj",))
    with pytest.raises(ValueError, match="group_size 32, quant_config says 64"):
        save_quantized(model, tmp_path / "a", quant_config={**model.quantization_config,
                                                            "group_size": 64})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj is Linear"):
        save_quantized(model, tmp_path / "b", quant_config={**model.quantization_config,
                                                            "modules_to_not_convert": ["lm_head"]})
    assert not list(tmp_path.iterdir())


def _saved(tmp_path) -> Path:
    return save_quantized(tiny_quantized(), tmp_path / "ckpt")


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"quant_method": "gptq"}, "quant_method 'gptq'"),
    ({"version": "gemv"}, "version 'gemv'"),
    ({"bits": 3}, "bits=3"),
    ({"group_size": 0}, "group_size=0"),
    ({"group_size": "64"}, "group_size='64'"),
    ({"group_size": 48}, (r"model.layers.0.self_attn.q_proj: group_size 48 does not divide "
                          r"in_features 64")),
    ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
])
def test_unreadable_quantization_config(tmp_path, changes, message):
    out = _saved(tmp_path)
    _edit_config(out, **changes)
    with pytest.raises(ValueError, match=message):
        load_quantized_model(out)


def test_group_size_disagreeing_with_tensors(tmp_path):
    out = _saved(tmp_path)
    _edit_config(out, group_size=16)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.qzeros: shape \(2, 8\) "
                                         r"does not match the expected \(4, 8\)"):
        load_quantized_model(out)


def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_bad_tensors(tmp_path):
    out = _saved(tmp_path)
    qw = "model.layers.1.mlp.down_proj.qweight"
    _rewrite_tensors(out, lambda t: t.update({qw: t[qw][:, :4].contiguous()}))
    with pytest.raises(ValueError, match=r"down_proj.qweight: shape \(128, 4\).*\(128, 8\)"):
        load_quantized_model(out)
    _rewrite_tensors(out, lambda t: t.pop(qw))
    with pytest.raises(ValueError, match="missing.*down_proj.qweight"):
        load_quantized_model(out)
    _rewrite_tensors(out, lambda t: t.update({
        qw: torch.zeros(128, 8, dtype=torch.int32),
        "model.layers.1.mlp.down_proj.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unexpected.*down_proj.weight"):
        load_quantized_model(out)
    sc = "model.layers.0.mlp.up_proj.scales"
    _rewrite_tensors(out, lambda t: (t.pop("model.layers.1.mlp.down_proj.weight"),
                                     t.update({sc: t[sc].float()})))
    with pytest.raises(ValueError, match="up_proj.scales: dtype torch.float32"):
        load_quantized_model(out)


def test_stored_rope_buffer_is_ignored(tmp_path):
    """Older transformers saved rotary_emb.inv_freq; the model recomputes it, and the quantized
    loader ignores it as the fp loaders do."""
    out = _saved(tmp_path)
    plain = logits(load_quantized_model(out))
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_tensors(out, lambda t: t.update({key: torch.ones(8)}))
    assert torch.equal(logits(load_quantized_model(out)), plain)


def test_not_a_quantized_folder(tmp_path):
    out = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config"):
        load_quantized_model(out)
    with pytest.raises(ValueError, match="config.json: config file not found"):
        load_quantized_model(tmp_path / "missing")


def test_missing_weights_file(tmp_path):
    out = _saved(tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_quantized_model(out)


def test_a_tied_checkpoint_that_stores_lm_head_loads_tied(tmp_path):
    """Some writers store the tied head anyway: it is read as the embedding it is tied to."""
    model = tiny_quantized(tie_word_embeddings=True)
    out = save_quantized(model, tmp_path / "q")
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              shard, metadata={"format": "pt"})
    loaded = load_quantized_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_checkpoint_files_are_readable_by_others(tmp_path):
    out = save_quantized(tiny_quantized(), tmp_path / "q")
    for p in out.iterdir():
        assert p.stat().st_mode & 0o044 == 0o044, p.name


def test_unpackable_width_names_the_layer():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=44, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj: out_features 44 is not a multiple of 8"):
        quantize(Llama(cfg), "rtn", 4, 4)
    quantize(Llama(cfg), "rtn", 4, 4, pack=False)  # fake quantization has no such limit


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("skip", [(), ("down_proj",)])
def test_transformers_4x_converts_exactly_the_stored_layers(tmp_path, tied, skip):
    """transformers 4.x (AutoAWQ's WQLinear_GEMM) turns every nn.Linear whose full name contains
    no entry of modules_to_not_convert into a 4-bit layer (`replace_with_awq_linear`; only a null
    list gets default skips), so the config must name exactly the linears stored unpacked: with
    `[]` it built lm_head from tensors the checkpoint does not have."""
    model = tiny_quantized(tie_word_embeddings=tied, skip=skip)
    out = save_quantized(model, tmp_path / "ckpt")
    names = json.loads((out / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    assert isinstance(names, list) and names[0] == "lm_head" and list(skip) == names[1:]
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert "lm_head" in linears
    converted = {n for n in linears if not any(key in n for key in names)}
    stored = {k.removesuffix(".qweight") for k in load_file(out / "model.safetensors")
              if k.endswith(".qweight")}
    assert converted == stored


@pytest.mark.parametrize("zero_point", [True, False])
def test_config_states_sym_for_readers_that_do_not_derive_it(zero_point):
    """gptqmodel (transformers 5.x's AWQ backend) takes `sym` from the config or its own default
    True; awq_ref reads zero_point and ignores sym."""
    d = quant_config_dict(QuantSpec(4, 32, zero_point))
    assert d["sym"] is (not zero_point) and d["zero_point"] is zero_point
    assert parse_quant_config(d) == (QuantSpec(4, 32, zero_point), ("lm_head",))
    assert parse_quant_config({**d, "sym": "ignored"})[0] == QuantSpec(4, 32, zero_point)
    without = {k: v for k, v in d.items() if k != "zero_point"}  # AutoAWQ's default: zero points
    assert parse_quant_config(without)[0] == QuantSpec(4, 32, True)
    for group in (1, -1):  # the smallest groups, and one per output channel (our extension)
        assert parse_quant_config({**d, "group_size": group})[0] == QuantSpec(4, group, zero_point)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_transformers_builds_the_architecture_the_tensors_are_for(tmp_path, model_type):
    """transformers' own class for the saved config.json expects exactly the stored tensors,
    each quantized linear's weight standing as qweight/qzeros/scales: the right names, and the
    biases where that architecture has them (Qwen2: q, k, v and not o)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    model = tiny_quantized(model_type=model_type, tie_word_embeddings=False)
    out = save_quantized(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(hf).__name__ == config["architectures"][0]
    stored = set(load_file(out / "model.safetensors"))
    quantized = {k.removesuffix(".qweight") for k in stored if k.endswith(".qweight")}
    assert len(quantized) == 7 * TINY["num_hidden_layers"]
    expected = set()
    for name in hf.state_dict():
        module, _, leaf = name.rpartition(".")
        quant = module in quantized and leaf == "weight"
        expected |= {f"{module}.{t}" for t in ("qweight", "qzeros", "scales")} if quant else {name}
    assert stored == expected
