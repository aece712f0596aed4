"""`python -m awq_ref quantize`: check the settings before any work, load (or stream), search or
re-apply AWQ (or round to nearest), write the checkpoint; what a stopped run leaves behind."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from awq_ref.cli_common import (
    DTYPES,
    add_model_args,
    check_host_memory,
    load,
    positive,
    seed,
    warn_past_context,
    weight_hints,
    weights_bytes,
)
from awq_ref.cli_process import print_result_line
from awq_ref.files import check_writable


def add_quantize_parser(sub) -> None:
    """The `quantize` subcommand's arguments, on the main parser's subparsers `sub`."""
    q = sub.add_parser("quantize", help="quantize (RTN or AWQ) and write a packed AWQ checkpoint")
    add_model_args(q)
    q.add_argument("--method", default="awq", choices=["awq", "rtn"], help="(default: awq)")
    q.add_argument("--w-bit", type=int, default=4, help="bits per weight (default: 4)")
    q.add_argument("--group-size", type=int, default=128,
                   help="weights per scale and zero along K; -1 = one group per output channel "
                        "(default: 128; SmolLM2's 576 needs 64)")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization")
    q.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    q.add_argument("--save-dtype", default=None, choices=sorted(DTYPES),
                   help="dtype of the unquantized tensors written (embeddings, norms, lm_head, "
                        "biases); float16 is what AutoAWQ stores and config.json's torch_dtype "
                        "says (default: the model's --dtype; with --stream the source's)")
    q.add_argument("--calib", nargs="*", default=None, metavar="FILE",
                   help="calibration text file(s) (AWQ; without it: data-free calibration)")
    # Calibration options default to None (CALIBRATION_DEFAULTS then): given to a run that
    # calibrates nothing (rtn, --result), they are refused rather than ignored.
    q.add_argument("--n-samples", type=int, default=None, help="calibration windows (default: 128)")
    q.add_argument("--calib-seqlen", type=int, default=None,
                   help="tokens per calibration window (default: 512)")
    q.add_argument("--seed", type=seed, default=None,
                   help="which calibration windows are drawn (default: 0)")
    q.add_argument("--n-grid", type=int, default=None,
                   help="ratios tried by the scale search (default: AwqConfig's, 40)")
    q.add_argument("--duo-scaling", action="store_true", help="s = mean|x|^a / mean|w|^(1-a)")
    q.add_argument("--save-result", default=None, help="also save the AWQ search (safetensors)")
    q.add_argument("--result", default=None,
                   help="re-apply a saved AWQ search instead of searching")
    q.add_argument("--work-dir", default=None,
                   help="AWQ progress saved after every block, resumed by rerunning the same "
                        "command (default: OUT.partial; removed after success)")
    q.add_argument("--stream", action="store_true",
                   help="HF safetensors folder only: read, quantize and write one block at a "
                        "time (models larger than memory); computes in fp32, keeps the "
                        "checkpoint's dtype for unquantized tensors (--dtype is not used)")
    q.set_defaults(func=cmd_quantize)


CALIBRATION_DEFAULTS = {"n_samples": 128, "calib_seqlen": 512, "seed": 0}


def check_quantize_args(args: argparse.Namespace) -> None:
    """What `quantize` can refuse before loading anything (the search would otherwise run for
    minutes and fail at the end)."""
    from awq_ref.awq.pipeline import AwqConfig
    from awq_ref.quant.quantizer import QuantSpec

    if Path(args.out).exists() or Path(args.out).is_symlink():
        work = _work_dir(args)
        left = (f" ({work} beside it is what a run stopped between writing --out and emptying "
                "its work folder leaves: delete it too)") if work.exists() else ""
        raise ValueError(f"--out {args.out} already exists: remove it or choose another "
                         f"folder{left}")
    _check_output_paths(args)
    spec = QuantSpec(bits=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point)
    if spec.bits != 4:
        raise ValueError(f"--w-bit {spec.bits}: the AWQ checkpoint holds 4-bit codes only; other "
                         "widths (2..8) run as fake quantization from Python "
                         "(awq_ref.quantize(..., pack=False)) and cannot be saved")
    if args.method == "rtn" and (args.result or args.save_result or args.calib is not None):
        raise ValueError("--result, --save-result and --calib belong to --method awq; rtn "
                         "searches nothing")
    if args.calib is not None and not args.calib:
        raise ValueError("--calib names no file (leave --calib out for data-free calibration)")
    if args.result and args.calib is not None:
        raise ValueError("--result re-applies a saved search: it takes no --calib text")
    search_options = [f for f, given in (("--n-samples", args.n_samples is not None),
                                         ("--calib-seqlen", args.calib_seqlen is not None),
                                         ("--seed", args.seed is not None),
                                         ("--n-grid", args.n_grid is not None),
                                         ("--duo-scaling", args.duo_scaling)) if given]
    if search_options and (args.method == "rtn" or args.result):
        verb = "shape" if len(search_options) > 1 else "shapes"
        raise ValueError(f"{' and '.join(search_options)} {verb} the AWQ search, which "
                         + ("--method rtn does not run" if args.method == "rtn"
                            else "--result replaces with a saved one"))
    for name, value in CALIBRATION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive("--n-samples", args.n_samples)
    positive("--calib-seqlen", args.calib_seqlen)
    for name, path in [("--calib", f) for f in args.calib or ()] + [("--result", args.result)]:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path}: " + ("a folder, not a file" if Path(path).is_dir()
                                                   else "no such file"))
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
    config = _check_layers(args.model, spec)
    if config is not None:
        _check_memory(args, config)


def _check_memory(args: argparse.Namespace, config) -> None:
    """Before loading: the weights (unless --stream reads them block by block) and the search's
    calibration hidden states, B x T x D fp32 held twice (the search's x, and saving its progress
    copies them to host memory; so on any device), must fit the free host memory
    (cli_common.check_host_memory). A window past the trained context is allowed, with a note."""
    subject, needs, hints = f"--model {args.model}", {}, []
    weights = 0 if args.stream else weights_bytes(config, args)
    if weights:
        subject += f" in {args.dtype}"
        needs["weights"] = weights
        hints += ["--stream (block by block)"] if Path(args.model).is_dir() else []
        hints += weight_hints(args)
    if args.method == "awq" and not args.result:
        warn_past_context(config, args.calib_seqlen, "--calib-seqlen")
        subject += f" with --n-samples {args.n_samples} x --calib-seqlen {args.calib_seqlen}"
        needs[f"activations (2 x B x T x hidden {config.hidden_size} x 4 bytes)"] = (
            2 * args.n_samples * args.calib_seqlen * config.hidden_size * 4)
        hints.insert(0, "fewer or shorter windows")
    check_host_memory(subject, needs, hints)


def _check_output_paths(args: argparse.Namespace) -> None:
    """--out is written whole at the end and the work folder emptied after success: neither
    may hold the other (or the saved search), the work folder is not the model's, and each must
    be creatable."""
    out, work = Path(args.out).resolve(), _work_dir(args).resolve()
    if _within(work, out) or _within(out, work):
        raise ValueError(f"--work-dir {work} and --out {out} must lie apart (the checkpoint "
                         "folder is written whole at the end, the work folder deleted)")
    if work == Path(args.model).resolve():
        raise ValueError(f"--work-dir {work} is the --model folder: the search's state files "
                         "would sit among the model's; give another folder")
    if args.save_result and _within(Path(args.save_result).resolve(), out):
        raise ValueError(f"--save-result {args.save_result} lies inside --out {args.out}, which "
                         "is written whole at the end: save the search beside it")
    if args.save_result:
        _check_save_result(args)
    check_writable(out, "--out")
    check_writable(work, "--work-dir", extra=0)  # made by mkdir: no temporary name


def _check_save_result(args: argparse.Namespace) -> None:
    """--save-result may replace a search result saved before, nothing else: not the model's
    files, the calibration text, a folder or any other file (written after the search, it was
    lost without a word)."""
    from awq_ref.awq.result import AwqResult

    path, flag = Path(args.save_result), f"--save-result {args.save_result}"
    resolved, model = path.resolve(), Path(args.model).resolve()
    if path.is_dir():
        raise ValueError(f"{flag} is a folder; give a file name")
    if _within(resolved, model) or any(resolved == Path(c).resolve() for c in args.calib or ()):
        raise ValueError(f"{flag} is the model or the calibration text, or lies inside the "
                         "model's folder; writing it would destroy it")
    if path.exists() and not AwqResult.is_file(path):
        raise ValueError(f"{flag} exists and is no saved search result (only one is replaced): "
                         "remove it or choose another name")
    check_writable(path, "--save-result")  # written beside the name given (a link's folder)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _work_dir(args: argparse.Namespace) -> Path:
    """The AWQ progress folder: --work-dir, by default OUT.partial beside --out."""
    return Path(args.work_dir or f"{str(args.out).rstrip('/')}.partial")


def _check_layers(model: str, spec):
    """The group size against every decoder linear, from the config alone (one block built on
    the meta device: no weights read), so a bad --group-size fails before a long load; returns
    that config (None where the loader alone can read it)."""
    from awq_ref.api import check_quantizable_config
    from awq_ref.loaders import is_quantized_folder, load_config

    config = load_config(model)
    if config is None and is_quantized_folder(model):
        raise ValueError(f"--model {model} is already quantized (its config.json has a "
                         "quantization_config); quantize the fp original instead")
    if config is not None:
        check_quantizable_config(config, spec)
    return config


def _spec_name(spec) -> str:
    return f"W{spec.bits} g{spec.group_size}" + ("" if spec.zero_point else " symmetric")


def awq_options(args: argparse.Namespace) -> dict:
    """The AwqConfig fields set on the command line (the others keep AwqConfig's defaults)."""
    options = {"duo_scaling": args.duo_scaling}
    if args.n_grid is not None:
        options["n_grid"] = args.n_grid
    return options


def _progress(args: argparse.Namespace):
    """The resumable search's work folder (--work-dir, default OUT.partial beside --out)."""
    from awq_ref.awq.resume import Progress

    work_dir = _work_dir(args)
    model = args.model if args.model == "default" else str(Path(args.model).resolve())
    return Progress(work_dir, identity={"model": model, "dtype": args.dtype})


def _awq_result(args: argparse.Namespace, model, tok, spec, progress=None):
    """The AWQ search result: re-loaded with --result, else searched (and saved with --save-result);
    `progress` (awq.resume.Progress) makes the search save and resume its state per block."""
    from awq_ref.awq.apply import check_result_fits
    from awq_ref.awq.calibration import calibration_tokens, sample_from_model
    from awq_ref.awq.pipeline import AwqConfig, search_awq
    from awq_ref.awq.result import AwqResult

    if args.result:
        result = AwqResult.load(args.result)
        try:
            check_result_fits(model, result)
        except ValueError as e:
            raise ValueError(f"--result {args.result}: {e} (was it searched on another model?)"
                             ) from None
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
    result = search_awq(model, calib, spec, config, device=args.device, work=progress)
    if args.save_result:
        result.save(args.save_result)
        print(f"search result saved to {args.save_result}", file=sys.stderr)
    return result


def cmd_quantize(args: argparse.Namespace) -> int:
    from awq_ref.api import quantize
    from awq_ref.loaders import folder_lacks_tokenizer, load_tokenizer
    from awq_ref.quant.checkpoint import save_quantized
    from awq_ref.quant.quantizer import QuantSpec

    check_quantize_args(args)
    if args.stream:
        return cmd_quantize_stream(args)
    spec = QuantSpec(bits=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point)
    progress = _progress(args) if args.method == "awq" and not args.result else None
    if progress is None and _work_dir(args).exists():
        print(f"note: {_work_dir(args)} holds an interrupted search this run does not use "
              f"(--method {args.method}{' --result' if args.result else ''}); it stays until "
              "you delete it", file=sys.stderr)
    with progress.hold() if progress is not None else nullcontext():  # load to save: alone
        if folder_lacks_tokenizer(args.model) and not args.calib:  # nothing to read: no need
            print(f"{args.model} has no tokenizer: the checkpoint is written without one",
                  file=sys.stderr)
            tok = None
        else:
            tok = load_tokenizer(args.model)
        model = load(args)
        resumed = progress.saved_blocks() if progress is not None else 0  # for the last line
        t0 = time.perf_counter()
        extra = ({"result": _awq_result(args, model, tok, spec, progress)}
                 if args.method == "awq" else {})
        qmodel = quantize(model, method=args.method, w_bit=spec.bits, group_size=spec.group_size,
                          zero_point=spec.zero_point, inplace=True, **extra)
        seconds = time.perf_counter() - t0
        save_quantized(qmodel, args.out, tokenizer=tok, dtype=_save_dtype(args))
        if progress is not None:  # only now: a crash while saving can still resume
            progress.remove()
    before = f" (this run; blocks 0-{resumed - 1} were searched before)" if resumed else ""
    print_result_line(f"{args.method} W{spec.bits} g{spec.group_size} quantized in "
                      f"{seconds:.1f} s{before}; checkpoint written to {args.out}")
    return 0


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
    print_result_line(f"{args.method} W{args.w_bit} g{args.group_size} streamed in "
                      f"{time.perf_counter() - t0:.1f} s; checkpoint written to {args.out}")
    return 0


def _save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--save-dtype: the checkpoint's dtype for unquantized tensors (None: the writer's)."""
    return DTYPES[args.save_dtype] if args.save_dtype else None


def what_is_kept(args: argparse.Namespace) -> str:
    """What a stopped command leaves behind: the checkpoint if it was written; else the blocks
    a per-block progress file holds (AWQ, or anything --stream); nothing else is written early."""
    if args.command != "quantize":
        return "nothing was written"
    if Path(args.out).exists():  # stopped after the atomic write, before the clean-up
        return f"the checkpoint was written to {args.out}"
    if not (args.stream or (args.method == "awq" and not args.result)):
        return "nothing was written"
    from awq_ref.awq.resume import Progress

    work = Progress(_work_dir(args))
    blocks = work.saved_blocks()
    if not blocks:
        return "no block was finished"
    return f"{blocks} finished block(s) are kept in {work.work_dir}: the same command resumes"
