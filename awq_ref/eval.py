"""Perplexity, KL divergence and top-1 agreement, exactly as ../shared/design/PROTOCOL.md says.

The text is tokenized as one stream and cut into non-overlapping windows of `seqlen` tokens;
every window predicts its tokens 2..seqlen from the ones before, so N windows score
N * (seqlen - 1) tokens:

    ppl  = exp(mean over scored tokens of -log p_model(token))
    kl   = mean over scored positions of KL(p_ref || p_model)
         = sum_v p_ref(v) (log p_ref(v) - log p_model(v))
    top1 = fraction of scored positions where argmax p_model == argmax p_ref
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from awq_ref.files import read_text
from awq_ref.model import check_token_ids

# Positions per chunk when turning logits into log-probs: bounds the (T, V) fp32 temporaries.
_CHUNK = 512


def load_wikitext_tokens(tokenizer: Any, path: str | Path) -> torch.Tensor:
    """The whole file as one token stream (1-D int64), with the tokenizer's own BOS default."""
    return torch.tensor(tokenizer.encode(read_text(path)), dtype=torch.int64)


def windows_of(tokens: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows from the start of a 1-D stream; the tail is dropped."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"evaluate: tokens must be a 1-D integer tensor, got "
                        f"{type(tokens).__name__}")
    if tokens.dim() != 1 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"evaluate: tokens must be one 1-D integer token stream (it is cut into "
                         f"windows here), got {tokens.dtype} {tuple(tokens.shape)}")
    for name, value in (("seqlen", seqlen), ("windows", 1 if windows is None else windows)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"evaluate: {name} must be an integer, got {value!r}")
    if seqlen < 2:
        raise ValueError(f"a window needs at least 2 tokens (one to predict), got seqlen {seqlen}")
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(f"need at least {seqlen} tokens for one window, "
                         f"the text has {tokens.numel()}")
    n = available if windows is None else windows
    if not 0 < n <= available:
        raise ValueError(f"asked for {n} windows of {seqlen} tokens; the text holds {available} "
                         "such windows")
    return tokens[: n * seqlen].view(n, seqlen)


def _scores(logp: torch.Tensor, ref_logp: torch.Tensor | None, targets: torch.Tensor
            ) -> tuple[float, float, int]:
    """Summed NLL, summed KL and count of top-1 matches for (T, V) log-probs and (T,) targets."""
    nll = -logp.gather(1, targets[:, None]).sum().item()
    if ref_logp is None:
        return nll, 0.0, 0
    kl = (ref_logp.exp() * (ref_logp - logp)).sum().item()
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
    return nll, kl, int(top1)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, seqlen: int = 2048, windows: int | None = None,
             reference: nn.Module | None = None, progress: bool = True) -> dict[str, float]:
    """Score `model` on `tokens` (1-D); with `reference`, also KL(p_ref || p_model) and top-1.

    Returns {"ppl", "nll", "tokens", "windows", "seqlen"} plus {"kl", "top1"} with a reference.
    """
    return evaluate_many({"model": model}, tokens, seqlen, windows, reference, progress)["model"]


@torch.no_grad()
def evaluate_many(models: dict[Hashable, nn.Module], tokens: torch.Tensor, seqlen: int = 2048,
                  windows: int | None = None, reference: nn.Module | None = None,
                  progress: bool = True) -> dict[Hashable, dict[str, float]]:
    """`evaluate` for several models, window by window, so the reference runs once per window,
    not once per model (each model's numbers are the ones `evaluate` gives it alone; the
    reference itself among the models costs no second forward)."""
    batches = windows_of(tokens, seqlen, windows)
    if not models:
        return {}
    llamas = [m for m in [*models.values(), reference] if hasattr(m, "config")]  # others: trusted
    for m in llamas:
        check_token_ids(m.config, batches, "evaluate: the text's tokens")
    vocabs = sorted({m.config.vocab_size for m in llamas})
    if reference is not None and len(vocabs) > 1:
        raise ValueError(f"evaluate: the models' vocabularies differ ({vocabs} tokens); KL and "
                         "top-1 compare their logits token by token")
    sums = {name: [0.0, 0.0, 0] for name in models}  # summed NLL, KL, top-1 matches
    for window in tqdm(batches, desc="eval windows", disable=not progress):
        ref_logits = (reference(window[None].to(reference.device))[0, :-1]
                      if reference is not None else None)  # (T-1, V)
        for name, model in models.items():
            x = window[None].to(model.device)  # (1, T)
            logits = ref_logits if model is reference else model(x)[0, :-1]  # (T-1, V): t -> t+1
            _score_window(logits, ref_logits, x[0, 1:], sums[name])
            del logits  # not alive during the next model's forward
    count = batches.shape[0] * (seqlen - 1)
    results = {}
    for name, (nll_sum, kl_sum, top1_sum) in sums.items():
        results[name] = {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count,
                         "windows": batches.shape[0], "seqlen": seqlen}
        if reference is not None:
            results[name].update(kl=kl_sum / count, top1=top1_sum / count)
    return results


def _score_window(logits: torch.Tensor, ref_logits: torch.Tensor | None, targets: torch.Tensor,
                  sums: list) -> None:
    """Adds one window's summed NLL, KL and top-1 matches to `sums`, _CHUNK positions at a time."""
    for a in range(0, logits.shape[0], _CHUNK):
        logp = torch.log_softmax(logits[a:a + _CHUNK].float(), -1)
        ref_logp = None
        if ref_logits is not None:
            ref_logp = torch.log_softmax(ref_logits[a:a + _CHUNK].float(), -1).to(logp.device)
        nll, kl, top1 = _scores(logp, ref_logp, targets[a:a + _CHUNK])
        sums[0], sums[1], sums[2] = sums[0] + nll, sums[1] + kl, sums[2] + top1
