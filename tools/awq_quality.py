"""Quality of AWQ vs RTN vs fp on the PROTOCOL.md protocol, with AWQ's wall time and peak RSS.

    PYTHONPATH=. .venv/bin/python tools/awq_quality.py --bits 4 3 --json awq_quality.json

Calibration: --calib-windows x --seqlen random windows (--seed, default 0) of --calib;
evaluation: the first --eval-windows non-overlapping --eval-seqlen-token windows of --eval
(default 20 x 2048; `--eval-windows all`: every window, PROTOCOL.md's full run).
recovery = (ppl_RTN - ppl_AWQ) / (ppl_RTN - ppl_fp). Weights are fake-quantized (nn.Linear keeps
w_hat), so any bit width runs. --json is written after each search (times, peak RSS) and again
with the scores, atomically: a crash in an hour-long evaluation keeps the searches' rows.
AWQ options: --set name=value for AwqConfig fields (e.g. --set duo_scaling=true).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tool_cli import check_output, count, exit_status  # tools/, beside this script

from awq_ref.api import quantize
from awq_ref.awq.calibration import calibration_tokens
from awq_ref.awq.pipeline import AwqConfig
from awq_ref.eval import evaluate_many, load_wikitext_tokens, read_text
from awq_ref.files import atomic_write_text
from awq_ref.loaders import load_model, load_tokenizer
from awq_ref.quant.quantizer import QuantSpec

# ../shared beside the repo, wherever the tool is run from
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"


def windows_arg(value: str) -> int | None:
    """--eval-windows: a positive count, or "all" (None: every window of the text)."""
    if value == "all":
        return None
    if not value.isdecimal() or not value.isascii() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return int(value)


def parse_overrides(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(AwqConfig)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--set {item}: AwqConfig has no field {name!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string such as propagate=awq
        want = {"int": int, "float": (int, float), "bool": bool}.get(types[name])
        if want and (not isinstance(parsed, want) or isinstance(parsed, bool) != (want is bool)):
            raise SystemExit(f"--set {item}: AwqConfig.{name} is {types[name]}, got {value!r}")
        out[name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def peak_rss_gib() -> float:
    """The peak resident set so far, in GiB (2**30 bytes); older JSON files name it peak_rss_gb."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib", default=f"{DATA}/tinystories/tinystories_val_prefix.txt")
    ap.add_argument("--calib-windows", type=count, default=128)
    ap.add_argument("--seqlen", type=count, default=512)
    ap.add_argument("--seed", type=int, default=0, help="calibration windows seed")
    ap.add_argument("--eval", default=f"{DATA}/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--eval-windows", type=windows_arg, default=20,
                    help="evaluation windows N, or 'all' (PROTOCOL.md's full run; default 20)")
    ap.add_argument("--eval-seqlen", type=count, default=2048)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["awq", "rtn"],
                    choices=["awq", "rtn"])  # AWQ first: its RSS
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--half-split", action="store_true",
                    help="calibrate on the first half of --calib, evaluate on its second half")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.overrides)
    for bits in args.bits:  # every setting checked before the first hour-long search
        QuantSpec(bits, args.group)
    if args.json:
        check_output("--json", args.json, [args.model, args.calib, args.eval])
    texts = [("--calib", args.calib)] + ([] if args.half_split else [("--eval", args.eval)])
    for flag, path in texts:
        if not Path(path).is_file():  # found only after loading the model
            raise ValueError(f"{flag} {path}: no such file")

    fp = load_model(args.model)
    tok = load_tokenizer(args.model)
    if args.half_split:
        text = read_text(args.calib)
        half = len(text) // 2
        calib = calibration_tokens(tok, [text[:half]], args.calib_windows, args.seqlen,
                                   seed=args.seed)
        evals = torch.tensor(tok.encode(text[half:]), dtype=torch.int64)
    else:
        calib = calibration_tokens(tok, args.calib, args.calib_windows, args.seqlen, seed=args.seed)
        evals = load_wikitext_tokens(tok, args.eval)
    # the effective AWQ settings, not only the overrides: the defaults change over time
    report = {"args": vars(args), "awq_config": asdict(AwqConfig(**overrides)), "rows": []}

    def save() -> None:  # after each search and at the end: a crash keeps what is done
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=1))

    quantized, rows = {}, {}  # (method, bits) -> model; (method, bits) -> its JSON row
    for bits in args.bits:
        for method in args.methods:
            t = time.perf_counter()
            extra = {"calib_tokens": calib, **overrides} if method == "awq" else {}
            quantized[(method, bits)] = quantize(fp, method, bits, args.group, pack=False, **extra)
            row = {"method": method, "bits": bits, "quant_s": time.perf_counter() - t,
                   "peak_rss_gib": peak_rss_gib()}
            rows[(method, bits)] = row
            report["rows"] = list(rows.values())
            save()
            print(f"{method} W{bits} g{args.group}: {row['quant_s']:.1f} s, "
                  f"peak RSS so far {row['peak_rss_gib']:.2f} GiB", flush=True)
    # every model window by window, so fp's logits (the KL reference) are computed once per window
    scores = evaluate_many({("fp", None): fp, **quantized}, evals, args.eval_seqlen,
                           args.eval_windows, reference=fp)
    rows = {("fp", None): {"method": "fp", "bits": None, "quant_s": None, "peak_rss_gib": None},
            **rows}
    for key, res in scores.items():
        if key == ("fp", None):  # against itself: KL 0, top-1 1
            res = {k: v for k, v in res.items() if k not in ("kl", "top1")}
        rows[key] = {"method": key[0], "bits": key[1], **res, "quant_s": rows[key]["quant_s"],
                     "peak_rss_gib": rows[key]["peak_rss_gib"]}
        print(json.dumps(rows[key]), flush=True)
    for bits in args.bits:
        if ("rtn", bits) in rows and ("awq", bits) in rows:
            p_fp, p_rtn, p_awq = (rows[k]["ppl"] for k in (("fp", None), ("rtn", bits),
                                                           ("awq", bits)))
            rows[("awq", bits)]["recovery"] = (p_rtn - p_awq) / (p_rtn - p_fp)
            print(f"W{bits} g{args.group}: recovery {(p_rtn - p_awq) / (p_rtn - p_fp):.3f}")
    report["rows"] = list(rows.values())
    save()


if __name__ == "__main__":
    raise SystemExit(exit_status(main, "--json keeps the rows of the searches finished"))
