"""transformers 4.x and AutoAWQ load awq_ref's checkpoints of every architecture it runs (CPU).

For each model_type of `awq_ref.config.ARCHITECTURES` (llama, mistral, qwen2, qwen3): a random
model of small shapes with random norms, biases and Qwen3's q/k norms, AWQ-searched on random
calibration tokens (so Qwen2's v_proj bias is rescaled with v), packed and saved with
`save_quantized`; then built by transformers' `from_pretrained` and by AutoAWQ's
`from_quantized`, each as on a GPU (WQLinear_GEMM; only their CPU -> IPEX switch skipped, as in
transformers_load_check.py) and compared with awq_ref's own forward of the same folder (fp32
against their fp16): logits and greedy tokens. What this checks for the architectures the real
default model cannot: that the saved config.json names a class these readers build with the
tensors we store (q/k/v biases without an o bias; q_norm/k_norm; head_dim apart from
hidden / heads), nothing missing or unexpected, and the same numbers.

Run in the venv of transformers_load_check.py (steps 2 and 3), from the repo root:

    PYTHONPATH=. /tmp/autoawq-venv/bin/python docs/checks/architectures_load_check.py \
        --json docs/checks/2026-12-06/architectures.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers_load_check import (
    hf_greedy,
    hf_logits,
    is_awq_layer,
    leading_equal,
    package_versions,
    rel_err,
)

import awq_ref
from awq_ref.config import ARCHITECTURES, LlamaConfig
from awq_ref.loaders import read_safetensors_folder
from awq_ref.model import Llama

SHAPES = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
          "bos_token_id": 1, "eos_token_ids": (2,)}
EXTRA = {"llama": {"attention_bias": True},  # Llama's switch: biases on q, k, v and o
         "mistral": {"sliding_window": 512},
         "qwen2": {"tie_word_embeddings": True, "rope_theta": 1e6},
         "qwen3": {"tie_word_embeddings": True, "head_dim": 96}}  # H * Dh = 384, not 256


def random_model(model_type: str, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**SHAPES, model_type=model_type, **EXTRA[model_type])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # q/k norms too: away from 1
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias"):  # away from 0
                p.normal_(0, 0.3)
    return model


def load_published(folder: str):
    """transformers 5.x `from_pretrained` as published: its AWQ path is gptqmodel's, which picks
    a kernel for the device (on a CPU, TorchAtenAwqLinear: torch's int4 CPU kernel)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)


def readers() -> list[tuple[str, object]]:
    """transformers 4.x: its own from_pretrained and AutoAWQ's from_quantized, each with the CPU
    -> IPEX switch skipped (GPU modules); transformers 5.x: from_pretrained as published."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return [("transformers5", load_published)]
    from transformers_load_check import load_autoawq, load_transformers

    return [("transformers", load_transformers), ("autoawq", load_autoawq)]


def save_random_checkpoint(model_type: str, folder: Path | str) -> None:
    """random_model(model_type), AWQ-searched on random calibration tokens (so Qwen2's v bias
    is rescaled with v), packed W4 g64 and saved by awq_ref into `folder`."""
    calib = torch.randint(3, SHAPES["vocab_size"], (8, 128),
                          generator=torch.Generator().manual_seed(1))
    q = awq_ref.quantize(random_model(model_type), method="awq", w_bit=4, group_size=64,
                         calib_tokens=calib, n_grid=10, progress=False)
    awq_ref.save_quantized(q, folder)


def check(model_type: str, folder: Path, new_tokens: int) -> dict:
    save_random_checkpoint(model_type, folder)
    ours = awq_ref.load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    prompts = [torch.randint(3, SHAPES["vocab_size"], (n,),
                             generator=torch.Generator().manual_seed(n)).tolist()
               for n in (7, 33, 200)]
    row: dict = {"architectures": config["architectures"],
                 "stored": sorted(k.split(".", 3)[-1] for k in read_safetensors_folder(folder)
                                  if k.startswith("model.layers.0."))}
    for name, load in readers():
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # transformers reports missing / unused weights here
        logger = logging.getLogger("transformers")
        logger.addHandler(handler)
        try:
            other = load(str(folder))
        finally:
            logger.removeHandler(handler)
        built = type(other).__name__
        kinds = sorted({type(m).__name__ for m in other.modules() if is_awq_layer(m)})
        linears = sum(is_awq_layer(m) for m in other.modules())
        errors = [rel_err(hf_logits(other, p), ours(torch.tensor([p]))[0].float().detach())
                  for p in prompts]
        with torch.no_grad():
            mine = awq_ref.generate(ours, prompts[1], new_tokens)
        theirs = hf_greedy(other, prompts[1], new_tokens)
        same = leading_equal(mine, theirs)
        flags = ("newly initialized", "not used", "| MISSING", "| UNEXPECTED", "| MISMATCH")
        notes = sorted({r.getMessage()[:300] for r in records  # 4.x's sentences, 5.x's table
                        if any(f in r.getMessage() for f in flags)})
        row[name] = {"class": built, "quantized_linears": linears, "layer_classes": kinds,
                     "logits_rel_err": errors,
                     "greedy_tokens_equal": same, "of": new_tokens, "load_warnings": notes}
        print(f"{model_type:8s} {name:13s} {built:18s} {linears:2d} x {'/'.join(kinds)}  "
              f"logits rel err {', '.join(f'{e:.1e}' for e in errors)}  greedy {same}/{new_tokens}"
              + (f"  WARNINGS {notes}" if notes else ""))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    report: dict = {"versions": {"torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 **package_versions("autoawq", "gptqmodel")}}
    print(report["versions"])
    with TemporaryDirectory() as tmp:
        for model_type in ARCHITECTURES:
            report[model_type] = check(model_type, Path(tmp) / model_type, args.new_tokens)
    if args.json:
        from awq_ref.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
