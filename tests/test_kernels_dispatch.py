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
    assert [choose(m).kernel for m in (0, 1, 2, 3, 8, 9, 31, 32, 33, 64, 65, 4096)] == [
        "gemv_direct", "gemv_direct", "gemv_direct", "mma_direct", "mma_direct", "mma_split",
        "mma_split", "mma_split", "mma_split", "mma_split", "dequant", "dequant"]
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


@pytest.mark.parametrize("bad,message", [
    ([], "a dispatch is an object"),
    ({"rules": []}, "needs rules"),
    ({"rules": [{"max_m": 8, "kernel": "dequant"}]}, "the last with no bound"),
    ({"rules": [{"max_m": 8, "kernel": "dequant"}, {"max_m": 4, "kernel": "mma"},
                {"max_m": None, "kernel": "mma"}]}, "increasing positive ints"),
    ({"rules": [{"max_m": 0, "kernel": "mma"}, {"max_m": None, "kernel": "mma"}]},
     "increasing positive ints"),
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


def test_variant_choices_name_every_variant_once():
    for m in sweep.SWEEP_MS:
        choices = sweep.variant_choices(m, 128)
        assert ("dequant" in choices) == (m >= 16)
        assert ("dequant_overlap" in choices) == (m >= 64)
        tiles = sum(c.kernel in ("mma", "mma_split") for c in choices.values())
        assert tiles == 2 * len(build.MMA_TILES)
        assert all(c.tile is None or c.tile in build.MMA_TILES for c in choices.values())
