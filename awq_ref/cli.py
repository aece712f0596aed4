"""Command line: `python -m awq_ref {generate,ppl,quantize} ...`; parses, then calls the package."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from awq_ref.cli_common import (
    DTYPES,
    add_model_args,
    command_line_text,
    load,
    positive,
    seed,
    warn_past_context,
)
from awq_ref.cli_process import command_process, interrupted_status, silence_stdout
from awq_ref.cli_quantize import add_quantize_parser, what_is_kept


def check_device(device: str) -> None:
    """--device names a CPU or CUDA device torch has here (a clear error instead of torch's)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name "
                         f"(cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (a CPU-only torch "
                         "build, or no driver)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", choices=["torch", "cupy"],
                   help="quantized layers: torch = dequantize + matmul (the reference), "
                        "cupy = awq_kernels' int4 CUDA kernels (--device cuda, --dtype float16)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="run q/k/v and gate/up as one linear each (same numbers, fewer and "
                        "larger products: faster decode on a GPU)")
    p.add_argument("--fuse-elementwise", action="store_true",
                   help="with --backend cupy: RMSNorm (+ residual add), silu(gate) * up, the "
                        "rotary embedding (+ KV-cache write) and the decode step's attention as "
                        "one CUDA kernel each (awq_kernels.ops; 10 instead of 19 kernels per "
                        "layer and decode step; head dim 64 or 128)")
    p.add_argument("--quantize-embeddings", nargs="?", const="both", default=None,
                   choices=["embed", "head", "both"],
                   help="also hold the token table (embed), lm_head (head) or both (the default "
                        "when given alone) in 4 bits, RTN at load time: memory on large "
                        "vocabularies; the head costs quality (see docs/quantize-your-model.md)")
    p.add_argument("--head-bits", type=int, default=4, choices=[4, 8],
                   help="with --quantize-embeddings head/both: the lm_head in 4 bits (the packed "
                        "format) or 8 (int8 per row: 27.6%% of fp16 for Llama-3-8B's shape with "
                        "the 4-bit table, at a tenth of the 4-bit head's quality cost)")
    p.add_argument("--head-calib", nargs="+", default=None, metavar="FILE",
                   help="with --quantize-embeddings: clip the 4-bit lm_head's groups against the "
                        "final hidden states of 128 x 512 tokens of these texts (awq_ref.awq.head;"
                        " recovers much of the head's cost)")


def _clipped_head(args: argparse.Namespace, model):
    """The lm_head weight clipped against --head-calib texts, or None without them."""
    if not args.head_calib:
        return None

    from awq_ref.awq.calibration import calibration_tokens
    from awq_ref.awq.head import clipped_head
    from awq_ref.loaders import load_tokenizer
    from awq_ref.quant.embedding import default_group_size

    tokens = calibration_tokens(load_tokenizer(args.model), [Path(f) for f in args.head_calib])
    print(f"--head-calib: searching the 4-bit lm_head's clip boxes on {tokens.shape[0]} x "
          f"{tokens.shape[1]} tokens (minutes on a CPU: 1.5 for SmolLM2 on 2 cores)...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    head = clipped_head(model, tokens, default_group_size(model))
    print(f"--head-calib: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return head


def _quantize_tables(args: argparse.Namespace, model) -> None:
    """--quantize-embeddings [--head-bits] [--head-calib]: the token table in 4 bits, the
    lm_head in 4 (clipped against --head-calib if given) or 8 bits."""
    from awq_ref.quant.embedding import quantize_embeddings

    parts = {"embed": ("embed",), "head": ("head",), "both": ("embed", "head")}[
        args.quantize_embeddings]
    if args.head_bits == 8 and "head" in parts:
        from awq_ref.quant.int8_head import quantize_head_int8

        if args.head_calib:
            raise ValueError("--head-calib clips the 4-bit lm_head; the 8-bit one needs no clip")
        quantize_head_int8(model)
        parts = tuple(p for p in parts if p != "head")
    if parts:
        quantize_embeddings(model, parts=parts, head_weight=_clipped_head(args, model))


def _load_for_inference(args: argparse.Namespace):
    """The --model with its QuantLinear layers on --backend (checked before loading)."""
    from awq_ref.backend import backend_kernel, check_kernel_layers
    from awq_ref.quant.qlinear import apply_kernel

    kernel = backend_kernel(args.backend, args.device, DTYPES[args.dtype])
    if args.fuse_elementwise and args.backend == "torch":
        raise ValueError("--fuse-elementwise runs awq_kernels' CUDA kernels: it needs "
                         "--backend cupy")
    if args.quantize_embeddings == "embed" and (args.head_calib or args.head_bits != 4):
        raise ValueError("--head-calib and --head-bits shape the quantized lm_head: "
                         "--quantize-embeddings embed leaves it as it is (use head or both)")
    model = load(args)
    if args.quantize_embeddings:
        _quantize_tables(args, model)
    elif args.head_calib or args.head_bits != 4:
        raise ValueError("--head-calib and --head-bits shape the quantized lm_head: each "
                         "needs --quantize-embeddings")
    if args.fuse_projections:
        from awq_ref.fuse import fuse_projections

        fuse_projections(model)
    check_kernel_layers(args.backend, model)
    if apply_kernel(model, kernel) == 0 and kernel is not None:
        raise ValueError(f"--backend {args.backend}: {args.model} has no quantized (packed "
                         "4-bit) layers; the backend only runs those (use --backend torch)")
    if args.quantize_embeddings and args.head_bits == 8:
        from awq_ref.backend import backend_int8_kernel
        from awq_ref.quant.int8_head import apply_int8_kernel

        apply_int8_kernel(model, backend_int8_kernel(args.backend, args.device, DTYPES[args.dtype]))
    if args.fuse_elementwise:
        from awq_ref.backend import backend_elementwise_ops
        from awq_ref.fuse import use_elementwise_kernels

        use_elementwise_kernels(model, backend_elementwise_ops(args.backend, args.device,
                                                               DTYPES[args.dtype]))
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    from awq_ref.generate import check_sampling, generate
    from awq_ref.loaders import load_tokenizer

    check_sampling(args.temperature, args.top_p)  # before the prompt is echoed
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise ValueError(f"--cuda-graph needs --device cuda (CUDA graphs), got "
                         f"--device {args.device}")
    positive("--max-new-tokens", args.max_new_tokens, least=0)
    model = _load_for_inference(args)  # first: a backend that cannot run fails before any work
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt)
    # the last new token is never fed back: T + N - 1 positions run
    warn_past_context(model.config, len(ids) + args.max_new_tokens - 1,
                      "the prompt and --max-new-tokens")
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = [tok.decode(ids, skip_special_tokens=True)]  # the decoded text so far

    def stream(token: int) -> None:
        # Decode prompt and continuation together each time: SentencePiece drops the leading
        # space of a text's first token, and byte-level tokens may end mid-character, which
        # decodes as U+FFFD until the character's last byte comes: hold those back.
        new.append(token)
        text = tok.decode(ids + new, skip_special_tokens=True).rstrip("\ufffd")
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    t0 = time.perf_counter()
    generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             eos_ids=tok.eos_ids, seed=args.seed, on_token=stream, cuda_graph=args.cuda_graph)
    dt = time.perf_counter() - t0
    rest = tok.decode(ids + new, skip_special_tokens=True)[len(shown[0]):]  # bytes never completed
    print(rest, flush=True)  # stdout ends with a newline
    print(f"[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from awq_ref.eval import evaluate, load_wikitext_tokens
    from awq_ref.loaders import load_tokenizer

    positive("--seqlen", args.seqlen, least=2)
    positive("--windows", args.windows)
    model = _load_for_inference(args)
    warn_past_context(model.config, args.seqlen, "--seqlen")
    tok = load_tokenizer(args.model)
    reference = load(args, args.reference) if args.reference else None
    tokens = load_wikitext_tokens(tok, args.text)
    result = evaluate(model, tokens, seqlen=args.seqlen, windows=args.windows, reference=reference)
    result.update(model=args.model, text=args.text, reference=args.reference)
    windows = result["windows"]
    line = (f"ppl {result['ppl']:.4f} over {result['tokens']} tokens ({windows} window"
            f"{'s' if windows != 1 else ''})")
    if reference is not None:
        line += f"; vs reference: KL {result['kl']:.5f}, top-1 {result['top1']:.4f}"
    print(line)
    if args.json:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m awq_ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    add_model_args(g)
    g.add_argument("--prompt", required=True, type=command_line_text)
    g.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling's probability mass (default: 1.0, off)")
    g.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")
    _add_backend_arg(g)
    g.add_argument("--cuda-graph", action="store_true",
                   help="decode by replaying one captured CUDA graph per token (CUDA only)")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity on a text file (PROTOCOL.md)")
    add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, tokenized as one stream")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--reference", default=None,
                   help="also report KL and top-1 against this model (same --model forms)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_backend_arg(p)
    p.set_defaults(func=cmd_ppl)

    add_quantize_parser(sub)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: Python's or CuPy's MemoryError, CUDA's OutOfMemoryError, or the
    RuntimeError of torch's CPU allocator."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


# What uses less memory, per subcommand (the out-of-memory line's advice).
OOM_HINTS = {
    "quantize": "Fewer --n-samples or a shorter --calib-seqlen, --stream (models larger than "
                "memory), --dtype bfloat16",
    "ppl": "A shorter --seqlen, --dtype bfloat16",
    "generate": "A shorter prompt or fewer --max-new-tokens (the KV cache), --dtype bfloat16",
}


def oom_hint(args: argparse.Namespace) -> str:
    """OOM_HINTS for the command, quantize's cut to the options this run can take: no
    calibration for rtn or --result, --stream only for an HF folder not already streamed."""
    if args.command != "quantize":
        return OOM_HINTS[args.command]
    hints = []
    if args.method == "awq" and not args.result:
        hints.append("fewer --n-samples or a shorter --calib-seqlen")
    if not args.stream:
        hints += ["--stream (models larger than memory)"] if Path(args.model).is_dir() else []
        hints.append("--dtype bfloat16")
    return ", ".join(hints).capitalize() if hints else "Less"


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 (bytes a file system
        if hasattr(stream, "reconfigure"):    # allows) printed, not a crash after the work
            stream.reconfigure(errors="backslashreplace")
    with command_process():  # SIGTERM as Ctrl-C; a stderr that cannot be written is no error
        return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        check_device(args.device)
        return args.func(args)
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as SIGPIPE would
        silence_stdout()
        return 141
    except (ValueError, OSError) as e:  # OSError: a disk full, a path not readable, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not a traceback
        word, status = interrupted_status(e)  # 130 = 128 + SIGINT, 143 = 128 + SIGTERM
        print(f"\n{word}: {what_is_kept(args)}", file=sys.stderr)
        return status
    except (RuntimeError, MemoryError) as e:  # only allocation failures; any other is a bug
        if not _out_of_memory(e):
            raise
        first_line = (str(e).splitlines() or [""])[0][:200]
        print(f"error: out of memory ({type(e).__name__}: {first_line}); {what_is_kept(args)}. "
              f"{oom_hint(args)}, or a device with more memory may fit", file=sys.stderr)
        return 1
