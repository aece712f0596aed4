"""How many output rows the clip search leaves with a larger whole-row error than no clipping
(docs/walkthrough.md section 8): per-group boxes judge each group on its own partial output,
so the cross-group terms of e^T H e can add up past the unclipped row's error.

    PYTHONPATH=. .venv/bin/python docs/checks/clip_rows_check.py   (blocks 0-1 of SmolLM2)

Runs the default search on the protocol's calibration (128 x 512 TinyStories windows, seed 0)
over the first two blocks, and for every clipped linear compares each row's e^T H e at the
boxes chosen group by group (clip_joint 0) and after the default joint sweeps with its value
without clipping.
"""

from pathlib import Path

import torch

from awq_ref.awq import pipeline
from awq_ref.awq import search_clip as sc
from awq_ref.awq.calibration import calibration_tokens
from awq_ref.loaders import load_model, load_tokenizer
from awq_ref.quant.quantizer import QuantSpec, grouped

TEXT = Path("../shared/data/text/tinystories/tinystories_val_prefix.txt")
counts = {"rows": 0, "worse per group": 0, "worse after joint": 0}
worst = {"per group": 0.0, "after joint": 0.0}


def row_errors(w, gram, lo, hi, spec, g) -> torch.Tensor:
    """e_n^T H e_n per output row (N,) for the boxes lo, hi (N, K/G)."""
    e = sc._quant_error(grouped(w, g), lo, hi, spec, g).reshape(w.shape[0], -1)  # (N, K)
    return ((e @ gram) * e).sum(-1)


def counting_search_clip(w, gram, spec, n_grid=20, max_shrink=0.5, mode="range", name="weight",
                         joint=0):
    g = spec.group_for(w.shape[1], name)
    lo1, hi1 = sc.clip_box(grouped(w, g), 1.0, mode, spec.zero_point)
    unclipped = row_errors(w, gram, lo1, hi1, spec, g)
    per_group = sc.search_clip(w, gram, spec, n_grid, max_shrink, mode, name, joint=0)
    chosen = sc.search_clip(w, gram, spec, n_grid, max_shrink, mode, name, joint=joint)
    for key, (lo, hi) in (("per group", per_group[:2]), ("after joint", chosen[:2])):
        ratio = row_errors(w, gram, lo, hi, spec, g) / unclipped
        counts[f"worse {key}"] += int((ratio > 1).sum())
        worst[key] = max(worst[key], float(ratio.max()))
    counts["rows"] += w.shape[0]
    return chosen


pipeline.search_clip = counting_search_clip
model, tok = load_model("default"), load_tokenizer("default")
model.model.layers = model.model.layers[:2]
calib = calibration_tokens(tok, TEXT, 128, 512, seed=0)
pipeline.search_awq(model, calib, QuantSpec(4, 64), pipeline.AwqConfig(progress=False))
print(counts, {k: round(v, 3) for k, v in worst.items()})
