"""How every launcher of the package checks its arguments and launches a kernel: argument checks
on tensor metadata (before anything touches CUDA), CuPy on torch's device and current stream,
tensors passed as raw device addresses, and the split-K counters of the fused kernels.
Shared by api.py (gemm, dequantize), ops.py and int8.py."""

from __future__ import annotations

import functools
import operator

import torch

from . import build

ACTIVATION_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}
ALIGNMENT = 16  # bytes; every tensor is read or written with 16-byte vector accesses


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def require_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def require_layout_and_device(tensors: dict[str, torch.Tensor]) -> None:
    """Contiguous, 16-byte aligned, all on one CUDA device (checked in that order)."""
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {t.stride()})")
    for name, t in tensors.items():
        if t.data_ptr() % ALIGNMENT:
            raise ValueError(f"{name} must start at a {ALIGNMENT}-byte aligned address "
                             f"(storage offset {t.storage_offset()})")
    require_one_cuda_device(tensors)


def require_one_cuda_device(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not t.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def require_int(name: str, v: object) -> int:
    """v as a Python int: an int or a NumPy integer, not a bool, float or string."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None


# Fused split-K (splitk_fused.cuh) needs, per output tile (a column tile of the direct kernels,
# a BM x BN tile of gemm_mma), an int32 counter that is zero when a launch starts; each launch
# leaves its counters zero again. Launches on one stream never overlap, so one set per (device,
# stream) is never used by two running kernels. A set is made (zeroed) on a stream's first
# fused call. Not under CUDA-graph capture: a tensor zeroed there is only zeroed when the graph
# replays; a capturing stream without a set falls back to the reduction kernel
# (CudaGraphDecoder captures on the stream it warmed up, so it has one). A captured graph keeps
# the capture stream's set: replay it on the capture stream itself (as CudaGraphDecoder does),
# so that it never runs beside other work on that set (torch's stream pool hands the same
# stream out again after 32 others).
SPLITK_COUNTER_SLOTS = 4096  # output tiles per launch; more: the reduction kernel instead
_splitk_counter_sets: dict[tuple[int, int], torch.Tensor] = {}


def splitk_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    if tiles > SPLITK_COUNTER_SLOTS:
        return None
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    counters = _splitk_counter_sets.get(key)
    if counters is not None:  # the usual case: no more host time per launch
        return counters
    with torch.cuda.device(device):  # the capture state of `device`'s current stream
        capturing = torch.cuda.is_current_stream_capturing()
    if not capturing:
        counters = torch.zeros(SPLITK_COUNTER_SLOTS, dtype=torch.int32, device=device)
        _splitk_counter_sets[key] = counters
    return counters


class on_torch_stream:
    """Context: CuPy on the tensor's device and torch's current stream; yields device info."""

    def __init__(self, device: torch.device):
        import cupy

        index = device.index if device.index is not None else torch.cuda.current_device()
        self._device = cupy.cuda.Device(index)
        self._stream = _cupy_stream(torch.cuda.current_stream(index), index)
        self._info = build.device_info(index)

    def __enter__(self) -> tuple[str, int]:
        self._device.__enter__()
        self._stream.__enter__()
        return self._info

    def __exit__(self, *exc) -> None:
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)


@functools.lru_cache(maxsize=64)
def _cupy_stream(torch_stream: torch.cuda.Stream, device_index: int):
    """CuPy's view of a torch stream, cached (torch streams hash and compare by handle and
    device): building one per call costs host time on every launch."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)  # older CuPy/torch


INT32_MAX = 2**31 - 1


def i32(v: int):
    """A kernel's `int` argument. Out of range it is a ValueError: numpy 1.x wraps it silently
    (a wrong address in the kernel), numpy 2 raises an OverflowError naming no argument."""
    import numpy as np

    if not -INT32_MAX - 1 <= v <= INT32_MAX:
        raise ValueError(f"{v} does not fit a kernel's 32-bit int argument (a shape or stride "
                         "past 2**31-1)")
    return np.int32(v)


def _arg(a):
    """Kernel argument: a tensor goes as its device address (a 64-bit value, what a pointer
    parameter holds), so no CuPy array is built per call; the kernels only see bits."""
    import numpy as np

    if a is None:  # an optional pointer argument: nullptr
        return np.uint64(0)
    return np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a


def run(launch, arch: str, expr: str, args: tuple) -> None:
    kernel = build.get_kernel(launch.family, arch, expr)
    kernel(launch.grid, launch.block, tuple(_arg(a) for a in args))
