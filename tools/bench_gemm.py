"""Time awq_kernels.gemm against fp16 cuBLAS and torch's int4 kernel (PROTOCOL.md, kernel speed).

    python tools/bench_gemm.py [--quick] [--group-size 128] [--reps 50] [--out out/bench_gemm]
    python tools/bench_gemm.py --sweep-mma [--out out/sweep_mma]   # every mma tile (sweep.py)
    python tools/bench_gemm.py --tuned-from out/sweep_mma.json   # + `auto` as the sweep chose it

Writes <out>.json and <out>.md after every shape (a time limit or a fault later keeps what was
measured), prints each point's times as it goes and the markdown table at the end. A point that
leaves CUDA unusable (an illegal address) stops the run there: the files say where ("stopped")
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from awq_kernels import benchmark, sweep
from awq_kernels.dispatch import describe
from awq_ref.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes x 6 M instead of 7 x 11")
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--reps", type=int, default=50, help="timed calls per point (>= 50)")
    parser.add_argument("--sweep-mma", action="store_true",
                        help="time every compiled mma tile, plain and split-K, at M = "
                             f"{', '.join(map(str, sweep.SWEEP_MS))}, and the decode kernels' "
                             "split caps, on the quick shapes and 8192x28672")
    parser.add_argument("--tuned-from", type=Path, default=None, metavar="SWEEP_JSON",
                        help="also time `auto` under the dispatch this sweep's JSON chooses "
                             "(awq_kernels.sweep.tuned_dispatch) as awq[tuned], where it "
                             "differs from the default")
    parser.add_argument("--out", type=Path, default=None,
                        help="file stem (default out/bench_gemm, or out/sweep_mma)")
    args = parser.parse_args()
    if args.quick and args.sweep_mma:
        parser.error("--quick: the sweep has its own shapes (--sweep-mma's help)")
    if args.reps < 50:
        parser.error(f"--reps {args.reps}: PROTOCOL.md takes the median of at least 50 calls")
    out = args.out or Path("out/sweep_mma" if args.sweep_mma else "out/bench_gemm")
    out.parent.mkdir(parents=True, exist_ok=True)
    to_markdown = sweep.markdown if args.sweep_mma else benchmark.markdown

    def save(result: dict) -> None:  # after every shape: a later fault or time limit keeps it
        atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
        atomic_write_text(out.with_suffix(".md"), to_markdown(result))

    tuned = None
    if args.tuned_from is not None:
        if args.sweep_mma:
            parser.error("--tuned-from times the benchmark's shapes, not the sweep's")
        try:
            tuned = sweep.load_tuned_dispatch(args.tuned_from)
        except ValueError as err:
            parser.error(f"--tuned-from {err}")
        print(f"awq[tuned]: `auto` as {tuned.source} chose it:\n{describe(tuned)}", flush=True)
    if args.sweep_mma:
        result = sweep.run(group_size=args.group_size, reps=args.reps, on_shape=save)
    else:
        shapes, ms = ((benchmark.QUICK_SHAPES, benchmark.QUICK_MS) if args.quick
                      else (benchmark.SHAPES, benchmark.MS))
        result = benchmark.run(shapes, ms, args.group_size, args.reps, on_shape=save, tuned=tuned)
    save(result)
    print(to_markdown(result))
    if "stopped" in result:  # CUDA was lost: the rest is unmeasured (the log names the point)
        sys.exit(1)


if __name__ == "__main__":
    main()
