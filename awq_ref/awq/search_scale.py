"""Search the per-input-channel scale s of one scaling group over a grid of ratios.

For a group with linears W_j (N_j, K) fed by x (T, K), candidate scales are

    s(a)   = max(mean|x|^a, 1e-4)                                (AWQ), or
    s(a)   = max(mean|x|^a / (mean|w~|^(1-a) + 1e-4), 1e-4)       (duo scaling),
    s      = s(a) / sqrt(max s(a) * min s(a))          (normalised as llm-awq does),

(w~ = |w| / its group's max, mean over output rows; 1e-4 keeps a dead channel's s finite).
The normalisation hardly changes which a wins: the group quantizer is homogeneous
(Q(cW) = c Q(W) but for the fp16 rounding of its scales), so L below does not depend on a
global factor of s; it picks the representative with max(s) * min(s) = 1, which keeps
W diag(s) and prev's outputs / s in fp16's range.

for a = 0, 1/n_grid, ..., (n_grid-1)/n_grid, and the chosen s minimises

    L(s) = || f(x; W) - f(x; Q(W diag(s)) diag(s)^-1) ||^2 / numel

where f is the output of the group's `inspect` module and Q the group-wise fake quantizer
(the project's RTN, fp16-rounded scales included, so the search sees nearly the final weights:
a later group's scale still divides v_proj's and up_proj's rows). mean|x| runs over every
calibration token (the B x T of capture.py), L over a fixed subset of them (capture.SubsetPlan:
AwqConfig.loss_seqs whole sequences for attention, loss_tokens strided tokens for the MLP);
a group whose inspect is one linear uses all tokens through H (below). Feeding
x with the effective weights Q(W diag(s)) diag(s)^-1 equals feeding x/s with Q(W diag(s)).
For plain AWQ (no duo scaling, no scale_clip_grid) a = 0 gives s = 1, plain round-to-nearest,
so the chosen loss never exceeds RTN's.

Optionally (AwqConfig.scale_clip_grid > 0) each candidate is judged nearly as it will finally
be used (the clip search without joint sweeps or clip_damp):
Q(clip_s(W diag(s))) diag(s)^-1, clip_s being the clip search of search_clip run on the scaled
weights (a coarser grid keeps it affordable); the final clip search still runs after.

When inspect is a single linear, L is quadratic in its weight error E = W_eff - W:
    L(s) = tr(E H E^T) / (T N),   H = X^T X (K, K),
the Gram matrix H accumulated once over all tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from awq_ref.quant.packing import FP16_MAX, Fp16OverflowError
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight


@dataclass(frozen=True)
class ScaleChoice:
    s: torch.Tensor  # (C,) the chosen scale, one per output channel of the group's prev
    ratio: float  # the chosen a
    loss: float  # L at the chosen a
    loss0: float  # L at a = 0 (s = 1 for plain AWQ: round-to-nearest)
    losses: tuple[float, ...]  # L at a = i/n_grid, the coarse grid (not n_refine's extra points)


def candidate_scale(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """s(a), normalised so that max(s) * min(s) = 1; see the module docstring."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over output rows of |w| / (its group's max |w|), per input channel (K,)."""
    w = torch.cat(weights, dim=0)  # (sum N, K)
    g = spec.group_for(w.shape[1])
    wg = w.abs().view(w.shape[0], -1, g)  # (N, K/G, G)
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view_as(w).mean(0)


# clip(W diag(s) (N, K), s (K,)) -> the scaled weights clipped; see search_clip.clipper
Clip = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def effective_weight(w: torch.Tensor, s_in: torch.Tensor, spec: QuantSpec,
                     clip: Clip | None = None) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 (N, K): what x meets after scaling (clipping) and quantization."""
    ws = w * s_in[None, :]
    if clip is not None:
        ws = clip(ws, s_in)
    return fake_quantize_weight(ws, spec) / s_in[None, :]


def _total(t: torch.Tensor) -> float:
    """The sum of t's elements, the same number at any thread count. A plain `t.sum()` has one
    output, which torch splits between threads in two passes: its last bits moved with the
    thread count (up to 2.4e-7 relative), enough to decide a near-tie of two candidates
    differently on 1 and 2 threads. A sum per row (last dim) has one output per row, and with
    many rows (here the N output channels, or the tokens) torch splits the rows between threads,
    each row added whole by one; the rows' sums are then added exactly (math.fsum). (Row sums
    in float64 cost 50x more here: 12 ms for 8192 x 576, against the module's forward.)"""
    return math.fsum(t.reshape(-1, t.shape[-1]).sum(-1).tolist())


def gram_loss(w: torch.Tensor, gram: torch.Tensor, count: int, s_in: torch.Tensor,
              spec: QuantSpec, clip: Clip | None = None) -> float:
    """L(s) = tr(E H E^T) / (T N), E = W_eff - W (N, K), H = X^T X (K, K) over T tokens."""
    e = effective_weight(w, s_in, spec, clip) - w  # (N, K)
    return _total((e @ gram) * e) / (count * w.shape[0])


def module_loss(inspect: nn.Module, weights: dict[str, torch.Tensor], spec: QuantSpec,
                inputs: torch.Tensor, reference: torch.Tensor, extra: tuple = (),
                chunk: int = 16, clips: dict[str, Clip] | None = None
                ) -> Callable[[torch.Tensor], float]:
    """L as a function of s_in, measured by running `inspect` with effective weights.

    weights: parameter name inside `inspect` -> original weight (N, K); inputs (B, ...) and
    reference (B, ...) are cut into chunks of `chunk` rows along dim 0; `extra` are further
    forward arguments (cos, sin for attention); clips: parameter name -> its Clip, if any.
    """
    clips = clips or {}

    def loss(s_in: torch.Tensor) -> float:
        params = {k: effective_weight(w, s_in, spec, clips.get(k)) for k, w in weights.items()}
        total = 0.0
        for i in range(0, inputs.shape[0], chunk):
            out = functional_call(inspect, params, (inputs[i:i + chunk], *extra))
            total += _total((out - reference[i:i + chunk]).pow(2))
        return total / reference.numel()

    return loss


def grid_search(loss: Callable[[torch.Tensor], float], x_mean: torch.Tensor,
                w_mean: torch.Tensor | None, n_grid: int,
                expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
                n_refine: int = 0, prev_max: torch.Tensor | None = None) -> ScaleChoice:
    """Evaluate L(s(a)) for a = i / n_grid, i < n_grid; keep the first minimum.

    Then n_refine times: halve the step and try the two ratios beside the best one (within
    [0, 1]), 2 losses per level instead of doubling the grid. `losses` holds the coarse grid.
    A candidate that pushes weights past fp16 gets L = inf: the linears' scaled weights
    (Fp16OverflowError from the loss), or, for a prev that is itself quantized (v_proj,
    up_proj), its rows' max |w| prev_max (C,) divided by s. Fp16OverflowError if every
    candidate does.

    expand maps a scale over prev's channels (C,) to the linears' inputs (K,) (GQA repeat).
    """
    overflows: list[str] = []  # "at a = ...: why", one per candidate pushed past fp16

    def value(ratio: float) -> tuple[torch.Tensor, float]:
        s = candidate_scale(x_mean, ratio, w_mean)
        if prev_max is not None and (reach := float((prev_max / s).max())) > FP16_MAX:
            overflows.append(f"at a = {ratio:.3g}: prev's rows divided by s reach |w| = "
                             f"{reach:.4g}, beyond fp16's {FP16_MAX:.0f}")
            return s, math.inf
        try:
            return s, loss(expand(s))
        except Fp16OverflowError as e:  # s pushes a group's weights past fp16: not a candidate
            overflows.append(f"at a = {ratio:.3g}: {str(e).removeprefix('weight: ')}")
            return s, math.inf

    losses, best = [], None
    for i in range(n_grid):
        ratio = i / n_grid
        s, v = value(ratio)
        losses.append(v)
        if best is None or v < best[2]:
            best = (s, ratio, v)
    step = 1 / n_grid
    for _ in range(n_refine):
        step /= 2
        center = best[1]
        for ratio in (center - step, center + step):
            if 0 <= ratio <= 1:
                s, v = value(ratio)
                if v < best[2]:
                    best = (s, ratio, v)
    s, ratio, v = best
    if math.isinf(v) and overflows:
        raise Fp16OverflowError(f"every scale candidate overflows fp16 ({overflows[0]})")
    return ScaleChoice(s=s, ratio=ratio, loss=v, loss0=losses[0], losses=tuple(losses))
