"""The public entry point: quantize a Llama with RTN or AWQ, packed or fake."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from awq_ref.config import LlamaConfig
from awq_ref.fuse import is_fused
from awq_ref.model import Block
from awq_ref.quant.checkpoint import check_fused_skip, quant_config_dict
from awq_ref.quant.packing import check_linear, check_packable
from awq_ref.quant.qlinear import (
    check_changeable,
    check_not_quantized,
    decoder_linears,
    skip_names,
    skipped,
)
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import apply_rtn

METHODS = ("rtn", "awq")


def check_quantizable(model: nn.Module, spec: QuantSpec, skip: tuple[str, ...] = (),
                      pack: bool = True) -> None:
    """ValueError unless every decoder linear (but `skip`) can be quantized with `spec` (packed:
    4 bits, whole words of codes, and a checkpoint vLLM can load)."""
    _check_linears(decoder_linears(model, skip), len(model.model.layers), spec, skip, pack,
                   "quantize", hint="; use pack=False (fake quantization)")


def check_quantizable_config(config: LlamaConfig, spec: QuantSpec, skip: tuple[str, ...] = (),
                             pack: bool = True, where: str = "quantize", hint: str = "") -> None:
    """check_quantizable from a config alone, before any weight is read: one block built on the
    meta device stands for all (every block has the same linears), so even a config claiming
    billions of layers costs nothing here."""
    with torch.device("meta"):
        block = Block(config, 0)
    linears = [(f"model.layers.{i}.{n}", m) for n, m in block.named_modules()
               if isinstance(m, nn.Linear)
               and (i := _first_quantized(n, config.num_hidden_layers, skip)) is not None]
    _check_linears(linears, config.num_hidden_layers, spec, skip, pack, where, hint)


def _first_quantized(name: str, num_layers: int, skip: tuple[str, ...]) -> int | None:
    """The first layer whose linear `name` is quantized (a skip entry may name one layer only:
    "layers.0.mlp.down_proj"), None if every layer keeps it. An entry without digits matches
    every layer's `name` alike, so no loop over a config's claimed layer count is needed then."""
    if skipped(f"model.layers.0.{name}", [k for k in skip if not any(c.isdigit() for c in k)]):
        return None
    return next((i for i in range(num_layers) if not skipped(f"model.layers.{i}.{name}", skip)),
                None)


def _check_linears(linears: list[tuple[str, nn.Linear]], num_layers: int, spec: QuantSpec,
                   skip: tuple[str, ...], pack: bool, where: str, hint: str) -> None:
    if pack:  # a packed model is what a checkpoint holds: it must be one vLLM can load
        check_packable(spec, where)
        check_fused_skip(num_layers, skip, where)
    g = spec.group_size
    for name, lin in linears:
        if g > 0 and lin.in_features % g:  # the usual mistake: say which group size would do
            widths = {other.in_features for _, other in linears}
            fits = [f for f in (128, 64, 32) if all(k % f == 0 for k in widths)]
            raise ValueError(f"{name}: group_size {g} does not divide in_features "
                             f"{lin.in_features}; group_size {fits[0] if fits else -1} fits "
                             f"every layer of this model")
        check_linear(spec, name, lin.in_features, lin.out_features, pack, hint)


def quantize(model: nn.Module, method: str = "rtn", w_bit: int = 4, group_size: int = 128,
             zero_point: bool = True, modules_to_not_convert: Iterable[str] = (),
             pack: bool = True, inplace: bool = False, **kwargs: Any) -> nn.Module:
    """A quantized copy of `model` (or `model` itself, modified, with inplace=True).

    method "rtn": round-to-nearest. method "awq": first
    `awq_ref.awq.pipeline.run_awq(model, spec, modules_to_not_convert=..., **kwargs)` folds the
    searched scales and clipping into the fp weights (kwargs: calib_tokens (B, T), device,
    result=AwqResult to re-apply a saved search, AwqConfig fields), and the same rounding runs
    on each block right after its fold, while the block is in fp32 (apply_awq's `then`).

    pack=True swaps decoder nn.Linear layers for QuantLinear (4 bits only; the result carries a
    `quantization_config` attribute for `save_quantized`); pack=False keeps nn.Linear with
    fake-quantized weights (bits 2..8), e.g. to evaluate W3.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if method == "rtn" and kwargs:
        raise TypeError(f"method 'rtn' takes no extra arguments, got {sorted(kwargs)}")
    spec = QuantSpec(bits=w_bit, group_size=group_size, zero_point=zero_point)
    if is_fused(model):
        raise ValueError("quantize: the model's projections are fused (awq_ref.fuse), a run-time "
                         "form; quantize the model as loaded, then fuse")
    check_not_quantized(model, "quantize")
    skip = skip_names(modules_to_not_convert, "quantize")
    # Check every layer before touching any, so a bad setting never leaves a half-quantized model.
    check_quantizable(model, spec, skip, pack)
    if not inplace:
        model = copy.deepcopy(model)  # normal tensors, even of a model made in inference_mode
    elif method == "awq" or not pack:  # scales, clips or fake quantization change weights
        check_changeable(model, "quantize(inplace=True)")
    if method == "awq":
        from awq_ref.awq.pipeline import run_awq  # here: RTN users never load the AWQ package

        # each block rounded right after its fold, while it is in fp32 (see apply_awq)
        model = run_awq(model, spec, modules_to_not_convert=skip,
                        then=lambda i: apply_rtn(model, spec, skip, pack=pack, block=i), **kwargs)
    else:
        model = apply_rtn(model, spec, skip, pack=pack)
    if pack:
        model.quantization_config = quant_config_dict(spec, skip)
    return model
