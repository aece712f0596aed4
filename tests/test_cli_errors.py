"""The command line refuses bad arguments with one clear line (exit status 2) before any work:
no model is loaded, so the model paths below need not exist."""

from __future__ import annotations

import pytest
import torch

from awq_ref.cli import main
from awq_ref.eval import read_text, windows_of


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
