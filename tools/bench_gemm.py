"""Time awq_kernels.gemm against fp16 cuBLAS and torch's int4 kernel (PROTOCOL.md, kernel speed).

    python tools/bench_gemm.py [--quick] [--group-size 128] [--reps 50] [--out out/bench_gemm]
    python tools/bench_gemm.py --sweep-mma [--out out/sweep_mma]   # every mma tile (sweep.py)

Writes <out>.json and <out>.md and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from awq_kernels import benchmark, sweep
from awq_ref.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes x 6 M instead of 7 x 11")
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--reps", type=int, default=50, help="timed calls per point (>= 50)")
    parser.add_argument("--sweep-mma", action="store_true",
                        help="time every compiled mma tile, plain and split-K, at M = "
                             f"{', '.join(map(str, sweep.SWEEP_MS))}, and the decode kernels' "
                             "split caps, on the quick shapes")
    parser.add_argument("--out", type=Path, default=None,
                        help="file stem (default out/bench_gemm, or out/sweep_mma)")
    args = parser.parse_args()
    if args.reps < 50:
        parser.error(f"--reps {args.reps}: PROTOCOL.md takes the median of at least 50 calls")
    if args.sweep_mma:
        result = sweep.run(group_size=args.group_size, reps=args.reps)
        table = sweep.markdown(result)
        args.out = args.out or Path("out/sweep_mma")
    else:
        shapes, ms = ((benchmark.QUICK_SHAPES, benchmark.QUICK_MS) if args.quick
                      else (benchmark.SHAPES, benchmark.MS))
        result = benchmark.run(shapes, ms, args.group_size, args.reps)
        table = benchmark.markdown(result)
        args.out = args.out or Path("out/bench_gemm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
