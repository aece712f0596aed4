"""transformers 4.x and AutoAWQ load an awq_ref checkpoint and compute what awq_ref computes (CPU).

transformers 4.x loads AWQ "gemm" checkpoints through AutoAWQ's modules. On a machine without
CUDA, transformers 4.51 and AutoAWQ 0.2.9 both switch such a checkpoint to AutoAWQ's IPEX
kernel (intel_extension_for_pytorch, which pins its own torch). Step 1 is that path as
published: `AutoModelForCausalLM.from_pretrained(DIR)`, which needs IPEX installed (without it,
the error is recorded). Steps 2 and 3 skip only the switch, so each builds the model as it does
on a GPU: transformers' own LlamaForCausalLM from our config.json (step 2; AutoAWQ's own loader,
`from_quantized`, in step 3), our tensors loaded by name and shape into `WQLinear_GEMM`
modules, whose forward without the CUDA extension is AutoAWQ's pure-torch dequantization and
an fp16 matmul. Each is compared with awq_ref's own forward of the same folder (fp32): logits,
greedy tokens, and perplexity, KL and top-1 on WikiText-2 windows. What this checks: the config
keys, which layers are quantized, tensor names, shapes and dtypes, the packing (nibble order,
zeros, scales) and the model around them. What it does not: the CUDA kernels (AutoAWQ's,
vLLM's) that a GPU would run.

Three virtual environments (never the project's own), with awq_ref importable from the repo root:

    # steps 2 and 3: the venv of tools/autoawq_baseline.py (CPU torch), plus datasets
    python3.11 -m venv /tmp/autoawq-venv
    /tmp/autoawq-venv/bin/pip install torch==2.13.0 transformers==4.51.3 accelerate \
        "huggingface-hub<1.0" "datasets<4.5" gguf sentencepiece zstandard
    /tmp/autoawq-venv/bin/pip install --no-deps autoawq==0.2.9
    PYTHONPATH=. /tmp/autoawq-venv/bin/python docs/checks/transformers_load_check.py DIR \
        --steps 2 3 --windows 4
    # step 1: IPEX 2.8 wants torch 2.8 (PyPI's, a CUDA build: steps 2 and 3 fail under it)
    python3.11 -m venv /tmp/ipex-venv
    /tmp/ipex-venv/bin/pip install torch==2.8.0 intel-extension-for-pytorch==2.8.0 \
        transformers==4.51.3 accelerate "huggingface-hub<1.0" "datasets<4.5" gguf \
        sentencepiece zstandard
    /tmp/ipex-venv/bin/pip install --no-deps autoawq==0.2.9
    PYTHONPATH=. /tmp/ipex-venv/bin/python docs/checks/transformers_load_check.py DIR \
        --steps 1 --windows 4
    # step 1 under transformers 5.x, whose AWQ path is gptqmodel's (7.6.0: the last release
    # that takes torch 2.13; on a CPU it picks TorchAtenAwqLinear, torch's int4 CPU kernel)
    python3.11 -m venv /tmp/gptq-venv
    /tmp/gptq-venv/bin/pip install torch==2.13.0
    /tmp/gptq-venv/bin/pip install transformers==5.25.0 gptqmodel==7.6.0 gguf sentencepiece
    PYTHONPATH=. /tmp/gptq-venv/bin/python docs/checks/transformers_load_check.py DIR \
        --steps 1 --windows 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers.quantizer_awq import AwqQuantizer

import awq_ref
from awq_ref.eval import load_wikitext_tokens

PROMPTS = ("The capital of France is", "Once upon a time, there was a little robot who",
           "def fibonacci(n):")
WIKI = "../shared/data/text/wikitext-2-raw/wiki.test.raw"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def ours_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax of the last position, n times, each a full forward (no EOS stop, as ours)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(hf_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def leading_equal(mine: list[int], theirs: list[int]) -> int:
    """How many tokens two greedy continuations share before they part."""
    return next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), len(mine))


def window_stats(ours, theirs, window: list[int]) -> dict:
    """NLL of each model on one window, and KL(ours || theirs) and top-1 agreement between them."""
    a, b = ours_logits(ours, window)[:-1], hf_logits(theirs, window)[:-1]
    target = torch.tensor(window[1:])
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    return {"nll_awq_ref": float(F.nll_loss(la, target)),
            "nll_other": float(F.nll_loss(lb, target)),
            "kl": float((la.exp() * (la - lb)).sum(-1).mean()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            "logits_rel_err": rel_err(b, a)}


def is_awq_layer(module) -> bool:
    """AutoAWQ's WQLinear_* (transformers 4.x) or gptqmodel's *AwqLinear (transformers 5.x)."""
    name = type(module).__name__
    return "WQLinear" in name or "AwqLinear" in name


def package_versions(*names: str) -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def load_transformers(folder: str):
    """AutoModelForCausalLM.from_pretrained as on a GPU: only the CPU -> IPEX switch skipped."""
    original = AwqQuantizer.validate_environment
    real_cuda = torch.cuda.is_available

    def validate(self, device_map, **kwargs):  # the GPU branch's checks, CUDA taken as present
        torch.cuda.is_available = lambda: True
        try:
            return original(self, device_map=None, **kwargs)
        finally:
            torch.cuda.is_available = real_cuda

    AwqQuantizer.validate_environment = validate
    try:
        return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float16)
    finally:
        AwqQuantizer.validate_environment = original


def load_autoawq(folder: str):
    """AutoAWQ's own loader (from_quantized) with its CPU -> IPEX switch skipped."""
    from awq import AutoAWQForCausalLM
    from awq.models import base

    best = base.get_best_device
    base.get_best_device = lambda: "cuda:0"  # read only to choose IPEX and fusing
    try:
        return AutoAWQForCausalLM.from_quantized(folder, fuse_layers=False, use_ipex=False,
                                                 torch_dtype=torch.float16, device_map="auto").model
    finally:
        base.get_best_device = best


def compare(name: str, other, ours, ids: dict[str, list[int]], tokens: list[int],
            windows: int, n_new: int) -> dict:
    quantized = sorted({type(m).__name__ for m in other.modules() if is_awq_layer(m)})
    count = sum(is_awq_layer(m) for m in other.modules())
    print(f"\n== {name}: {count} quantized linears ({', '.join(quantized)})")
    report: dict = {"quantized_linears": count, "modules": quantized, "prompts": []}
    for prompt, p in ids.items():
        a, b = ours_logits(ours, p), hf_logits(other, p)
        t0 = time.perf_counter()
        mine = awq_ref.generate(ours, p, n_new)
        theirs = hf_greedy(other, p, n_new)
        same = leading_equal(mine, theirs)
        row = {"prompt": prompt, "logits_rel_err": rel_err(b, a),
               "last_top1_same": bool(a[-1].argmax() == b[-1].argmax()),
               "greedy_tokens_equal": same, "of": n_new, "s": round(time.perf_counter() - t0, 1)}
        report["prompts"].append(row)
        print(f"  {prompt!r}: logits rel err {row['logits_rel_err']:.2e}, greedy tokens equal "
              f"{same}/{n_new}")
    for w in range(windows):
        stats = window_stats(ours, other, tokens[w * 2048:(w + 1) * 2048])
        report.setdefault("wikitext_windows", []).append(stats)
        print(f"  WikiText-2 window {w}: ppl awq_ref {math.exp(stats['nll_awq_ref']):.3f}, "
              f"{name} {math.exp(stats['nll_other']):.3f}; KL {stats['kl']:.2e}, top-1 "
              f"{stats['top1']:.4f}, logits rel err {stats['logits_rel_err']:.2e}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--windows", type=int, default=1, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="2 and 3 need a CPU-only torch (a CUDA build without a GPU fails there)")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*naive.*")
    torch.manual_seed(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                **package_versions("autoawq", "intel_extension_for_pytorch", "gptqmodel")}
    print(versions)
    report: dict = {"folder": args.folder, "versions": versions}

    published = None
    if 1 in args.steps:
        print("\n== 1. transformers from_pretrained as published, on this CPU")
        try:
            published = AutoModelForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32)
            report["as_published"] = "loaded"
        except Exception as e:  # noqa: BLE001 -- the point is to record whatever it raises
            published, report["as_published"] = None, f"{type(e).__name__}: {e}"[:400]
        print(" ", report["as_published"])

    ours = awq_ref.load_model(args.folder)
    tok = awq_ref.load_tokenizer(args.folder)
    hf_tok = AutoTokenizer.from_pretrained(args.folder)
    ids = {p: tok.encode(p) for p in PROMPTS}
    report["tokenizers_agree"] = all(hf_tok(p, add_special_tokens=True)["input_ids"] == i
                                     for p, i in ids.items())
    print("tokenizer ids equal (awq_ref vs AutoTokenizer):", report["tokenizers_agree"])
    tokens = load_wikitext_tokens(tok, WIKI).tolist() if args.windows else []

    if published is not None:  # with intel_extension_for_pytorch installed: its kernel
        report["published"] = compare("1. transformers from_pretrained as published", published,
                                      ours, ids, tokens, args.windows, args.new_tokens)
        del published
    if 2 in args.steps:
        report["transformers"] = compare("2. transformers from_pretrained (WQLinear_GEMM)",
                                         load_transformers(args.folder), ours, ids, tokens,
                                         args.windows, args.new_tokens)
    if 3 in args.steps:
        report["autoawq"] = compare("3. AutoAWQ from_quantized", load_autoawq(args.folder), ours,
                                    ids, tokens, args.windows, args.new_tokens)
    if args.json:
        from awq_ref.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print("\nwritten", args.json)


if __name__ == "__main__":
    main()
