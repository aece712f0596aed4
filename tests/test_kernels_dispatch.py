"""awq_kernels.dispatch on CPU: `auto`'s rule as data (DEFAULT), its JSON form and checks, and
a rule derived from a tile sweep's ranking (from_sweep, sweep.tuned_dispatch)."""

from __future__ import annotations

import json

import pytest
import torch

from awq_kernels import api, build, sweep
from awq_kernels.dispatch import DEFAULT, Choice, Dispatch, choose, describe, from_sweep, resolve

BK64 = build.MmaTile(16, 1, 4, 64)


def test_default_is_the_h100_rule():
    assert [choose(m) for m in (0, 1, 2, 3, 8, 9, 31, 32, 33, 64, 65, 4096)] == [
        Choice(k) for k in ("gemv_direct", "gemv_direct", "gemv_direct", "mma_direct",
                            "mma_direct", "mma_split", "mma_split", "mma_split", "mma_split",
                            "mma_split", "dequant", "dequant")]
    assert choose(4, "mma") == Choice("mma")
    assert [choose(m, "auto_direct").kernel for m in (1, 2, 8, 9, 64, 65, 128, 129)] == [
        "gemv_direct", "mma_direct", "mma_direct", "mma_direct", "mma_direct", "mma_direct",
        "mma_direct", "dequant"]
    assert describe(DEFAULT).splitlines() == [
        "M 1..2: gemv_direct", "M 3..8: mma_direct", "M 9..64: mma_split", "M >= 65: dequant"]


def test_json_round_trip():
    d = Dispatch(((2, Choice("gemv_direct", max_splits=4)), (64, Choice("mma_split", BK64)),
                  (None, Choice("dequant"))), source="test")
    text = json.dumps(d.to_json())
    assert Dispatch.from_json(json.loads(text)) == d
    assert Dispatch.from_json(DEFAULT.to_json()) == DEFAULT
    assert describe(d).splitlines() == ["M 1..2: gemv_direct splits<=4",
                                        "M 3..64: mma_split 16x256x64 w1x4", "M >= 65: dequant"]


def test_row_limited_kernels_take_rules_up_to_their_limit():
    for kernel in ("gemv", "gemv_direct"):  # both take M <= 8
        Dispatch(((8, Choice(kernel)), (None, Choice("dequant"))))
        with pytest.raises(ValueError, match="takes at most M = 8"):
            Dispatch(((9, Choice(kernel)), (None, Choice("dequant"))))


@pytest.mark.parametrize("bad,message", [
    ([], "a dispatch is an object"),
    ({"rules": []}, "needs rules"),
    ({"rules": [{"max_m": 8, "kernel": "dequant"}]}, "the last with no bound"),
    ({"rules": [{"max_m": 8, "kernel": "dequant"}, {"max_m": 4, "kernel": "mma"},
                {"max_m": None, "kernel": "mma"}]}, "increasing positive ints"),
    ({"rules": [{"max_m": 0, "kernel": "mma"}, {"max_m": None, "kernel": "mma"}]},
     "increasing positive ints"),
    ({"rules": [{"max_m": 4, "kernel": "mma"}, {"max_m": 4, "kernel": "dequant"},
                {"max_m": None, "kernel": "mma"}]}, "increasing positive ints"),  # a tie
    ({"rules": [{"max_m": 1.5, "kernel": "mma"}, {"max_m": None, "kernel": "mma"}]},
     "increasing positive ints"),
    ({"rules": [{"max_m": None, "kernel": "auto"}]}, "kernel must be one of"),
    ({"rules": [{"max_m": 16, "kernel": "gemv_direct"}, {"max_m": None, "kernel": "mma"}]},
     "takes at most M = 8"),
    ({"rules": [{"max_m": None, "kernel": "gemv"}]}, "takes at most M = 8"),
    ({"rules": [{"max_m": None, "kernel": "dequant", "tile": [16, 1, 2, 32]}]},
     "needs kernel 'mma'"),
    ({"rules": [{"max_m": None, "kernel": "mma", "tile": [16, 1, 2, 48]}]}, "build.MMA_TILES"),
    ({"rules": [{"max_m": None, "kernel": "mma", "tile": [16, 1, 2]}]}, "a tile is"),
    ({"rules": [{"max_m": None, "kernel": "mma", "max_splits": 17}]}, "max_splits must be"),
    ({"rules": [{"max_m": None, "kernel": "mma", "max_splits": True}]}, "max_splits must be"),
    ({"rules": [{"max_m": None, "kernel": "mma", "extra": 1}]}, "keys kernel, tile"),
    ({"rules": ["mma"]}, "a rule is an object"),
])
def test_bad_json_is_a_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        Dispatch.from_json(bad)


def test_resolve_takes_tile_and_split_cap_from_the_choice():
    d = Dispatch(((8, Choice("mma_direct", max_splits=4)), (None, Choice("mma_split", BK64))))
    assert resolve(4, 128, dispatch=d) == Choice("mma_direct", max_splits=4)
    assert resolve(4, 128, max_splits=2, dispatch=d) == Choice("mma_direct", max_splits=2)
    assert resolve(16, 128, dispatch=d) == Choice("mma_split", BK64)
    assert resolve(16, 32, dispatch=d) == Choice("mma_split")  # BK 64 does not divide G = 32
    tile = build.MMA_CONFIGS[32]
    assert resolve(16, 128, "mma", tile) == Choice("mma", tile)
    assert resolve(3, 128) == Choice("mma_direct")


def test_gemm_launches_the_dispatch_choice(monkeypatch):
    """api.gemm hands the kernel, tile and split cap of the dispatch's choice to the launch."""
    launched = []
    monkeypatch.setattr(api, "check_gemm_args", lambda x, *a, **k: (x.shape[0], 128, 64))
    monkeypatch.setattr(api, "_launch_product",
                        lambda name, *a: launched.append((name, a[-2], a[-1])))
    d = Dispatch(((8, Choice("mma_direct", max_splits=4)), (None, Choice("mma_split", BK64, 8))))
    x = torch.zeros(16, 128, dtype=torch.float16)
    api.gemm(x, None, None, None, 128, dispatch=d)
    api.gemm(x[:3], None, None, None, 128, dispatch=d, max_splits=2)
    api.gemm(x, None, None, None, 32, dispatch=d)  # BK 64 does not divide G = 32
    assert launched == [("mma_split", BK64, 8), ("mma_direct", None, 2), ("mma_split", None, 8)]


def test_gemm_checks_dispatch_before_cuda():
    k, n, g = 128, 64, 32
    args = (torch.zeros(2, k, dtype=torch.float16), torch.zeros(k, n // 8, dtype=torch.int32),
            torch.zeros(k // g, n // 8, dtype=torch.int32),
            torch.zeros(k // g, n, dtype=torch.float16), g)
    with pytest.raises(ValueError, match="applies to kernel 'auto' only"):
        api.gemm(*args, kernel="mma", dispatch=DEFAULT)
    with pytest.raises(ValueError, match="must be a dispatch.Dispatch"):
        api.gemm(*args, dispatch=DEFAULT.to_json())
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        api.gemm(*args, dispatch=DEFAULT)


def _ranking(scores: dict[int, dict[str, float]]) -> dict[int, list[tuple[str, float]]]:
    return {m: sorted(v.items(), key=lambda kv: kv[1]) for m, v in scores.items()}


def test_from_sweep_picks_the_best_unless_auto_is_close():
    tile = build.MMA_CONFIGS[16]
    choices = {m: sweep.variant_choices(m, 128) for m in (1, 2, 4, 16, 64, 256)}
    name = f"mma_split {sweep.tile_name(tile)}"
    ranked = _ranking({
        1: {"awq": 1.02, "gemv_direct splits<=4": 1.0},          # within 3%: auto's kept
        2: {"awq": 1.2, "gemv_direct splits<=4": 1.0},
        4: {"awq": 1.0, "mma_direct splits<=2": 1.01},
        16: {"awq": 1.3, name: 1.0, "unknown variant": 0.5},      # unknown names are ignored
        64: {"awq": 1.5, "dequant": 1.0},
        256: {"awq": 1.0, "dequant": 1.0}})
    d = from_sweep(ranked, choices)
    assert d.rules == ((1, Choice("gemv_direct")), (2, Choice("gemv_direct", max_splits=4)),
                       (4, Choice("mma_direct")),  # `auto`'s own at M = 4: DEFAULT's choice
                       (16, Choice("mma_split", tile)),  # M 5..16 take M = 16's
                       (None, Choice("dequant")))  # 17..256 measured, then DEFAULT's: one rule
    assert [d.choose(m).kernel for m in (3, 5, 9, 17, 64, 65, 300)] == [
        "mma_direct", "mma_split", "mma_split", "dequant", "dequant", "dequant", "dequant"]


def test_from_sweep_keeps_the_base_outside_the_timed_m():
    ranked = _ranking({16: {"awq": 2.0, "dequant": 1.0}})
    d = from_sweep(ranked, {16: sweep.variant_choices(16, 128)})
    assert describe(d).splitlines() == ["M 1..2: gemv_direct", "M 3..8: mma_direct",
                                        "M 9..16: dequant", "M 17..64: mma_split",
                                        "M >= 65: dequant"]
    assert from_sweep({}, {}) == DEFAULT
    # the first timed M at a bound of the base: the base's rule there gives way to the pick
    tile = build.MMA_CONFIGS[16]
    ranked = _ranking({8: {"awq": 2.0, f"mma_split {sweep.tile_name(tile)}": 1.0}})
    d = from_sweep(ranked, {8: sweep.variant_choices(8, 128)})
    assert describe(d).splitlines() == ["M 1..2: gemv_direct", "M 3..8: mma_split 16x128x32 w1x2",
                                        "M 9..64: mma_split", "M >= 65: dequant"]


def test_tuned_dispatch_of_a_sweep_result():
    """sweep.tuned_dispatch reads rows as sweep.run writes them, through ranking."""
    tile = build.MMA_TILES[-1]
    rows = []
    for k in (4096, 14336):
        for m, variant, vs_best in [(16, "awq", 1.4), (16, f"mma {sweep.tile_name(tile)}", 1.0),
                                    (128, "awq", 1.0), (128, "dequant", 1.0)]:
            rows.append({"k": k, "n": 4096, "m": m, "variant": variant, "us": vs_best,
                         "vs_best": vs_best, "speedup_vs_fp16": 1.0})
    result = {"device": "GPU", "torch": "x", "group_size": 128, "reps": 50, "rows": rows}
    d = sweep.tuned_dispatch(result)
    assert d.choose(16) == Choice("mma", tile) and d.choose(9) == Choice("mma", tile)
    assert d.choose(128) == Choice("dequant") and d.choose(2) == Choice("gemv_direct")
    assert "M 9..16: mma 128x256x32 w2x4" in describe(d) and "sweep on GPU" in d.source
    assert "M 9..16: mma 128x256x32 w2x4\nM >= 17: dequant" in sweep.markdown(result)
    # the rule "awq" ran under, as the sweep stored it, and a sweep cut short says so
    base = Dispatch(((None, Choice("mma")),))
    d = sweep.tuned_dispatch({**result, "auto": base.to_json(), "shapes": [[1, 2]] * 3})
    assert d.choose(2) == Choice("mma", tile)  # base has no bound below 16
    assert d.choose(128) == Choice("mma") == d.choose(300)  # "awq" as good: the base's
    assert d.source.endswith(", 2 of 3 shapes")


def test_from_sweep_leaves_out_scores_that_are_not_finite():
    name = f"mma {sweep.tile_name(build.MMA_CONFIGS[16])}"
    ranked = {16: [(name, float("nan")), ("dequant", 1.0), ("awq", 2.0)]}
    d = from_sweep(ranked, {16: sweep.variant_choices(16, 128)})
    assert d.choose(16) == Choice("dequant")


def test_variant_choices_name_every_variant_once():
    for m in sweep.SWEEP_MS:
        choices = sweep.variant_choices(m, 128)
        assert ("dequant" in choices) == (m >= 16)
        assert ("dequant_overlap" in choices) == (m >= 64)
        tiles = sum(c.kernel in ("mma", "mma_split") for c in choices.values())
        assert tiles == 2 * len(build.MMA_TILES)
        decode = [c for c in choices.values() if c.kernel in sweep.DECODE_KERNELS]
        assert len(decode) == len(sweep.SPLIT_CAPS) * sum(m in ms for ms in
                                                           sweep.DECODE_KERNELS.values())
        assert len({(c.kernel, c.tile, c.max_splits) for c in choices.values()}) == len(choices)
        assert all(c.tile is None or c.tile in build.MMA_TILES for c in choices.values())


def test_benchmark_times_the_tuned_rule_only_where_it_differs():
    from awq_kernels import benchmark

    d = Dispatch(((16, Choice("mma_split")), (None, Choice("dequant"))))
    assert [benchmark.timed_at("awq[tuned]", m, d) for m in (1, 8, 9, 16, 64, 65, 4096)] == [
        True, True, False, False, True, False, False]
    assert not benchmark.timed_at("awq[tuned]", 1, None)
    assert [benchmark.timed_at("awq[dequant,overlap]", m) for m in (64, 128, 4096)] == [
        False, True, True]
    assert benchmark.timed_at("awq", 4096) and benchmark.timed_at("fp16", 1)
    assert [benchmark.timed_at("awq[direct]", m) for m in (1, 8, 9)] == [True, True, False]


@pytest.mark.parametrize("text,message", [
    ("not json", "not valid JSON"), ('{"rows": [{"m": 1}]}', "KeyError"), ("[]", "TypeError"),
    ('{"group_size": 128, "rows": [{"k": 1, "n": 1, "m": 1, "variant": "a", "vs_best": 1' +
     "0" * 400 + '}]}', "OverflowError"),
])
def test_bench_gemm_tuned_from_refuses_what_is_no_sweep(tmp_path, monkeypatch, capsys, text,
                                                       message):
    import runpy
    from pathlib import Path

    bad = tmp_path / "sweep.json"
    bad.write_text(text)
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_gemm.py"
    monkeypatch.setattr("sys.argv", ["bench_gemm.py", "--tuned-from", str(bad)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(tool), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not a sweep's JSON" in err and message in err
