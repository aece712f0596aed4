"""Time and peak memory of streaming-quantizing a large checkpoint (awq_ref.stream).

    PYTHONPATH=. python tools/make_random_checkpoint.py --preset llama-2-7b --out /work/rand7b
    PYTHONPATH=. python tools/stream_7b.py --model /work/rand7b --out /work/rand7b-awq

Calibration: --n-samples x --seqlen random tokens (seed 0; a random checkpoint has no
tokenizer, and the cost does not depend on the text). Prints one JSON object: wall time, peak
RSS of this process and of its children (ru_maxrss), peak GPU memory on CUDA, settings.
Rerunning the same command after a crash resumes from the last finished block.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from tool_cli import count, exit_status  # tools/, beside this script

from awq_ref.cli import check_device
from awq_ref.loaders.lazy import LazyTensors
from awq_ref.stream import quantize_folder


def peak_rss_gb(who: int) -> float:
    """ru_maxrss in GB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(who).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def check_paths(args: argparse.Namespace) -> None:
    """--out (replaced with --overwrite) and the work folder (deleted after success) must not
    hold --model: either would destroy the checkpoint being read."""
    model = Path(args.model).resolve()
    work = args.work_dir or f"{str(args.out).rstrip('/')}.partial"  # quantize_folder's default
    for flag, path in (("--out", args.out), ("--work-dir", work)):
        if Path(path).resolve() in (model, *model.parents):
            raise ValueError(f"{flag} {path} holds --model {args.model}, which it would destroy: "
                             "write elsewhere")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="fp HF folder (safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="awq", choices=["awq", "rtn"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=count, default=8)
    ap.add_argument("--seqlen", type=count, default=256)
    ap.add_argument("--n-grid", type=int, default=5)
    ap.add_argument("--clip-grid", type=int, default=5)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--threads", type=count, default=None,
                    help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    check_device(args.device)
    check_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    embed = LazyTensors(args.model).index.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{args.model}: no model.embed_tokens.weight (not a Llama-style HF "
                         "checkpoint)")
    vocab = embed.shape[0]
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.n_samples, args.seqlen), generator=gen)
    options = ({"calib_tokens": calib, "n_grid": args.n_grid, "clip_grid": args.clip_grid,
                "clip": not args.no_clip} if args.method == "awq" else {})
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    t0 = time.perf_counter()
    out = quantize_folder(args.model, args.out, method=args.method, group_size=args.group_size,
                          device=args.device, work_dir=args.work_dir, overwrite=args.overwrite,
                          **options)
    wall = time.perf_counter() - t0
    report = {
        "model": str(args.model), "out": str(out), "method": args.method,
        "group_size": args.group_size, "device": args.device, "threads": torch.get_num_threads(),
        "calibration": f"{args.n_samples} x {args.seqlen} random tokens (seed 0)"
        if args.method == "awq" else None,
        "n_grid": args.n_grid if args.method == "awq" else None,
        "clip_grid": args.clip_grid if args.method == "awq" and not args.no_clip else None,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_rss_gb(resource.RUSAGE_SELF), 3),
        "peak_rss_children_gb": round(peak_rss_gb(resource.RUSAGE_CHILDREN), 3),
        "checkpoint_gb": round(sum(p.stat().st_size for p in Path(out).iterdir()) / 1e9, 3),
    }
    if args.device.startswith("cuda"):
        report["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 1e9, 3)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main, "the finished blocks are kept in the work folder "
                                       "(--work-dir, by default OUT.partial): the same command "
                                       "resumes"))
