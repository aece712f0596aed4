"""tools/targets.py: the issue 5 and 6 targets judged from benchmark JSON (no GPU needed)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import targets


def _gemm_row(k, n, m, impl, us, pct=50.0):
    return {"k": k, "n": n, "m": m, "impl": impl, "us": us, "pct_of_floor": pct}


def test_gemm_targets_take_the_worst_shape_and_the_best_of_ours():
    rows = [_gemm_row(4096, 4096, 1, "awq", 10.0, pct=60.0),
            _gemm_row(4096, 4096, 1, "awq[direct]", 6.0, pct=80.0),
            _gemm_row(4096, 4096, 1, "awq[direct,no sum]", 4.0, pct=99.0),  # no product: not ours
            _gemm_row(4096, 4096, 1, "fp16", 15.0), _gemm_row(4096, 4096, 1, "int4pack", 9.0),
            _gemm_row(576, 192, 1, "awq", 5.0, pct=10.0),  # small shape: not in the M=1 target
            _gemm_row(4096, 576, 1, "awq", 5.0, pct=20.0),  # N < 4096: not in it either
            _gemm_row(4096, 4096, 16, "awq", 10.0), _gemm_row(4096, 4096, 16, "fp16", 30.0),
            _gemm_row(4096, 4096, 16, "int4pack", 40.0)]
    got = {r["target"]: r for r in targets.gemm_targets({"rows": rows})}
    m1 = got["M=1 >= 75% of floor (K, N >= 4096)"]
    assert m1["auto"].startswith("60.00% at 4096x4096 M=1 (awq): NOT met")
    assert m1["best of ours"].startswith("80.00% at 4096x4096 M=1 (awq[direct]): met")
    assert got["M=16 >= 2.5x fp16"]["auto"] == "3.00x at 4096x4096 M=16 (awq): met"
    assert got["M=64 >= 1.8x fp16"]["auto"] == "not measured"
    int4 = got["faster than torch int4 at every M"]
    assert int4["auto"].startswith("0.90x at 4096x4096 M=1 (awq): NOT met")
    assert int4["best of ours"].startswith("1.50x at 4096x4096 M=1 (awq[direct]): met")


def test_tuned_column_uses_awq_where_the_tuned_dispatch_was_not_timed(tmp_path, capsys):
    from awq_kernels.dispatch import DEFAULT

    rows = [_gemm_row(4096, 4096, 16, "awq", 20.0), _gemm_row(4096, 4096, 16, "fp16", 30.0),
            _gemm_row(4096, 4096, 16, "awq[tuned]", 10.0),
            _gemm_row(4096, 4096, 64, "awq", 20.0), _gemm_row(4096, 4096, 64, "fp16", 40.0)]
    got = {r["target"]: r for r in targets.gemm_targets({"rows": rows})}
    assert got["M=16 >= 2.5x fp16"]["tuned"] == "3.00x at 4096x4096 M=16 (awq[tuned]): met"
    assert got["M=16 >= 2.5x fp16"]["auto"] == "1.50x at 4096x4096 M=16 (awq): NOT met"
    assert got["M=64 >= 1.8x fp16"]["tuned"] == "2.00x at 4096x4096 M=64 (awq): met"
    assert "tuned" not in targets.gemm_targets({"rows": rows[:2]})[0]
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"rows": rows, "tuned_dispatch": DEFAULT.to_json()}))
    e2e = tmp_path / "e2e.json"
    e2e.write_text(json.dumps({"rows": []}))
    assert targets.main(["--gemm", str(path), "--e2e", str(e2e)]) == 0
    out = capsys.readouterr().out
    assert "| target | auto | tuned | best of ours |" in out and "M >= 65: dequant" in out
    assert "| llama3-8b end to end | not measured | - | not measured |" in out


def test_e2e_targets_and_the_cli(tmp_path, capsys):
    def row(variant, decode, weights, prefill):
        return {"model": "llama3-8b", "variant": variant, "decode_graph_tok_s": decode,
                "weights_gib": weights, "prefill_2048_tok_s": prefill}
    result = {"rows": [row("fp16", 100.0, 15.0, 1000.0), row("w4 cupy", 150.0, 5.4, 900.0),
                       row("w4 cupy +emb", 260.0, 4.0, 910.0), row("w4 torch", None, 5.5, 200.0)]}
    got = {r["target"]: r for r in targets.e2e_targets(result)}
    decode = got["llama3-8b decode (graph) >= 2.5x fp16"]
    assert decode["auto"].startswith("1.50x at w4 cupy: NOT met")
    assert decode["best of ours"].startswith("2.60x at w4 cupy +emb: met")
    weights = got["llama3-8b weights <= 30% of fp16"]
    assert weights["best of ours"] == "0.27 at w4 cupy +emb: met"
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(result))
    assert targets.main(["--e2e", str(path)]) == 0
    assert "| llama3-8b prefill 2048 >= 1.0x fp16 |" in capsys.readouterr().out
    result["rows"].append(row("w4 cupy [tuned]", 200.0, 5.4, 1010.0))
    got = {r["target"]: r for r in targets.e2e_targets(result)}
    assert got["llama3-8b decode (graph) >= 2.5x fp16"]["tuned"] == (
        "2.00x at w4 cupy [tuned]: NOT met")
    assert got["llama3-8b prefill 2048 >= 1.0x fp16"]["tuned"] == "1.01x at w4 cupy [tuned]: met"
    assert targets.main(["--e2e", str(tmp_path / "absent.json")]) == 2
    assert targets.main([]) == 2


def test_e2e_ops_variants_are_compared_with_fp16_ops():
    """A "+ops" variant runs the element-wise kernels: its baseline is fp16 with them too."""
    def row(variant, decode):
        return {"model": "llama3-8b", "variant": variant, "decode_graph_tok_s": decode,
                "weights_gib": 4.0, "prefill_2048_tok_s": 900.0}
    rows = [row("fp16", 100.0), row("w4 cupy", 150.0), row("fp16 +ops", 130.0),
            row("w4 cupy +emb +ops", 312.0)]
    decode = {r["target"]: r for r in targets.e2e_targets({"rows": rows})}[
        "llama3-8b decode (graph) >= 2.5x fp16"]
    assert decode["best of ours"].startswith("2.40x at w4 cupy +emb +ops: NOT met")
    without_base = [r for r in rows if r["variant"] != "fp16 +ops"]
    decode = {r["target"]: r for r in targets.e2e_targets({"rows": without_base})}[
        "llama3-8b decode (graph) >= 2.5x fp16"]
    assert decode["best of ours"].startswith("3.12x at w4 cupy +emb +ops: met")


def test_fastest_per_m_ranks_by_geometric_mean_over_shapes():
    rows = [_gemm_row(4096, 4096, 1, "awq", 10.0), _gemm_row(4096, 4096, 1, "awq[direct]", 5.0),
            _gemm_row(8192, 28672, 1, "awq", 40.0), _gemm_row(8192, 28672, 1, "awq[direct]", 80.0),
            _gemm_row(4096, 4096, 1, "awq[direct,2 launches]", 1.0),  # a variant, not a kernel
            _gemm_row(4096, 4096, 1, "fp16", 1.0),  # not ours
            _gemm_row(4096, 4096, 16, "awq", 9.0),
            _gemm_row(4096, 4096, 16, "awq[mma_direct]", 3.0),
            _gemm_row(4096, 4096, 16, "awq[tuned]", 1.0)]  # `auto` under a sweep's rule: no kernel
    got = {r["M"]: r for r in targets.fastest_per_m({"rows": rows})}
    # M = 1: each is 2x off the best on one shape: a tie at sqrt(2)
    assert got[1]["fastest (geo-mean time / best)"] in ("awq 1.41, awq[direct] 1.41",
                                                        "awq[direct] 1.41, awq 1.41")
    assert got[1]["shapes"] == 2
    assert got[16]["fastest (geo-mean time / best)"] == "awq[mma_direct] 1.00, awq 3.00"


def test_fixed_cost_and_rate_recovers_a_line():
    """Times made as 5 us + bytes / 2 TB/s over three shapes come back as that line."""
    shapes = [(4096, 4096), (4096, 14336), (8192, 28672)]
    rows = []
    for k, n in shapes:
        nbytes = targets._bytes("awq", 1, k, n, 128)
        rows.append(_gemm_row(k, n, 1, "awq", 5.0 + nbytes / 2e12 * 1e6))
    rows.append(_gemm_row(4096, 4096, 16, "awq", 9.0))  # one shape only: no line
    got = targets.fixed_cost_and_rate({"group_size": 128, "rows": rows})
    assert got == [{"M": 1, "impl": "awq", "fixed us": "5.0", "rate": "2.00 TB/s", "shapes": 3}]


def test_reading_json_needs_no_torch():
    """targets.py imports awq_kernels (and so torch) only for a "tuned_dispatch" to describe."""
    import subprocess

    tools = Path(__file__).resolve().parents[1] / "tools"
    code = (f"import sys; sys.path.insert(0, {str(tools)!r}); import targets; "
            f"print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_splitk_tail_is_the_difference_with_and_without_the_sum():
    rows = [_gemm_row(4096, 4096, 1, "awq[direct]", 12.8),
            _gemm_row(4096, 4096, 1, "awq[direct,no sum]", 10.3),
            _gemm_row(8192, 28672, 16, "awq[mma,split]", 60.0),
            _gemm_row(8192, 28672, 16, "awq[mma,split,no sum]", 57.5),
            _gemm_row(4096, 4096, 2, "awq[direct]", 14.4)]  # no partner: left out
    got = targets.splitk_tail({"rows": rows})
    assert [(r["impl"], r["K x N"], r["tail us"]) for r in got] == [
        ("awq[direct]", "4096x4096", "2.5"), ("awq[mma,split]", "8192x28672", "2.5")]


def test_a_target_met_exactly_is_met_and_large_m_starts_at_1024():
    assert targets._row("t", 2.5, (2.5, "here"), None, unit="x")["auto"] == "2.50x at here: met"
    assert targets._row("w", 0.30, (0.30, "here"), None, higher_is_better=False)["auto"] == (
        "0.30 at here: met")
    rows = [_gemm_row(4096, 4096, 1024, "awq", 10.0), _gemm_row(4096, 4096, 1024, "fp16", 9.0)]
    got = {r["target"]: r for r in targets.gemm_targets({"rows": rows})}
    assert got["M>=1024 >= 0.9x fp16"]["auto"] == "0.90x at 4096x4096 M=1024 (awq): met"


def test_bytes_of_a_4bit_product_are_the_packed_layers_buffers():
    """PROTOCOL.md's traffic of a W4 product: x and y in fp16 plus qweight, qzeros and scales,
    here against the buffers of a QuantLinear of that shape."""
    from awq_ref.quant.qlinear import QuantLinear

    for m, k, n, g in ((1, 4096, 4096, 128), (16, 512, 1024, 64), (3, 256, 64, 32)):
        layer = QuantLinear(k, n, g, device="meta")
        weights = sum(b.numel() * b.element_size()
                      for b in (layer.qweight, layer.qzeros, layer.scales))
        assert targets._bytes("awq", m, k, n, g) == weights + 2 * m * k + 2 * m * n
        assert targets._bytes("fp16", m, k, n, g) == 2 * (k * n + m * k + m * n)
