"""The QuantLinear backend chosen by name: "torch" (the reference: dequantize, then matmul) or
"cupy" (awq_kernels' int4 GEMM/GEMV, CUDA only).

awq_kernels is imported here, inside the function, and only when "cupy" is asked for: the
reference package never needs it to load, and choosing the backend is an argument.
"""

from __future__ import annotations

import torch

from awq_ref.quant.qlinear import Kernel, QuantLinear

BACKENDS = ("torch", "cupy")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # the activations awq_kernels.gemm takes
MIN_CAPABILITY = (8, 0)  # the oldest GPU architecture awq_kernels' sources compile for


def check_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise ValueError saying what is missing when `name` cannot run on (device, dtype)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "torch":
        return
    if not torch.cuda.is_available():
        raise ValueError("backend 'cupy' runs the awq_kernels CUDA kernels and needs a CUDA "
                         "device, but torch sees none (torch.cuda.is_available() is False); "
                         "use the 'torch' backend on this machine")
    if torch.device(device).type != "cuda":
        raise ValueError(f"backend 'cupy' needs the model on a CUDA device, got device "
                         f"{str(device)!r} (pass --device cuda)")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend 'cupy' needs float16 or bfloat16 activations, got {dtype} "
                         "(pass --dtype float16)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:  # cp.async, L2 prefetch hints, cvt to f16x2: PTX for sm_80
        raise ValueError(f"backend 'cupy' needs a GPU of compute capability "
                         f"{'.'.join(map(str, MIN_CAPABILITY))} or later (Ampere, Hopper, ...); "
                         f"{torch.cuda.get_device_name(device)} has "
                         f"{'.'.join(map(str, capability))}: use the 'torch' backend")
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise ValueError(f"backend 'cupy' needs CuPy (pip install cupy-cuda13x): {e}") from e


def backend_kernel(name: str, device: torch.device | str, dtype: torch.dtype) -> Kernel | None:
    """The kernel to install with `apply_kernel`: None for "torch", awq_kernels.gemm for "cupy".
    Checks first (see `check_backend`)."""
    check_backend(name, device, dtype)
    if name == "torch":
        return None
    import awq_kernels  # here, not at the top: see the module docstring

    return awq_kernels.gemm


def check_kernel_layers(name: str, model: torch.nn.Module) -> None:
    """ValueError naming the first QuantLinear that backend `name` cannot run (awq_kernels:
    group sizes 32, 64, 128 and N a multiple of 64), when it is installed, not at the first
    forward. The "torch" reference runs any layer of the format."""
    if name != "cupy":
        return
    from awq_kernels.api import check_packed  # touches no device

    for layer, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                check_packed(m.qweight, m.qzeros, m.scales, m.group_size)
            except ValueError as e:
                raise ValueError(f"backend 'cupy' cannot run {layer}: {e}; use the 'torch' "
                                 "backend for this model") from None


def backend_int8_kernel(name: str, device: torch.device | str, dtype: torch.dtype):
    """The kernel to install with `awq_ref.quant.int8_head.apply_int8_kernel`: None for "torch",
    awq_kernels.int8.gemm_int8 for "cupy". Checks first (see `check_backend`)."""
    check_backend(name, device, dtype)
    if name == "torch":
        return None
    import awq_kernels.int8  # here, not at the top: see the module docstring

    return awq_kernels.int8.gemm_int8


def backend_elementwise_ops(name: str, device: torch.device | str, dtype: torch.dtype):
    """The element-wise kernels to install with `awq_ref.fuse.use_elementwise_kernels`: None for
    "torch", awq_kernels.ops for "cupy". Checks first (see `check_backend`)."""
    check_backend(name, device, dtype)
    if name == "torch":
        return None
    import awq_kernels.ops  # here, not at the top: see the module docstring

    return awq_kernels.ops
