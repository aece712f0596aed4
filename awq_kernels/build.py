"""Kernel sources, their template instantiations, and compilation.

Two ways in:
- `compile_nvrtc(family, arch)` compiles through NVRTC alone (no GPU needed) and returns PTX,
  cubin and the ptxas log: the CPU CI uses it to check every kernel builds without spills.
- `get_kernel(family, arch, expr)` compiles through CuPy's RawModule on first use (cached per
  kernel instantiation and GPU architecture; instantiations encode the dtype) for launching.

Sources are real .cu/.cuh files beside this module. Local `#include "x.cuh"` lines are inlined
here, so the text handed to the compiler is self-contained: CuPy's on-disk cache key (the
source text) then changes whenever any included header changes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)

SOURCES = {
    "mma": "gemm_mma.cu",
    "gemv": "gemv.cu",
    "gemv_direct": "gemv_direct.cu",
    "mma_direct": "mma_direct.cu",
    "dequant": "dequant.cu",
    "reduce": "splitk_reduce.cu",
    "elementwise": "elementwise.cu",
    "attention": "attention.cu",
    "gemv_int8": "gemv_int8.cu",
}
DTYPE_TAGS = ("F16", "BF16")



@dataclass(frozen=True)
class MmaTile:
    """One compiled block tile of the tensor-core kernel (gemm_mma.cu's template parameters):
    BM x BN output, BK k rows per pipeline stage, WARPS_M x WARPS_N warps of (BM / WARPS_M) x 64."""

    bm: int
    warps_m: int
    warps_n: int
    bk: int

    @property
    def bn(self) -> int:
        return 64 * self.warps_n

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def stage_bytes(self) -> int:  # x tile + padded weight tile + one row of scales and zeros
        return 2 * self.bm * self.bk + 4 * self.bk * (self.bn // 8 + 4) + 2 * self.bn + self.bn // 2

    @property
    def stages(self) -> int:  # MmaTile::STAGES: 4, or what fits in 48 KB of static smem
        return min(4, 48 * 1024 // self.stage_bytes)

    def expr(self, tag: str) -> str:
        return f"awq_gemm_mma<{tag}, {self.bm}, {self.warps_m}, {self.warps_n}, {self.bk}>"


# The tiles `mma` and `mma_split` pick from by M (BM -> tile; BN = 128, BK = 32): what ran on
# the H200 and H100.
MMA_CONFIGS = {bm: MmaTile(bm, wm, 2, 32) for bm, wm in ((16, 1), (32, 2), (64, 2), (128, 2))}
# Wider (BN = 256) and deeper (BK = 64, group sizes 64 and 128 only) tiles, compiled for the
# tile sweep (sweep.run, `tools/bench_gemm.py --sweep-mma`) to measure against the
# ladder; not used by `auto` until measured. (64, 1, 4, 32): one warp row, so each weight is
# dequantized once for 64 rows (the ladder's BM = 64 dequantizes it twice).
MMA_SWEEP_TILES = (MmaTile(16, 1, 2, 64), MmaTile(16, 1, 4, 32), MmaTile(16, 1, 4, 64),
                   MmaTile(32, 1, 4, 32), MmaTile(32, 1, 4, 64), MmaTile(64, 1, 4, 32),
                   MmaTile(64, 2, 4, 32), MmaTile(128, 2, 4, 32))
MMA_TILES = (*MMA_CONFIGS.values(), *MMA_SWEEP_TILES)
# Row capacities MT of the GEMV kernel (M <= MT rows per launch).
GEMV_ROWS = (1, 2, 4, 8)
# Row capacities MT of the direct-load GEMV (gemv_direct.cu).
GEMV_DIRECT_ROWS = (1, 2, 4, 8)
# Row capacities MT of the direct-load tensor-core kernel (mma_direct.cu) -> (NT, WM): n8 tiles
# per warp and warps along M; MT = 8 NT WM.
MMA_DIRECT_CONFIGS = {8: (1, 1), 16: (2, 1), 32: (4, 1), 64: (4, 2)}
# Row capacities MT of the 8-bit lm_head GEMV (gemv_int8.cu, awq_kernels.int8).
GEMV_INT8_ROWS = (1, 2, 4, 8)
# Kernels of elementwise.cu (awq_kernels.ops), each templated on the dtype tag only.
ELEMENTWISE_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "rotary", "rotary_into_cache")
ATTENTION_HEAD_DIMS = (64, 128)  # decode_attention<T, Dh, GM> (attention.cu)
ATTENTION_GROUPS = (4, 8)  # GM: query heads per KV head held in registers (>= the model's)
COMPILE_OPTIONS = ("-std=c++17",)


def load_source(filename: str) -> str:
    """Source text of `filename` with local includes inlined (each header once)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (KERNEL_DIR / name).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


def mma_expr(tag: str, tile: MmaTile) -> str:
    return tile.expr(tag)


def gemv_expr(tag: str, mt: int) -> str:
    return f"awq_gemv<{tag}, {mt}>"


def gemv_direct_expr(tag: str, mt: int) -> str:
    return f"awq_gemv_direct<{tag}, {mt}>"


def mma_direct_expr(tag: str, mt: int) -> str:
    nt, wm = MMA_DIRECT_CONFIGS[mt]
    return f"awq_mma_direct<{tag}, {nt}, {wm}>"


def attention_expr(tag: str, dh: int, gm: int) -> str:
    return f"decode_attention<{tag}, {dh}, {gm}>"


def elementwise_expr(op: str, tag: str) -> str:
    return f"{op}<{tag}>"


def gemv_int8_expr(tag: str, mt: int) -> str:
    return f"gemv_int8<{tag}, {mt}>"


def dequant_expr(tag: str) -> str:
    return f"awq_dequant<{tag}>"


def reduce_expr(tag: str) -> str:
    return f"splitk_reduce<{tag}>"


def instantiations(family: str) -> list[str]:
    """Every template instantiation the API may launch from `family`."""
    per_tag = {
        "mma": lambda tag: [mma_expr(tag, tile) for tile in MMA_TILES],
        "gemv": lambda tag: [gemv_expr(tag, mt) for mt in GEMV_ROWS],
        "gemv_direct": lambda tag: [gemv_direct_expr(tag, mt) for mt in GEMV_DIRECT_ROWS],
        "mma_direct": lambda tag: [mma_direct_expr(tag, mt) for mt in MMA_DIRECT_CONFIGS],
        "dequant": lambda tag: [dequant_expr(tag)],
        "reduce": lambda tag: [reduce_expr(tag)],
        "elementwise": lambda tag: [elementwise_expr(op, tag) for op in ELEMENTWISE_OPS],
        "attention": lambda tag: [attention_expr(tag, dh, gm) for dh in ATTENTION_HEAD_DIMS
                                  for gm in ATTENTION_GROUPS],
        "gemv_int8": lambda tag: [gemv_int8_expr(tag, mt) for mt in GEMV_INT8_ROWS],
    }[family]
    return [expr for tag in DTYPE_TAGS for expr in per_tag(tag)]


@dataclass(frozen=True)
class NvrtcResult:
    ptx: str
    cubin: bytes
    log: str
    lowered: dict[str, str]  # name expression -> mangled kernel name


def compile_nvrtc(family: str, arch: str, exprs: list[str] | None = None) -> NvrtcResult:
    """Compile `family` for `arch` (e.g. "sm_90") with NVRTC; ptxas runs verbosely."""
    from cupy_backends.cuda.libs import nvrtc

    exprs = instantiations(family) if exprs is None else exprs
    prog = nvrtc.createProgram(load_source(SOURCES[family]), SOURCES[family], [], [])
    try:
        for expr in exprs:
            nvrtc.addNameExpression(prog, expr)
        options = [*COMPILE_OPTIONS, f"--gpu-architecture={arch}", "--ptxas-options=-v"]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as err:
            raise RuntimeError(f"{SOURCES[family]} failed for {arch}:\n"
                               f"{nvrtc.getProgramLog(prog)}") from err
        return NvrtcResult(
            ptx=nvrtc.getPTX(prog).decode(),
            cubin=nvrtc.getCUBIN(prog),
            log=nvrtc.getProgramLog(prog),
            lowered={expr: nvrtc.getLoweredName(prog, expr) for expr in exprs},
        )
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def get_kernel(family: str, arch: str, expr: str):
    """CuPy RawKernel for one instantiation; `arch` (the device's, e.g. "90") keys the cache.

    CuPy compiles for the current device, so callers enter that device first.
    """
    import cupy

    module = cupy.RawModule(code=load_source(SOURCES[family]), options=COMPILE_OPTIONS,
                            name_expressions=[expr])
    return module.get_function(expr)


@functools.cache
def device_info(device_index: int) -> tuple[str, int]:
    """(compute capability as "90", multiprocessor count) of a CUDA device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_index)
    return f"{props['major']}{props['minor']}", int(props["multiProcessorCount"])
