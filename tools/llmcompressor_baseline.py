"""llm-compressor's AWQ on the same model and calibration windows as ours: the second baseline.

llm-compressor (https://github.com/vllm-project/llm-compressor, 0.14) is the vLLM project's
quantization library and where AutoAWQ's maintainers sent its users. Its AWQ is two recipe
stages: `AWQModifier` searches and applies the per-channel scales (AutoAWQ's grid search: duo
scaling, n_grid 20; no clipping search), then `QuantizationModifier` rounds the weights group-wise
with its min-max observer. This script runs both with their defaults, group size 64 and
asymmetric integers (AWQ's zero points), on exactly the calibration windows PROTOCOL.md gives
our search (128 x 512 TinyStories tokens, seed 0, as token ids), on the CPU.

Its checkpoints are compressed-tensors, which our loader does not read, so this writes what they
would hold as fake-quantized fp32 weights (compressed-tensors' own `fake_quantize` with the
scales and zero points it computed) in an HF folder with our tokenizer, scored like ours:

    python -m awq_ref ppl --model OUT --text ../shared/data/text/wikitext-2-raw/wiki.test.raw \
        --windows 20 --reference default

llm-compressor pulls in transformers 5, so it runs in a virtual environment of its own:

    python3.11 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf sentencepiece
    PYTHONPATH=. /tmp/llmc-venv/bin/python tools/llmcompressor_baseline.py --out out/llmc-w4g64

The HF folder (out/smollm2-hf) is the one tools/autoawq_baseline.py makes from the GGUF; alone,
in a venv with transformers 4 (transformers 5 will not save a model it read from a GGUF):

    python3.11 -m venv /tmp/hf4-venv
    /tmp/hf4-venv/bin/pip install torch==2.13.0 transformers==4.51.3 accelerate gguf sentencepiece
    PYTHONPATH=. /tmp/hf4-venv/bin/python tools/autoawq_baseline.py --only-hf-dir

Measured 2026-12-05 (README "Measured"): W4 g64 24.961 ppl, KL 0.1593, top-1 0.7906 against
ours 24.159, KL 0.1441, top-1 0.7938; 5899 s of search beside another job on the 2 cores.
W3 g64 (`--w-bit 3`): 53.233, KL 0.9161, top-1 0.5201 against ours 45.747, 0.724, 0.568; 2689 s.
W4 g64 on PROTOCOL.md's full run (all 147 windows, 2026-12-07): 26.354, KL 0.1678, top-1 0.7832
against ours 25.676, 0.1508, 0.7901; 4174 s of search alone on the 2 cores. W3 g64 on the full
run (2026-12-07): 58.566, KL 0.9552, top-1 0.5124 against ours 50.977, 0.7765, 0.5547; 5252 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from baseline_protocol import add_protocol_args, protocol_windows  # tools/, beside this script
from safetensors import safe_open
from safetensors.torch import save_file


def skip_pinning_without_gpu() -> None:
    """llm-compressor 0.14 pins its cached activations before each scale search (for faster
    copies to a GPU); with no accelerator torch refuses (`Cannot access accelerator device when
    none is available`). Pinning changes no number, so on a CPU it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index: None


def fake_quantized_state(model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The model's tensors named `keys`, each quantized linear's weight fake-quantized.

    After `oneshot` every targeted linear holds its (scaled) fp32 weight beside the
    `weight_scale` and `weight_zero_point` llm-compressor computed for it; compressing the
    checkpoint would round the weight with exactly these, which `fake_quantize` does too.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    n_quantized = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        w = fake_quantize(module.weight.data, module.weight_scale.data,
                          module.weight_zero_point.data, scheme.weights)
        state[f"{name}.weight"] = w.to(module.weight.dtype)
        n_quantized += 1
    if n_quantized == 0:
        raise RuntimeError("no quantized linear found after oneshot")
    params = dict(model.named_parameters())
    for key in keys:
        if key not in state:
            state[key] = params[key].data
    return {k: state[k].contiguous() for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the fake-quantized HF checkpoint")
    add_protocol_args(ap)
    ap.add_argument("--duo-scaling", default="true", choices=["true", "false", "both"])
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="windows per forward pass (oneshot's default 1 is slow on a CPU; the "
                         "statistics and the losses are sums over all windows either way)")
    args = ap.parse_args()
    if Path(args.out).exists():  # before the hour of search, not replaced after it
        ap.error(f"--out {args.out} already exists: remove it or choose another folder")

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    skip_pinning_without_gpu()
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").exists():
        raise SystemExit(f"{hf_dir}: no HF folder; `tools/autoawq_baseline.py --only-hf-dir` "
                         "makes it (see this script's docstring)")
    tokenizer, windows = protocol_windows(args)  # windows (n, seqlen), as ours sees them
    n, seqlen = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                 "attention_mask": [[1] * seqlen] * n})

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    weights = {"num_bits": args.w_bit, "type": "int", "symmetric": False,
               "strategy": "group", "group_size": args.group_size}
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    recipe = [AWQModifier(duo_scaling=duo, n_grid=args.n_grid),
              QuantizationModifier(ignore=["lm_head"], config_groups={
                  "group_0": {"targets": ["Linear"], "weights": weights}})]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seqlen,
            num_calibration_samples=n, shuffle_calibration_samples=False,
            batch_size=args.batch_size)
    seconds = time.perf_counter() - t0

    with safe_open(hf_dir / "model.safetensors", "pt") as f:  # the original folder's names
        keys = list(f.keys())
    state = fake_quantized_state(model, keys)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", partial / "config.json")
    tokenizer.save_pretrained(partial)  # ours, as for AutoAWQ's checkpoint
    partial.rename(out)
    print(json.dumps({"out": str(out), "quantize_s": round(seconds, 1), "weights": weights,
                      "duo_scaling": args.duo_scaling, "n_grid": args.n_grid,
                      "calib_windows": n, "seqlen": seqlen, "seed": args.seed,
                      "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
