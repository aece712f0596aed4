"""Kernel timing per /work/shared/design/PROTOCOL.md ("Kernel speed").

- Ceilings measured on the machine: HBM bandwidth from a large device-to-device copy (bytes
  read + written), tensor peak from a large fp16 matmul on random data.
- Each timed call is preceded by a GPU sleep so the host has enqueued it before the start event
  fires: the events then bracket GPU time only (host launch overhead is reported apart, as
  wall time per call of back-to-back launches).
- Weights rotate among enough copies (> 2 x L2 in total) that every call streams from HBM.
- Median of >= 50 timed calls after warm-up. Random codes, scales, zeros and activations.
- Roofline floor = max(bytes / BW, 2 M K N / peak), bytes = 2MK + KN/2 + 2KN/G + KN/(2G) + 2MN.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import api
from .dispatch import DEFAULT, Dispatch
from .plan import GEMV_DIRECT_MAX_M, MMA_DIRECT_MAX_M

SHAPES = ((4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (8192, 28672),
          (28672, 8192), (5120, 13824))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
QUICK_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
QUICK_MS = (1, 8, 16, 64, 256, 1024)
SLEEP_CYCLES = 200_000  # ~100 us at ~2 GHz: longer than one launch from Python
CYCLES_PER_US = 2_000   # SM clock of an H100/H200 under load, ~2 GHz


@dataclass(frozen=True)
class Ceilings:
    hbm_bytes_per_s: float
    tensor_flops: float


@dataclass
class Row:
    k: int
    n: int
    m: int
    impl: str
    us: float
    host_us: float
    gb_per_s: float      # awq format bytes (the formula above) / time
    speedup_vs_fp16: float
    pct_of_floor: float  # floor / time * 100


def awq_bytes(m: int, k: int, n: int, g: int) -> float:
    return 2 * m * k + k * n / 2 + 2 * k * n / g + k * n / (2 * g) + 2 * m * n


def median_us(fns: list[Callable[[], object]], reps: int, warmup: int = 5,
              sleep_cycles: int = SLEEP_CYCLES) -> float:
    """Median GPU time of single calls, rotating over `fns` (one per weight copy).

    Before each call the GPU sleeps `sleep_cycles` so that the host has queued the call by the
    time the start event fires: the events then time the kernels, not the host's launch cost."""
    for i in range(warmup):
        fns[i % len(fns)]()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for i, (start, end) in enumerate(pairs):
        torch.cuda._sleep(sleep_cycles)
        start.record()
        fns[i % len(fns)]()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in pairs)


def host_us(fn: Callable[[], object], calls: int = 50) -> float:
    """Wall time per call of back-to-back launches (includes the GPU time when that is longer),
    after a few untimed calls (first-use set-up, GPU clocks ramping up from idle)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


def _copy_us(reps: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return median_us([lambda: dst.copy_(src)], reps)


def _matmul_us(reps: int) -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.float16) for _ in range(2))
    return median_us([lambda: a @ b], reps)


def measure_ceilings(reps: int = 50) -> Ceilings:
    """HBM bytes/s of a 1 GiB copy (read + write) and FLOP/s of an 8192^3 fp16 matmul."""
    return Ceilings(2 * (1 << 30) / (_copy_us(reps) * 1e-6),
                    2 * 8192**3 / (_matmul_us(reps) * 1e-6))


def weight_copies(bytes_per_copy: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-2 * l2 // bytes_per_copy) + 1)


def random_packed_cuda(k: int, n: int, g: int) -> tuple[torch.Tensor, ...]:
    """Timing inputs (reference.random_packed makes seeded ones for checks on any device):
    uniformly random words are uniformly random codes; drawn on the GPU (fast for 8192 x
    28672), scales positive around 1e-2."""
    def words(rows: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, (rows, n // 8), dtype=torch.int32, device="cuda")

    scales = (torch.rand(k // g, n, device="cuda") * 0.02 + 0.002).to(torch.float16)
    return words(k), words(k // g), scales


def _impls(k: int, n: int, g: int, tuned: Dispatch | None = None
           ) -> dict[str, Callable[[torch.Tensor], list]]:
    """name -> (x -> one closure per weight copy); "awq[tuned]" is `auto` under `tuned`."""
    packed = [random_packed_cuda(k, n, g) for _ in range(weight_copies(k * n // 2))]
    fp16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02
            for _ in range(weight_copies(2 * k * n))]
    int4 = _int4pack_weights(k, n, g)

    def ours(kernel: str, fuse_splitk: bool = True):
        return lambda x: [lambda w=w: api.gemm(x, *w, g, kernel=kernel, fuse_splitk=fuse_splitk)
                          for w in packed]

    def int4pack(x: torch.Tensor) -> list:
        xb = x.to(torch.bfloat16)  # converted once, outside the timed calls
        return [lambda w=w: torch._weight_int4pack_mm(xb, w[0], g, w[1]) for w in int4]

    def partials_only(kernel: str):  # the kernel without its split-K sum (y left unwritten)
        def make(x: torch.Tensor) -> list:
            y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
            return [lambda w=w: api._launch_product(kernel, x, *w, g, y, sum_splits=False)
                    for w in packed]
        return make

    impls = {"awq": ours("auto"), "awq[mma]": ours("mma"), "awq[direct]": ours("gemv_direct"),
             "awq[direct,2 launches]": ours("gemv_direct", fuse_splitk=False),
             "awq[direct,no sum]": partials_only("gemv_direct"),
             "awq[mma,split,no sum]": partials_only("mma_split"),
             "awq[mma,split]": ours("mma_split"), "awq[mma_direct]": ours("mma_direct"),
             "awq[dequant,overlap]": ours("dequant_overlap"),
             "fp16": lambda x: [lambda w=w: torch.matmul(x, w) for w in fp16]}
    if int4:
        impls["int4pack"] = int4pack
    if tuned is not None:
        impls["awq[tuned]"] = lambda x: [lambda w=w: api.gemm(x, *w, g, dispatch=tuned)
                                         for w in packed]
    return impls


def _int4pack_weights(k: int, n: int, g: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """torch's tinygemm layout: uint8 [N, K/2] -> packed, scales_and_zeros [K/G, N, 2] bf16.
    Empty (baseline skipped) when this torch build lacks the op for the device."""
    weights = []
    try:
        for _ in range(weight_copies(k * n // 2)):
            w_u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            scale_zero = (torch.rand(k // g, n, 2, device="cuda") * 0.02).to(torch.bfloat16)
            weights.append((torch._convert_weight_to_int4pack(w_u8, 8), scale_zero))
    except RuntimeError as err:
        print(f"  int4pack baseline unavailable for K={k} N={n}: {err}")
        return []
    return weights


def point_errors() -> tuple[type[Exception], ...]:
    """What one timed point may raise without ending the run: a baseline op missing in this
    torch build (RuntimeError), a kernel that does not compile (CuPy's CompileException, which
    is no RuntimeError), a launch refused by its checks (ValueError)."""
    from cupy.cuda.compiler import CompileException

    return (RuntimeError, ValueError, CompileException)


class ContextLost(RuntimeError):
    """A point's error left CUDA unusable in this process (an illegal address, a device-side
    trap: the context's error is sticky), so nothing after it can be timed. `rows`: what the
    shape measured before it (the benchmark: up to the point; the sweep: its finished Ms)."""

    def __init__(self, message: str, rows: list):
        super().__init__(message)
        self.rows = rows


def check_context(where: str, err: Exception, rows: list) -> None:
    """After a point's error (printed, the run going on): raise ContextLost if CUDA no longer
    works in this process, naming the point, with the shape's rows so far."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).cpu()
    except RuntimeError as lost:
        raise ContextLost(f"{where} raised {type(err).__name__}: {err}; CUDA fails after it "
                          f"({lost}): the run stops here, what it measured is kept",
                          rows) from err


def stop_note(result: dict, lost: ContextLost) -> None:
    """Record a stopped run in its result: the shape's rows so far and why it stopped."""
    result["rows"] += [r if isinstance(r, dict) else asdict(r) for r in lost.rows]
    result["stopped"] = str(lost)
    print(f"stopped: {lost}", flush=True)


def timed_at(name: str, m: int, tuned: Dispatch | None = None) -> bool:
    """Whether bench_shape times implementation `name` at M rows (the rest cost device time
    for nothing the tables need)."""
    if name == "awq[direct]":
        return m <= GEMV_DIRECT_MAX_M
    if name == "awq[mma_direct]":
        return m <= 4 * MMA_DIRECT_MAX_M  # 64 rows per launch: far past where it could win
    if name in ("awq[direct,2 launches]", "awq[direct,no sum]"):
        return m == 1  # the split-K sum's cost (fused, 2 launches, none), at decode's M = 1
    if name == "awq[mma,split,no sum]":
        return m == 16  # the same for mma_split, at M = 16
    if name == "int4pack":
        # 16-25x slower than ours from M = 16 on (H100, 2026-12-05): at M = 4096 it alone
        # took ~40 s of the benchmark's device time
        return m <= 1024
    if name == "awq[dequant,overlap]":
        return m >= 128  # hides the dequantization behind matmuls that take longer than it
    if name == "awq[tuned]":
        return tuned is not None and tuned.choose(m) != DEFAULT.choose(m)  # else = "awq"
    if name == "awq[mma,split]":
        # `auto` runs it at M 9..64; since its K loop lost 2/3 of its instructions
        # (2026-12-05) it may win at M <= 8 and 128 too
        return m <= 128
    return True


def _point_rows(k: int, n: int, m: int, g: int, ceil: Ceilings,
                times: dict[str, tuple[float, float]]) -> list[Row]:
    """One (shape, M)'s rows from its implementations' (us, host us): GB/s, speedup over fp16
    (NaN where fp16 was not timed), % of the roofline floor."""
    floor_s = max(awq_bytes(m, k, n, g) / ceil.hbm_bytes_per_s, 2 * m * k * n / ceil.tensor_flops)
    fp16_us = times.get("fp16", (float("nan"),))[0]
    return [Row(k, n, m, name, us, h_us, awq_bytes(m, k, n, g) / (us * 1e3), fp16_us / us,
                100 * floor_s / (us * 1e-6)) for name, (us, h_us) in times.items()]


def bench_shape(k: int, n: int, ms: tuple[int, ...], g: int, ceil: Ceilings, reps: int,
                tuned: Dispatch | None = None) -> list[Row]:
    impls = _impls(k, n, g, tuned)
    rows: list[Row] = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        times: dict[str, tuple[float, float]] = {}
        for name, make in impls.items():
            if not timed_at(name, m, tuned):
                continue
            fns = make(x)
            try:
                h_us = host_us(fns[0])  # the GPU sleeps twice that before each timed call
                sleep = max(SLEEP_CYCLES, int(2 * h_us * CYCLES_PER_US))
                times[name] = (median_us(fns, reps, sleep_cycles=sleep), h_us)
            except point_errors() as err:  # costs only this point, unless CUDA is lost
                print(f"  {name} K={k} N={n} M={m}: {type(err).__name__}: {err}", flush=True)
                check_context(f"{name} K={k} N={n} M={m}", err,
                              rows + _point_rows(k, n, m, g, ceil, times))
        point = _point_rows(k, n, m, g, ceil, times)
        print(summary({"rows": [asdict(r) for r in point]}), flush=True)  # progress in the log
        rows += point
        del x
    return rows


def run(shapes=SHAPES, ms=MS, group_size: int = 128, reps: int = 50,
        on_shape: Callable[[dict], None] | None = None, tuned: Dispatch | None = None) -> dict:
    """The whole table; `on_shape(result so far)` after each shape (e.g. to save it, so a
    time limit or a fault later in the run loses only what was not yet measured). With
    `tuned`, also "awq[tuned]": `auto` under that dispatch, where it differs from DEFAULT's."""
    ceil = measure_ceilings()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "group_size": group_size, "reps": reps, "ceilings": asdict(ceil), "rows": []}
    if tuned is not None:
        result["tuned_dispatch"] = tuned.to_json()
    for k, n in shapes:
        try:
            result["rows"] += [asdict(r) for r in bench_shape(k, n, ms, group_size, ceil, reps,
                                                              tuned)]
        except ContextLost as lost:
            stop_note(result, lost)
        if on_shape is not None:
            on_shape(result)
        if "stopped" in result:
            break
        torch.cuda.empty_cache()
    return result


def markdown(result: dict) -> str:
    c = result["ceilings"]
    title = (f"{result['device']}, torch {result['torch']}, G = {result['group_size']}, median "
             f"of {result['reps']}; measured HBM {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"fp16 tensor {c['tensor_flops'] / 1e12:.0f} TFLOP/s")
    lines = [title, "",
             "| K x N | M | impl | us | host us | GB/s | x fp16 | % floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']}x{r['n']} | {r['m']} | {r['impl']} | {r['us']:.1f} | "
                     f"{r['host_us']:.1f} | {r['gb_per_s']:.0f} | {r['speedup_vs_fp16']:.2f} | "
                     f"{r['pct_of_floor']:.0f} |")
    if "stopped" in result:
        lines += ["", f"Stopped: {result['stopped']}"]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """One line per (shape, M): every implementation's microseconds, awq's % of the floor."""
    points: dict[tuple[int, int, int], dict[str, dict]] = {}
    for r in result["rows"]:
        points.setdefault((r["k"], r["n"], r["m"]), {})[r["impl"]] = r
    lines = []
    for (k, n, m), impls in points.items():
        cells = " ".join(f"{name} {r['us']:8.1f}" for name, r in impls.items())
        floor = impls["awq"]["pct_of_floor"] if "awq" in impls else float("nan")
        lines.append(f"{k:>5}x{n:<5} M={m:<5} floor% {floor:5.1f} | us: {cells}")
    return "\n".join(lines)
