"""Calibration windows: random token windows from text, or (data-free) sampled from the model.

PROTOCOL.md: 128 windows of 512 tokens drawn at random (seed 0) from one token stream.
The stream is the texts joined by blank lines and tokenized once; window starts are uniform
over every position that leaves a full window (windows may overlap).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_ref.files import read_text

log = logging.getLogger(__name__)
DEFAULT_WINDOWS = 128
DEFAULT_SEQLEN = 512
# Below these the search is warned of (not refused: tests and experiments use tiny ones): the
# scales and clips are fitted to the calibration tokens, and a few tokens, or one token
# repeated (padding: windows are not masked, so a pad is calibration data like any other),
# make a model worse than round-to-nearest (KL to the fp model up to 6x RTN's, measured on
# stories260K with 1 x 2 tokens, all-BOS windows, or windows left-padded to 7/8).
FEW_TOKENS = 2048
MOST_OF_ONE_TOKEN = 0.5


def random_windows(stream: torch.Tensor, n: int = DEFAULT_WINDOWS, seqlen: int = DEFAULT_SEQLEN,
                   seed: int = 0) -> torch.Tensor:
    """n windows (n, seqlen) int64 at random starts (torch.Generator seeded with `seed`)."""
    if n < 1 or seqlen < 1:  # an empty (n, seqlen) would fail only deep in the search
        raise ValueError(f"calibration needs n >= 1 windows of seqlen >= 1 tokens, got n {n}, "
                         f"seqlen {seqlen}")
    stream = torch.as_tensor(stream, dtype=torch.int64).flatten()
    if stream.numel() < seqlen:
        raise ValueError(f"calibration data has {stream.numel()} tokens; one window needs "
                         f"{seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=gen)  # (n,)
    return stream[starts[:, None] + torch.arange(seqlen)]  # (n, seqlen)


def check_calib_tokens(tokens: Any) -> None:
    """TypeError / ValueError unless `tokens` is an integer tensor (B, T) with B, T >= 1."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"calib_tokens must be an integer tensor (B, T), got "
                        f"{type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64) or not tokens.numel():
        raise ValueError(f"calib_tokens must be integer (B, T) with B, T >= 1, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    warn_thin_calibration(tokens)


def warn_thin_calibration(tokens: torch.Tensor) -> None:
    """A warning when the calibration tokens (B, T) are too few or mostly one token."""
    if tokens.numel() < FEW_TOKENS:
        log.warning("only %d calibration tokens: AWQ fits its scales and clips to them, and so "
                    "few can make the model worse than round-to-nearest (the default is %d x %d)",
                    tokens.numel(), DEFAULT_WINDOWS, DEFAULT_SEQLEN)
    ids, counts = tokens.flatten().unique(return_counts=True)
    top = int(counts.argmax())
    if counts[top] > MOST_OF_ONE_TOKEN * tokens.numel():
        log.warning("token %d is %.0f%% of the calibration tokens (padding?): windows are not "
                    "masked, so every token is calibration data; use windows of real text",
                    int(ids[top]), 100 * int(counts[top]) / tokens.numel())


def calibration_tokens(tokenizer: Any, source: str | Path | Sequence[str | Path],
                       n: int = DEFAULT_WINDOWS, seqlen: int = DEFAULT_SEQLEN, seed: int = 0
                       ) -> torch.Tensor:
    """(n, seqlen) windows from text: one file (str or Path), or a list of texts (str) and
    files (Path). tokenizer.encode(text) -> list[int].
    """
    items = [Path(source)] if isinstance(source, (str, Path)) else list(source)
    if not items:
        raise ValueError("no calibration text given")
    strings = [read_text(t) if isinstance(t, Path) else t for t in items]
    stream = torch.tensor(tokenizer.encode("\n\n".join(strings)), dtype=torch.int64)
    if stream.numel() < seqlen:  # say where the text came from, and catch file names as text
        files = [str(t) for t in items if isinstance(t, Path)]
        named = [t for t in items if isinstance(t, str) and len(t) < 4096 and "\n" not in t
                 and Path(t).is_file()]
        raise ValueError(
            f"calibration data has {stream.numel()} tokens; one window needs {seqlen} (from "
            f"{len(files)} file(s) {files} and {len(items) - len(files)} text(s))"
            + (f"; {named} in the list was read as text, not as a file: in a list, give files "
               f"as pathlib.Path" if named else ""))
    return random_windows(stream, n, seqlen, seed)


@torch.no_grad()
def sample_from_model(model: nn.Module, n: int = DEFAULT_WINDOWS, seqlen: int = DEFAULT_SEQLEN,
                      seed: int = 0, batch: int = 32, temperature: float = 1.0) -> torch.Tensor:
    """Data-free calibration: (n, seqlen) windows the model writes itself from BOS.

    Each window starts with the BOS token (config.bos_token_id, else 1) and continues by sampling
    softmax(logits / temperature) with a seeded generator. Costs one generation of n * seqlen
    tokens, and the windows follow the model's own distribution, not a real domain.
    """
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        toks = torch.full((b, seqlen), bos, dtype=torch.int64, device=model.device)  # (B, T)
        cache = model.new_cache(b, max(seqlen - 1, 1))  # the last token is never fed back
        for t in range(seqlen - 1):
            logits = model(toks[:, t:t + 1], cache=cache)[:, -1].float()  # (B, V)
            probs = torch.softmax(logits / temperature, dim=-1)
            toks[:, t + 1] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out.append(toks.cpu())
    return torch.cat(out)
