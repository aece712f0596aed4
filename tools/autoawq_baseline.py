"""AutoAWQ on the same model and calibration windows as ours: the published baseline.

AutoAWQ (https://github.com/casper-hansen/AutoAWQ, 0.2.9, the last release; now archived) is the
AWQ implementation most checkpoints on model hubs were made with. This script runs its own
`quantize` on the default model with exactly the calibration windows PROTOCOL.md gives our
search (128 x 512 TinyStories tokens, seed 0), on the CPU, and writes its packed checkpoint.
The checkpoint is then scored with our evaluation, like ours:

    python -m awq_ref ppl --model OUT --text ../shared/data/text/wikitext-2-raw/wiki.test.raw \
        --windows 20 --reference default

AutoAWQ pulls in transformers, so it runs in a virtual environment of its own (never ours):

    python3.11 -m venv /tmp/autoawq-venv
    /tmp/autoawq-venv/bin/pip install torch==2.13.0 transformers==4.51.3 accelerate datasets \
        gguf sentencepiece zstandard
    /tmp/autoawq-venv/bin/pip install --no-deps autoawq==0.2.9
    PYTHONPATH=. /tmp/autoawq-venv/bin/python tools/autoawq_baseline.py --out out/autoawq-w4g64

The HF folder AutoAWQ needs is made from the default model's GGUF by transformers' own GGUF
reader (--hf-dir, reused when present; `--only-hf-dir` makes it and stops, and then needs only
torch, transformers 4.51.3, accelerate, gguf and sentencepiece: transformers 5 refuses to save a
model it read from a GGUF, "not serializable"). The model is loaded in fp32 (AutoAWQ's default
fp16 is for GPUs; in fp32 its search rounds less). AutoAWQ 0.2.9 breaks the model on a CPU; the one
patch that makes it behave as on a GPU is `fix_cpu_aliasing` below.

Measured 2026-12-05 (README "Measured"): AutoAWQ W4 g64 25.003 ppl, KL 0.1612 against ours
24.159, KL 0.1441; W3 g64 (--fake-quant --w-bit 3) 46.717, KL 0.7708 against ours 45.747,
KL 0.724; W4 g64 at calibration seed 1 (--seed 1) 25.618, KL 0.1698 against ours 24.606,
KL 0.1464.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from baseline_protocol import add_protocol_args, protocol_windows  # tools/, beside this script

from awq_ref.loaders.default_model import default_gguf_path


def make_hf_folder(gguf: Path, hf_dir: Path) -> None:
    """The GGUF as an HF safetensors folder (fp32), through transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 torch_dtype=torch.float32)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)


def fix_cpu_aliasing() -> None:
    """Make AutoAWQ 0.2.9's scale search restore the original weights on a CPU, as on a GPU.

    `AwqQuantizer._compute_best_scale` saves `{k: v.cpu() for k, v in state_dict().items()}`
    before trying each ratio, scales the weights in place (`fc.weight.mul_`) and reloads the
    saved dict afterwards. On a GPU `.cpu()` copies; on a CPU it returns the same tensor, so the
    "saved" weights are the scaled ones: every ratio after the first is tried on corrupted
    weights and the block is left holding them (measured: block 0's output off by 56% instead
    of 8%, perplexity 290,246). Giving the module a state_dict of copies during the search
    restores AutoAWQ's GPU behaviour without touching its algorithm.
    """
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict  # the class's own method again

    AwqQuantizer._compute_best_scale = compute_best_scale


def fake_quantize_blocks(quantizer) -> None:
    """What AutoAWQ's packing step would store, as fp32 weights, for any bit width.

    With `export_compatible=True` AutoAWQ scales and clips the weights but leaves them in
    floating point; its `_apply_quant` would then cast each linear to fp16 and round it with
    `pseudo_quantize_tensor` before packing. This does the same and keeps the rounded weights
    (packing itself only knows 4 bits). The search is unchanged by the flag: each block's
    inputs are taken before anything in it is quantized, either way.
    """
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears

    for block in quantizer.modules:
        linears = exclude_layers_to_not_quantize(get_named_linears(block),
                                                 quantizer.modules_to_not_convert)
        for linear in linears.values():
            w, _, _ = quantizer.pseudo_quantize_tensor(linear.weight.data.half())
            linear.weight.data = w.to(linear.weight.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--out", help="AutoAWQ's checkpoint folder (required unless --only-hf-dir)")
    add_protocol_args(ap)
    ap.add_argument("--no-duo-scaling", action="store_true",
                    help="s = mean|x|^a (AutoAWQ's default also divides by mean|w|^(1-a))")
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--fake-quant", action="store_true",
                    help="write fake-quantized fp32 weights instead of a packed checkpoint: "
                         "any --w-bit (AutoAWQ packs only 4 bits)")
    ap.add_argument("--keep-cpu-bug", action="store_true",
                    help="run AutoAWQ unpatched (see fix_cpu_aliasing): a broken model on a CPU")
    ap.add_argument("--only-hf-dir", action="store_true",
                    help="make the HF folder (--hf-dir) from the GGUF and stop: no AutoAWQ needed")
    args = ap.parse_args()
    hf_dir = Path(args.hf_dir)
    if args.only_hf_dir:
        make_hf_folder(default_gguf_path(), hf_dir)
        return
    if not args.out:
        ap.error("--out is required")

    from awq import AutoAWQForCausalLM  # AutoAWQ: only in its own environment

    if not args.keep_cpu_bug:
        fix_cpu_aliasing()

    if not (hf_dir / "config.json").exists():
        make_hf_folder(default_gguf_path(), hf_dir)
    tokenizer, windows = protocol_windows(args)  # windows (n, seqlen), as ours sees them

    model = AutoAWQForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    config = {"zero_point": True, "q_group_size": args.group_size, "w_bit": args.w_bit,
              "version": "GEMM"}
    t0 = time.perf_counter()
    # A list of token-id lists of length <= max_calib_seq_len is concatenated and cut back into
    # windows of max_calib_seq_len: exactly our windows, in our order.
    model.quantize(None, quant_config=config, calib_data=windows.tolist(),
                   max_calib_samples=args.calib_windows, max_calib_seq_len=args.seqlen,
                   duo_scaling=not args.no_duo_scaling, apply_clip=not args.no_clip,
                   export_compatible=args.fake_quant)
    seconds = time.perf_counter() - t0
    if args.fake_quant:
        fake_quantize_blocks(model.quantizer)
        model.model.save_pretrained(args.out)
    else:
        model.save_quantized(args.out)
    # Our tokenizer, not the one transformers converted from the GGUF: that one adds a BOS and
    # splits 2 of WikiText-2's 301,948 tokens differently, and the evaluation must see ours.
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "quantize_s": round(seconds, 1), **config,
                      "duo_scaling": not args.no_duo_scaling, "apply_clip": not args.no_clip,
                      "fake_quant": args.fake_quant,
                      "cpu_aliasing_fixed": not args.keep_cpu_bug}))


if __name__ == "__main__":
    main()
