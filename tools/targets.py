"""The speed and memory targets of issues 5 and 6, checked against the benchmarks' JSON.

    PYTHONPATH=. python tools/targets.py --gemm out/gpu_check/bench_gemm.json \
        --e2e out/gpu_check/bench_e2e.json

Issue 5 (tools/bench_gemm.py; per shape and M, "ours" = the best awq* implementation timed,
"awq" = what `auto` dispatches to, "tuned" = `auto` under the dispatch a tile sweep chose
(bench_gemm.py --tuned-from: "awq[tuned]" where it differs from "awq"), a column only then):
  M = 1 at >= 75% of the roofline floor on shapes with K, N >= 4096; M = 16 >= 2.5x fp16 cuBLAS;
  M = 64 >= 1.8x; M = 128 >= 1.0x; M >= 1024 >= 0.9x; faster than torch's int4 kernel at every M.
Issue 6 (tools/bench_e2e.py, the Llama-3-8B shape; "w4" = the best "w4 cupy*" variant; a
"tuned" column for "w4 cupy [tuned]" where bench_e2e.py ran with --tuned-from):
  batch-1 decode (CUDA graph) >= 2.5x fp16 tokens/s; weights <= 30% of fp16; prefill of 2048
  tokens >= 1.0x fp16. A "+ops" variant (awq_kernels.ops for the element-wise steps) is compared
  with "fp16 +ops", the same model code on fp16 weights, where that row exists.
Prints one markdown row per target: the worst case over the shapes it covers, where that is,
and whether the target is met, for `auto` and for the best of ours; then, per M, our
implementations ranked by time (what `auto` should dispatch to), and each implementation's
fixed cost per call and streaming rate (a line fitted over the shapes). Reads JSON only: no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

SPEEDUP_TARGETS = ((16, 2.5), (64, 1.8), (128, 1.0))  # (M, min speedup over fp16)
LARGE_M, LARGE_M_SPEEDUP = 1024, 0.9
FLOOR_PCT_AT_M1, FLOOR_MIN_DIM = 75.0, 4096
E2E_MODEL = "llama3-8b"
TUNED_E2E = "w4 cupy [tuned]"  # bench_e2e.py --tuned-from: `auto` under a tile sweep's rule


def _worst(points: Iterable[tuple[float, str]], higher_is_better: bool = True
           ) -> tuple[float, str] | None:
    points = list(points)
    if not points:
        return None
    return min(points) if higher_is_better else max(points)


def _row(target: str, threshold: float, auto: tuple[float, str] | None,
         ours: tuple[float, str] | None, higher_is_better: bool = True, unit: str = "",
         tuned: tuple[float, str] | None | bool = False) -> dict:
    """One target's verdicts; `tuned` False: no such column."""
    def verdict(p):
        if p is None:
            return "not measured"
        ok = p[0] >= threshold if higher_is_better else p[0] <= threshold
        return f"{p[0]:.2f}{unit} at {p[1]}: {'met' if ok else 'NOT met'}"
    row = {"target": target, "auto": verdict(auto)}
    if tuned is not False:
        row["tuned"] = verdict(tuned)
    return {**row, "best of ours": verdict(ours)}


def gemm_targets(result: dict) -> list[dict]:
    by_point: dict[tuple[int, int, int], dict[str, dict]] = {}
    for r in result["rows"]:
        by_point.setdefault((r["k"], r["n"], r["m"]), {})[r["impl"]] = r
    ours_names = [name for impls in by_point.values() for name in impls if is_ours(name)]
    has_tuned = "awq[tuned]" in ours_names

    def best(impls: dict[str, dict]) -> dict | None:
        mine = [impls[n] for n in dict.fromkeys(ours_names) if n in impls]
        return min(mine, key=lambda r: r["us"]) if mine else None

    def collect(select: Callable[[int, int, int], bool], value: Callable[[dict, dict], float],
                which: str) -> list[tuple[float, str]]:
        out = []
        for (k, n, m), impls in by_point.items():
            if which == "auto":
                row = impls.get("awq")
            elif which == "tuned":  # timed only where it differs from `auto`
                row = impls.get("awq[tuned]", impls.get("awq"))
            else:
                row = best(impls)
            if select(k, n, m) and row is not None:
                out.append((value(row, impls), f"{k}x{n} M={m} ({row['impl']})"))
        return out

    def pct(row: dict, impls: dict) -> float:
        return row["pct_of_floor"]

    def speedup(row: dict, impls: dict) -> float:
        return impls["fp16"]["us"] / row["us"] if "fp16" in impls else float("nan")

    def vs_int4(row: dict, impls: dict) -> float:
        return impls["int4pack"]["us"] / row["us"]

    def target(name: str, threshold: float, select: Callable[[int, int, int], bool],
               value: Callable[[dict, dict], float], unit: str) -> dict:
        tuned = _worst(collect(select, value, "tuned")) if has_tuned else False
        return _row(name, threshold, _worst(collect(select, value, "auto")),
                    _worst(collect(select, value, "ours")), unit=unit, tuned=tuned)

    m1 = lambda k, n, m: m == 1 and k >= FLOOR_MIN_DIM and n >= FLOOR_MIN_DIM
    rows = [target(f"M=1 >= {FLOOR_PCT_AT_M1:.0f}% of floor (K, N >= {FLOOR_MIN_DIM})",
                   FLOOR_PCT_AT_M1, m1, pct, "%")]
    for m_target, s in SPEEDUP_TARGETS:
        sel = lambda k, n, m, mt=m_target: m == mt
        rows.append(target(f"M={m_target} >= {s}x fp16", s, sel, speedup, "x"))
    big = lambda k, n, m: m >= LARGE_M
    rows.append(target(f"M>={LARGE_M} >= {LARGE_M_SPEEDUP}x fp16", LARGE_M_SPEEDUP, big,
                       speedup, "x"))
    has_int4 = lambda k, n, m: "int4pack" in by_point[(k, n, m)]
    rows.append(target("faster than torch int4 at every M", 1.0, has_int4, vs_int4, "x"))
    return rows


def is_ours(impl: str) -> bool:
    """An implementation of ours that computes the product: the benchmark's "no sum" rows time
    a kernel without its split-K sum (output unwritten), for the difference only."""
    return impl.startswith("awq") and "no sum" not in impl


def fastest_per_m(result: dict) -> list[dict]:
    """Which of our implementations to dispatch to, per M: for each awq* timed at every shape
    of that M, the geometric mean over shapes of its time over the best of ours there (1.00 =
    fastest everywhere). The first is what `auto` (dispatch.DEFAULT) should pick at that M."""
    by_m: dict[int, dict[tuple[int, int], dict[str, float]]] = {}
    for r in result["rows"]:
        if is_ours(r["impl"]) and r["impl"] not in ("awq[direct,2 launches]", "awq[tuned]"):
            by_m.setdefault(r["m"], {}).setdefault((r["k"], r["n"]), {})[r["impl"]] = r["us"]
    out = []
    for m in sorted(by_m):
        shapes = by_m[m].values()
        common = set.intersection(*(set(times) for times in shapes))
        score = {}
        for impl in common:
            logs = [math.log(times[impl] / min(times.values())) for times in shapes]
            score[impl] = math.exp(sum(logs) / len(logs))
        ranked = sorted(score.items(), key=lambda kv: kv[1])
        out.append({"M": m, "shapes": len(by_m[m]),
                    "fastest (geo-mean time / best)": ", ".join(f"{i} {v:.2f}" for i, v in ranked)})
    return out


# (implementation, its run without the split-K sum, M) pairs bench_gemm times for the difference
SPLITK_TAIL_PAIRS = (("awq[direct]", "awq[direct,no sum]", 1),
                     ("awq[mma,split]", "awq[mma,split,no sum]", 16))


def splitk_tail(result: dict) -> list[dict]:
    """What the fused split-K sum costs per call (the partials' fence, the arrival count and the
    last block's sum): the time with it minus the time without, per shape, where both ran. The
    fixed cost at M = 1 (~9.8 us against torch int4's ~5.8 on the H100) is partly this tail;
    the split-K through distributed shared memory (NOTES.md) is worth writing only if large."""
    times = {(r["k"], r["n"], r["m"], r["impl"]): r["us"] for r in result["rows"]}
    out = []
    for impl, no_sum, m in SPLITK_TAIL_PAIRS:
        for (k, n, mm, name), us in times.items():
            if name == impl and mm == m and (k, n, m, no_sum) in times:
                base = times[(k, n, m, no_sum)]
                out.append({"impl": impl, "M": m, "K x N": f"{k}x{n}", "us": f"{us:.1f}",
                            "without the sum": f"{base:.1f}", "tail us": f"{us - base:.1f}"})
    return out


def e2e_targets(result: dict, model: str = E2E_MODEL) -> list[dict]:
    rows = {r["variant"]: r for r in result["rows"] if r["model"] == model}
    fp16 = rows.get("fp16")
    ours = {v: r for v, r in rows.items() if v.startswith("w4 cupy")}
    if fp16 is None or not ours:
        return [{"target": f"{model} end to end", "auto": "not measured",
                 "best of ours": "not measured"}]

    def base(variant: str) -> dict:
        return rows.get("fp16 +ops", fp16) if variant.endswith("+ops") else fp16

    def ratio(key: str, higher_is_better: bool = True) -> tuple:
        """(auto, tuned or False when no such row, best) ratios to the fp16 baseline."""
        points = [(r[key] / base(v)[key], v) for v, r in ours.items() if r.get(key) is not None]
        auto = next(((x, v) for x, v in points if v == "w4 cupy"), None)
        tuned = (next(((x, v) for x, v in points if v == TUNED_E2E), None)
                 if TUNED_E2E in ours else False)
        best = (max(points) if higher_is_better else min(points)) if points else None
        return auto, tuned, best

    out = []
    auto, tuned, best = ratio("decode_graph_tok_s")
    out.append(_row(f"{model} decode (graph) >= 2.5x fp16", 2.5, auto, best, unit="x",
                    tuned=tuned))
    auto, tuned, best = ratio("weights_gib", higher_is_better=False)
    out.append(_row(f"{model} weights <= 30% of fp16", 0.30, auto, best, higher_is_better=False,
                    tuned=tuned))
    auto, tuned, best = ratio("prefill_2048_tok_s")
    out.append(_row(f"{model} prefill 2048 >= 1.0x fp16", 1.0, auto, best, unit="x",
                    tuned=tuned))
    return out


def markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns, in order
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |"
                              for r in rows])


def _bytes(impl: str, m: int, k: int, n: int, g: int) -> float:
    """Bytes an implementation must move: fp16 weights for cuBLAS, PROTOCOL.md's formula for
    the 4-bit ones (torch's int4 kernel's format is within a few percent of it)."""
    if impl == "fp16":
        return 2 * (k * n + m * k + m * n)
    return 2 * m * k + k * n / 2 + 2 * k * n / g + k * n / (2 * g) + 2 * m * n


def fixed_cost_and_rate(result: dict, min_shapes: int = 3) -> list[dict]:
    """Per implementation and M, the least-squares line time = fixed + bytes / rate over the
    shapes timed: what a call costs whatever its size, and how fast it streams. On the H100
    (2026-12-05) this showed M = 1 lost on fixed cost (ours 12.3 us, cuBLAS 6.0, torch's int4
    5.8) while our rate led (2.79 TB/s against int4's 2.06)."""
    points: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in result["rows"]:
        key = (r["impl"], r["m"])
        nbytes = _bytes(r["impl"], r["m"], r["k"], r["n"], result.get("group_size", 128))
        points.setdefault(key, []).append((nbytes, r["us"]))
    out = []
    for (impl, m), xy in sorted(points.items(), key=lambda item: (item[0][1], item[0][0])):
        if len(xy) < min_shapes:
            continue
        mx = sum(x for x, _ in xy) / len(xy)
        my = sum(y for _, y in xy) / len(xy)
        sxx = sum((x - mx) ** 2 for x, _ in xy)
        if sxx == 0:
            continue
        slope = sum((x - mx) * (y - my) for x, y in xy) / sxx  # us per byte
        rate = f"{1e-6 / slope:.2f} TB/s" if slope > 0 else "-"
        out.append({"M": m, "impl": impl, "fixed us": f"{my - slope * mx:.1f}",
                    "rate": rate, "shapes": len(xy)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemm", type=Path, help="tools/bench_gemm.py's JSON")
    p.add_argument("--e2e", type=Path, help="tools/bench_e2e.py's JSON")
    args = p.parse_args(argv)
    rows, dispatch, lines, tuned, tails = [], [], [], None, []
    source = None  # the file being read, for the error
    try:
        if args.gemm:
            source = args.gemm
            gemm = json.loads(args.gemm.read_text(encoding="utf-8"))
            rows += gemm_targets(gemm)
            if "tuned_dispatch" in gemm:  # (imports torch, through awq_kernels: only then)
                from awq_kernels.dispatch import Dispatch

                tuned = Dispatch.from_json(gemm["tuned_dispatch"])
            dispatch = fastest_per_m(gemm)
            lines = fixed_cost_and_rate(gemm)
            tails = splitk_tail(gemm)
        if args.e2e:
            source = args.e2e
            rows += e2e_targets(json.loads(args.e2e.read_text(encoding="utf-8")))
    # a JSON of another shape: a list, rows of strings, a time of 0 or null, nesting too deep
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
        print(f"targets.py: cannot read the benchmark results in {source}: {e!r:.200}",
              file=sys.stderr)
        return 2
    if not rows:
        print("targets.py: give --gemm and/or --e2e", file=sys.stderr)
        return 2
    print(markdown(rows))
    if tuned is not None:
        from awq_kernels.dispatch import describe

        print(f"\n\"tuned\" is `auto` as {tuned.source} chose it (awq_kernels.dispatch):\n")
        print(describe(tuned))
    if dispatch:
        print("\nOur implementations per M, fastest first:\n")
        print(markdown(dispatch))
    if lines:
        print("\nFixed cost and streaming rate per implementation and M (least squares over"
              " the shapes: time = fixed + bytes / rate):\n")
        print(markdown(lines))
    if tails:
        print("\nThe fused split-K sum's cost per call (time minus the same launch without "
              "the sum):\n")
        print(markdown(tails))
    return 0


if __name__ == "__main__":
    sys.exit(main())
