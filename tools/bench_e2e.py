"""End-to-end speed on a CUDA device, PROTOCOL.md "End-to-end speed", in one run:

    PYTHONPATH=. python tools/bench_e2e.py --json out/bench_e2e.json [--quick] [--models ...]

Models: SmolLM2-135M-Instruct (real weights via load_model("default"), RTN W4 g64; random weights
of its shape when the file is unavailable, which the table says) and a Llama-3-8B-shaped model
with random non-zero weights made directly on the GPU (W4 g128; no checkpoint file). Variants of
each: fp16; 4-bit on awq_kernels ("w4 cupy"); 4-bit on the dequantize + matmul reference
("w4 torch"); 4-bit on awq_kernels with the token table and lm_head in 4 bits too
("w4 cupy +emb", awq_ref.quant.embedding, RTN at load time). "+ops" variants also run RMSNorm,
SwiGLU and the rotary embedding on awq_kernels.ops (one kernel each;
awq_ref.fuse.use_elementwise_kernels): "fp16 +ops" and "w4 cupy +emb +ops", compared with each
other (tools/targets.py); they are skipped with a message if the ops fail a quick check against
torch. "w4 cupy +emb4/head8 +ops" keeps the lm_head in 8 bits (awq_ref.quant.int8_head,
gemv_int8.cu) with the 4-bit token table. "w4 cupy [overlap]" (prefill only) runs `auto` with
dequantize + cuBLAS overlapped in column slices from M = 65 (kernel "dequant_overlap",
awq_kernels/NOTES.md), which `auto` does not take until measured; with --tuned-from, "w4 cupy
[tuned]" runs `auto` under the rule a tile sweep chose (awq_kernels.sweep). (Until 2026-12-05
"[direct]" variants also ran `kernel="auto_direct"`; `auto` now takes the direct kernels where
the H100 measured them fastest, so they were dropped.) Per variant:

- prefill tokens/s of one forward over 128 and over 2048 tokens (median of --repeats);
- decode tokens/s: batch 1, 128-token prompt, 256 greedy tokens (the first comes from the
  prefill, so 255 decode steps are timed), eager and replayed from a CUDA graph (not for the
  reference backend); the next token stays on the GPU (argmax), so no host sync per token;
- weights (the bytes of the model's tensors, as --count-weights counts them; until
  2026-12-07 the memory allocated once built, which also held cuBLAS's workspaces: 32 MiB per
  stream that ran a matmul, kept after the model that made them was freed), the memory
  allocated once built ("allocated_gib", those workspaces now freed between variants) and
  peak GPU memory (torch.cuda.max_memory_allocated, reset after each variant is built; it
  includes the 2048-token prefill).

Every variant, fp16 included, runs with q/k/v and gate/up fused into one linear each
(awq_ref.fuse; since 2026-12-05, after the H200 run of 2026-12-04, which had them apart).

Times: torch.cuda.synchronize() around time.perf_counter(), after a warm-up call that compiles
the kernels. Exits 2 with a message where there is no CUDA device or no CuPy.

    PYTHONPATH=. python tools/bench_e2e.py --count-weights

counts (on the meta device, no GPU needed) the bytes each variant's weights take, as the
"weights" column finds them on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from e2e_models import (  # tools/, beside this script
    DEVICE,
    DTYPE,
    GROUP_SIZE,
    build,
    count_weights,
    weight_gib,
)
from ops_check import elementwise_ops  # tools/, beside this script
from torch import nn

from awq_kernels.benchmark import point_errors
from awq_ref.backend import backend_int8_kernel, backend_kernel, check_backend
from awq_ref.cuda_graph import CudaGraphDecoder
from awq_ref.files import atomic_write_text
from awq_ref.fuse import use_elementwise_kernels
from awq_ref.model import Llama
from awq_ref.quant.embedding import quantize_embeddings
from awq_ref.quant.int8_head import apply_int8_kernel, quantize_head_int8
from awq_ref.quant.qlinear import apply_kernel


@dataclass(frozen=True)
class Settings:
    prompt: int = 128
    new_tokens: int = 256
    long_prefill: int = 2048
    repeats: int = 3


QUICK = Settings(new_tokens=64, repeats=2)


# --- timing -----------------------------------------------------------------------------------

def _seconds(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _prompt(model: Llama, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(DEVICE)  # (1, T)


@torch.no_grad()
def prefill_tokens_per_s(model: Llama, n: int, repeats: int) -> float:
    ids, cache = _prompt(model, n), model.new_cache(1, n)

    def run() -> None:
        cache.length = 0
        model(ids, cache, last_only=True)

    run()  # warm-up: kernels compiled, cuBLAS set up
    return n / statistics.median(_seconds(run) for _ in range(repeats))


@torch.no_grad()
def decode_tokens_per_s(model: Llama, s: Settings, graph: bool) -> float:
    """Greedy decode after an s.prompt-token prefill; s.new_tokens - 1 steps are timed."""
    steps = s.new_tokens - 1
    cache = model.new_cache(1, s.prompt + steps + 1)  # + 1: the warm-up step
    token = model(_prompt(model, s.prompt), cache, last_only=True)[0, -1].argmax()  # 0-dim
    if graph:
        step = CudaGraphDecoder(model, cache).step
    else:
        def step(t: torch.Tensor) -> torch.Tensor:
            return model(t.view(1, 1), cache, last_only=True)[0, -1]  # (V,)
    token = step(token).argmax()  # warm-up: the M = 1 kernels compiled

    def run() -> None:
        t = token
        for _ in range(steps):
            t = step(t).argmax()

    return steps / _seconds(run)


def measure(model: Llama, s: Settings, graph: bool, eager: bool = True) -> dict[str, float | None]:
    """Prefill and decode speeds; eager decode is host-bound on some machines (H200 under
    gVisor: 8-13 tokens/s, seconds per variant), so the newer variants skip it (eager=False)."""
    return {
        f"prefill_{s.prompt}_tok_s": prefill_tokens_per_s(model, s.prompt, s.repeats),
        f"prefill_{s.long_prefill}_tok_s": prefill_tokens_per_s(model, s.long_prefill, s.repeats),
        "decode_eager_tok_s": decode_tokens_per_s(model, s, graph=False) if eager else None,
        "decode_graph_tok_s": decode_tokens_per_s(model, s, graph=True) if graph else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _fresh_peak() -> float:
    """Free what is unreferenced (cuBLAS's per-stream workspaces too: they outlive the model
    that made them), restart the peak counter; returns GiB allocated now."""
    gc.collect()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def overlap_kernel() -> Callable:
    """awq_kernels.gemm whose `auto` takes "dequant_overlap" where it took "dequant"."""
    from awq_kernels.dispatch import DEFAULT, Choice, Dispatch

    rules = tuple((b, Choice("dequant_overlap") if c.kernel == "dequant" else c)
                  for b, c in DEFAULT.rules)
    return dispatch_kernel(Dispatch(rules, f"{DEFAULT.source}, overlapped"))


def dispatch_kernel(dispatch) -> Callable:
    """awq_kernels.gemm with `auto` under another rule (awq_kernels.dispatch.Dispatch)."""
    from awq_kernels import gemm

    return functools.partial(gemm, dispatch=dispatch)


def optional_rows(name: str, s: Settings, tuned=None) -> Iterator[dict]:
    """The variants whose kernels have not yet run on a GPU: "w4 cupy [overlap]" and, with
    `tuned` (a Dispatch), "w4 cupy [tuned]" (`auto` under it). A failure costs its own row;
    run after every model's proven rows, since a sticky CUDA error would end the process."""
    model, source = build(name, quantized=True)
    apply_kernel(model, backend_kernel("cupy", DEVICE, DTYPE))
    optional = [("w4 cupy [overlap]", overlap_kernel(), False)]
    if tuned is not None:
        optional.append(("w4 cupy [tuned]", dispatch_kernel(tuned), True))
    for variant, kernel, graph in optional:
        apply_kernel(model, kernel)
        try:
            row = _row(name, source, variant, model, s, graph=graph, eager=False)
        except point_errors() as err:
            print(f"  {name} {variant}: {type(err).__name__}: {err}", flush=True)
            continue
        yield row
    del model
    _fresh_peak()


def _row(name: str, source: str, variant: str, model: nn.Module, s: Settings, graph: bool,
         eager: bool = True) -> dict:
    """One variant's row: the weights as the bytes of the model's tensors (weight_gib), what
    the allocator holds once built (more: it also holds cuBLAS's workspaces, 32 MiB per stream
    that ran a matmul on Hopper), then the speeds and this variant's peak."""
    return {"model": name, "weights": source, "variant": variant,
            "weights_gib": weight_gib(model), "allocated_gib": _fresh_peak(),
            **measure(model, s, graph=graph, eager=eager)}


def bench_model(name: str, s: Settings) -> Iterator[dict]:
    """Every proven variant of one model without awq_kernels.ops, one after the other (never
    two models at once), a row as each is measured (the "+ops" ones: ops_rows; the unproven
    ones: optional_rows; both after every model's rows here)."""
    model, source = build(name, quantized=False)
    yield _row(name, source, "fp16", model, s, graph=True)
    del model
    _fresh_peak()
    model, source = build(name, quantized=True)
    for backend in ("cupy", "torch"):
        apply_kernel(model, backend_kernel(backend, DEVICE, DTYPE))
        yield _row(name, source, f"w4 {backend}", model, s, graph=backend == "cupy")
    quantize_embeddings(model)  # RTN on the GPU; the fp16 tables are freed
    apply_kernel(model, backend_kernel("cupy", DEVICE, DTYPE))
    yield _row(name, source, "w4 cupy +emb", model, s, graph=True, eager=False)
    del model
    _fresh_peak()


def ops_rows(name: str, s: Settings, ops) -> Iterator[dict]:
    """The variants with awq_kernels.ops (`ops`, or None where they failed ops_check):
    "fp16 +ops", "w4 cupy +emb +ops", and the 4-bit token table with an 8-bit lm_head (a tenth
    of the 4-bit head's quality cost), "+ops" where the ops passed, on the torch code where not
    (then its only row)."""
    if ops is not None:
        model, source = build(name, quantized=False)
        use_elementwise_kernels(model, ops)
        yield _row(name, source, "fp16 +ops", model, s, graph=True, eager=False)
        del model
        _fresh_peak()
        model, source = build(name, quantized=True)
        quantize_embeddings(model)
        apply_kernel(model, backend_kernel("cupy", DEVICE, DTYPE))
        use_elementwise_kernels(model, ops)
        yield _row(name, source, "w4 cupy +emb +ops", model, s, graph=True, eager=False)
        del model
        _fresh_peak()
    model, source = build(name, quantized=True)
    quantize_head_int8(model)
    quantize_embeddings(model, parts=("embed",))
    apply_kernel(model, backend_kernel("cupy", DEVICE, DTYPE))
    apply_int8_kernel(model, backend_int8_kernel("cupy", DEVICE, DTYPE))
    use_elementwise_kernels(model, ops)  # None: the torch code
    yield _row(name, source, "w4 cupy +emb4/head8" + (" +ops" if ops else ""), model, s,
               graph=True, eager=False)
    del model
    _fresh_peak()


# --- where the decode time goes ----------------------------------------------------------------

PROFILED = ("fp16", "w4 cupy", "w4 cupy +emb +ops")


def profiled_model(name: str, variant: str, ops) -> Llama:
    """One of PROFILED's models: the 4-bit tables made before the kernel is set (the 4-bit
    lm_head is a new QuantLinear: set first, it ran on the torch reference, dequantizing the
    whole 8B head each step, while the profile's title said awq_kernels)."""
    model, _ = build(name, quantized=variant != "fp16")
    if variant == "w4 cupy +emb +ops":
        quantize_embeddings(model)
        use_elementwise_kernels(model, ops)  # None (failed check): the torch code
    if variant != "fp16":
        apply_kernel(model, backend_kernel("cupy", DEVICE, DTYPE))
    return model


@torch.no_grad()
def profile_decode(name: str, steps: int = 4, rows: int = 14) -> str:
    """torch.profiler's per-kernel device time over `steps` eager and CUDA-graph decode steps,
    for fp16, W4 on awq_kernels (`auto`), and W4 with 4-bit tables on awq_kernels and
    awq_kernels.ops (the tables name each kernel and its mean time)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    ops = elementwise_ops()
    for variant in PROFILED:
        model = profiled_model(name, variant, ops)
        cache = model.new_cache(1, 128 + 3 * steps + 8)
        token = model(_prompt(model, 128), cache, last_only=True)[0, -1].argmax()  # 0-dim
        graph = CudaGraphDecoder(model, cache)

        def eager(t: torch.Tensor, model=model, cache=cache) -> torch.Tensor:
            return model(t.view(1, 1), cache, last_only=True)[0, -1]  # (V,)

        for mode, step in (("eager", eager), ("graph", graph.step)):
            step(token)  # warm-up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = token
                for _ in range(steps):
                    t = step(t).argmax()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)
            out.append(f"### {name} {variant}, {mode} decode, {steps} steps\n{table}")
        del model, graph, cache
        _fresh_peak()
    return "\n".join(out)


# --- report -----------------------------------------------------------------------------------

def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(GROUP_SIZE), choices=list(GROUP_SIZE))
    p.add_argument("--quick", action="store_true", help=f"{QUICK.new_tokens} new tokens, "
                   f"{QUICK.repeats} prefill repeats (for tools/gpu_check.sh)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--tuned-from", type=Path, default=None, metavar="SWEEP_JSON",
                   help="also time 'w4 cupy [tuned]': `auto` under the rule this tile sweep's "
                        "JSON chooses (awq_kernels.sweep.tuned_dispatch)")
    p.add_argument("--profile", action="store_true", help="instead of timing, print where the "
                   "decode time goes (torch.profiler kernel tables: fp16, w4 cupy, "
                   "w4 cupy +emb +ops)")
    p.add_argument("--count-weights", action="store_true", help="only count each variant's "
                   "weight bytes from the shapes (no GPU needed)")
    args = p.parse_args(argv)
    if args.count_weights:
        print(markdown(count_weights(args.models)))
        return 0
    tuned = None
    if args.tuned_from is not None:
        from awq_kernels import sweep

        try:
            tuned = sweep.load_tuned_dispatch(args.tuned_from)
        except ValueError as err:
            print(f"--tuned-from {err}", file=sys.stderr)
            return 2
    try:
        check_backend("cupy", DEVICE, DTYPE)
    except ValueError as e:
        print(f"bench_e2e.py needs a CUDA device with CuPy; nothing measured: {e}", file=sys.stderr)
        return 2
    if args.profile:
        for name in args.models:
            print(profile_decode(name))
        return 0
    s = QUICK if args.quick else Settings()
    rows = []
    ops = elementwise_ops()  # checked in a child process: a fault there leaves ours intact
    # Generators: one model on the GPU at a time; every model's proven rows first, then those
    # with the element-wise kernels, then the unproven ones.
    passes = [*(bench_model(name, s) for name in args.models),
              *(ops_rows(name, s, ops) for name in args.models),
              *(optional_rows(name, s, tuned) for name in args.models)]
    for row in itertools.chain.from_iterable(passes):  # saved after each row: a fault keeps it
        rows.append(row)
        print(f"{row['model']} {row['variant']}: measured", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "settings": asdict(s), "rows": rows}, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
