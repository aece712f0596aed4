"""The command line refuses bad arguments with one clear line (exit status 2) before any work:
no model is loaded, so the model paths below need not exist."""

from __future__ import annotations

import pytest
import torch

from awq_ref.awq.result import AwqResult
from awq_ref.awq.resume import Progress
from awq_ref.cli import _what_is_kept, build_parser, main
from awq_ref.eval import read_text, windows_of
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
    _refused(capsys, [*base, "--out", str(out)], "already exists")
    fresh = str(tmp_path / "new")
    _refused(capsys, [*base, "--out", fresh, "--n-samples", "0"], "--n-samples must be at least 1")
    _refused(capsys, [*base, "--out", fresh, "--calib-seqlen", "-3"], "--calib-seqlen")
    _refused(capsys, [*base, "--out", fresh, "--w-bit", "9"], "bits must be an integer in 2..8")
    _refused(capsys, [*base, "--out", fresh, "--n-grid", "0"], "n_grid must be >= 1")
    _refused(capsys, [*base, "--out", fresh, "--method", "rtn", "--save-result", "r.st"],
             "rtn searches nothing")
    _refused(capsys, ["quantize", "--model", "default", "--out", fresh, "--stream"],
             "is not a folder")
    assert not (tmp_path / "new").exists()


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
    assert _what_is_kept(stream) == "no block was finished"
    Progress(tmp_path / "ckpt.partial").save(3, AwqResult(QuantSpec(4, 32, True)), torch.zeros(1))
    assert _what_is_kept(stream).startswith(f"3 finished block(s) are kept in {tmp_path / 'ckpt.partial'}")
    assert _what_is_kept(build_parser().parse_args([*base, "--method", "rtn"])) == "nothing was written"
    out.mkdir()
    assert _what_is_kept(stream) == f"the checkpoint was written to {out}"
