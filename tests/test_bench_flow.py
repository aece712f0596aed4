"""The GPU check's benchmark flow on the CPU, CUDA faked: sweep -> derived rule -> benchmark
timing "awq[tuned]" where that rule differs from `auto` -> targets.py's "tuned" column.

GPU time is scarce (minutes per session), so the flow that spends it is checked here: tensors
stay on the CPU, every launch is recorded instead of run (api.gemm resolves its choice as on a
GPU, then stops), and the timers return a fixed time per launch choice, made up so that a sweep
tile beats `auto` at M = 16."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from awq_kernels import api, benchmark, build, dispatch, sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import targets

WIN = build.MMA_TILES[-1]  # the made-up winner at M = 16


@pytest.fixture
def fake_cuda(monkeypatch):
    launches = []

    def on_cpu(fn):
        def inner(*args, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)
        return inner

    for name in ("randn", "randint", "rand", "ones"):
        monkeypatch.setattr(torch, name, on_cpu(getattr(torch, name)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(benchmark, "weight_copies", lambda nbytes: 1)
    monkeypatch.setattr(benchmark, "measure_ceilings",
                        lambda reps=50: benchmark.Ceilings(3e12, 7e14))
    monkeypatch.setattr(benchmark, "host_us", lambda fn, calls=50: 10.0)
    monkeypatch.setattr(benchmark, "_int4pack_weights", lambda k, n, g: [])

    def gemm(x, qweight, qzeros, scales, group_size, *, kernel="auto", mma_tile=None,
             max_splits=16, dispatch=None, **_):
        launches.append(dispatch_mod.resolve(x.shape[0], group_size, kernel, mma_tile,
                                             max_splits, dispatch))

    dispatch_mod = dispatch
    monkeypatch.setattr(api, "gemm", gemm)
    monkeypatch.setattr(api, "_launch_product",
                        lambda name, x, *a, **k: launches.append(dispatch.Choice(name)))
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: launches.append("fp16"))

    def median_us(fns, reps, warmup=5, sleep_cycles=0):
        launches.clear()
        fns[0]()
        c = launches[-1] if launches else "torch"
        if c == "fp16" or c == "torch":
            return 100.0
        return 50.0 if c.tile == WIN else 80.0 if c.kernel != "dequant_overlap" else 90.0

    monkeypatch.setattr(benchmark, "median_us", median_us)
    return launches


def test_sweep_rule_is_timed_by_the_benchmark_and_judged(fake_cuda, tmp_path, capsys):
    swept = sweep.run(shapes=((128, 256), (256, 128)), ms=(8, 16, 64), reps=50)
    assert swept["auto"] == dispatch.DEFAULT.to_json() and swept["shapes"] == [[128, 256],
                                                                                [256, 128]]
    rule = sweep.tuned_dispatch(swept)
    assert rule.choose(16).tile == WIN and rule.choose(64).tile == WIN
    assert rule.choose(2) == dispatch.DEFAULT.choose(2)  # below the first timed M: the base's
    result = benchmark.run(((128, 256),), (1, 16, 64, 128), reps=50, tuned=rule)
    impls = {(r["m"], r["impl"]) for r in result["rows"]}
    assert {(16, "awq[tuned]"), (64, "awq[tuned]")} <= impls  # where it differs from `auto`
    assert (1, "awq[tuned]") not in impls and (128, "awq[tuned]") not in impls
    assert (128, "awq[dequant,overlap]") in impls and (64, "awq[dequant,overlap]") not in impls
    assert dispatch.Dispatch.from_json(result["tuned_dispatch"]) == rule
    path = tmp_path / "bench_gemm.json"
    path.write_text(json.dumps(result))
    assert targets.main(["--gemm", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| target | auto | tuned | best of ours |" in out
    assert "2.00x at 128x256 M=16 (awq[tuned])" in out  # fp16 100 us, the winner 50


def test_benchmark_rows_are_the_protocols_numbers(fake_cuda):
    """Each row's GB/s (awq bytes / time), speedup (fp16's time / its own) and % of the roofline
    floor (max of the bytes' and the flops' time, over its own) at the faked times: awq[mma] 80
    us, fp16 100 us, ceilings 3 TB/s and 700 TFLOP/s (memory-bound at M = 16)."""
    k, n, m, g = 128, 256, 16, 128
    result = benchmark.run(((k, n),), (m,), group_size=g, reps=50)
    row = next(r for r in result["rows"] if r["impl"] == "awq[mma]")
    nbytes = benchmark.awq_bytes(m, k, n, g)
    floor_s = max(nbytes / 3e12, 2 * m * k * n / 7e14)
    assert row["us"] == 80.0 and row["gb_per_s"] == pytest.approx(nbytes / 80e-6 / 1e9)
    assert row["speedup_vs_fp16"] == pytest.approx(100 / 80)
    assert row["pct_of_floor"] == pytest.approx(100 * floor_s / 80e-6)


def test_sweep_compares_with_the_fastest_of_ours_not_fp16(fake_cuda, monkeypatch):
    """vs_best is over our variants only: where cuBLAS fp16 is fastest, our best is still 1.0,
    and fp16 gets its time over it (not a rank among our variants)."""
    timed = benchmark.median_us

    def fp16_fastest(fns, reps, warmup=5, sleep_cycles=0):
        us = timed(fns, reps, warmup, sleep_cycles)
        return 20.0 if us == 100.0 else us

    monkeypatch.setattr(benchmark, "median_us", fp16_fastest)
    rows = sweep.run(shapes=((128, 256),), ms=(16,), reps=50)["rows"]
    ours = [r for r in rows if r["variant"] != "fp16"]
    fp16 = next(r for r in rows if r["variant"] == "fp16")
    assert min(r["vs_best"] for r in ours) == 1.0 and fp16["vs_best"] == pytest.approx(20 / 50)
    assert "fp16" not in [name for name, _ in sweep.ranking({"rows": rows})[16]]


@pytest.mark.parametrize("tool", ["benchmark", "sweep"])
def test_a_point_that_loses_cuda_stops_the_run_and_keeps_what_was_measured(fake_cuda, monkeypatch,
                                                                           tool):
    """A point's error is printed and the run goes on, unless CUDA fails after it (an illegal
    address poisons the process's context): then every later point would fail too, so the
    run stops with the rows measured before it, says where, and a sweep derives no rule."""
    culprit = "mma_direct" if tool == "benchmark" else "dequant"  # timed after awq at M = 16
    state = {"m": 0, "sticky": False, "lost": False}
    timer, randn = benchmark.median_us, torch.randn

    def note_m(*shape, **kw):  # x = randn(M, K): the M being timed
        if len(shape) == 2 and shape[0] in (8, 16, 64):
            state["m"] = shape[0]
        return randn(*shape, **kw)

    def faulting(fns, reps, warmup=5, sleep_cycles=0):
        us = timer(fns, reps, warmup, sleep_cycles)
        if getattr(fake_cuda[-1], "kernel", None) == culprit and state["m"] == 16:
            state["lost"] = state["sticky"]
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return us

    def synchronize(*a):
        if state["lost"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "randn", note_m)
    monkeypatch.setattr(benchmark, "median_us", faulting)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    shapes, saved = ((128, 256), (256, 128)), []

    def run() -> dict:
        if tool == "benchmark":
            return benchmark.run(shapes, (8, 16, 64), reps=50, on_shape=saved.append)
        return sweep.run(shapes=shapes, ms=(8, 16, 64), reps=50, on_shape=saved.append)

    whole = run()  # an error that leaves CUDA working costs its own point only
    assert "stopped" not in whole and {r["k"] for r in whole["rows"]} == {128, 256}
    state["sticky"], saved = True, []
    result = run()
    assert "illegal memory access" in result["stopped"] and "M=16" in result["stopped"]
    assert saved and saved[-1] is result  # saved once stopped
    points = {(r["k"], r["m"]) for r in result["rows"]}  # nothing after the fault
    if tool == "benchmark":  # M = 8, and M = 16's points timed before it
        assert points == {(128, 8), (128, 16)}
        assert {"awq", "awq[mma]"} <= {r["impl"] for r in result["rows"] if r["m"] == 16}
        assert "Stopped:" in benchmark.markdown(result)
    else:  # the Ms finished before it; no rule from a sweep with a faulting variant
        assert points == {(128, 8)}
        assert "Stopped:" in sweep.markdown(result)
        with pytest.raises(ValueError, match="the sweep stopped"):
            sweep.tuned_dispatch(result)


def test_e2e_benchmark_measures_every_models_proven_rows_first(monkeypatch, tmp_path):
    """The variants on awq_kernels.ops (changed since their last GPU run) and the unproven ones
    ([overlap], [tuned]) run after both models' proven rows, in that order: a sticky CUDA
    error there must not cost the Llama-3-8B rows; every row is in the JSON as measured."""
    import bench_e2e

    def rows(kind):
        def fake(name, s, extra=None):
            assert kind != "ops" or extra == "the ops"
            yield {"model": name, "variant": f"{kind} 1"}
            yield {"model": name, "variant": f"{kind} 2"}
            if kind == "optional" and name == "llama3-8b":
                raise RuntimeError("an illegal memory access was encountered")
        return fake

    monkeypatch.setattr(bench_e2e, "check_backend", lambda *a: None)
    monkeypatch.setattr(bench_e2e, "elementwise_ops", lambda: "the ops")
    monkeypatch.setattr(bench_e2e, "bench_model", rows("proven"))
    monkeypatch.setattr(bench_e2e, "ops_rows", rows("ops"))
    monkeypatch.setattr(bench_e2e, "optional_rows", rows("optional"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    out = tmp_path / "e2e.json"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_e2e.main(["--models", "smollm2-135m", "llama3-8b", "--json", str(out)])
    got = [(r["model"], r["variant"]) for r in json.loads(out.read_text())["rows"]]
    models = ("smollm2-135m", "llama3-8b")
    assert got == [(m, f"{kind} {i}") for kind in ("proven", "ops", "optional")
                   for m in models for i in (1, 2)]


def test_the_ops_check_runs_apart_and_a_failure_there_skips_only_the_ops(capsys, monkeypatch):
    """tools/ops_check.py checks awq_kernels.ops in a child process (a CUDA fault there would
    leave the benchmark's own context unusable); its failure, here no CUDA device for the
    child, is a message and None, and this process never touched CUDA."""
    import ops_check

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child's failure, on a GPU machine too
    assert ops_check.elementwise_ops() is None
    assert not torch.cuda.is_initialized()
    err = capsys.readouterr().err
    assert "awq_kernels.ops failed its check, skipping the +ops variants: exit status 1" in err
    assert "CUDA" in err or "cuda" in err  # the child's own error, passed on


def test_e2e_weights_are_the_tensors_bytes_not_the_allocators_total(monkeypatch):
    """The H100 run's "weights" column was memory_allocated() once built, which also held
    cuBLAS's workspaces (32 MiB per stream; SmolLM2 W4 0.20 GiB against 0.11 of tensors):
    the column is now the model's own tensors, the allocator's total a column of its own."""
    import bench_e2e
    import e2e_models

    with torch.device("meta"):
        model = bench_e2e.Llama(e2e_models.SMOLLM2).half()
    monkeypatch.setattr(bench_e2e, "_fresh_peak", lambda: 0.25)
    monkeypatch.setattr(bench_e2e, "measure", lambda *a, **k: {"peak_gib": 0.5})
    row = bench_e2e._row("smollm2-135m", "random", "fp16", model, bench_e2e.QUICK, graph=True)
    assert row["weights_gib"] == pytest.approx(134515008 * 2 / 2**30)  # 134.5 M parameters
    assert row["allocated_gib"] == 0.25 and row["peak_gib"] == 0.5


def test_every_profiled_4bit_linear_runs_on_our_kernels(monkeypatch):
    """The decode profile's "w4 cupy +emb +ops" set the kernel before making the 4-bit tables,
    so its new 4-bit lm_head ran on the torch reference (the 8B head dequantized every step)
    under a title naming awq_kernels: every QuantLinear must hold the kernel."""
    import bench_e2e

    from awq_ref.api import quantize
    from awq_ref.config import LlamaConfig
    from awq_ref.quant.qlinear import QuantLinear

    def tiny(name, quantized):
        torch.manual_seed(0)
        model = bench_e2e.Llama(LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)).eval()
        if quantized:
            model = quantize(model, method="rtn", group_size=32, inplace=True)
        return model, "random"

    kernel = object()
    monkeypatch.setattr(bench_e2e, "build", tiny)
    monkeypatch.setattr(bench_e2e, "backend_kernel", lambda *a: kernel)
    for variant in bench_e2e.PROFILED[1:]:
        model = bench_e2e.profiled_model("smollm2-135m", variant, None)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.kernel is kernel for m in layers), variant
        if "+emb" in variant:
            assert isinstance(model.lm_head, QuantLinear)
