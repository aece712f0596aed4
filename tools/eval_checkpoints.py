"""Score several checkpoints against one reference model on PROTOCOL.md's evaluation, in one pass.

    PYTHONPATH=. .venv/bin/python tools/eval_checkpoints.py out/demo/smollm2-135m-awq-w4-g64 \
        out/autoawq-w4g64 --reference default --windows all --json compare.json

Each model gets ppl, KL and top-1 against the reference (PROTOCOL.md's formulas, awq_ref.eval),
the reference its own ppl. Window by window (`evaluate_many`), so the reference's logits are
computed once per window however many models there are: `python -m awq_ref ppl` per checkpoint
would run the reference once per checkpoint. Every model reads the text through the reference's
tokenizer, so all of them score the same tokens; a model whose vocabulary differs is refused.
Used for the published implementations' checkpoints (tools/autoawq_baseline.py,
tools/llmcompressor_baseline.py) against ours on every window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from awq_quality import windows_arg  # tools/, beside this script
from tool_cli import check_output, count, exit_status

from awq_ref.eval import evaluate_many, load_wikitext_tokens
from awq_ref.files import atomic_write_text
from awq_ref.loaders import load_model, load_tokenizer

# ../shared beside the repo, wherever the tool is run from
WIKI = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
           / "wikitext-2-raw" / "wiki.test.raw")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("models", nargs="+",
                    help="checkpoint folders or files (anything load_model reads)")
    ap.add_argument("--reference", default="default",
                    help="the unquantized model (default: SmolLM2)")
    ap.add_argument("--text", default=WIKI)
    ap.add_argument("--seqlen", type=count, default=2048)
    ap.add_argument("--windows", type=windows_arg, default=20, help="N, or 'all' (the full run)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    # "reference" is the reference's row: a model of that name would take its place; "./q"
    # and "q" are one model ("default" is a name, not a path)
    named = [m if m == "default" else str(Path(m).resolve()) for m in
             [*args.models, args.reference]]
    if len(set(named)) != len(named) or "reference" in args.models:
        raise SystemExit("each model once, and not the reference itself (nor one named "
                         "'reference', the reference's row)")
    if args.json:
        check_output("--json", args.json, [*args.models, args.reference, args.text])

    reference = load_model(args.reference)
    tokens = load_wikitext_tokens(load_tokenizer(args.reference), args.text)
    models = {"reference": reference}
    for path in args.models:
        model = load_model(path)
        if model.config.vocab_size != reference.config.vocab_size:
            raise SystemExit(f"{path}: vocabulary of {model.config.vocab_size} tokens, the "
                             f"reference has {reference.config.vocab_size}")
        models[path] = model
    rows = evaluate_many(models, tokens, args.seqlen, args.windows, reference=reference)
    rows["reference"] = {k: v for k, v in rows["reference"].items() if k not in ("kl", "top1")}
    print("| model | ppl | KL vs reference | top-1 vs reference |\n|---|---|---|---|")
    for name, r in rows.items():
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        top1 = f"{r['top1']:.4f}" if "top1" in r else "-"
        print(f"| {name} | {r['ppl']:.3f} | {kl} | {top1} |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
