"""Command line: `python -m awq_ref {generate,ppl,quantize} ...`. Thin: parse, then call the package."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF folder, .gguf file, llama2.c .bin, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and activations")


def _load(args: argparse.Namespace, path: str | None = None):
    from awq_ref.loaders import load_model

    return load_model(path or args.model, device=args.device, dtype=DTYPES[args.dtype])


def cmd_generate(args: argparse.Namespace) -> int:
    from awq_ref.generate import generate
    from awq_ref.loaders import load_tokenizer

    tok, model = load_tokenizer(args.model), _load(args)
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
             eos_ids=tok.eos_ids, seed=args.seed, on_token=stream)
    dt = time.perf_counter() - t0
    print(f"\n[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from awq_ref.eval import evaluate, load_wikitext_tokens
    from awq_ref.loaders import load_tokenizer

    tok, model = load_tokenizer(args.model), _load(args)
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
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity on a text file (PROTOCOL.md)")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, tokenized as one stream")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--reference", default=None, help="also report KL and top-1 against this model")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
