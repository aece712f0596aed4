"""CPU parts of the tools: weight bytes by shapes (bench_e2e --count-weights), bench_gemm's and
stream_7b's options, the SASS loop counter (sass_loops.py) on a hand-written listing, bench_cpu's
transformers twin, awq_quality's JSON, eval_checkpoints, the mutants list."""

import json
import sys
from pathlib import Path

import bench_cpu
import bench_e2e
import pytest
import sass_loops
import torch

from awq_ref.config import LlamaConfig
from awq_ref.model import Llama


def test_count_weights_by_shapes():
    rows = {(r["model"], r["variant"]): r
            for r in bench_e2e.count_weights(["smollm2-135m", "llama3-8b"])}
    fp16 = rows[("llama3-8b", "fp16")]["weights_gib"]
    assert 14.9 < fp16 < 15.0  # 8.03e9 parameters x 2 bytes
    assert 0.35 < rows[("llama3-8b", "w4")]["of_fp16"] < 0.37  # fp16 tables: 2 GiB
    assert rows[("llama3-8b", "w4 +emb")]["of_fp16"] < 0.30  # the issue 6 target
    assert 0.27 < rows[("llama3-8b", "w4 +emb4/head8")]["of_fp16"] < 0.30  # 8-bit head: 0.49 GiB
    small = rows[("smollm2-135m", "w4 +emb")]["weights_gib"]
    assert small < rows[("smollm2-135m", "w4")]["weights_gib"]



def test_count_weights_counts_the_models_asked_for(capsys):
    assert bench_e2e.main(["--count-weights", "--models", "smollm2-135m"]) == 0
    table = capsys.readouterr().out
    assert "smollm2-135m" in table and "llama3-8b" not in table


def test_bench_gemm_refuses_quick_with_the_sweep(monkeypatch, capsys):
    """--quick does not shorten --sweep-mma (its shapes are its own): refused, not ignored."""
    import runpy

    monkeypatch.setattr("sys.argv", ["bench_gemm.py", "--sweep-mma", "--quick"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(bench_e2e.__file__).parent / "bench_gemm.py"), run_name="__main__")
    assert exit_.value.code == 2 and "--quick" in capsys.readouterr().err


def test_stream_7b_reports_no_search_grids_for_rtn(tmp_path, capsys):
    import stream_7b
    from test_resume import write_tiny_model

    model = write_tiny_model(tmp_path / "fp")
    assert stream_7b.main(["--model", str(model), "--out", str(tmp_path / "q"), "--method", "rtn",
                           "--group-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "rtn" and report["n_grid"] is None and report["clip_grid"] is None
    assert (tmp_path / "q" / "config.json").is_file()

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HFMA2 R8, R4, R5, R8 ;
        /*0030*/                   HFMA2 R9, R4, R6, R9 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   FADD R10, R8, R9 ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0070*/                   EXIT ;
"""


def test_sass_loops_counts_backward_branches_only():
    found = sass_loops.loops(LISTING)
    assert len(found) == 1  # the forward branch to .L_x_2 closes no loop
    assert found[0] == {"LDG": 1, "HFMA2": 2, "BRA": 1}
    assert sass_loops.weights_per_iteration("awq_gemv_direct<F16, 1>") == 8 * 4 * 8
    assert sass_loops.weights_per_iteration("awq_gemv_direct<BF16, 8>") == 8 * 1 * 4
    assert sass_loops.weights_per_iteration("awq_gemv<F16, 2>") == 32
    assert sass_loops.weights_per_iteration("splitk_reduce<F16>") is None
    # gemm_mma: a lane dequantizes 4 words of 8 per k16 step, BK / 16 steps per k tile
    assert sass_loops.weights_per_iteration("awq_gemm_mma<F16, 16, 1, 2, 32>") == 64
    assert sass_loops.weights_per_iteration("awq_gemm_mma<BF16, 16, 1, 4, 64>") == 128


PTX = """
.visible .entry k(
\t.param .u64 k_param_0
)
{
\tmov.u32 \t%r1, 0;
$L__BB0_1:
\tadd.s32 \t%r1, %r1, 1;
\tsetp.lt.s32 \t%p1, %r1, 8;
\t@%p1 bra \t$L__BB0_1;
\tbra.uni \t$L__BB0_3;
$L__BB0_3:
\tret;
}
"""


def test_ptx_loops_counts_backward_branches_only():
    loops = sass_loops.ptx_loops(PTX, "k")
    assert loops == [["add.s32 \t%r1, %r1, 1;", "setp.lt.s32 \t%p1, %r1, 8;",
                      "@%p1 bra \t$L__BB0_1;"]]  # the forward bra.uni closes no loop


def test_bench_e2e_refuses_a_tuned_from_that_is_no_sweep(tmp_path, capsys):
    """Checked before any device is looked for: a bad file is a clear exit 2, on any machine."""
    bad = tmp_path / "sweep.json"
    bad.write_text('{"rows": [{"m": 1}]}')
    assert bench_e2e.main(["--tuned-from", str(bad)]) == 2
    assert "not a sweep's JSON (KeyError" in capsys.readouterr().err


@pytest.mark.parametrize("arch", [{}, {"model_type": "qwen2", "tie_word_embeddings": True},
                                  {"model_type": "mistral"},
                                  {"model_type": "qwen3", "head_dim": 32}])
def test_bench_cpu_times_transformers_own_class_with_every_weight(arch):
    """The CPU benchmark's transformers model is that architecture's class holding all our
    weights (it once built LlamaForCausalLM and dropped Qwen2's biases without a word)."""
    pytest.importorskip("transformers", reason="transformers is the benchmark's oracle")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              **arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and biases away from their initial values
                p.normal_()
    hf = bench_cpu.hf_twin(model)
    assert type(hf).__name__ == model.config.to_hf_dict()["architectures"][0]
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


def _awq_quality_argv(stories_dir, out):
    text = stories_dir.parent / "text" / "tinystories" / "tinystories_val_prefix.txt"
    return ["awq_quality.py", "--model", str(stories_dir / "stories260K.bin"), "--calib", str(text),
            "--half-split", "--calib-windows", "2", "--seqlen", "32", "--eval-windows", "1",
            "--eval-seqlen", "64", "--bits", "4", "--group", "-1", "--set", "n_grid=4",
            "loss_seqs=2", "progress=false", "--json", str(out)]


def test_awq_quality_json_keeps_the_searches_when_the_evaluation_fails(stories_dir, tmp_path,
                                                                        monkeypatch):
    import awq_quality

    out = tmp_path / "q.json"
    monkeypatch.setattr(sys, "argv", _awq_quality_argv(stories_dir, out))

    evaluated = []

    def crash(models, tokens, *args, **kwargs):
        evaluated.append(tokens)
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(awq_quality, "evaluate_many", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        awq_quality.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["bits"]) for r in rows] == [("awq", 4), ("rtn", 4)]
    assert all(r["quant_s"] > 0 and "ppl" not in r for r in rows)
    from awq_ref.files import read_text
    from awq_ref.loaders import load_tokenizer

    text = read_text(stories_dir.parent / "text" / "tinystories" / "tinystories_val_prefix.txt")
    held_out = load_tokenizer(stories_dir / "stories260K.bin").encode(text[len(text) // 2:])
    assert evaluated[0].tolist() == held_out  # --half-split: scored on the half not calibrated on

    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", _awq_quality_argv(stories_dir, out))
    awq_quality.main()  # the whole run replaces it with the scored rows
    report = json.loads(out.read_text())
    rows = {(r["method"], r["bits"]): r for r in report["rows"]}
    assert list(rows) == [("fp", None), ("awq", 4), ("rtn", 4)]
    assert "kl" not in rows[("fp", None)] and rows[("rtn", 4)]["kl"] > 0
    p_fp, p_rtn, p_awq = (rows[k]["ppl"] for k in (("fp", None), ("rtn", 4), ("awq", 4)))
    assert rows[("awq", 4)]["recovery"] == pytest.approx((p_rtn - p_awq) / (p_rtn - p_fp))
    assert report["awq_config"]["n_grid"] == 4


def test_eval_checkpoints_scores_each_model_against_one_reference(tmp_path, capsys):
    import eval_checkpoints
    from test_stream_quantize import make_source

    from awq_ref.eval import evaluate, load_wikitext_tokens
    from awq_ref.loaders import load_model, load_tokenizer
    from awq_ref.stream import quantize_folder

    src = make_source(tmp_path / "src", layers=2)
    q32 = quantize_folder(src, tmp_path / "q32", method="rtn", group_size=32, progress=False)
    q64 = quantize_folder(src, tmp_path / "q64", method="rtn", group_size=64, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, again and again. " * 20)
    out = tmp_path / "cmp.json"
    assert eval_checkpoints.main([str(q32), str(q64), "--reference", str(src), "--text", str(text),
                                  "--seqlen", "128", "--windows", "all", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["reference", str(q32), str(q64)] and "kl" not in rows["reference"]
    table = capsys.readouterr().out
    r = rows[str(q64)]
    assert f"| {q64} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} |" in table
    assert f"| reference | {rows['reference']['ppl']:.3f} | - | - |" in table
    tokens = load_wikitext_tokens(load_tokenizer(src), text)
    alone = evaluate(load_model(q64), tokens, 128, None, reference=load_model(src))
    for key in ("ppl", "kl", "top1", "tokens"):
        assert rows[str(q64)][key] == pytest.approx(alone[key], rel=1e-6), key
    assert rows[str(q32)]["kl"] != rows[str(q64)]["kl"]
    with pytest.raises(SystemExit, match="not the reference itself"):
        eval_checkpoints.main([str(src), "--reference", str(src)])


def test_every_mutant_still_names_code_that_exists():
    """tools/mutants.py's planted bugs each replace text found once in its file: when the code
    moves, this says which mutant to update (the mutants themselves run outside CI)."""
    import mutants

    root = Path(__file__).resolve().parents[1]
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert (root / m.file).read_text().count(m.old) == 1, m.name
        assert m.new != m.old and all((root / t).exists() for t in m.tests
                                      if t.startswith("tests/"))


def test_mutants_runner_kills_a_planted_bug(shared_data, capsys):
    import mutants

    assert mutants.main(["--only", "crlf-kept"]) == 0
    assert "killed   crlf-kept" in capsys.readouterr().out


def test_awq_quality_windows_and_peak_rss_units():
    import argparse

    import awq_quality

    assert awq_quality.windows_arg("all") is None and awq_quality.windows_arg("3") == 3
    for bad in ("0", "-1", "2.5", "\u0663"):  # U+0663: a digit int() takes, not an ASCII one
        with pytest.raises(argparse.ArgumentTypeError):
            awq_quality.windows_arg(bad)
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc to compare ru_maxrss with")
    hwm_kib = next(int(line.split()[1]) for line in status.read_text().splitlines()
                   if line.startswith("VmHWM:"))  # the kernel's peak RSS, in kB
    assert awq_quality.peak_rss_gib() == pytest.approx(hwm_kib / 2**20, rel=0.05)


def test_bench_e2e_turns_times_into_tokens_per_s_and_gib(monkeypatch):
    """measure()'s arithmetic on the CPU (the model runs, the timer is faked): prefill is n over
    the median of the repeats, decode counts the timed steps (new tokens - 1), memory in GiB."""
    times = iter([1.0, 4.0, 2.0, 1.0, 4.0, 2.0, 0.5])

    def seconds(fn):
        fn()
        return next(times)

    monkeypatch.setattr(bench_e2e, "DEVICE", "cpu")
    monkeypatch.setattr(bench_e2e, "_seconds", seconds)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2)).eval()
    s = bench_e2e.Settings(prompt=4, new_tokens=6, long_prefill=8, repeats=3)
    assert bench_e2e.measure(model, s, graph=False) == {
        "prefill_4_tok_s": 4 / 2.0, "prefill_8_tok_s": 8 / 2.0, "decode_eager_tok_s": 5 / 0.5,
        "decode_graph_tok_s": None, "peak_gib": 3.0}


@pytest.mark.filterwarnings("error:.*past_key_values")  # transformers 5.x's name is cache=
def test_bench_cpu_rates_and_ratio(stories_dir, monkeypatch, capsys, one_thread):
    """bench_cpu's table and JSON from its timings (faked): tokens over seconds, and the time
    ratio ours / transformers."""
    pytest.importorskip("transformers", reason="transformers is the benchmark's oracle")
    times = iter([0.5, 2.0, 0.25, 4.0])  # ours prefill, ours decode, transformers prefill, decode

    def timed(fn, repeats):
        fn()
        return next(times)

    monkeypatch.setattr(bench_cpu, "timed", timed)
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--model",
                                      str(stories_dir / "stories260K.bin"),
                                      "--threads", "1", "--seqlen", "16", "--decode-steps", "4",
                                      "--repeats", "1", "--json"])
    bench_cpu.main()
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[-1])
    assert result["ours"] == {"prefill_s": 0.5, "prefill_tok_s": 32.0, "decode_tok_s": 2.0}
    assert result["transformers"] == {"prefill_s": 0.25, "prefill_tok_s": 64.0, "decode_tok_s": 1.0}
    assert "time ratio ours/transformers: prefill 2.000, decode 0.500" in out


def test_bench_cpu_refuses_a_twin_missing_weights(monkeypatch):
    """A transformers model left with weights of its own random init would time another model."""
    pytest.importorskip("transformers", reason="transformers is the benchmark's oracle")
    model = Llama(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    full = model.state_dict()
    monkeypatch.setattr(model, "state_dict",
                        lambda: {k: v for k, v in full.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        bench_cpu.hf_twin(model)


def test_awq_quality_set_checks_the_field_type():
    import awq_quality

    assert awq_quality.parse_overrides(["n_grid=5", "duo_scaling=true", "max_shrink=0.4"]) == {
        "n_grid": 5, "duo_scaling": True, "max_shrink": 0.4}
    for bad in ("n_grid=abc", "n_grid=true", "duo_scaling=1", "max_shrink=x"):
        with pytest.raises(SystemExit, match=f"--set {bad}: AwqConfig"):
            awq_quality.parse_overrides([bad])


def test_random_checkpoint_files_are_readable_by_others(tmp_path):
    import make_random_checkpoint as mrc

    out = mrc.write_random_checkpoint(mrc.LlamaConfig(**mrc.PRESETS["tiny"]), tmp_path / "r",
                                      max_shard_bytes=400_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_mode & 0o044 == 0o044 for p in shards)
