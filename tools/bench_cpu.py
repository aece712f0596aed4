"""CPU speed of our model against transformers' LlamaForCausalLM on the same weights.

Both models get the same state dict, threads and dtype. Measures a full forward over `--seqlen`
tokens (prefill) and greedy decode tokens/s with each one's KV cache. Prints a markdown table and,
with --json, one JSON object as the last line.

    python tools/bench_cpu.py --model default --threads 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
from tool_cli import count, exit_status  # tools/, beside this script


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_twin(model):
    """transformers' own class for our model's architecture (LlamaForCausalLM, ...) holding its
    weights (test/benchmark oracle only)."""
    import transformers

    d = model.config.to_hf_dict()
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf = hf.to(model.model.embed_tokens.weight.dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing:  # every weight, biases included, must arrive
        raise ValueError(f"transformers' {type(hf).__name__} does not take our weights: missing "
                         f"{missing}, unexpected {unexpected}")
    return hf


@torch.no_grad()
def bench_ours(model, prompt: torch.Tensor, steps: int, repeats: int) -> tuple[float, float]:
    prefill = timed(lambda: model(prompt), repeats)

    def decode():
        cache = model.new_cache(1, 1 + steps)
        tok = prompt[:, :1]
        for _ in range(steps):
            tok = model(tok, cache, last_only=True)[:, -1:].argmax(-1)

    return prefill, timed(decode, repeats)


@torch.no_grad()
def bench_hf(hf, prompt: torch.Tensor, steps: int, repeats: int) -> tuple[float, float]:
    from transformers import DynamicCache

    prefill = timed(lambda: hf(prompt, use_cache=False), repeats)
    # transformers 5.x renamed past_key_values to cache (the old name goes in 5.40); 4.x has only it
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def decode():
        cache = DynamicCache()
        tok = prompt[:, :1]
        for _ in range(steps):
            out = hf(tok, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)

    return prefill, timed(decode, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--seqlen", type=count, default=2048)
    ap.add_argument("--decode-steps", type=count, default=64)
    ap.add_argument("--repeats", type=count, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from awq_ref.loaders import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    hf = hf_twin(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.seqlen),
                           generator=torch.Generator().manual_seed(0))
    rows = {"ours": bench_ours(model, prompt, args.decode_steps, args.repeats),
            "transformers": bench_hf(hf, prompt, args.decode_steps, args.repeats)}
    print(f"model {args.model}, {args.dtype}, {args.threads} threads, "
          f"prefill {args.seqlen} tokens, decode {args.decode_steps} tokens, "
          f"median of {args.repeats}")
    print("| impl | prefill s | prefill tok/s | decode tok/s |\n|---|---|---|---|")
    result = {}
    for name, (pre, dec) in rows.items():
        result[name] = {"prefill_s": pre, "prefill_tok_s": args.seqlen / pre,
                        "decode_tok_s": args.decode_steps / dec}
        r = result[name]
        print(f"| {name} | {pre:.3f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    ratio = rows["ours"][0] / rows["transformers"][0], rows["ours"][1] / rows["transformers"][1]
    print(f"time ratio ours/transformers: prefill {ratio[0]:.3f}, decode {ratio[1]:.3f}")
    if args.json:
        print(json.dumps({**result, "args": vars(args)}))


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
