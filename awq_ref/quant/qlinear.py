"""QuantLinear: a linear layer stored in the packed 4-bit format, and the swap that installs it.

    y = x @ W + b,   W [K, N] = dequantize_packed(qweight, qzeros, scales, G)

The reference backend dequantizes W in the activation dtype and calls matmul. A faster backend
is chosen by argument: `apply_kernel(model, fn)` stores `fn` on every QuantLinear, and forward
then calls `fn(x, qweight, qzeros, scales, group_size) -> y` (this package never imports one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from awq_ref.quant.packing import (
    PACK_NUM,
    check_packable,
    check_packed_shapes,
    dequantize_packed,
    pack_weight,
)
from awq_ref.quant.quantizer import QuantSpec

# kernel(x [..., K] fp16/bf16, qweight, qzeros, scales, group_size) -> y [..., N] in x's dtype
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class QuantLinear(nn.Module):
    """Buffers named like the checkpoint keys: qweight [K, N/8] int32, qzeros [K/G, N/8] int32,
    scales [K/G, N] float16, and bias [N] (or None). The constructor only allocates."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        g = in_features if group_size == -1 else group_size
        if g <= 0 or in_features % g:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        if out_features % PACK_NUM:
            raise ValueError(f"out_features {out_features} is not a multiple of {PACK_NUM}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, g
        k, n = in_features, out_features
        self.register_buffer("qweight", torch.zeros(k, n // PACK_NUM, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(k // g, n // PACK_NUM, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(k // g, n, dtype=torch.float16, device=device))
        self.register_buffer("bias",
                             torch.zeros(n, dtype=bias_dtype, device=device) if bias else None)
        self.kernel: Kernel | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, name: str = "linear") -> QuantLinear:
        """RTN-quantize and pack `linear.weight` (N, K); see `packing.pack_weight`."""
        check_packable(spec, name)
        w = linear.weight.detach()
        ql = cls(linear.in_features, linear.out_features, spec.group_for(w.shape[1], name),
                 bias=linear.bias is not None, device=w.device, bias_dtype=w.dtype)
        ql.qweight, ql.qzeros, ql.scales = pack_weight(w, spec, name)
        if linear.bias is not None:
            ql.bias = linear.bias.detach().clone()
        return ql

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None, name: str = "layer"
                    ) -> QuantLinear:
        """Wrap existing packed tensors (no copy) after checking them against the format."""
        k, n = qweight.shape[0], scales.shape[-1]
        g = k if group_size == -1 else group_size
        check_packed_shapes(qweight, qzeros, scales, k, n, g, name)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"{name}.bias: shape {tuple(bias.shape)}, expected ({n},)")
        ql = cls(k, n, g, bias=False, device="meta")
        ql.qweight, ql.qzeros, ql.scales, ql.bias = qweight, qzeros, scales, bias
        return ql

    def weight_kn(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight W [K, N] (= nn.Linear.weight.T) in `dtype`."""
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> y (..., N)
        if self.kernel is not None:
            y = self.kernel(x, self.qweight, self.qzeros, self.scales, self.group_size)
        else:
            y = x @ self.weight_kn(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) would round the fp16 scales (lossy for bf16): keep their values and
        # let them follow only the device move.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        backend = "reference" if self.kernel is None else getattr(self.kernel, "__name__", "kernel")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={backend}")


def skipped(name: str, modules_to_not_convert: Iterable[str]) -> bool:
    """HF's rule: a module stays unquantized if any entry is a substring of its full name."""
    return any(key in name for key in modules_to_not_convert)


def skip_names(modules_to_not_convert: Iterable[str], where: str) -> tuple[str, ...]:
    """modules_to_not_convert as a tuple; TypeError for one string, which would be read as its
    characters (every linear's name holds some of them: nothing would be quantized)."""
    if isinstance(modules_to_not_convert, str):
        raise TypeError(f"{where}: modules_to_not_convert must be a list of names, got the string "
                        f"{modules_to_not_convert!r} (write [{modules_to_not_convert!r}])")
    return tuple(modules_to_not_convert)


def check_not_quantized(model: nn.Module, where: str) -> None:
    """ValueError if `model` already holds packed layers (a quantized checkpoint loaded back):
    its 4-bit codes are no weights to search or round again; or if it has no weights yet (built
    on the meta device and never loaded: torch would say so only deep in the first check)."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"{where}: the model's {meta} is on the meta device (no values); load "
                         "its weights first (load_state_dict(..., assign=True))")
    packed = [n for n, m in model.model.layers.named_modules() if isinstance(m, QuantLinear)]
    if packed:
        raise ValueError(f"{where}: the model is already quantized ({len(packed)} packed layers, "
                         f"model.layers.{packed[0]} first); quantize its fp original instead")


def check_changeable(model: nn.Module, where: str) -> None:
    """ValueError if `model`'s weights are inference tensors (made under torch.inference_mode()):
    torch refuses to change them in place outside that mode, which folding scales and clips
    (and fake quantization) does; said here, before a search, in words."""
    if torch.is_inference_mode_enabled():  # inside the mode, torch allows it
        return
    frozen = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if frozen is not None:
        raise ValueError(f"{where}: the model's {frozen} was made under torch.inference_mode(), "
                         "so it cannot be changed in place; build or load the model outside "
                         "inference_mode (or quantize a copy: inplace=False)")


def decoder_linears(model: nn.Module, modules_to_not_convert: Iterable[str] = (),
                    block: int | None = None) -> list[tuple[str, nn.Linear]]:
    """(full name, module) of every nn.Linear inside `model.model.layers` (block: only inside
    that one) that is quantized: embeddings and lm_head are never, and names matching
    `modules_to_not_convert` are left out (they stay full precision)."""
    skip = tuple(modules_to_not_convert)
    inside = "" if block is None else f"{block}."
    return [(f"model.layers.{name}", m) for name, m in model.model.layers.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(inside)
            and not skipped(f"model.layers.{name}", skip)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def replace_linears(model: nn.Module, spec: QuantSpec, modules_to_not_convert: Iterable[str] = (),
                    init_only: bool = False, block: int | None = None) -> nn.Module:
    """Swap (in place) every decoder nn.Linear for a QuantLinear; returns `model`.

    With init_only the QuantLinear layers are only allocated on the Linear's device (use with a
    model on the meta device, then assign the packed tensors); otherwise each weight is RTN
    quantized and packed.
    """
    check_packable(spec, "replace_linears")
    for name, lin in decoder_linears(model, modules_to_not_convert, block):
        if init_only:
            g = spec.group_for(lin.in_features, name)
            q = QuantLinear(lin.in_features, lin.out_features, g, bias=lin.bias is not None,
                            device=lin.weight.device, bias_dtype=lin.weight.dtype)
        else:
            q = QuantLinear.from_linear(lin, spec, name)
        _set_submodule(model, name, q)
    return model


def apply_kernel(model: nn.Module, kernel: Kernel | None) -> int:
    """Set (in place) the backend of every QuantLinear in `model`; None = the reference path.
    Returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.kernel = kernel
    return len(layers)
