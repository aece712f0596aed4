"""The CPU tools (tools/) on bad input, as an adversarial user gives it: each is one line and a
non-zero exit before any work, never a traceback, a destroyed input or a half-written file
(found by a review of the tools' command lines, 2026-12-07)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(monkeypatch, script: str, *argv: str) -> int:
    """The script run as `python tools/SCRIPT ARGV...` (its __main__ block): the exit status."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(TOOLS / script), run_name="__main__")
    return done.value.code


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the refusal must come before any work."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    # load_model and load_tokenizer look the path up first, through this module-level name:
    # patched here, not where a tool binds them (a tool imported under the patch would keep
    # the patched names for the tests after this one)
    monkeypatch.setattr("awq_ref.loaders._resolve", loaded)


def test_figures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while drawing a PNG leaves the previous figure, not half of a new one."""
    pytest.importorskip("matplotlib")
    import figures
    import numpy as np
    from matplotlib.figure import Figure

    path = tmp_path / "block_error.png"
    path.write_bytes(b"the previous figure")

    def crash(fig, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        figures.plot_block_errors({"RTN W4": np.array([0.2]), "AWQ W4": np.array([0.1])}, path)
    assert path.read_bytes() == b"the previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["block_error.png"]  # no temporary left


@pytest.mark.parametrize("flag", ["--gemm", "--e2e"])
@pytest.mark.parametrize("text", [
    "[1, 2]", '{"rows": 5}', '{"rows": [5]}', "[" * 100_000,
    json.dumps({"rows": [{"k": 4096, "n": 4096, "m": 16, "impl": "awq", "us": 0.0,
                          "pct_of_floor": 1.0},
                         {"k": 4096, "n": 4096, "m": 16, "impl": "fp16", "us": 30.0}]}),
    json.dumps({"rows": [{"model": "llama3-8b", "variant": v, "decode_graph_tok_s": d,
                          "weights_gib": 1.0, "prefill_2048_tok_s": 1.0}
                         for v, d in (("fp16", None), ("w4 cupy", 1.0))]})])
def test_targets_names_a_benchmark_json_of_another_shape(tmp_path, capsys, flag, text):
    bad = tmp_path / "bench.json"
    bad.write_text(text)
    assert __import__("targets").main([flag, str(bad)]) == 2
    one_line_error(capsys, f"cannot read the benchmark results in {bad}")


def test_report_refuses_a_bad_quality_json_before_any_work(tmp_path, capsys, monkeypatch,
                                                           no_loading):
    for content, words in ((None, "cannot read an awq_quality.py --json report"),
                           ("{", "not valid JSON"),
                           ('{"rows": [{"method": "fp"}], "args": {}}', "KeyError('group')")):
        report = tmp_path / "quality.json"
        report.unlink(missing_ok=True)
        if content is not None:
            report.write_text(content)
        assert run_tool(monkeypatch, "report.py", "--out", str(tmp_path / "docs"),
                        "--reuse-figure-data", "--from-json", str(report)) == 2
        one_line_error(capsys, f"error: {report}", words)


@pytest.mark.parametrize("content,words", [
    (None, "cannot read report.py's figure data"), ('{"curves": 1', "not valid JSON"),
    ("[1]", "a JSON list"), ('{"activations": []}', "not report.py's figure data")])
def test_report_names_bad_figure_data(tmp_path, capsys, monkeypatch, content, words):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr("awq_ref.loaders.load_model", lambda *a, **k: None)
    monkeypatch.setattr("awq_ref.loaders.load_tokenizer", lambda *a, **k: None)
    data = tmp_path / "figures" / "data.json"
    data.parent.mkdir()
    if content is not None:
        data.write_text(content)
    assert run_tool(monkeypatch, "report.py", "--out", str(tmp_path),
                    "--reuse-figure-data") == 2
    one_line_error(capsys, str(data), words)


def test_awq_quality_refuses_before_loading(tmp_path, capsys, monkeypatch, no_loading):
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    base = ("--model", str(model), "--calib", str(tmp_path / "calib.txt"))
    refusals = [(("--json", str(model)), "is also an input"),  # it would be written over
                (("--json", str(tmp_path)), "is a folder"),  # found only after the first search
                (("--bits", "4", "99"), "bits must be an integer in 2..8, got 99"),
                (("--calib-windows", "0"), "--calib-windows"),  # torch.cat(): ... non-empty list
                (("--seqlen", "-1"), "--seqlen"),  # RuntimeError: negative dimension
                (("--methods", "awq", "int4"), "invalid choice: 'int4'"),
                ((), "calib.txt: no such file")]  # found after loading the model
    for extra, words in refusals:
        assert run_tool(monkeypatch, "awq_quality.py", *base, *extra) == 2, extra
        one_line_error(capsys, words)
    assert model.read_bytes() == b"weights"


def test_awq_quality_ctrl_c_is_one_line(stories_dir, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("awq_ref.api.quantize", interrupt)
    text = stories_dir.parent / "text" / "tinystories" / "tinystories_val_prefix.txt"
    assert run_tool(monkeypatch, "awq_quality.py", "--model", str(stories_dir / "stories260K.bin"),
                    "--calib", str(text), "--half-split", "--calib-windows", "1", "--seqlen",
                    "16", "--bits", "4", "--group", "-1") == 130
    one_line_error(capsys, "interrupted: --json keeps")


def test_eval_checkpoints_refusals(tmp_path, capsys, monkeypatch, no_loading):
    import eval_checkpoints

    # a model given as "reference" took the reference's row: its KL vanished, the row showed
    # the model's ppl under the reference's name
    with pytest.raises(SystemExit, match="nor one named 'reference'"):
        eval_checkpoints.main(["reference", "--reference", "fp"])
    for models in (["q", "./q"], ["fp", "--reference", "./fp"], ["default", "--reference",
                                                               "default"]):
        with pytest.raises(SystemExit, match="each model once, and not the reference itself"):
            eval_checkpoints.main(models)  # the same model twice: one wasted evaluation
    text = tmp_path / "text.txt"
    text.write_text("the evaluation text")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "x.json")
    (tmp_path / "file").write_text("")
    for out, words in ((text, "is also an input"), (tmp_path, "is a folder"),
                       (tmp_path / "dangling.json", "a link to nothing"),  # replaced by a file
                       (tmp_path / "file" / "x.json", "is a file, not a folder"),
                       (tmp_path / ("x" * 250), "is too long")):  # all failed after the work
        assert run_tool(monkeypatch, "eval_checkpoints.py", "q", "--reference", "fp", "--text",
                        str(text), "--json", str(out)) == 2
        one_line_error(capsys, "error: --json", words)
    assert text.read_text() == "the evaluation text"
    assert run_tool(monkeypatch, "eval_checkpoints.py", "q", "--seqlen", "0") == 2


def test_stream_7b_keeps_the_model_it_reads(tmp_path, capsys, monkeypatch):
    """--out with --overwrite, and the work folder (deleted after success), replaced or deleted
    the source checkpoint when they were it."""
    import make_random_checkpoint as mrc
    import stream_7b

    model = mrc.write_random_checkpoint(mrc.LlamaConfig(**mrc.PRESETS["tiny"]), tmp_path / "fp")
    files = sorted(p.name for p in model.iterdir())
    for extra in (["--out", str(model), "--overwrite"],
                  ["--out", str(tmp_path / "q"), "--work-dir", str(model)],
                  ["--out", str(tmp_path / "q"), "--work-dir", str(tmp_path)]):
        with pytest.raises(ValueError, match="holds --model"):
            stream_7b.main(["--model", str(model), "--method", "rtn", *extra])
    assert sorted(p.name for p in model.iterdir()) == files and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="not a device name"):  # torch's RuntimeError before
        stream_7b.main(["--model", str(model), "--out", str(tmp_path / "q"), "--device", "gpu"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(_safetensors_without_embedding())
    assert run_tool(monkeypatch, "stream_7b.py", "--model", str(tmp_path / "other"), "--out",
                    str(tmp_path / "q")) == 2  # a KeyError's traceback before
    one_line_error(capsys, "error: ", "no model.embed_tokens.weight")


def _safetensors_without_embedding() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"lm_head.weight": torch.zeros(2, 2)})


def test_make_random_checkpoint_refusals(tmp_path, capsys, monkeypatch):
    import make_random_checkpoint as mrc

    for extra, words in ((["--max-shard-mb", "0"], "--max-shard-mb"),  # a shard per tensor
                         (["--std", "nan"], "--std must be a finite number"),  # all-nan weights
                         (["--seed", str(2**64)], "a seed is 0 ... 2**64-1")):
        with pytest.raises(SystemExit) as done:
            mrc.main(["--out", str(tmp_path / "r"), *extra])
        assert done.value.code == 2 and not (tmp_path / "r").exists(), extra
        one_line_error(capsys, words)
    assert mrc.main(["--out", str(tmp_path / "r"), "--layers", "1", "--seed", str(2**64 - 1)]) == 0
    assert run_tool(monkeypatch, "make_random_checkpoint.py", "--out", str(tmp_path / "r")) == 2
    one_line_error(capsys, "error: ", "already exists")


def test_bench_cpu_refuses_counts_below_one(capsys, monkeypatch, no_loading):
    import bench_cpu

    for flag in ("--repeats", "--decode-steps", "--threads", "--seqlen"):
        monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--model", "m", flag, "0"])
        with pytest.raises(SystemExit) as done:  # StatisticsError, negative tok/s, ... before
            bench_cpu.main()
        assert done.value.code == 2
        one_line_error(capsys, f"argument {flag}")


def test_mutants_refuses_a_selection_of_none(capsys):
    import mutants

    with pytest.raises(SystemExit) as done:  # "0 of 0 killed", status 0, before
        mutants.main(["--only", "no-such-mutant", "--list"])
    assert done.value.code == 2
    one_line_error(capsys, "no mutant's name contains it")


def test_demo_errors_are_one_line(capsys, monkeypatch, no_loading):
    import demo

    monkeypatch.setattr(sys, "argv", ["demo.py", "--n-samples", "0"])
    with pytest.raises(SystemExit) as done:  # torch.cat(): expected a non-empty list, before
        demo.main()
    assert done.value.code == 2
    one_line_error(capsys, "--n-samples")

    def bad_group(args):
        raise ValueError("model.layers.0.self_attn.q_proj: group_size 7 does not divide 576")

    monkeypatch.setattr(demo, "run", bad_group)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--group-size", "7"])
    with pytest.raises(SystemExit) as done:
        demo.main()
    assert done.value.code == 2
    one_line_error(capsys, "error: model.layers.0.self_attn.q_proj: group_size 7")


def test_report_refuses_a_quality_report_on_another_model(tmp_path, capsys, monkeypatch,
                                                          no_loading):
    """results.md, its figures and its sizes are the default model's: a report made with
    --model OTHER would be printed as the default's numbers."""
    quality = tmp_path / "quality.json"
    for model, group, words in (("other-model", 64, "a report on --model other-model"),
                                ("default", 0, "group=0 is no group size")):
        args = {"model": model, "bits": [4], "group": group, "calib_windows": 8, "seqlen": 64,
                "eval_windows": 2, "eval_seqlen": 64}
        rows = [{"method": "fp", "bits": None, "ppl": 20.0, "windows": 2, "tokens": 128}]
        quality.write_text(json.dumps({"args": args, "rows": rows}))
        assert run_tool(monkeypatch, "report.py", "--out", str(tmp_path / "docs"),
                        "--reuse-figure-data", "--from-json", str(quality)) == 2
        one_line_error(capsys, f"error: {quality}", words)


def test_report_sizes_the_checkpoint_at_the_reports_group(monkeypatch):
    """The table's rows say the report's group size: the sizes are measured at it, not at
    report.py's --group (the figures')."""
    import report  # tools/ is on sys.path (conftest)

    seen = []
    monkeypatch.setattr(report, "checkpoint_sizes",
                        lambda model, group: seen.append(group) or {"fp16": 2, "w4": 1})
    rows = [{"method": "fp", "bits": None, "ppl": 20.0},
            {"method": "rtn", "bits": 4, "ppl": 21.0, "kl": 0.1, "top1": 0.9, "quant_s": 1.0}]
    table = report.measured_quality_table({"args": {"group": 128}, "rows": rows}, None)
    assert seen == [128] and "W4 g128" in table


def test_tools_run_under_python_OO():
    """`python -OO` strips docstrings: nine tools (make demo's among them) took their
    description as __doc__.splitlines() and died on None; reading kernel sources without an
    encoding broke under a non-UTF-8 locale. Checked in the source: no attribute of __doc__."""
    import re

    sources = [*TOOLS.glob("*.py"), *(TOOLS.parent / "awq_ref").rglob("*.py"),
               *(TOOLS.parent / "awq_kernels").rglob("*.py")]
    offenders = [p.name for p in sources if re.search(r"__doc__\s*\.", p.read_text("utf-8"))
                 and p.name != "mutant_list.py"]  # its planted bugs are data
    assert offenders == []
    build = (TOOLS.parent / "awq_kernels" / "build.py").read_text("utf-8")
    assert re.search(r"\.read_text\(\)", build) is None


def test_tools_find_the_shared_data_wherever_they_are_run_from():
    """awq_quality, eval_checkpoints and the baselines named ../shared/data relative to the
    current folder: run from anywhere but the repo, they failed (after loading the model)."""
    import awq_quality
    import baseline_protocol
    import eval_checkpoints

    repo = TOOLS.parent
    for path in (awq_quality.DATA, baseline_protocol.DATA, eval_checkpoints.WIKI):
        assert Path(path).is_absolute() and str(path).startswith(str(repo.parent / "shared"))
