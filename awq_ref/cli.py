"""Command line: `python -m awq_ref {generate,ppl,quantize} ...`. Thin: parse, then call the package."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF folder, .gguf file, llama2.c .bin, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and activations")


def check_device(device: str) -> None:
    """--device names a CPU or CUDA device torch has here (a clear error instead of torch's)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (a CPU-only torch "
                         "build, or no driver)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")


def _positive(name: str, value: int | None, least: int = 1) -> None:
    if value is not None and value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")


def _load(args: argparse.Namespace, path: str | None = None):
    from awq_ref.loaders import load_model

    return load_model(path or args.model, device=args.device, dtype=DTYPES[args.dtype])


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
    return clipped_head(model, tokens, default_group_size(model))


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
    from awq_ref.backend import backend_kernel
    from awq_ref.quant.qlinear import apply_kernel

    kernel = backend_kernel(args.backend, args.device, DTYPES[args.dtype])
    if args.fuse_elementwise and args.backend == "torch":
        raise ValueError("--fuse-elementwise runs awq_kernels' CUDA kernels: it needs "
                         "--backend cupy")
    if args.quantize_embeddings == "embed" and (args.head_calib or args.head_bits != 4):
        raise ValueError("--head-calib and --head-bits shape the quantized lm_head: "
                         "--quantize-embeddings embed leaves it as it is (use head or both)")
    model = _load(args)
    if args.quantize_embeddings:
        _quantize_tables(args, model)
    elif args.head_calib or args.head_bits != 4:
        raise ValueError("--head-calib and --head-bits shape the quantized lm_head: each "
                         "needs --quantize-embeddings")
    if args.fuse_projections:
        from awq_ref.fuse import fuse_projections

        fuse_projections(model)
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
    from awq_ref.generate import generate
    from awq_ref.loaders import load_tokenizer

    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise ValueError(f"--cuda-graph needs --device cuda (CUDA graphs), got --device {args.device}")
    _positive("--max-new-tokens", args.max_new_tokens, least=0)
    model = _load_for_inference(args)  # first: a backend that cannot run fails before any work
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt)
    print(args.prompt, end="", flush=True)
    new: list[int] = []

    def stream(token: int) -> None:
        # Decode the whole continuation each time: byte-level tokens may end mid-character.
        before = tok.decode(new, skip_special_tokens=True)
        new.append(token)
        print(tok.decode(new, skip_special_tokens=True)[len(before):], end="", flush=True)

    t0 = time.perf_counter()
    generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             eos_ids=tok.eos_ids, seed=args.seed, on_token=stream, cuda_graph=args.cuda_graph)
    dt = time.perf_counter() - t0
    print(flush=True)  # stdout ends with a newline
    print(f"[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from awq_ref.eval import evaluate, load_wikitext_tokens
    from awq_ref.loaders import load_tokenizer

    _positive("--seqlen", args.seqlen, least=2)
    _positive("--windows", args.windows)
    model = _load_for_inference(args)
    tok = load_tokenizer(args.model)
    reference = _load(args, args.reference) if args.reference else None
    tokens = load_wikitext_tokens(tok, args.text)
    result = evaluate(model, tokens, seqlen=args.seqlen, windows=args.windows, reference=reference)
    result.update(model=args.model, text=args.text, reference=args.reference)
    line = f"ppl {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows)"
    if reference is not None:
        line += f"; vs reference: KL {result['kl']:.5f}, top-1 {result['top1']:.4f}"
    print(line)
    if args.json:
        print(json.dumps(result))
    return 0


def _progress(args: argparse.Namespace):
    """The resumable search's work folder (--work-dir, default OUT.partial beside --out)."""
    from awq_ref.awq.resume import Progress

    work_dir = Path(args.work_dir or f"{str(args.out).rstrip('/')}.partial")
    model = args.model if args.model == "default" else str(Path(args.model).resolve())
    return Progress(work_dir, identity={"model": model, "dtype": args.dtype})


def _awq_result(args: argparse.Namespace, model, tok, spec, progress=None):
    """The AWQ search result: re-loaded with --result, else searched (and saved with --save-result);
    `progress` (awq.resume.Progress) makes the search save and resume its state per block."""
    from awq_ref.awq.calibration import calibration_tokens, sample_from_model
    from awq_ref.awq.pipeline import AwqConfig, search_awq
    from awq_ref.awq.result import AwqResult

    if args.result:
        result = AwqResult.load(args.result)
        if result.spec != spec:  # allowed (scales carry over), but say so
            print(f"note: {args.result} was searched for {_spec_name(result.spec)}, applied at "
                  f"{_spec_name(spec)}: its clip boxes were tuned for the former", file=sys.stderr)
        return result
    if args.calib:
        files = [Path(p) for p in args.calib]  # Paths: a list of str would be read as texts
        calib = calibration_tokens(tok, files, args.n_samples, args.calib_seqlen, args.seed)
    else:
        print("no --calib text: sampling calibration windows from the model (data-free)",
              file=sys.stderr)
        calib = sample_from_model(model, args.n_samples, args.calib_seqlen, args.seed)
    config = AwqConfig(**awq_options(args))
    result = search_awq(model, calib, spec, config, device=args.device, progress=progress)
    if args.save_result:
        result.save(args.save_result)
        print(f"search result saved to {args.save_result}", file=sys.stderr)
    return result


def _spec_name(spec) -> str:
    return f"W{spec.bits} g{spec.group_size}" + ("" if spec.zero_point else " symmetric")


def awq_options(args: argparse.Namespace) -> dict:
    """The AwqConfig fields set on the command line (the others keep AwqConfig's defaults)."""
    options = {"duo_scaling": args.duo_scaling}
    if args.n_grid is not None:
        options["n_grid"] = args.n_grid
    return options


def cmd_quantize_stream(args: argparse.Namespace) -> int:
    """--stream: block by block from the safetensors files (awq_ref.stream), never whole."""
    from awq_ref.awq.calibration import calibration_tokens
    from awq_ref.loaders import load_tokenizer
    from awq_ref.stream import quantize_folder

    calib, options = None, {}
    if args.method == "awq":
        files = [Path(p) for p in args.calib]
        calib = calibration_tokens(load_tokenizer(args.model), files, args.n_samples,
                                   args.calib_seqlen, args.seed)
        options = awq_options(args)
    t0 = time.perf_counter()
    quantize_folder(args.model, args.out, method=args.method, w_bit=args.w_bit,
                    group_size=args.group_size, zero_point=not args.no_zero_point,
                    calib_tokens=calib, device=args.device, work_dir=args.work_dir,
                    dtype=_save_dtype(args), **options)
    print(f"{args.method} W{args.w_bit} g{args.group_size} streamed in "
          f"{time.perf_counter() - t0:.1f} s; checkpoint written to {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from awq_ref.api import quantize
    from awq_ref.loaders import folder_lacks_tokenizer, load_tokenizer
    from awq_ref.quant.checkpoint import save_quantized
    from awq_ref.quant.quantizer import QuantSpec

    check_quantize_args(args)
    if args.stream:
        return cmd_quantize_stream(args)
    spec = QuantSpec(bits=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point)
    if folder_lacks_tokenizer(args.model) and not args.calib:  # nothing to read: none is needed
        print(f"{args.model} has no tokenizer: the checkpoint is written without one",
              file=sys.stderr)
        tok = None
    else:
        tok = load_tokenizer(args.model)
    model = _load(args)
    t0 = time.perf_counter()
    progress = _progress(args) if args.method == "awq" and not args.result else None
    extra = {"result": _awq_result(args, model, tok, spec, progress)} if args.method == "awq" else {}
    qmodel = quantize(model, method=args.method, w_bit=spec.bits, group_size=spec.group_size,
                      zero_point=spec.zero_point, inplace=True, **extra)
    seconds = time.perf_counter() - t0
    save_quantized(qmodel, args.out, tokenizer=tok, dtype=_save_dtype(args))
    if progress is not None:  # only now: a crash while saving can still resume
        progress.remove()
    print(f"{args.method} W{spec.bits} g{spec.group_size} quantized in {seconds:.1f} s; "
          f"checkpoint written to {args.out}")
    return 0


def _save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--save-dtype: the unquantized tensors' dtype in the checkpoint (None: the writer's default)."""
    return DTYPES[args.save_dtype] if args.save_dtype else None


def check_quantize_args(args: argparse.Namespace) -> None:
    """What `quantize` can refuse before loading anything (the search would otherwise run for
    minutes and fail at the end)."""
    from awq_ref.awq.pipeline import AwqConfig
    from awq_ref.quant.quantizer import QuantSpec

    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} already exists: remove it or choose another folder")
    spec = QuantSpec(bits=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point)
    if spec.bits != 4:
        raise ValueError(f"--w-bit {spec.bits}: the AWQ checkpoint holds 4-bit codes only; other "
                         "widths (2..8) run as fake quantization from Python (awq_ref.quantize(..., "
                         "pack=False)) and cannot be saved")
    _positive("--n-samples", args.n_samples)
    _positive("--calib-seqlen", args.calib_seqlen)
    if args.method == "rtn" and (args.result or args.save_result or args.calib is not None):
        raise ValueError("--result, --save-result and --calib belong to --method awq; rtn "
                         "searches nothing")
    if args.calib is not None and not args.calib:
        raise ValueError("--calib names no file (leave --calib out for data-free calibration)")
    if args.result and args.calib is not None:
        raise ValueError("--result re-applies a saved search: it takes no --calib text")
    for name, path in [("--calib", f) for f in args.calib or ()] + [("--result", args.result)]:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path}: no such file")
    if args.method == "awq":
        AwqConfig(**awq_options(args))
    if args.stream:
        if args.result or args.save_result:
            raise ValueError("--stream does not take --result or --save-result")
        if not Path(args.model).is_dir():
            raise ValueError(f"--stream reads an HF safetensors folder; {args.model!r} is not a "
                             "folder")
        if args.method == "awq" and not args.calib:
            raise ValueError("--stream with --method awq needs --calib text: sampling "
                             "calibration windows from the model would load it whole")
    _check_layers(args.model, spec)


def _check_layers(model: str, spec) -> None:
    """The group size against every decoder linear, from the config alone (a model built on the
    meta device: no weights read), so a bad --group-size fails before a long load."""
    from awq_ref.api import check_quantizable
    from awq_ref.loaders import load_config
    from awq_ref.model import Llama

    config = load_config(model)
    if config is not None:
        with torch.device("meta"):
            check_quantizable(Llama(config), spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m awq_ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _add_backend_arg(g)
    g.add_argument("--cuda-graph", action="store_true",
                   help="decode by replaying one captured CUDA graph per token (CUDA only)")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity on a text file (PROTOCOL.md)")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, tokenized as one stream")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--reference", default=None, help="also report KL and top-1 against this model")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_backend_arg(p)
    p.set_defaults(func=cmd_ppl)

    q = sub.add_parser("quantize", help="quantize (RTN or AWQ) and write a packed AWQ checkpoint")
    _add_model_args(q)
    q.add_argument("--method", default="awq", choices=["awq", "rtn"])
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="-1 = one group per output channel")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization")
    q.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    q.add_argument("--save-dtype", default=None, choices=sorted(DTYPES),
                   help="dtype of the unquantized tensors written (embeddings, norms, lm_head, "
                        "biases); float16 is what AutoAWQ stores and config.json's torch_dtype "
                        "says (default: the model's --dtype; with --stream the source's)")
    q.add_argument("--calib", nargs="*", default=None, metavar="FILE",
                   help="calibration text file(s) (AWQ; without it: data-free calibration)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    q.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n-grid", type=int, default=None,
                   help="ratios tried by the scale search (default: AwqConfig's, 40)")
    q.add_argument("--duo-scaling", action="store_true", help="s = mean|x|^a / mean|w|^(1-a)")
    q.add_argument("--save-result", default=None, help="also save the AWQ search (safetensors)")
    q.add_argument("--result", default=None, help="re-apply a saved AWQ search instead of searching")
    q.add_argument("--work-dir", default=None,
                   help="AWQ progress saved after every block, resumed by rerunning the same "
                        "command (default: OUT.partial; removed after success)")
    q.add_argument("--stream", action="store_true",
                   help="HF safetensors folder only: read, quantize and write one block at a "
                        "time (models larger than memory); computes in fp32, keeps the "
                        "checkpoint's dtype for unquantized tensors (--dtype is not used)")
    q.set_defaults(func=cmd_quantize)
    return parser


def _what_is_kept(args: argparse.Namespace) -> str:
    """What a stopped command leaves behind: the checkpoint if it was written; else the blocks
    a per-block progress file holds (AWQ, or anything --stream); nothing else is written early."""
    if args.command != "quantize":
        return "nothing was written"
    if Path(args.out).exists():  # stopped after the atomic write, before the clean-up
        return f"the checkpoint was written to {args.out}"
    if not (args.stream or (args.method == "awq" and not args.result)):
        return "nothing was written"
    from awq_ref.awq.resume import Progress

    work = Progress(args.work_dir or f"{str(args.out).rstrip('/')}.partial")
    blocks = work.saved_blocks()
    if not blocks:
        return "no block was finished"
    return f"{blocks} finished block(s) are kept in {work.work_dir}: the same command resumes"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: Python's or CuPy's MemoryError, CUDA's OutOfMemoryError, or the
    RuntimeError of torch's CPU allocator."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_device(args.device)
        return args.func(args)
    except (ValueError, OSError) as e:  # OSError: a disk full, a path not readable, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 = 128 + SIGINT
        print(f"\ninterrupted: {_what_is_kept(args)}", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:  # only allocation failures; any other is a bug
        if not _out_of_memory(e):
            raise
        first_line = (str(e).splitlines() or [""])[0][:200]
        print(f"error: out of memory ({type(e).__name__}: {first_line}); {_what_is_kept(args)}. "
              "Fewer --n-samples or a shorter --calib-seqlen (quantize), --stream (models "
              "larger than memory) or a device with more memory may fit", file=sys.stderr)
        return 1
