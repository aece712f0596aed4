"""What the published-AWQ baseline scripts share: PROTOCOL.md's model and calibration windows.

tools/autoawq_baseline.py and tools/llmcompressor_baseline.py run another implementation's
search on exactly the windows ours sees (128 x 512 TinyStories tokens, seed 0, as token ids),
each in a venv of its own; both import this module from tools/ (the script's own folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from awq_ref.awq.calibration import calibration_tokens
from awq_ref.loaders import load_tokenizer
from awq_ref.tokenizer import Tokenizer

# ../shared beside the repo, wherever the tool is run from
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"


def add_protocol_args(ap: argparse.ArgumentParser) -> None:
    """--hf-dir, the calibration windows (--calib, --calib-windows, --seqlen, --seed), --w-bit,
    --group-size, with PROTOCOL.md's defaults (W4 g64)."""
    ap.add_argument("--hf-dir", default="out/smollm2-hf", help="HF folder of the default model")
    ap.add_argument("--calib", default=f"{DATA}/tinystories/tinystories_val_prefix.txt")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)


def protocol_windows(args: argparse.Namespace) -> tuple[Tokenizer, torch.Tensor]:
    """Our tokenizer and the calibration windows (n, seqlen) as our search sees them."""
    tokenizer = load_tokenizer("default")
    return tokenizer, calibration_tokens(tokenizer, args.calib, args.calib_windows,
                                         args.seqlen, seed=args.seed)
