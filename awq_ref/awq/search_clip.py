"""Search the clipping range of each (output channel, group) of a linear.

Shrinking a group's range before quantization trades a larger error on the few extreme weights
for a finer step on all others. For a ratio r on the grid 1, 1 - 1/n_grid, ..., above
1 - max_shrink (r = 1 - i/n_grid for i < int(max_shrink * n_grid), as in llm-awq: so n_grid
here is the step's inverse, 20 ratios for n_grid 40 and max_shrink 0.5), the group's weights
w (G,) are clamped to the box

    mode "range":     [r * min(w), r * max(w)]       (both ends of the asymmetric range), or
    mode "absmax":    [-r * max|w|, r * max|w|]      (llm-awq's box),
    mode "lohi":      "range", then each end refined on its own: [lo, t * max(w)] over the
                      grid with the best lo kept, then [t * min(w), hi] (coordinate descent;
                      3x the evaluations of "range");
    symmetric quantization (zero_point=False) uses the "absmax" box in every mode,

then fake-quantized (q), and the box with the least output error of that group is kept:

    L_ng(r) = || X_g (q_ng - w_ng) ||^2 = e^T (X_g^T X_g) e,   e = q_ng - w_ng,

X_g (T, G) being the group's input channels. As in llm-awq each group is judged on its own
partial output; the diagonal G x G blocks of the Gram matrix X^T X give it exactly over all
calibration tokens. r = 1 is no clipping, so each group's chosen L_ng never exceeds
round-to-nearest's; a row's whole output error can (the cross-group terms are ignored).

Optionally (joint > 0 sweeps) the boxes are then judged by what the output channel really
sees, the error of its whole output || X (q_n - w_n) ||^2 = e^T H e over all K inputs
(H = X^T X), cross-group terms included. With the other groups' errors fixed, changing group g's
error to e_g changes the row's error by a term of e_g alone,

    L_ng = e_g^T H_gg e_g + 2 e_g^T c_g,   c_g = (H e)_g - H_gg e_g,

so each sweep re-picks every group's box on the grid by L_ng (all groups at once, from the same
e), and a row keeps the new boxes only if its whole error went down from its current boxes'
(it may still exceed the row's error without clipping: starting such rows from r = 1 instead
was measured, walkthrough.md section 8, and not adopted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from awq_ref.quant.quantizer import QuantSpec, clamp_groups, grouped
from awq_ref.quant.rtn import fake_quantize_weight

CLIP_MODES = ("range", "absmax", "lohi")
# One (rows, K) fp32 temporary of the search at most this large: 4096 rows up to K = 4096; a
# Llama-2-7B down_proj (K = 11008) in chunks of 1524 rows (its peak memory 2.6 -> 1.3 GB)
CLIP_CHUNK_BYTES = 1 << 26


def gram_blocks(gram: torch.Tensor, g: int) -> torch.Tensor:
    """The K/G diagonal blocks (K/G, G, G) of a Gram matrix (K, K)."""
    k = gram.shape[0]
    idx = torch.arange(k, device=gram.device).view(k // g, g)  # (K/G, G)
    return gram[idx[:, :, None], idx[:, None, :]]


def clip_box(wg: torch.Tensor, ratio: float, mode: str, zero_point: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) (N, K/G) for grouped weights wg (N, K/G, G) at shrink ratio r."""
    if mode in ("range", "lohi") and zero_point:
        return wg.amin(-1) * ratio, wg.amax(-1) * ratio
    m = wg.abs().amax(-1) * ratio
    return -m, m


def clipper(gram: torch.Tensor, spec: QuantSpec, n_grid: int, max_shrink: float, mode: str,
            name: str = "weight") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """clip(W diag(s), s): the scaled weights clamped to their best box for inputs x / s.

    The scale search uses it to judge each candidate s after clipping (search_scale.Clip).
    """
    def clip(ws: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        lo, hi, _, _ = search_clip(ws, gram / (s_in[:, None] * s_in[None, :]), spec, n_grid,
                                   max_shrink, mode, name)
        return clamp_groups(ws, lo, hi)

    return clip


def search_clip(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5, mode: str = "range", name: str = "weight",
                joint: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best box per (output channel, group) for w (N, K) given its input Gram X^T X (K, K).

    Returns lo, hi (N, K/G) and the summed group errors sum_ng L_ng before (r = 1) and after
    (with joint > 0: the summed whole-row errors sum_n e_n^T H e_n before and after).
    The defaults here are the plain search (llm-awq's grid of 20, "range", no joint sweeps);
    the pipeline passes AwqConfig's (clip_grid 40, "lohi", clip_joint 2).
    Output channels are processed in chunks to bound memory: as many as keep one (rows, K) fp32
    temporary within CLIP_CHUNK_BYTES, at most 4096 (the joint sweeps hold several).
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    g = spec.group_for(w.shape[1], name)
    blocks = gram_blocks(gram, g)  # (K/G, G, G)
    rows = max(1, min(4096, CLIP_CHUNK_BYTES // (4 * w.shape[1])))
    out = [_search_rows(w[i:i + rows], blocks, spec, g, n_grid, max_shrink, mode)
           for i in range(0, w.shape[0], rows)]
    if joint > 0:
        out = [_joint_rows(w[i:i + rows], gram, blocks, spec, g, n_grid, max_shrink, mode,
                           o[0], o[1], joint) for i, o in zip(range(0, w.shape[0], rows), out)]
    lo, hi = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return lo, hi, sum(o[2] for o in out), sum(o[3] for o in out)


def _ratios(n_grid: int, max_shrink: float) -> list[float]:
    """r = 1 - i/n_grid for i < int(max_shrink * n_grid) (llm-awq's grid and truncation), all
    > 1 - max_shrink; at least r = 1. The defaults: 1, 0.975, ..., 0.525."""
    return [1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]


def _quant_error(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                 g: int) -> torch.Tensor:
    """e = Q(clamp(w, lo, hi)) - w (N, K/G, G) for grouped weights wg and boxes (N, K/G)."""
    clipped = clamp_groups(wg.reshape(wg.shape[0], -1), lo, hi)  # (N, K)
    return grouped(fake_quantize_weight(clipped, spec), g) - wg


def _group_errors(e: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """e_g^T H_gg e_g (N, K/G) for errors e (N, K/G, G) and the Gram's diagonal blocks."""
    return (torch.einsum("ngi,gij->ngj", e, blocks) * e).sum(-1)


def _search_rows(w: torch.Tensor, blocks: torch.Tensor, spec: QuantSpec, g: int, n_grid: int,
                 max_shrink: float, mode: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """llm-awq's per-group search: for each (row, group) the box on the ratio grid with the
    least e^T H_gg e ("lohi": then each end refined on its own). Returns lo, hi (N, K/G), and
    the summed group errors at r = 1 and at the chosen boxes."""
    wg = grouped(w, g)  # (N, K/G, G)
    ratios = _ratios(n_grid, max_shrink)

    def error(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # (N, K/G)
        return _group_errors(_quant_error(wg, lo, hi, spec, g), blocks)

    lo, hi = clip_box(wg, 1.0, mode, spec.zero_point)
    best_err = err0 = error(lo, hi)
    best_lo, best_hi = lo, hi

    def keep(lo: torch.Tensor, hi: torch.Tensor) -> None:
        nonlocal best_err, best_lo, best_hi
        err = error(lo, hi)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)

    for r in ratios[1:]:
        keep(*clip_box(wg, r, mode, spec.zero_point))
    if mode == "lohi" and spec.zero_point:  # refine hi with lo fixed, then lo with hi fixed
        w_min, w_max = wg.amin(-1), wg.amax(-1)  # (N, K/G)
        for r in ratios:
            keep(best_lo, torch.maximum(w_max * r, best_lo))
        for r in ratios:
            keep(torch.minimum(w_min * r, best_hi), best_hi)
    return best_lo, best_hi, float(err0.sum()), float(best_err.sum())


def _joint_rows(w: torch.Tensor, gram: torch.Tensor, blocks: torch.Tensor, spec: QuantSpec,
                g: int, n_grid: int, max_shrink: float, mode: str, lo: torch.Tensor,
                hi: torch.Tensor, sweeps: int
                ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Re-pick the boxes lo, hi (N, K/G) by whole-row error; see the module docstring."""
    wg = grouped(w, g)  # (N, K/G, G)

    def row_error(e: torch.Tensor) -> torch.Tensor:  # e (N, K/G, G) -> e_n^T H e_n (N,)
        flat = e.reshape(e.shape[0], -1)
        return ((flat @ gram) * flat).sum(-1)

    lo1, hi1 = clip_box(wg, 1.0, mode, spec.zero_point)
    err0 = row_error(_quant_error(wg, lo1, hi1, spec, g))
    e = _quant_error(wg, lo, hi, spec, g)
    err = row_error(e)
    for _ in range(sweeps):
        own = torch.einsum("ngi,gij->ngj", e, blocks)  # H_gg e_g (N, K/G, G)
        c = grouped(e.reshape(e.shape[0], -1) @ gram, g) - own  # c_g (N, K/G, G)
        best = (own * e).sum(-1) + 2 * (c * e).sum(-1)  # L_ng of the current boxes
        new_lo, new_hi = lo, hi
        for r in _ratios(n_grid, max_shrink):
            cand_lo, cand_hi = clip_box(wg, r, mode, spec.zero_point)
            ec = _quant_error(wg, cand_lo, cand_hi, spec, g)
            lc = _group_errors(ec, blocks) + 2 * (c * ec).sum(-1)
            better = lc < best
            best = torch.where(better, lc, best)
            new_lo = torch.where(better, cand_lo, new_lo)
            new_hi = torch.where(better, cand_hi, new_hi)
        new_e = _quant_error(wg, new_lo, new_hi, spec, g)
        new_err = row_error(new_e)
        keep = new_err < err  # (N,) rows whose whole error went down
        if not bool(keep.any()):
            break
        lo, hi = torch.where(keep[:, None], new_lo, lo), torch.where(keep[:, None], new_hi, hi)
        e = torch.where(keep[:, None, None], new_e, e)
        err = torch.where(keep, new_err, err)
    return lo, hi, float(err0.sum()), float(err.sum())
