"""Resumable AWQ quantization: a CLI run killed with SIGKILL after block 2, then rerun with
the same command, writes the same checkpoint bytes as an uninterrupted run."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_helpers import folder_bytes, kill_after_block, saved_block, stop_after_block
from safetensors.torch import save_file

from awq_ref.awq.pipeline import AwqConfig, search_awq
from awq_ref.awq.resume import STATE_NAME, Progress, fingerprint
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.quantizer import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 261, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (256 bytes + 5 merges = 261 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    merges = [("H", "e"), ("l", "l"), ("o", "r"), ("He", "ll"), ("\u0120", "w")]
    vocab = {t: i for i, t in enumerate(sorted(alphabet) + ["".join(m) for m in merges])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "!", "eos_token": "\"", "add_bos_token": True}))


def write_tiny_model(folder: Path, seed: int = 0, **changes) -> Path:
    """An HF folder (config, safetensors, tokenizer) of a random 6-block Llama, hidden 64
    (`changes`: other config fields)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**TINY, **changes})).eval()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"))
    write_tokenizer(folder)
    return folder


def quantize_cmd(model: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "awq_ref", "quantize", "--model", str(model), "--out", str(out),
            "--method", "awq", "--group-size", "32", "--calib", str(text), "--n-samples", "16",
            "--calib-seqlen", "64", "--n-grid", "10", *extra]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    text = root / "calib.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog. " * 200)
    return write_tiny_model(root / "model"), text, root


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_killed_run_resumes_to_identical_checkpoint(tiny_setup):
    model, text, root = tiny_setup
    ref, out = root / "ref", root / "out"
    subprocess.run(quantize_cmd(model, ref, text), check=True, env=env(), capture_output=True)
    assert not (root / "ref.partial").exists()  # removed after success

    done = kill_after_block(quantize_cmd(model, out, text), env(),
                            root / "out.partial" / STATE_NAME, 2)
    assert 2 <= done < TINY["num_hidden_layers"] and not out.exists()

    run = subprocess.run(quantize_cmd(model, out, text), check=False, env=env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert folder_bytes(out) == folder_bytes(ref)
    assert not (root / "out.partial").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
@pytest.mark.parametrize("sig,word,status", [("SIGINT", "interrupted", 130),
                                             ("SIGTERM", "terminated", 143)])
def test_interrupted_run_says_so_and_resumes(tiny_setup, sig, word, status):
    """Ctrl-C (SIGINT) after block 2: one line naming the work folder, exit status 130, no
    traceback; the same command then finishes to the uninterrupted run's bytes. SIGTERM (what
    timeout, docker stop and Slurm send) killed the run without a word, its cleanups not run
    (a half-written checkpoint's temporary folder stayed): now the same, with status 143."""
    model, text, root = tiny_setup
    ref, out = root / f"ref_{sig}", root / f"out_{sig}"
    subprocess.run(quantize_cmd(model, ref, text), check=True, env=env(), capture_output=True)
    done, returncode, err = stop_after_block(quantize_cmd(model, out, text), env(),
                                             root / f"out_{sig}.partial" / STATE_NAME, 2,
                                             getattr(signal, sig))
    assert returncode == status, err
    assert f"\n{word}: " in err, err
    assert "Traceback" not in err and "the same command resumes" in err and not out.exists(), err
    assert 2 <= done < TINY["num_hidden_layers"]
    assert f"{done} finished block(s) are kept in {root / f'out_{sig}.partial'}" in err, err
    run = subprocess.run(quantize_cmd(model, out, text), check=False, env=env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (f"resuming at block {done}: blocks 0-{done - 1} were finished and saved in "
            f"{root / f'out_{sig}.partial'}") in run.stderr
    assert f"s (this run; blocks 0-{done - 1} were searched before); checkpoint" in run.stdout
    assert folder_bytes(out) == folder_bytes(ref)


def test_other_settings_refused(tiny_setup):
    model, text, root = tiny_setup
    out, work = root / "refused", root / "refused.partial"
    work.mkdir()
    Progress(work).save(3, _empty_result(), torch.zeros(1))  # a state with no/foreign fingerprint
    run = subprocess.run(quantize_cmd(model, out, text), check=False, env=env(),
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "different model, calibration data or settings" in run.stderr
    assert str(work) in run.stderr and not out.exists()


def test_a_second_run_on_the_same_work_folder_is_refused(tiny_setup, tmp_path, capsys):
    """The same command started twice: the second is refused at once (flock), for the CLI and
    for quantize_folder, and the first's folder is left as it was; a nested hold is the same
    run; a hold that saved nothing leaves no folder behind."""
    from awq_ref.cli import main

    model, text, _ = tiny_setup
    first, again = Progress(tmp_path / "w"), Progress(tmp_path / "w")
    with first.hold():
        with first.hold():
            pass
        with pytest.raises(ValueError, match="w is in use by another run"), again.hold():
            pass
        out = tmp_path / "q"
        for stream in ([], ["--stream"]):
            argv = quantize_cmd(model, out, text, "--work-dir", str(tmp_path / "w"), *stream)
            assert main(argv[3:]) == 2  # after "python -m awq_ref"
            assert "is in use by another run (the same command started twice?)" in (
                capsys.readouterr().err)
            assert not out.exists()
        assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [".lock"]
    assert not (tmp_path / "w").exists()
    with again.hold():  # released
        pass


def test_a_work_dir_the_user_named_keeps_its_other_files(tiny_setup, tmp_path, capsys):
    """After success a run removes what it wrote in the work folder, not the folder: a --work-dir
    that already held the user's files (once even the model's own folder) keeps them."""
    from awq_ref.cli import main

    model, text, _ = tiny_setup
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    for i, stream in enumerate(([], ["--stream"])):
        argv = quantize_cmd(model, tmp_path / f"q{i}", text, "--work-dir", str(work), *stream)
        assert main(argv[3:]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert main(quantize_cmd(model, tmp_path / "q2", text)[3:]) == 0  # its own folder: removed
    assert not (tmp_path / "q2.partial").exists()


def test_the_model_folder_as_work_dir_is_refused(tiny_setup, tmp_path, capsys):
    from awq_ref.cli import main
    from awq_ref.stream import quantize_folder

    model, text, _ = tiny_setup
    for stream in ([], ["--stream"]):
        argv = quantize_cmd(model, tmp_path / "q", text, "--work-dir", f"{model}/", *stream)
        assert main(argv[3:]) == 2
        assert f"--work-dir {model} is the --model folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="work_dir .* is the source folder"):
        quantize_folder(model, tmp_path / "q", method="rtn", group_size=32, work_dir=model)
    assert not (tmp_path / "q").exists()


def test_a_hold_keeps_folders_it_did_not_create_and_its_caller_s_exception(tmp_path):
    """Only a work folder the hold made is removed when nothing was saved: a folder the user
    made (or a link to one, a natural way to put the state on another disk) stays, and the
    exception that ended the run is the one raised."""
    mine = tmp_path / "mine"
    mine.mkdir()
    link = tmp_path / "link"
    link.symlink_to(mine)
    for folder in (mine, link):
        with pytest.raises(KeyboardInterrupt), Progress(folder).hold():
            raise KeyboardInterrupt
        assert folder.is_dir()
    with pytest.raises(KeyboardInterrupt), Progress(tmp_path / "new").hold():
        raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()


def test_corrupt_state_file_is_a_value_error(tmp_path):
    """A torn or foreign state file raised SafetensorError / KeyError tracebacks on resume."""
    from safetensors.torch import save_file

    progress = Progress(tmp_path / "work")
    progress.work_dir.mkdir()
    progress.state_path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt AWQ progress file"):
        progress.restore(_empty_result())
    # the right format and fingerprint, but no search record or block number
    meta = {"format": "awq_ref.AwqProgress/1", "fingerprint": progress.fingerprint}
    save_file({"hidden": torch.zeros(1)}, str(progress.state_path), metadata=meta)
    with pytest.raises(ValueError, match=r"corrupt AWQ progress file.*KeyError"):
        progress.restore(_empty_result())


def _empty_result():
    from awq_ref.awq.result import AwqResult

    return AwqResult(spec=QuantSpec(group_size=32))


class _StopAfterBlock2(Progress):
    """A search interrupted (Ctrl-C) right after its state for blocks 0-1 is on disk."""

    def save(self, next_block, result, hidden):
        super().save(next_block, result, hidden)
        if next_block == 2:
            raise KeyboardInterrupt


def test_resume_in_process_matches(tmp_path, one_thread, monkeypatch):
    """The API: a search stopped after 2 blocks and resumed searches blocks 2-3 only and equals
    an uninterrupted one; the state is refused for other settings and for another model of the
    same config."""
    from awq_ref.awq import pipeline

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "num_hidden_layers": 4})).eval()
    tokens = torch.randint(0, TINY["vocab_size"], (4, 32),
                           generator=torch.Generator().manual_seed(1))
    spec, config = QuantSpec(group_size=32), AwqConfig(n_grid=5, progress=False)
    full = search_awq(model, tokens, spec, config)

    with pytest.raises(KeyboardInterrupt):
        search_awq(model, tokens, spec, config, work=_StopAfterBlock2(tmp_path / "work"))
    progress = Progress(tmp_path / "work")
    assert saved_block(progress.state_path) == 2
    with pytest.raises(ValueError, match="different model, calibration data or settings"):
        search_awq(model, tokens, spec, AwqConfig(n_grid=6, progress=False), work=progress)
    fine_tuned = copy.deepcopy(model)  # the same config; one matrix of the last block moved
    with torch.no_grad():
        w = fine_tuned.model.layers[3].mlp.down_proj.weight
        w += 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="different model, calibration data or settings"):
        search_awq(fine_tuned, tokens, spec, config, work=progress)
    assert saved_block(progress.state_path) == 2
    searched, search_block = [], pipeline.search_block
    monkeypatch.setattr(
        pipeline, "search_block",
        lambda block, prefix, *a: searched.append(prefix) or search_block(block, prefix, *a))
    with pytest.raises(TypeError, match="give the work folder once"):
        search_awq(model, tokens, spec, config, work=progress, progress=progress)
    with pytest.warns(DeprecationWarning, match=r"now search_awq\(work=...\)"):
        resumed = search_awq(model, tokens, spec, config, progress=progress)  # the former name
    assert searched == ["model.layers.2", "model.layers.3"]  # blocks 0, 1 were not redone
    assert resumed.search == full.search
    assert sorted(resumed.scales) == sorted(full.scales)
    for k in full.scales:
        assert torch.equal(resumed.scales[k], full.scales[k])
    for k in full.clips:
        assert all(torch.equal(a, b) for a, b in zip(resumed.clips[k], full.clips[k]))


@pytest.mark.parametrize("stream", [False, True])
def test_cli_save_dtype_casts_the_unquantized_tensors(tiny_setup, tmp_path, stream):
    """--save-dtype float16 stores embeddings and norms as AutoAWQ does (half the bytes of the
    fp32 default); the packed tensors are the same either way."""
    from awq_ref.cli import main
    from awq_ref.loaders import read_safetensors_folder

    model, _, _ = tiny_setup
    base = ["quantize", "--model", str(model), "--method", "rtn", "--group-size", "32",
            *(["--stream"] if stream else [])]
    assert main([*base, "--out", str(tmp_path / "kept")]) == 0
    assert main([*base, "--out", str(tmp_path / "half"), "--save-dtype", "float16"]) == 0
    kept, half = (read_safetensors_folder(tmp_path / name) for name in ("kept", "half"))
    embed = "model.embed_tokens.weight"
    assert kept[embed].dtype == torch.float32  # the model's (and the fp32 source's) dtype
    assert half[embed].dtype == half["model.norm.weight"].dtype == torch.float16
    q = "model.layers.0.self_attn.q_proj"
    assert all(torch.equal(kept[f"{q}.{t}"], half[f"{q}.{t}"])
               for t in ("qweight", "qzeros", "scales"))


def test_fingerprint_changes_with_every_input_of_the_search():
    """A resumed search must be the same search: each input changes the fingerprint (the
    progress flag alone does not)."""
    config = LlamaConfig(**TINY)
    tokens = torch.randint(0, TINY["vocab_size"], (4, 32),
                           generator=torch.Generator().manual_seed(1))
    base = (config, tokens, QuantSpec(group_size=32), AwqConfig(n_grid=5, progress=False), (),
            torch.device("cpu"), {"source": "a"})
    first = fingerprint(*base)
    other_tokens = tokens.clone()
    other_tokens[3, 31] = (other_tokens[3, 31] + 1) % TINY["vocab_size"]  # one token, same shape
    changes = [(0, LlamaConfig(**{**TINY, "rope_theta": 12345.0})), (1, other_tokens),
               (2, QuantSpec(group_size=64)), (3, AwqConfig(n_grid=6, progress=False)),
               (4, ("mlp.down_proj",)), (5, torch.device("meta")), (6, {"source": "b"})]
    for i, value in changes:
        assert fingerprint(*base[:i], value, *base[i + 1:]) != first, i
    assert fingerprint(*base[:3], AwqConfig(n_grid=5, progress=True), *base[4:]) == first
    assert fingerprint(*base[:1], tokens.to(torch.int32), *base[2:]) == first


def test_cli_progress_of_another_dtype_is_refused(tiny_setup, tmp_path, monkeypatch, one_thread):
    """The CLI adds the model path and --dtype to the fingerprint: a search made in float32 is
    not resumed (here: not reused whole) by a bfloat16 run, whose activations differ."""
    from awq_ref.cli import main

    model, text, _ = tiny_setup
    work = tmp_path / "work"
    base = ["quantize", "--model", str(model), "--method", "awq", "--group-size", "32", "--calib",
            str(text), "--n-samples", "4", "--calib-seqlen", "32", "--n-grid", "2",
            "--work-dir", str(work)]
    monkeypatch.setattr(Progress, "remove", lambda self: None)  # keep the finished state
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    assert Progress(work).saved_blocks() == TINY["num_hidden_layers"]
    assert main([*base, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 2
    assert not (tmp_path / "bf16").exists()


# A run that dies (SIGKILL, power loss: no `except` runs) with the checkpoint written in its
# temporary folder, just before the rename; os._exit stands in for the kill. Status 9 if the
# writer held its folder's lock then (another open of it cannot take it), 8 if not.
_DIE_BEFORE_RENAME = """
import fcntl, os, sys
import awq_ref.quant.checkpoint as ck

def die(tmp, out_dir):
    try:
        fcntl.flock(os.open(tmp, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os._exit(9)
    os._exit(8)

ck._swap_in = die
from awq_ref.cli import main
main(sys.argv[1:])
"""


def test_a_rerun_removes_the_temporary_folder_of_a_killed_save(tiny_setup):
    """A killed save leaves its temporary folder beside --out (nothing can remove it then); the
    rerun that writes --out removes it, and only a folder no live writer holds (flock)."""
    model, text, root = tiny_setup
    ref, out = root / "ref_tmp", root / "out_tmp"
    subprocess.run(quantize_cmd(model, ref, text), check=True, env=env(), capture_output=True)
    died = subprocess.run([sys.executable, "-c", _DIE_BEFORE_RENAME,
                           *quantize_cmd(model, out, text)[3:]], check=False, env=env(),
                          capture_output=True)
    assert died.returncode == 9, died.stderr
    assert not out.exists() and len(list(root.glob(".out_tmp.tmp-*"))) == 1
    live = root / ".out_tmp.tmp-live"  # another writer's, still being written: it holds the lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = subprocess.run(quantize_cmd(model, out, text), check=False, env=env(),
                             capture_output=True, text=True)
    finally:
        os.close(fd)
    assert run.returncode == 0, run.stderr
    assert folder_bytes(out) == folder_bytes(ref)
    assert [p.name for p in root.glob(".out_tmp.tmp-*")] == [live.name]
    assert not (root / "out_tmp.partial").exists()
