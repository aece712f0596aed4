"""Sweep of the kernels' launch choices, timed per PROTOCOL.md like benchmark.py, to choose
`auto`'s from measurements rather than from predictions: every compiled block tile of the
tensor-core kernel (gemm_mma.cu), plain and with the wider split-K; and the split-K
factor of the decode kernels (gemv_direct at M <= 2, mma_direct at M <= 8).

Why: on the H100 (docs/gpu/h100-2026-12-05) the mma kernel ran at 10-40% of the floor at
M = 16-128 (issue-bound on its copy address math, since rewritten: NOTES.md), and the decode
kernels at 22-50% on the 4096-wide shapes, where each launch ends in a split-K tail (partials,
a fence, an atomic, the last block's sum) whose cost against the parallelism it buys was
never measured. The tiles vary what costs per k tile and per block: BN = 128 or 256 columns,
BK = 32 or 64 rows per stage, one or two warp rows; and dequantize + cuBLAS, plain and
overlapped in column slices. Each (shape, M) point reports every
variant's microseconds and its time over the fastest; `ranking` folds those into one geometric
mean per M, and `tuned_dispatch` into `auto`'s rule as measured (dispatch.from_sweep), which
tools/bench_gemm.py --tuned-from times on PROTOCOL.md's shapes in the same run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import api, benchmark, build, dispatch
from .dispatch import AUTO_GEMV_DIRECT_MAX_M, AUTO_MMA_DIRECT_MAX_M, Choice
from .plan import check_mma_tile

SWEEP_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Each tile runs as "mma" (split K only under half a wave) and as "mma_split" (split K toward
# plan.MMA_SPLIT_BLOCKS_PER_SM blocks per SM).
TILE_KERNELS = ("mma", "mma_split")
SPLIT_CAPS = (1, 2, 4, 8, 16)  # max_splits of the decode kernels' variants
# The decode kernels' rows in the sweep: every M up to where `auto` stops running them
# (dispatch.DEFAULT); mma_direct also at M = 1 and 2, gemv_direct's, where its fixed cost per call
# was the lowest of ours on the H100 (8.5 us against gemv_direct's 12.1; tools/targets.py's line
# fit) at a lower streaming rate.
DECODE_KERNELS = {"gemv_direct": range(1, AUTO_GEMV_DIRECT_MAX_M + 1),
                  "mma_direct": range(1, AUTO_MMA_DIRECT_MAX_M + 1)}
DEQUANT_SWEEP_MIN_M = 16  # dequantize + cuBLAS: a variant from here on (`auto`'s from M = 65)
OVERLAP_SWEEP_MIN_M = 64  # the same in slices overlapped with the matmuls ("dequant_overlap")


@dataclass
class SweepRow:
    k: int
    n: int
    m: int
    variant: str   # "<kernel> <BM>x<BN>x<BK> w<WARPS_M>x<WARPS_N>", "<kernel> splits<=cap",
                   # or "fp16", "awq"
    us: float
    vs_best: float  # us / fastest of our variants at this point
    speedup_vs_fp16: float


def tile_name(tile: build.MmaTile) -> str:
    return f"{tile.bm}x{tile.bn}x{tile.bk} w{tile.warps_m}x{tile.warps_n}"


def valid_tiles(group_size: int) -> list[build.MmaTile]:
    tiles = []
    for tile in build.MMA_TILES:
        try:
            check_mma_tile(tile, group_size)
        except ValueError:
            continue
        tiles.append(tile)
    return tiles


def variant_choices(m: int, group_size: int) -> dict[str, Choice]:
    """The sweep's variants at M rows but fp16 and "awq" (`auto`): the decode kernels under
    each split cap (M <= 8), dequantize + cuBLAS (M >= 16; overlapped in slices M >= 64),
    every tile x split mode (the tensor-core kernel at every M: with 2/3 of its K loop gone it
    may compete at decode sizes too). dispatch.from_sweep maps the winners back through this."""
    choices = {}
    for kernel in (name for name, ms in DECODE_KERNELS.items() if m in ms):
        for cap in SPLIT_CAPS:
            choices[f"{kernel} splits<={cap}"] = Choice(kernel, max_splits=cap)
    if m >= DEQUANT_SWEEP_MIN_M:
        choices["dequant"] = Choice("dequant")
    if m >= OVERLAP_SWEEP_MIN_M:
        choices["dequant_overlap"] = Choice("dequant_overlap")
    for tile in valid_tiles(group_size):
        for kernel in TILE_KERNELS:
            choices[f"{kernel} {tile_name(tile)}"] = Choice(kernel, tile)
    return choices


def _variants(x: torch.Tensor, packed: list, fp16: list, g: int) -> dict[str, list]:
    """name -> one closure per weight copy: fp16 cuBLAS, `auto` ("awq"), variant_choices."""
    variants = {"fp16": [lambda w=w: torch.matmul(x, w) for w in fp16],
                "awq": [lambda w=w: api.gemm(x, *w, g) for w in packed]}
    for name, c in variant_choices(x.shape[0], g).items():
        variants[name] = [lambda w=w, c=c: api.gemm(x, *w, g, kernel=c.kernel, mma_tile=c.tile,
                                                    max_splits=c.max_splits)
                          for w in packed]
    return variants


def sweep_shape(k: int, n: int, ms: tuple[int, ...], g: int, reps: int) -> list[SweepRow]:
    packed = [benchmark.random_packed_cuda(k, n, g)
              for _ in range(benchmark.weight_copies(k * n // 2))]
    fp16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02
            for _ in range(benchmark.weight_copies(2 * k * n))]
    rows: list[SweepRow] = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        times = {}
        for name, fns in _variants(x, packed, fp16, g).items():
            try:
                h_us = benchmark.host_us(fns[0])
                sleep = max(benchmark.SLEEP_CYCLES, int(2 * h_us * benchmark.CYCLES_PER_US))
                times[name] = benchmark.median_us(fns, reps, sleep_cycles=sleep)
            except benchmark.point_errors() as err:  # costs only this variant, unless CUDA is lost
                print(f"  {name} K={k} N={n} M={m}: {type(err).__name__}: {err}", flush=True)
                benchmark.check_context(f"{name} K={k} N={n} M={m}", err, rows)
        ours = [us for name, us in times.items() if name != "fp16"]
        if not ours:
            print(f"  K={k} N={n} M={m}: none of our variants ran", flush=True)
            continue
        best, fp16_us = min(ours), times.get("fp16", float("nan"))
        rows += [SweepRow(k, n, m, name, us, us / best, fp16_us / us)
                 for name, us in times.items()]
        print(f"  K={k} N={n} M={m}: best {best:.1f} us, fp16 {fp16_us:.1f} us", flush=True)
    return rows


# The quick shapes, and a Llama-3-70B MLP shape: where the wide (BN = 256) and deep (BK = 64)
# tiles are predicted to rank first (NOTES.md).
SWEEP_SHAPES = (*benchmark.QUICK_SHAPES, (8192, 28672))


def run(shapes=SWEEP_SHAPES, ms=SWEEP_MS, group_size: int = 128, reps: int = 50,
        on_shape: Callable[[dict], None] | None = None) -> dict:
    """Every variant at every (shape, M); `on_shape(result so far)` after each shape."""
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "group_size": group_size, "reps": reps, "shapes": [list(s) for s in shapes],
              "auto": dispatch.DEFAULT.to_json(), "rows": []}  # what "awq" ran
    for k, n in shapes:
        try:
            result["rows"] += [asdict(r) for r in sweep_shape(k, n, ms, group_size, reps)]
        except benchmark.ContextLost as lost:
            benchmark.stop_note(result, lost)
        if on_shape is not None:
            on_shape(result)
        if "stopped" in result:
            break
        torch.cuda.empty_cache()
    return result


def ranking(result: dict) -> dict[int, list[tuple[str, float]]]:
    """Per M: (variant, geometric mean over shapes of time / fastest), best first; variants
    missing at some shape of that M are left out."""
    per_m: dict[int, dict[str, list[float]]] = {}
    shapes: dict[int, set] = {}
    for r in result["rows"]:
        if r["variant"] == "fp16":
            continue
        per_m.setdefault(r["m"], {}).setdefault(r["variant"], []).append(r["vs_best"])
        shapes.setdefault(r["m"], set()).add((r["k"], r["n"]))
    return {m: sorted(((name, math.exp(sum(map(math.log, v)) / len(v)))
                       for name, v in variants.items() if len(v) == len(shapes[m])),
                      key=lambda item: item[1])
            for m, variants in sorted(per_m.items())}


class SweepStopped(ValueError):
    """A sweep that a faulting variant stopped (benchmark.ContextLost)."""


def tuned_dispatch(result: dict) -> dispatch.Dispatch:
    """`auto`'s rule as this sweep measured it (dispatch.from_sweep over `ranking`), based on
    the rule "awq" ran under (stored by `run`; DEFAULT for older files). A sweep that stopped
    because a variant left CUDA unusable gives none: that variant might rank first."""
    if "stopped" in result:
        raise SweepStopped(f"the sweep stopped ({result['stopped']:.300}): no rule is derived "
                           "from it")
    ranked = ranking(result)
    choices = {m: variant_choices(m, result["group_size"]) for m in ranked}
    base = (dispatch.Dispatch.from_json(result["auto"]) if "auto" in result
            else dispatch.DEFAULT)
    timed = {(r["k"], r["n"]) for r in result["rows"]}
    planned = result.get("shapes")
    cut = (f", {len(timed)} of {len(planned)} shapes" if planned and len(timed) < len(planned)
           else "")
    return dispatch.from_sweep(ranked, choices, base,
                               source=f"sweep on {result['device']}, "
                                      f"G = {result['group_size']}{cut}")


def load_tuned_dispatch(path: str | Path) -> dispatch.Dispatch:
    """`tuned_dispatch` of a sweep's JSON file (bench_gemm.py and bench_e2e.py --tuned-from,
    gpu_check.sh); a file that is none is a ValueError naming it and the cause."""
    try:
        return tuned_dispatch(json.loads(Path(path).read_bytes()))
    except SweepStopped as err:
        raise ValueError(f"{path}: {err}") from None
    except (OSError, ValueError, RecursionError, KeyError, TypeError, ArithmeticError) as err:
        unparsed = isinstance(err, (json.JSONDecodeError, UnicodeDecodeError, RecursionError))
        cause = f"not valid JSON: {err!r:.200}" if unparsed else f"{err!r:.200}"
        raise ValueError(f"{path}: not a sweep's JSON ({cause})") from None


def markdown(result: dict, top: int = 6) -> str:
    title = (f"{result['device']}, torch {result['torch']}, G = {result['group_size']}, "
             f"median of {result['reps']}")
    lines = [title, "",
             "| K x N | M | variant | us | x best | x fp16 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']}x{r['n']} | {r['m']} | {r['variant']} | {r['us']:.1f} | "
              f"{r['vs_best']:.2f} | {r['speedup_vs_fp16']:.2f} |" for r in result["rows"]]
    lines += ["", f"Geometric mean of time / best over the shapes, the {top} best per M:", ""]
    for m, ranked in ranking(result).items():
        lines.append(f"- M = {m}: " + ", ".join(f"{name} {v:.2f}" for name, v in ranked[:top]))
    if "stopped" in result:
        return "\n".join([*lines, "", f"Stopped: {result['stopped']}"]) + "\n"
    note = ("`auto` as this sweep measured it (dispatch.from_sweep; tools/bench_gemm.py "
            "--tuned-from times it as awq[tuned]):")
    lines += ["", note, "", "```", dispatch.describe(tuned_dispatch(result)), "```"]
    return "\n".join(lines) + "\n"
