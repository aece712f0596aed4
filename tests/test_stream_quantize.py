"""Streaming quantization (awq_ref.stream): block by block from the safetensors files, tensor
for tensor what the in-memory path writes; resumable; the lazy reader matches safetensors' own
and refuses corrupt files."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import make_random_checkpoint as mrc  # tools/ is on sys.path (conftest.py)
import pytest
import torch
from kill_helpers import folder_bytes, kill_after_block, stop_after_saving
from safetensors.torch import save_file

import awq_ref
from awq_ref import stream
from awq_ref.awq.resume import STATE_NAME, Progress
from awq_ref.loaders import read_safetensors_file, read_safetensors_folder
from awq_ref.loaders.lazy import LazyTensors, index_safetensors_file
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.stream import quantize_folder

ROOT = Path(__file__).resolve().parents[1]

GROUP = 32
AWQ = {"n_grid": 5, "clip_grid": 8}  # small grids: a fast test that still searches


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (256 bytes + 1 merge) and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    merges = [("e", "r")]
    vocab = {t: i for i, t in enumerate(sorted(ByteLevel.alphabet()) + ["er"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "!", "eos_token": "\"", "add_bos_token": True}))


def make_source(folder: Path, layers: int = 4, preset: str = "tiny") -> Path:
    """The `tiny` preset (hidden 128, GQA 4/2, fp16), sharded (1 MB shards), with a tokenizer."""
    assert mrc.main(["--preset", preset, "--out", str(folder), "--max-shard-mb", "1",
                     "--layers", str(layers)]) == 0
    write_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "additional_chat_templates").mkdir()  # transformers 5's named templates
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("stream") / "src")


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))  # (B, T)


def in_memory(src: Path, out: Path, method: str, skip: tuple[str, ...] = (), **kwargs) -> Path:
    """load_model -> quantize -> save_quantized in the checkpoint's dtype (fp16)."""
    model = awq_ref.load_model(src)  # fp32
    qmodel = awq_ref.quantize(model, method=method, group_size=GROUP,
                              modules_to_not_convert=skip, **kwargs)
    return awq_ref.save_quantized(qmodel, out, dtype=torch.float16)



def assert_same_checkpoint(a: Path, b: Path) -> dict[str, torch.Tensor]:
    ta, tb = read_safetensors_folder(a), read_safetensors_folder(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    assert (json.loads((a / "config.json").read_text())
            == json.loads((b / "config.json").read_text()))
    return ta


@pytest.mark.parametrize("skip", [(), ("mlp.down_proj",)])
def test_streamed_awq_matches_in_memory(src, calib, tmp_path, one_thread, skip):
    ref = in_memory(src, tmp_path / "ref", "awq", skip, calib_tokens=calib, progress=False, **AWQ)
    out = quantize_folder(src, tmp_path / "out", group_size=GROUP, calib_tokens=calib,
                          modules_to_not_convert=skip, progress=False, **AWQ)
    tensors = assert_same_checkpoint(ref, out)
    n_quantized = 4 * (7 - len(skip))
    assert sum(k.endswith(".qweight") for k in tensors) == n_quantized
    assert ("model.layers.0.mlp.down_proj.weight" in tensors) == bool(skip)
    # Not vacuous: the search changed the weights (AWQ packs differently from RTN).
    rtn = quantize_folder(src, tmp_path / "rtn", method="rtn", group_size=GROUP,
                          modules_to_not_convert=skip, progress=False)
    rtn_tensors = read_safetensors_folder(rtn)
    assert not torch.equal(tensors["model.layers.0.mlp.up_proj.scales"],
                           rtn_tensors["model.layers.0.mlp.up_proj.scales"])
    norms = [k for k in tensors if k.endswith("layernorm.weight")]
    assert any(not torch.equal(tensors[k], rtn_tensors[k]) for k in norms)  # scales were folded
    assert not (tmp_path / "out.partial").exists()  # the work folder is removed after success


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_streamed_qwen_matches_in_memory(calib, tmp_path, one_thread, arch):
    """Qwen2's q, k, v biases (v's divided by its scales) and Qwen3's per-head q/k norms travel
    through the block-by-block path."""
    src = make_source(tmp_path / "src", layers=2, preset=f"tiny-{arch}")
    ref = in_memory(src, tmp_path / "ref", "awq", calib_tokens=calib, progress=False, **AWQ)
    out = quantize_folder(src, tmp_path / "out", group_size=GROUP, calib_tokens=calib,
                          progress=False, **AWQ)
    tensors = assert_same_checkpoint(ref, out)
    hf_class = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf_class]
    assert "model.layers.1.self_attn.o_proj.bias" not in tensors
    if arch == "qwen2":
        src_bias = read_safetensors_folder(src)["model.layers.1.self_attn.v_proj.bias"]
        bias = tensors["model.layers.1.self_attn.v_proj.bias"]
        assert bias.dtype == torch.float16 and not torch.equal(bias, src_bias)  # scaled with v
    else:
        assert tensors["model.layers.1.self_attn.q_norm.weight"].shape == (64,)


def test_streamed_dtype_applies_to_every_unquantized_tensor(src, tmp_path, one_thread):
    """dtype=bfloat16 from an fp16 source: embeddings, norms and lm_head in bf16 as in memory;
    the packed scales stay fp16 (FORMAT.md) whatever dtype says."""
    model = awq_ref.quantize(awq_ref.load_model(src), method="rtn", group_size=GROUP)
    ref = awq_ref.save_quantized(model, tmp_path / "ref", dtype=torch.bfloat16)
    out = quantize_folder(src, tmp_path / "out", method="rtn", group_size=GROUP,
                          dtype=torch.bfloat16, progress=False)
    tensors = assert_same_checkpoint(ref, out)
    assert "lm_head.weight" in tensors  # the tiny preset is untied
    for name, t in tensors.items():
        want = (torch.int32 if name.endswith((".qweight", ".qzeros")) else
                torch.float16 if name.endswith(".scales") else torch.bfloat16)
        assert t.dtype == want, name
    assert awq_ref.load_model(out).lm_head.weight.dtype == torch.float32  # loads (default fp32)


def test_streamed_rtn_matches_in_memory_and_loads(src, tmp_path, one_thread):
    ref = in_memory(src, tmp_path / "ref", "rtn")
    out = quantize_folder(src, tmp_path / "out", method="rtn", group_size=GROUP, progress=False)
    tensors = assert_same_checkpoint(ref, out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-00005.safetensors"
                                                 for i in range(1, 6)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    for name in ("tokenizer.json", "chat_template.jinja",
                 "additional_chat_templates/tool_use.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert awq_ref.load_tokenizer(out).chat_template[0]["template"].startswith("{% for m in")
    model = awq_ref.load_quantized_model(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * 7
    logits = model(torch.arange(16)[None])  # (1, T, V)
    assert logits.shape == (1, 16, 512) and torch.isfinite(logits).all()


def test_never_loads_the_whole_model(src, calib, tmp_path, monkeypatch, one_thread):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the streaming path loaded a whole checkpoint")

    for target in ("awq_ref.loaders.hf.read_safetensors_folder",
                   "awq_ref.loaders.hf.read_safetensors_file", "awq_ref.loaders.load_model"):
        monkeypatch.setattr(target, refuse)
    reads: list[str] = []
    read = LazyTensors.read
    monkeypatch.setattr(LazyTensors, "read",
                        lambda self, name: reads.append(name) or read(self, name))
    quantize_folder(src, tmp_path / "out", group_size=GROUP, calib_tokens=calib, progress=False,
                    **AWQ)
    assert len(reads) == len(LazyTensors(src).index) + 1  # each tensor once, the embedding twice


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_identical_files(src, calib, tmp_path, monkeypatch, one_thread):
    def run(out: Path, **kw) -> Path:
        return quantize_folder(src, out, group_size=GROUP, calib_tokens=calib, progress=False,
                               **{**AWQ, **kw})

    ref = run(tmp_path / "ref")
    out, work = tmp_path / "out", tmp_path / "out.partial"
    save = Progress.save
    stop_after_saving(monkeypatch, 2, Interrupted)
    with pytest.raises(Interrupted):
        run(out)
    monkeypatch.setattr(Progress, "save", save)
    assert not out.exists() and (work / STATE_NAME).is_file()
    assert sorted(p.name for p in (work / "shards").iterdir()) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"]

    with pytest.raises(ValueError, match="different model, calibration data or settings"):
        run(out, n_grid=4)  # another setting never resumes this state

    searched = []
    search_block = stream.search_block
    monkeypatch.setattr(
        stream, "search_block",
        lambda block, prefix, *a: searched.append(prefix) or search_block(block, prefix, *a))
    run(out)
    assert searched == ["model.layers.2", "model.layers.3"]  # blocks 0, 1 were not redone
    assert folder_bytes(out) == folder_bytes(ref)
    assert not work.exists()


def test_resume_refuses_weight_files_replaced_in_place(src, calib, tmp_path, monkeypatch,
                                                      one_thread):
    """A fine-tune written over the same folder (same config, same file sizes and times) is
    another model: its state of an interrupted run is refused, not mixed into the new model's
    checkpoint."""
    import shutil

    copy = Path(shutil.copytree(src, tmp_path / "src"))
    save = Progress.save
    stop_after_saving(monkeypatch, 2, Interrupted)
    with pytest.raises(Interrupted):
        quantize_folder(copy, tmp_path / "out", group_size=GROUP, calib_tokens=calib,
                        progress=False, **AWQ)
    monkeypatch.setattr(Progress, "save", save)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = copy / index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    tensors = read_safetensors_file(shard)
    tensors["model.layers.3.mlp.down_proj.weight"] = tensors[
        "model.layers.3.mlp.down_proj.weight"] * 1.01
    stat = shard.stat()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` keep it
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(ValueError, match="different model, calibration data or settings"):
        quantize_folder(copy, tmp_path / "out", group_size=GROUP, calib_tokens=calib,
                        progress=False, **AWQ)


def quantize_cmd(model: Path, out: Path, text: Path) -> list[str]:
    return [sys.executable, "-m", "awq_ref", "quantize", "--stream", "--model", str(model),
            "--out", str(out), "--group-size", str(GROUP), "--calib", str(text),
            "--n-samples", "16", "--calib-seqlen", "64", "--n-grid", "10"]



@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_cli_killed_run_resumes_and_matches_api(tmp_path):
    model = make_source(tmp_path / "src8", layers=8)
    text = tmp_path / "calib.txt"
    text.write_text("Here the reader reads, and the writer writes every other letter. " * 200)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(quantize_cmd(model, ref, text), check=True, env=env, capture_output=True)

    done = kill_after_block(quantize_cmd(model, out, text), env,
                            tmp_path / "out.partial" / STATE_NAME, 2)
    assert 2 <= done < 8 and not out.exists()
    run = subprocess.run(quantize_cmd(model, out, text), check=False, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"resuming at block {done}: blocks 0-{done - 1} were finished" in run.stderr
    assert folder_bytes(out) == folder_bytes(ref)

    # The CLI is a thin layer over the API: the same call writes the same bytes.
    tokens = awq_ref.calibration_tokens(awq_ref.load_tokenizer(model), [text], 16, 64, 0)
    api = quantize_folder(model, tmp_path / "api", group_size=GROUP, calib_tokens=tokens,
                          n_grid=10, progress=False)
    assert folder_bytes(api) == folder_bytes(ref)


def test_lazy_reader_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.randn(4, 2).to(torch.bfloat16),
               "d": torch.zeros(0, 3, dtype=torch.float16),
               "e": torch.tensor(2.5, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lazy = LazyTensors(tmp_path)
    assert sorted(lazy.index) == sorted(tensors)
    for name, t in read_safetensors_file(tmp_path / "model.safetensors").items():
        got = lazy.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def rewrite_header(path: Path, edit) -> None:
    """Apply edit(header dict) to a safetensors file's JSON header; the data stays."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize(("edit", "match"), [
    (lambda h: h["w"].update(data_offsets=[0, 10**6]), "outside the data section"),
    (lambda h: h["w"].update(shape=[4, 5]), "needs 40 bytes"),
    (lambda h: h["w"].update(data_offsets=[0, 20]), "holds 20 bytes"),  # more than 4 x 2 F16
    (lambda h: h["w"].update(dtype="F4"), "unknown dtype"),
    (lambda h: h["w"].update(shape=[-1, 2]), "bad shape"),
    (lambda h: h.update(w=[1, 2]), "not an object"),
])
def test_corrupt_header_named(tmp_path, edit, match):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 2, dtype=torch.float16), "v": torch.ones(3)}, str(path))
    rewrite_header(path, edit)
    with pytest.raises(ValueError, match=match) as e:
        index_safetensors_file(path)
    assert str(path) in str(e.value)


def test_corrupt_source_refused_before_any_work(src, tmp_path, calib):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        index_safetensors_file(truncated)

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (bad / p.name).write_bytes(p.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])  # cut into the last tensor's data
    with pytest.raises(ValueError, match=f"{shard}.*outside the data section"):
        quantize_folder(bad, tmp_path / "out", group_size=GROUP, calib_tokens=calib)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    shard.write_bytes((src / shard.name).read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(ValueError, match="has shape"):
        quantize_folder(bad, tmp_path / "out", group_size=GROUP, calib_tokens=calib)


def test_a_tied_config_with_a_different_stored_head_is_refused(src, tmp_path):
    """As the in-memory loaders (drop_tied_copy): the readers disagree on which table to use."""
    import shutil

    tied = Path(shutil.copytree(src, tmp_path / "tied"))
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="ties lm_head to the embeddings .* different lm_head"):
        quantize_folder(tied, tmp_path / "out", method="rtn", group_size=GROUP)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_argument_errors(src, tmp_path, calib):
    with pytest.raises(ValueError, match="needs calib_tokens"):
        quantize_folder(src, tmp_path / "a")
    with pytest.raises(TypeError, match="takes no AWQ options"):
        quantize_folder(src, tmp_path / "a", method="rtn", n_grid=3)
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        quantize_folder(src, tmp_path / "a", method="rtn", group_size=48)
    with pytest.raises(ValueError, match="quantize_folder: .*gate_proj/up_proj as one fused"):
        quantize_folder(src, tmp_path / "a", method="rtn", modules_to_not_convert=["up_proj"])
    with pytest.raises(ValueError, match="quantize_folder: .*q_proj/k_proj/v_proj as one fused"):
        quantize_folder(src, tmp_path / "a", method="rtn",
                        modules_to_not_convert=["layers.1.self_attn.v_proj"])  # not in block 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    with pytest.raises(ValueError, match="calib_tokens must be integer"):
        quantize_folder(src, tmp_path / "a", group_size=GROUP, calib_tokens=calib[0])  # (T,)
    with pytest.raises(ValueError, match="calib_tokens: token ids 0..512 do not fit"):
        quantize_folder(src, tmp_path / "a", group_size=GROUP,
                        calib_tokens=torch.cat([calib, torch.full((1, 64), 512)]))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        quantize_folder(src, tmp_path / "exists", method="rtn")
    (tmp_path / "file").write_bytes(b"kept")  # refused before the work, not after it
    with pytest.raises(FileExistsError, match="is not a folder"):
        quantize_folder(src, tmp_path / "file", method="rtn", overwrite=True)
    assert (tmp_path / "file").read_bytes() == b"kept"
    assert not (tmp_path / "file.partial").exists()
