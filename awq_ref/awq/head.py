"""Activation-aware clipping of the lm_head before it is held in 4 bits (awq_ref.quant.embedding).

The lm_head maps the final norm's output h (T, D) to the logits h W^T, W (V, D). Rounding W
moves every logit, and plain round-to-nearest costs SmolLM2 about as much KL as its whole W4
decoder. AWQ's clip search (awq_ref.awq.search_clip) applies as it does to any linear: per
(vocab row, group of G hidden dims) it picks the box whose rounding least changes that row's
logit over calibration tokens, e^T H e with e = q - w and H = h^T h (D x D), with the decoder's
clip settings (AwqConfig: clip_grid, max_shrink, clip_mode, clip_joint; not clip_damp) and 4
bits whatever the decoder's width (the 4-bit table holds it). No scaling: a
scale on the head's inputs would have to be folded into the final norm, and for a tied table
it would rescale the token embeddings too.
"""

from __future__ import annotations

import torch

from awq_ref.awq.pipeline import AwqConfig
from awq_ref.awq.search_clip import search_clip
from awq_ref.model import Llama
from awq_ref.quant.quantizer import QuantSpec, clamp_groups


@torch.no_grad()
def head_gram(model: Llama, calib_tokens: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """H = sum over calibration tokens of h^T h (D, D) fp32, h the final norm's output."""
    d = model.config.hidden_size
    gram = torch.zeros(d, d, device=model.device)
    for i in range(0, calib_tokens.shape[0], batch):
        h = model.hidden(calib_tokens[i:i + batch].to(model.device)).reshape(-1, d).float()
        gram += h.T @ h
    return gram


def clipped_head(model: Llama, calib_tokens: torch.Tensor, group_size: int,
                 config: AwqConfig | None = None) -> torch.Tensor:
    """The lm_head weight (V, D) with every (row, group) clamped to its searched box, ready to
    be rounded to 4 bits with groups of `group_size` (`quantize_embeddings(head_weight=...)`)."""
    config = config or AwqConfig()
    w = model.lm_head.weight.detach()
    lo, hi, _, _ = search_clip(w.float(), head_gram(model, calib_tokens), QuantSpec(4, group_size),
                               n_grid=config.clip_grid, max_shrink=config.max_shrink,
                               mode=config.clip_mode, name="lm_head", joint=config.clip_joint)
    return clamp_groups(w.float(), lo, hi).to(w.dtype)
