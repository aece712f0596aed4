"""The command line refuses bad arguments with one clear line (exit status 2) before any work:
no model is loaded, so the model paths below need not exist."""

from __future__ import annotations

import pytest
import torch

from awq_ref import cli_quantize
from awq_ref.awq.result import AwqResult
from awq_ref.awq.resume import Progress
from awq_ref.cli import build_parser, main
from awq_ref.cli_quantize import what_is_kept
from awq_ref.eval import windows_of
from awq_ref.files import read_text
from awq_ref.quant.quantizer import QuantSpec


def _refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("device,message", [("gpu", "is not a device name"),
                                            ("meta", "only cpu and cuda"),
                                            ("cuda:7", "CUDA device")])
def test_bad_device(capsys, device, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    _refused(capsys, ["ppl", "--model", "absent", "--text", "absent.txt", "--device", device],
             message)


def test_quantize_refuses_before_loading(capsys, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    base = ["quantize", "--model", str(tmp_path / "absent")]
    _refused(capsys, [*base, "--out", str(out)], "already exists: remove it or choose another "
             "folder\n")
    (tmp_path / "ckpt.partial").mkdir()  # a run killed after its rename, before its cleanup
    _refused(capsys, [*base, "--out", str(out)], f"folder ({tmp_path / 'ckpt.partial'} beside it")
    (tmp_path / "ckpt.partial").rmdir()
    fresh = str(tmp_path / "new")
    _refused(capsys, [*base, "--out", fresh, "--n-samples", "0"], "--n-samples must be at least 1")
    _refused(capsys, [*base, "--out", fresh, "--calib-seqlen", "-3"], "--calib-seqlen")
    _refused(capsys, [*base, "--out", fresh, "--n-samples", str(10**20)],
             "--n-samples must be at least 1 and at most 2147483647")  # was torch's TypeError
    _refused(capsys, [*base, "--out", fresh, "--w-bit", "9"], "bits must be an integer in 2..8")
    _refused(capsys, [*base, "--out", fresh, "--n-grid", "0"], "n_grid must be >= 1")
    _refused(capsys, [*base, "--out", fresh, "--method", "rtn", "--save-result", "r.st"],
             "rtn searches nothing")
    _refused(capsys, ["quantize", "--model", "default", "--out", fresh, "--stream"],
             "is not a folder")
    _refused(capsys, [*base, "--out", fresh, "--w-bit", "3"], "4-bit codes only")
    _refused(capsys, [*base, "--out", fresh, "--calib"], "--calib names no file")
    _refused(capsys, [*base, "--out", fresh, "--calib", str(tmp_path / "absent.txt")],
             "absent.txt: no such file")
    _refused(capsys, [*base, "--out", fresh, "--result", str(tmp_path / "r.st")],
             "r.st: no such file")
    _refused(capsys, [*base, "--out", fresh, "--result", "r.st", "--calib", "c.txt"],
             "takes no --calib")
    _refused(capsys, [*base, "--out", fresh, "--method", "rtn", "--n-grid", "5"],
             "--n-grid shapes the AWQ search, which --method rtn does not run")
    _refused(capsys, [*base, "--out", fresh, "--result", "r.st", "--duo-scaling"],
             "--duo-scaling shapes the AWQ search, which --result replaces with a saved one")
    _refused(capsys, [*base, "--out", fresh, "--method", "rtn", "--n-samples", "64"],
             "--n-samples shapes the AWQ search, which --method rtn does not run")  # was ignored
    _refused(capsys, [*base, "--out", fresh, "--result", "r.st", "--calib-seqlen", "256",
                      "--seed", "1"],
             "--calib-seqlen and --seed shape the AWQ search, which --result replaces")
    _refused(capsys, [*base, "--out", fresh, "--work-dir", f"{fresh}/work"], "must lie apart")
    _refused(capsys, [*base, "--out", fresh, "--work-dir", fresh], "must lie apart")
    _refused(capsys, [*base, "--out", f"{tmp_path}/w/ckpt", "--work-dir", f"{tmp_path}/w"],
             "must lie apart")  # the work folder, deleted after success, held the checkpoint
    _refused(capsys, [*base, "--out", fresh, "--save-result", f"{fresh}/r.st"], "inside --out")
    (tmp_path / "file").write_text("")
    _refused(capsys, [*base, "--out", f"{tmp_path}/file/ckpt"], "is a file, not a folder")
    _refused(capsys, [*base, "--out", fresh, "--work-dir", f"{tmp_path}/file/w"],
             "is a file, not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # was found after the search
    _refused(capsys, [*base, "--out", str(tmp_path / "dangling")], "dangling already exists")
    assert not (tmp_path / "new").exists()


def test_save_result_replaces_only_a_saved_result(capsys, tmp_path):
    """--save-result was written over any file after the search: the model's weights, the
    calibration text, anything; a folder or a dangling link failed only after the search."""
    from awq_ref.awq.result import AwqResult
    from awq_ref.quant.quantizer import QuantSpec

    model = _random_folder(tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text("calibration text")
    base = ["quantize", "--model", str(model), "--out", str(tmp_path / "q"), "--calib", str(text)]
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for target, words in ((model / "model.safetensors", "lies inside the model's folder"),
                          (text, "is the model or the calibration text"),
                          (tmp_path / "notes.txt", "exists and is no saved search result"),
                          (tmp_path, "is a folder"), (tmp_path / "dangling", "a link to nothing"),
                          (tmp_path / "notes.txt" / "r.st", "is a file, not a folder")):
        _refused(capsys, [*base, "--save-result", str(target)], words)
    assert (tmp_path / "notes.txt").read_text() == "mine" and text.read_text() == "calibration text"
    AwqResult(spec=QuantSpec(4, 32)).save(tmp_path / "old.st")  # a result saved before: replaced
    assert AwqResult.is_file(tmp_path / "old.st") and not AwqResult.is_file(text)
    cli_quantize._check_save_result(cli_quantize.argparse.Namespace(
        save_result=str(tmp_path / "old.st"), model=str(model), calib=[str(text)]))


def test_group_size_is_checked_from_the_config_before_loading(capsys, tmp_path, monkeypatch):
    folder = _random_folder(tmp_path)  # hidden 128: G = 256 divides no linear
    monkeypatch.setattr(cli_quantize, "load", lambda *a: pytest.fail("the model was loaded"))
    _refused(capsys, ["quantize", "--model", str(folder), "--out", str(tmp_path / "q"),
                      "--method", "rtn", "--group-size", "256"],
             "group_size 256 does not divide in_features 128")


def test_a_llama2c_checkpoint_is_checked_from_its_header(capsys, tmp_path, monkeypatch,
                                                         stories_dir):
    """stories260K's MLP is 172 wide: no 4-bit checkpoint, said before the weights are read."""
    monkeypatch.setattr(cli_quantize, "load", lambda *a: pytest.fail("the model was loaded"))
    _refused(capsys, ["quantize", "--model", str(stories_dir / "stories260K.bin"), "--out",
                      str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"],
             "out_features 172 is not a multiple of 8, so it cannot be packed")


def test_a_gguf_file_is_checked_from_its_header(capsys, tmp_path, monkeypatch, default_gguf):
    """SmolLM2 is 576 wide: group size 128 is refused from the GGUF's metadata, unloaded."""
    monkeypatch.setattr(cli_quantize, "load", lambda *a: pytest.fail("the model was loaded"))
    _refused(capsys, ["quantize", "--model", str(default_gguf), "--out", str(tmp_path / "q"),
                      "--method", "rtn", "--group-size", "128"],
             "group_size 128 does not divide in_features 576; group_size 64 fits")


def _random_folder(tmp_path):
    """A tiny random HF folder without a tokenizer (tools/make_random_checkpoint.py)."""
    import make_random_checkpoint as mrc  # tools/ is on sys.path (conftest.py)

    return mrc.write_random_checkpoint(mrc.LlamaConfig(**mrc.PRESETS["tiny"]), tmp_path / "src")


def test_a_path_that_is_not_utf8_is_printed_not_a_crash(tmp_path):
    """quantize's last line names --out; a name with bytes that are not UTF-8 crashed that
    print (UnicodeEncodeError) under a strict stdout, after the checkpoint was written: the
    rerun then said it already existed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    folder = _random_folder(tmp_path)
    out = os.fsencode(tmp_path) + b"/q\xff\xfe"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-m", "awq_ref", "quantize", "--model", str(folder),
                           "--out", out, "--method", "rtn"], capture_output=True, timeout=300,
                          env=env, cwd=repo, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    assert b"checkpoint written to" in done.stdout and b"\\udcff" in done.stdout


def test_quantize_a_folder_without_tokenizer(capsys, tmp_path, one_thread):
    """Nothing is read as text without --calib: RTN and data-free AWQ need no tokenizer, and the
    checkpoint is written without one; a saved search applied at another group size says so."""
    folder = _random_folder(tmp_path)
    rtn, awq, again = (str(tmp_path / n) for n in ("rtn", "awq", "again"))
    assert main(["quantize", "--model", str(folder), "--out", rtn, "--method", "rtn"]) == 0
    assert "has no tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "rtn").iterdir()) == [
        "config.json", "model.safetensors"]
    assert main(["quantize", "--model", str(folder), "--out", awq, "--n-samples", "2",
                 "--calib-seqlen", "16", "--n-grid", "2", "--save-result",
                 str(tmp_path / "r.st")]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--out", again, "--group-size", "64",
                 "--result", str(tmp_path / "r.st")]) == 0
    assert "searched for W4 g128, applied at W4 g64" in capsys.readouterr().err
    _refused(capsys, ["quantize", "--model", str(folder), "--out", str(tmp_path / "c"),
                      "--calib", str(folder / "config.json")], "no tokenizer.json")


def test_generate_ends_its_output_with_a_newline(capsys, stories_dir):
    assert main(["generate", "--model", str(stories_dir / "stories260K.bin"), "--prompt",
                 "Once", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once") and out.endswith("\n")


def test_ppl_and_generate_options(capsys):
    ppl = ["ppl", "--model", "absent", "--text", "absent.txt"]
    _refused(capsys, [*ppl, "--seqlen", "1"], "--seqlen must be at least 2")
    _refused(capsys, [*ppl, "--windows", "0"], "--windows must be at least 1")
    gen = ["generate", "--model", "absent", "--prompt", "x"]
    _refused(capsys, [*gen, "--max-new-tokens", "-1"], "--max-new-tokens")
    _refused(capsys, [*gen, "--quantize-embeddings", "embed", "--head-bits", "8"],
             "leaves it as it is")


def test_text_and_window_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read the text file"):
        read_text(tmp_path)  # a folder
    with pytest.raises(ValueError, match="at least 2 tokens"):
        windows_of(torch.arange(10), 1, None)


class FakeCupyOutOfMemory(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError derives from MemoryError (the CLI never imports CuPy)."""


@pytest.mark.parametrize("error,status,message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1,
     "error: out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)"),
    (torch.OutOfMemoryError(), 1, "error: out of memory (OutOfMemoryError: ); nothing was written"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 1099511627776 bytes."), 1, "error: out of memory"),
    (MemoryError(), 1, "error: out of memory (MemoryError: )"),
    (FakeCupyOutOfMemory("Out of memory allocating 1,024 bytes"), 1,
     "error: out of memory (FakeCupyOutOfMemory: Out of memory allocating 1,024 bytes)"),
    (KeyboardInterrupt(), 130, "interrupted: nothing was written"),
])
def test_stopped_runs_end_in_one_line(capsys, monkeypatch, error, status, message):
    """Out of memory and Ctrl-C end with a line that says what happened and what is left, not a
    traceback (a resumed quantization's line: tests/test_resume.py)."""
    def fail(args):
        raise error

    monkeypatch.setattr("awq_ref.cli.cmd_ppl", fail)
    assert main(["ppl", "--model", "absent", "--text", "absent.txt"]) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_out_of_memory_advice_fits_the_command(capsys, monkeypatch, tmp_path):
    """Each subcommand's line names its own options (ppl was told of --n-samples and --stream)."""
    def fail(args):
        raise MemoryError()

    for name in ("cmd_ppl", "cmd_generate"):
        monkeypatch.setattr(f"awq_ref.cli.{name}", fail)
    monkeypatch.setattr("awq_ref.cli_quantize.check_quantize_args", fail)
    for argv, advice in ((["ppl", "--text", "t.txt"], "A shorter --seqlen, --dtype bfloat16"),
                         (["generate", "--prompt", "Hi"], "fewer --max-new-tokens (the KV cache)"),
                         (["quantize", "--out", str(tmp_path / "q"), "--model", str(tmp_path)],
                          "Fewer --n-samples or a shorter --calib-seqlen, --stream (models")):
        assert main([*argv, "--model", "absent"] if "--model" not in argv else argv) == 1
        err = capsys.readouterr().err
        assert advice in err and "may fit" in err, err
        assert argv[0] == "quantize" or "--n-samples" not in err, err
    # rtn takes no --n-samples, and a GGUF file no --stream: advised only where they apply
    assert main(["quantize", "--out", str(tmp_path / "q"), "--model", "m.gguf", "--method",
                 "rtn"]) == 1
    assert "out of memory (MemoryError: ); nothing was written. --dtype bfloat16, or a device" \
        in capsys.readouterr().err


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    """Only the out-of-memory kind is turned into a line: any other RuntimeError is a bug."""
    def fail(args):
        raise RuntimeError("shape mismatch somewhere")

    monkeypatch.setattr("awq_ref.cli.cmd_ppl", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["ppl", "--model", "absent", "--text", "absent.txt"])


def test_what_a_stopped_quantization_keeps(tmp_path):
    """The line names what is really there: a work folder without a progress file holds no
    finished block; a written checkpoint is named as such."""

    out = tmp_path / "ckpt"
    base = ["quantize", "--model", "m", "--out", str(out)]
    stream = build_parser().parse_args([*base, "--stream", "--method", "rtn"])
    (tmp_path / "ckpt.partial" / "shards").mkdir(parents=True)  # made before block 0
    assert what_is_kept(stream) == "no block was finished"
    Progress(tmp_path / "ckpt.partial").save(3, AwqResult(QuantSpec(4, 32, True)), torch.zeros(1))
    assert what_is_kept(stream).startswith(f"3 finished block(s) are kept in "
                                           f"{tmp_path / 'ckpt.partial'}")
    assert (what_is_kept(build_parser().parse_args([*base, "--method", "rtn"]))
            == "nothing was written")
    out.mkdir()
    assert what_is_kept(stream) == f"the checkpoint was written to {out}"


def test_cuda_device_index_must_exist(monkeypatch):
    """cuda:N names one of the devices torch sees (0..count-1); cuda:count is refused."""
    from awq_ref.cli import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        check_device("cuda:2")


def test_generate_is_greedy_by_default_and_reports_its_speed(capsys, stories_dir, monkeypatch):
    """Without --temperature the continuation is the greedy one; stderr's speed line is tokens
    over the timed seconds."""
    import types

    from awq_ref import cli
    from awq_ref.generate import generate
    from awq_ref.loaders import load_model, load_tokenizer

    model_path = str(stories_dir / "stories260K.bin")
    clock = iter([10.0, 12.5])  # the two perf_counter() calls around generate: 2.5 s
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert main(["generate", "--model", model_path, "--prompt", "Once", "--max-new-tokens",
                 "24"]) == 0
    captured = capsys.readouterr()
    tok = load_tokenizer(model_path)
    ids = tok.encode("Once")
    greedy = generate(load_model(model_path), ids, 24, eos_ids=tok.eos_ids)
    text = tok.decode(ids + greedy, skip_special_tokens=True)  # "Once upon a time, ..."
    assert captured.out == "Once" + text[len("Once"):] + "\n" and text.startswith("Once upon")
    n = len(greedy)
    assert f"[{n} tokens in 2.50 s, {n / 2.5:.1f} tokens/s]" in captured.err, captured.err


def test_quantize_refuses_options_it_would_ignore(capsys, tmp_path):
    """rtn takes no --calib, --stream no --save-result: each would be silently dropped; --stream
    with AWQ needs --calib text (it cannot sample windows from a model it never holds whole)."""
    text = tmp_path / "c.txt"
    text.write_text("some text")
    base = ["quantize", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "new")]
    _refused(capsys, [*base, "--method", "rtn", "--calib", str(text)], "rtn searches nothing")
    _refused(capsys, [*base, "--stream", "--calib", str(text), "--save-result", "r.st"],
             "--stream does not take --result or --save-result")
    stream = ["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "new"), "--stream"]
    _refused(capsys, stream, "--stream with --method awq needs --calib text")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_no_zero_point_reaches_the_checkpoint(tmp_path, stream, one_thread):
    import json

    from awq_ref.loaders import read_safetensors_folder

    folder = _random_folder(tmp_path)
    out = tmp_path / "sym"
    assert main(["quantize", "--model", str(folder), "--out", str(out), "--method", "rtn",
                 "--no-zero-point", *(["--stream"] if stream else [])]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["zero_point"] is False and qc["sym"] is True
    qzeros = read_safetensors_folder(out)["model.layers.0.self_attn.q_proj.qzeros"]
    assert (qzeros == 0x88888888 - 2**32).all()  # symmetric: every zero point is the fixed 8


def test_quantize_hands_seed_and_search_options_to_the_search(capsys, tmp_path, monkeypatch):
    """--seed picks the calibration windows, --duo-scaling and --n-grid reach AwqConfig (the
    search is stopped as it starts: what it was given is all that is checked)."""
    from pathlib import Path

    from test_cli_inputs import write_folder

    from awq_ref.awq.calibration import calibration_tokens
    from awq_ref.loaders import load_tokenizer

    model_path = str(write_folder(tmp_path / "model", 261))  # packable widths, a tokenizer
    text = tmp_path / "c.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park. "
                    * 20)
    seen = []

    def search(model, calib, spec, config, **kwargs):
        seen.append((calib, config))
        raise ValueError("stopped before the search")

    monkeypatch.setattr("awq_ref.awq.pipeline.search_awq", search)
    for seed in ("0", "1"):
        _refused(capsys, ["quantize", "--model", model_path, "--out", str(tmp_path / "q"),
                          "--group-size", "32", "--calib", str(text), "--n-samples", "4",
                          "--calib-seqlen", "16", "--seed", seed, "--duo-scaling", "--n-grid", "3"],
                 "stopped before the search")
    tok = load_tokenizer(model_path)
    for seed, (calib, config) in enumerate(seen):
        assert torch.equal(calib, calibration_tokens(tok, [Path(text)], 4, 16, seed))
        assert config.duo_scaling is True and config.n_grid == 3
    assert not torch.equal(seen[0][0], seen[1][0])


@pytest.mark.parametrize("where,extra", [
    ("awq_ref.awq.pipeline.search_block", ["--n-samples", "2", "--calib-seqlen", "16",
                                            "--n-grid", "2"]),
    ("awq_ref.stream.block_tensors", ["--method", "rtn", "--stream"]),
    ("awq_ref.eval._score_window", None),
])
def test_an_error_during_a_progress_bar_starts_its_own_line(capsys, tmp_path, monkeypatch,
                                                            request, where, extra, one_thread):
    """The bar is closed when the work fails (keeping the count reached), so the error line
    starts a line of its own instead of being appended to the bar's."""
    folder = _random_folder(tmp_path)
    real, calls = _target(where), []

    def fail_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(where, fail_the_second_time)
    if extra is None:  # ppl: a text of a few windows, read with the stories260K tokenizer
        text = tmp_path / "t.txt"
        text.write_text("Once upon a time there was a cat. " * 40)
        model = request.getfixturevalue("stories_dir") / "stories260K.bin"
        argv = ["ppl", "--model", str(model), "--text", str(text), "--seqlen", "32"]
    else:
        argv = ["quantize", "--model", str(folder), "--out", str(tmp_path / "q"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "|" in err and "\nerror: [Errno 28] No space left on device" in err, err


def _target(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)
