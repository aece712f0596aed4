"""The main job, end to end on the default model (SmolLM2-135M-Instruct), on the CPU:

load -> AWQ W4 g64 -> save the packed checkpoint -> reload it -> evaluate against the
unquantized model (ppl, KL, top-1; RTN at the same setting for comparison) -> generate.

Calibration and evaluation texts come from ../shared/data (PROTOCOL.md) when it is there;
otherwise calibration is data-free (windows sampled from the model) and evaluation runs on
held-out windows sampled from the model too, which the printout says.

    python tools/demo.py [--out out/demo] [--n-samples 128] [--eval-windows 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tool_cli import count  # tools/, beside this script

import awq_ref
from awq_ref.awq.calibration import sample_from_model
from awq_ref.awq.resume import Progress
from awq_ref.cli_process import command_process, interrupted_status
from awq_ref.eval import load_wikitext_tokens
from awq_ref.files import atomic_write_text

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
CALIB = SHARED / "tinystories" / "tinystories_val_prefix.txt"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.txt"
SEARCH_DIR = "awq-search.partial"  # under --out: the search's progress until the checkpoint


def step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def texts(model, tok, args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration windows, evaluation stream, description of where they came from)."""
    if CALIB.is_file() and WIKI.is_file():
        calib = awq_ref.calibration_tokens(tok, CALIB, args.n_samples, args.calib_seqlen, seed=0)
        return calib, load_wikitext_tokens(tok, WIKI), "TinyStories calibration, WikiText-2 test"
    print("../shared/data not found: data-free calibration and model-sampled evaluation text")
    calib = sample_from_model(model, args.n_samples, args.calib_seqlen, seed=0)
    held_out = sample_from_model(model, args.eval_windows, args.seqlen, seed=1).flatten()
    return calib, held_out, "data-free (model-sampled) calibration and evaluation"


def main() -> None:
    """run(), with Ctrl-C or SIGTERM ending in one line (exit status 130 / 143, as the CLI's
    commands do)."""
    args = parse_args()
    with command_process():  # SIGTERM as Ctrl-C; a stderr that cannot be written is no error
        try:
            run(args)
        except (ValueError, OSError) as e:  # a bad option or path, a disk full: one line
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:
            blocks = Progress(Path(args.out) / SEARCH_DIR).saved_blocks()
            kept = (f"{blocks} finished AWQ block(s) are kept in {Path(args.out) / SEARCH_DIR}: "
                    "the same command resumes the search there" if blocks else
                    "no AWQ search progress is kept (the same command starts over)")
            word, status = interrupted_status(e)
            print(f"\n{word}: {kept}", file=sys.stderr)
            sys.exit(status)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--n-samples", type=count, default=128)
    ap.add_argument("--calib-seqlen", type=count, default=512)
    ap.add_argument("--eval-windows", type=count, default=4)
    ap.add_argument("--seqlen", type=count, default=2048)
    ap.add_argument("--group-size", type=int, default=64)
    return ap.parse_args()


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    ckpt = out / f"smollm2-135m-awq-w4-g{args.group_size}"

    t = step("load the default model (SmolLM2-135M-Instruct, fp32)")
    tok, model = awq_ref.load_tokenizer("default"), awq_ref.load_model("default")
    calib, eval_stream, source = texts(model, tok, args)
    print(f"{time.perf_counter() - t:.1f} s; calibration {tuple(calib.shape)}; {source}")

    t = step(f"AWQ search + quantize (W4 g{args.group_size}, "
             f"{args.n_samples} x {args.calib_seqlen})")
    # saved after every block: a rerun after Ctrl-C or a crash resumes (awq.resume)
    search = Progress(out / SEARCH_DIR, identity={"model": "default"})
    result = awq_ref.search_awq(model, calib, awq_ref.QuantSpec(4, args.group_size),
                                work=search)
    awq = awq_ref.quantize(model, "awq", 4, args.group_size, result=result)
    awq_seconds = time.perf_counter() - t
    rtn = awq_ref.quantize(model, "rtn", 4, args.group_size)
    print(f"AWQ took {awq_seconds:.1f} s")

    t = step(f"save the packed checkpoint to {ckpt} and load it back")
    # The demo's own output: a second run replaces it (atomically) instead of failing after the
    # search, as it did before 2026-12-05.
    awq_ref.save_quantized(awq, ckpt, tokenizer=tok, overwrite=True)
    search.remove()  # only now: until the checkpoint is written, a rerun resumes the search
    reloaded = awq_ref.load_model(ckpt)
    probe = calib[:1, :64]
    with torch.no_grad():
        same = torch.equal(reloaded(probe), awq(probe))
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint {size / 1e6:.1f} MB; reloaded logits identical: {same}")

    t = step(f"evaluate on {args.eval_windows} windows of {args.seqlen} tokens")
    # window by window: the fp logits serve as every model's KL reference, computed once
    models = {"fp32": model, "RTN W4": rtn, "AWQ W4 (reloaded)": reloaded}
    rows = awq_ref.evaluate_many(models, eval_stream, args.seqlen, args.eval_windows,
                                 reference=model)
    rows["fp32"] = {k: v for k, v in rows["fp32"].items() if k not in ("kl", "top1")}  # vs itself
    print("| model | ppl | KL vs fp | top-1 vs fp |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ppl']:.3f} | {r.get('kl', 0):.4f} | {r.get('top1', 1):.4f} |")

    t = step("generate with the reloaded 4-bit model")
    for prompt in PROMPTS.read_text().splitlines()[:2]:
        ids = tok.encode(prompt)
        new = awq_ref.generate(reloaded, ids, 24, eos_ids=tok.eos_ids)
        # decoded with the prompt: SentencePiece would drop the first token's leading space
        text = tok.decode(ids + new, skip_special_tokens=True)
        print(f"{prompt!r} -> {text[len(tok.decode(ids, skip_special_tokens=True)):]!r}")

    summary = {"source": source, "awq_seconds": awq_seconds, "checkpoint_bytes": size,
               "reload_identical": same, "eval": rows, "args": vars(args)}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    print(f"\nsummary written to {out / 'demo.json'}")


if __name__ == "__main__":
    main()
