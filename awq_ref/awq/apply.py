"""Fold searched scales and clip ranges into a full-precision model (the apply_* functions mutate).

Scaling (exact in real arithmetic): for y = W x with x = prev(...),
    y = (W diag(s)) (x / s),
so prev's output channels are divided by s and the linears' input columns multiplied by s.
Clipping: each (output channel, group) of a linear is clamped to its searched [lo, hi], so a
later round-to-nearest quantization uses exactly the searched range.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from awq_ref.awq.result import AwqResult
from awq_ref.awq.scaling_groups import LLAMA_GROUPS, expand_kv
from awq_ref.quant.qlinear import check_changeable, skip_names, skipped
from awq_ref.quant.quantizer import clamp_groups


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor,
                n_rep: int = 1, head_dim: int = 0) -> None:
    """prev output /= s; linears' input columns *= s (s expanded over query heads if n_rep > 1).

    prev is an RMSNorm (1-D weight) or an nn.Linear (rows of weight and bias).
    """
    s_in = expand_kv(s, n_rep, head_dim)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight)[:, None])  # (N, K) rows
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        prev.weight.div_(s.to(prev.weight))  # (D,)
    for lin in linears:
        if lin.in_features != s_in.numel():
            raise ValueError(f"scale of size {s_in.numel()} does not match in_features "
                             f"{lin.in_features} of {lin}")
        lin.weight.mul_(s_in.to(lin.weight)[None, :])


@torch.no_grad()
def apply_clip(linear: nn.Linear, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Clamp each group of the weight (N, K) to [lo, hi] (N, K/G); never increases |w|."""
    w = linear.weight
    w.copy_(clamp_groups(w, lo.to(w), hi.to(w)))


def apply_awq(model: nn.Module, result: AwqResult, clip: bool = True,
              modules_to_not_convert: Iterable[str] = (),
              then: Callable[[int], None] | None = None) -> None:
    """Fold `result` into the fp `model` (scales, then clips): RTN afterwards gives the AWQ model.

    Block by block, each in fp32 while it is folded: a bf16 or fp16 block is cast back after
    (a block's floating tensors share one dtype, as the loaders make them), so its folded
    weights are rounded once to its dtype. `then(i)`, if given, runs right after block i is
    folded, still in fp32: api.quantize rounds the block there, so the folded weights
    W diag(s), clipped, reach the quantizer exactly, not first rounded to bf16 (which moved
    1.7% of the codes; on stories260K W4, KL 0.0925 against 0.0904); one block at a time is in
    fp32.

    Clip ranges are per (output channel, group of result.spec.group_size inputs) and were chosen
    for result.spec.bits; for another bit width, re-applying the scales alone (clip=False) or
    with the clips are both valid, the clips being tuned for the searched width. Linears named
    by modules_to_not_convert stay full precision, so they get no clip (a result searched with
    fewer skipped modules has one for them); their scales are exact and still applied.
    Every name and shape is checked first: a result of another model changes nothing. A model
    a result was folded into is marked (`model.awq_applied`, kept by copy.deepcopy) and refused:
    a second fold (a notebook cell run twice) would scale twice and clip the twice-scaled
    weights to boxes searched for the once-scaled ones, a silently worse model.
    """
    scales, clips = _steps(model, result, clip,
                           skip_names(modules_to_not_convert, "apply_awq"))
    check_changeable(model, "apply_awq")
    check_not_applied(model, "apply_awq")
    model.awq_applied = True  # before the first change: a fold cut short is refused too
    layers = model.model.layers
    block_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for i, layer in enumerate(layers):
        dtypes = {n: t.dtype for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
        layer.float()
        try:
            for prev, linears, s, n_rep in scales:
                if block_of[id(prev)] == i:
                    apply_scale(prev, linears, s, n_rep, model.config.head_dim)
            for linear, lo, hi in clips:
                if block_of.get(id(linear)) == i:
                    apply_clip(linear, lo, hi)
            if then is not None:
                then(i)
        finally:
            _restore_dtypes(layer, dtypes)
    for linear, lo, hi in clips:  # a linear outside the blocks (a result edited by hand)
        if id(linear) not in block_of:
            apply_clip(linear, lo, hi)


def _restore_dtypes(layer: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Each parameter and buffer of `layer` back to its dtype of before (by name): a bf16
    block's folded tensors rounded once; tensors `then` made (a QuantLinear's packed ones and
    fp16 scales) stay as they are, and a linear's bias moved into its QuantLinear goes back."""
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        want = dtypes.get(name)
        if want is None or t.dtype == want:
            continue
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner)
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(want)
        else:
            setattr(module, leaf, t.to(want))


def check_not_applied(model: nn.Module, where: str) -> None:
    """ValueError if a search result was already folded into `model` (apply_awq's mark)."""
    if getattr(model, "awq_applied", False):
        raise ValueError(f"{where}: a search result is already folded into this model; fold "
                         "it into the fp model as loaded (a fresh copy), not twice")


def check_result_fits(model: nn.Module, result: AwqResult) -> None:
    """ValueError unless every scale and clip range of `result` fits a layer of `model`."""
    _steps(model, result, True, ())


def _steps(model: nn.Module, result: AwqResult, clip: bool, skip: tuple[str, ...]
           ) -> tuple[list[tuple[nn.Module, list[nn.Linear], torch.Tensor, int]],
                      list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]]:
    """apply_awq's scalings (prev, linears, s, n_rep) and clips (linear, lo, hi), checked."""
    cfg = model.config
    scales, names = [], set()
    # A fixed order (block, then the table's order) so re-applying is bit-for-bit repeatable.
    for i, layer in enumerate(model.model.layers):
        for group in LLAMA_GROUPS:
            name = f"model.layers.{i}.{group.prev}"
            if name not in result.scales:
                continue
            prev, s = layer.get_submodule(group.prev), result.scales[name]
            if tuple(s.shape) != (prev.weight.shape[0],):  # prev's output channels
                raise ValueError(f"AwqResult: the scale of {name} has shape {tuple(s.shape)}, "
                                 f"which does not fit its {prev.weight.shape[0]} channels")
            scales.append((prev, [layer.get_submodule(x) for x in group.linears], s,
                           group.n_rep(cfg)))
            names.add(name)
    unknown = sorted(set(result.scales) - names)
    if unknown:
        raise ValueError(f"AwqResult: scales {unknown[:3]} name no scaling group of this model")
    clips = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, (lo, hi) in result.clips.items() if clip else ():
        if skipped(name, skip):
            continue
        linear = linears.get(name)
        if linear is None:
            raise ValueError(f"AwqResult: a clip range names {name}, no linear of this model")
        n, k = linear.weight.shape
        if lo.shape != hi.shape or lo.dim() != 2 or lo.shape[0] != n or k % lo.shape[1]:
            raise ValueError(f"AwqResult: clip range of {name} has shape {tuple(lo.shape)}, "
                             f"which does not fit its weight ({n}, {k})")
        clips.append((linear, lo, hi))
    return scales, clips
