"""tools/demo.py, the README's main job: the whole pipeline on the default model with tiny
settings (the full-size run is `make demo`), and its data-free fallback without ../shared."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # demo.py

import demo
import pytest
import torch
from kill_helpers import stop_after_saving

import awq_ref
from awq_ref.awq import pipeline
from awq_ref.awq.resume import Progress
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama


@pytest.mark.slow
def test_demo_runs_the_main_job_end_to_end(default_gguf, shared_data, tmp_path, monkeypatch,
                                           capsys):
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", ["demo.py", "--out", str(out), "--n-samples", "2",
                                      "--calib-seqlen", "32", "--eval-windows", "1",
                                      "--seqlen", "64"])
    # A coarse search (the default one costs ~110 s here whatever the calibration size): the
    # demo's glue is under test, the search's quality elsewhere.
    search_awq = awq_ref.search_awq
    coarse = awq_ref.AwqConfig(n_grid=4, clip_grid=4, clip_joint=0)
    monkeypatch.setattr(awq_ref, "search_awq", lambda *a, **k: search_awq(*a, config=coarse, **k))
    # Ctrl-C after block 2 of the search: one line, exit status 130; the rerun resumes there
    save = Progress.save
    stop_after_saving(monkeypatch, 2, KeyboardInterrupt)
    with pytest.raises(SystemExit) as stopped:
        demo.main()
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert f"interrupted: 2 finished AWQ block(s) are kept in {out / 'awq-search.partial'}" in (
        err) and "Traceback" not in err
    assert Progress(out / "awq-search.partial").saved_blocks() == 2
    monkeypatch.setattr(Progress, "save", save)
    searched, search_block = [], pipeline.search_block
    monkeypatch.setattr(pipeline, "search_block", lambda block, prefix, *a: (
        searched.append(prefix) or search_block(block, prefix, *a)))
    demo.main()
    assert searched[0] == "model.layers.2" and len(searched) == 28  # 30 blocks, 2 kept
    assert not (out / "awq-search.partial").exists()  # removed once the checkpoint is written
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert summary["source"] == "TinyStories calibration, WikiText-2 test"
    assert summary["reload_identical"] is True
    ckpt = out / "smollm2-135m-awq-w4-g64"
    assert summary["checkpoint_bytes"] == sum(f.stat().st_size
                                              for f in ckpt.glob("*.safetensors")) > 0
    assert set(summary["eval"]) == {"fp32", "RTN W4", "AWQ W4 (reloaded)"}
    for name, row in summary["eval"].items():
        assert row["tokens"] == 63 and 1 < row["ppl"] < 1e4, name
        assert ("kl" in row) == (name != "fp32")
    # both prompts echoed, each followed by its continuation alone, which for these prompts
    # starts with a space or a newline
    lines = printed.splitlines()
    for prompt in demo.PROMPTS.read_text().splitlines()[:2]:
        shown = [line.split(" -> ", 1)[1] for line in lines if line.startswith(f"{prompt!r} -> ")]
        assert len(shown) == 1, prompt
        continuation = ast.literal_eval(shown[0])  # printed as its repr
        assert continuation[:1] in (" ", "\n"), continuation


def test_demo_without_shared_data_samples_distinct_calibration_and_evaluation(monkeypatch,
                                                                             one_thread):
    """Without ../shared the demo calibrates on windows the model writes and evaluates on other
    windows it writes (a second seed): evaluating on the calibration windows would flatter AWQ."""
    monkeypatch.setattr(demo, "CALIB", Path("/nonexistent/calib.txt"))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    args = argparse.Namespace(n_samples=2, calib_seqlen=16, eval_windows=2, seqlen=16)
    calib, held_out, source = demo.texts(model, None, args)
    assert source == "data-free (model-sampled) calibration and evaluation"
    assert calib.shape == (2, 16) and held_out.shape == (32,)
    assert not torch.equal(held_out, calib.flatten())
