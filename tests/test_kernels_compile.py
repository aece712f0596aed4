"""Every CUDA source of awq_kernels compiles through NVRTC for sm_80 and sm_90 (no GPU needed),
without local memory, with the instructions each kernel was written around, and with the loop
structure measured fast (PTX counts). test_kernels_emulated.py tests their index math in NumPy."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest

from awq_kernels import build, emulate, emulate_ops
from awq_kernels.plan import (
    GEMV_DIRECT_BLOCKS_PER_SM,
    GEMV_DIRECT_VEC,
    MAX_SPLITS,
    MMA_BLOCKS_PER_SM,
    MMA_DIRECT_BLOCKS_PER_SM,
    MMA_DIRECT_DEPTH,
    gemv_direct_flush,
    mma_blocks_per_sm,
)

ARCHS = ("sm_80", "sm_90")
STATIC_SMEM_LIMIT = 48 * 1024  # static __shared__ beyond this needs an opt-in the API never does
REQUIRED_PTX = {
    "mma": ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
            "cp.async.wait_group", "lop3.b32", "prmt.b32", "fma.rn.f16x2", "fma.rn.bf16x2"),
    "gemv": ("cp.async.cg.shared.global", "lop3.b32", "fma.rn.f16x2", "fma.rn.bf16x2"),
    "gemv_direct": ("ld.global.nc.L1::no_allocate.L2::256B.v4.u32", "lop3.b32", "fma.rn.f16x2",
                    "fma.rn.bf16x2", "shfl.sync.bfly"),
    "mma_direct": ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                   "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "ld.global.nc.L1::no_allocate.L2::256B.u32", "prmt.b32", "lop3.b32",
                   "atom.global.add.u32"),
    "dequant": ("lop3.b32", "st.global.v4.b32"),
    "reduce": ("ld.global.nc.v4.f32",),
    "elementwise": ("shfl.sync.bfly", "rsqrt.approx.f32", "ex2.approx", "st.global.v4.b32",
                    "cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32"),
    "attention": ("shfl.sync.bfly", "ex2.approx", "atom.global.add.u32", "ld.global.cg.f32"),
    "gemv_int8": ("ld.global.nc.L1::no_allocate.L2::256B.v4.u32", "shfl.sync.bfly"),
}


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except (ImportError, OSError, RuntimeError) as err:  # no cupy, or no NVRTC library
        pytest.skip(f"NVRTC unavailable (pip install cupy-cuda13x nvidia-cuda-nvrtc==13.*): {err}")


@functools.cache
def _compiled(family: str, arch: str) -> build.NvrtcResult:
    return build.compile_nvrtc(family, arch)


def _function_reports(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel: stack frame, spill stores/loads, registers, static smem (ptxas -v)."""
    reports: dict[str, dict[str, int]] = {}
    for block in re.split(r"Compiling entry function ", log)[1:]:
        name = block.split("'")[1]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        assert frame and regs, f"unexpected ptxas report for {name}:\n{block}"
        reports[name] = {"stack": int(frame[1]), "spill_stores": int(frame[2]),
                         "spill_loads": int(frame[3]), "registers": int(regs[1]),
                         "smem": int(smem[1]) if smem else 0}
    return reports


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", sorted(build.SOURCES))
def test_compiles_without_local_memory(family: str, arch: str):
    _nvrtc()
    result = _compiled(family, arch)
    reports = _function_reports(result.log)
    assert set(reports) == set(result.lowered.values()), "every instantiation must be compiled"
    for name, rep in reports.items():
        assert rep["spill_stores"] == rep["spill_loads"] == 0, f"{name} spills: {rep}"
        assert rep["stack"] == 0, f"{name} uses a stack frame (local memory): {rep}"
        assert rep["smem"] <= STATIC_SMEM_LIMIT, f"{name} static smem too large: {rep}"
    assert ".local" not in result.ptx


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", sorted(build.SOURCES))
def test_ptx_has_intended_instructions(family: str, arch: str):
    _nvrtc()
    ptx = _compiled(family, arch).ptx
    missing = [ins for ins in REQUIRED_PTX[family] if ins not in ptx]
    assert not missing, f"{build.SOURCES[family]} PTX for {arch} lacks {missing}"


def test_sources_are_self_contained_after_inlining():
    for filename in build.SOURCES.values():
        text = build.load_source(filename)
        assert '#include "' not in text
        assert text.count("struct F16 {") == 1  # common.cuh inlined exactly once


def test_cuda_constants_match_the_emulation_and_their_values():
    """The emulation mirrors common.cuh's bit patterns; both must be the numbers they claim."""
    text = (build.KERNEL_DIR / "common.cuh").read_text()

    def const(name: str, where: str = text) -> int:
        return int(re.search(rf"{name} = (0x[0-9A-Fa-f]+)u;", where)[1], 16)

    def pair_bits(value: float, tag: str) -> int:  # (value, value) as two fp16 / bf16 halves
        bits = (int(np.float16(value).view(np.uint16)) if tag == "F16"
                else int(np.float32(value).view(np.uint32)) >> 16)  # exact for these values
        return bits | bits << 16

    for tag, magic in (("F16", 1024.0), ("BF16", 128.0)):
        struct = re.search(rf"struct {tag} {{(.*?)\n}};", text, re.DOTALL)[1]
        assert const("MAGIC2", struct) == pair_bits(magic, tag) == emulate.MAGIC2[tag], tag
        assert const("ONE2", struct) == pair_bits(1.0, tag) == emulate.ONE2[tag], tag
        assert const("NAN16", struct) == emulate_ops.NAN16[tag], tag
        assert np.isnan(emulate.to_f32(tag, np.array([const("NAN16", struct)], np.uint16)))[0]
    for name, value in {"SIXTEENTH2_F16": 1 / 16, "NINE_SIXTY2_F16": 960.0}.items():
        assert const(name) == pair_bits(value, "F16"), name
    assert const("SIXTEENTH2_F16") == emulate.SIXTEENTH2_F16
    assert const("NINE_SIXTY2_F16") == emulate.NINE_SIXTY2_F16
    assert const("HIGH_NIBBLE_MASK2") == emulate.HIGH_NIBBLE_MASK2 == 0x00F000F0
    assert const("NIBBLE_MASK2") == emulate.NIBBLE_MASK2


def _blocks_per_sm(registers: int, smem: int, threads: int = 256) -> int:
    """Resident blocks on an sm_90 SM (the CUDA occupancy calculator's rules, cuda_occupancy.h):
    registers allocated per warp in units of 256 from each of the 4 sub-partitions' 16,384
    (not from one pool of 65,536: 101 registers fit 4 warps per sub-partition, so 8 blocks of
    2 warps, where one pool would say 9), 64 warps, 228 KB of shared memory with 1 KB reserved
    per block, 32 blocks."""
    warps = threads // 32
    per_warp = -(-registers * 32 // 256) * 256
    warps_by_registers = 4 * (16384 // per_warp)
    return min(warps_by_registers // warps, 64 // warps, 228 * 1024 // (smem + 1024), 32)


@pytest.mark.parametrize("family,table,expr", [
    ("gemv_direct", GEMV_DIRECT_BLOCKS_PER_SM, build.gemv_direct_expr),
    ("mma_direct", MMA_DIRECT_BLOCKS_PER_SM, build.mma_direct_expr)])
def test_split_planners_know_the_resident_blocks(family, table, expr):
    """plan.py splits these kernels to fill exactly one wave of resident blocks: its table must
    be what ptxas's registers and shared memory give on sm_90, for both dtypes."""
    _nvrtc()
    result = _compiled(family, "sm_90")
    reports = _function_reports(result.log)
    for mt, blocks in table.items():
        for tag in build.DTYPE_TAGS:
            rep = reports[result.lowered[expr(tag, mt)]]
            assert _blocks_per_sm(rep["registers"], rep["smem"]) == blocks, (family, tag, mt, rep)


def test_mma_planner_knows_each_tiles_resident_blocks():
    """plan_mma never splits past one wave of the tile's resident blocks: the table holds, per
    compiled tile, the lower of fp16's and bf16's count on sm_90 (from ptxas), and no other."""
    _nvrtc()
    result = _compiled("mma", "sm_90")
    reports = _function_reports(result.log)
    assert len(MMA_BLOCKS_PER_SM) == len(build.MMA_TILES)
    for tile in build.MMA_TILES:
        counts = [_blocks_per_sm(rep["registers"], rep["smem"], tile.threads)
                  for rep in (reports[result.lowered[tile.expr(tag)]] for tag in build.DTYPE_TAGS)]
        assert mma_blocks_per_sm(tile) == min(counts), (tile, counts)


def test_fused_splitk_covers_every_planned_split_count():
    text = (build.KERNEL_DIR / "splitk_fused.cuh").read_text()
    assert int(re.search(r"SPLITK_FINISH_MAX = (\d+);", text)[1]) == MAX_SPLITS


@pytest.mark.parametrize("tile", build.MMA_TILES, ids=str)
def test_mma_k_loop_is_lean(tile, monkeypatch):
    """The tensor-core kernel's K loop, counted in PTX: per weight a lane handles, at most 5
    instructions besides the mma.sync themselves (memory-bound on an H100 needs <= ~5.5 in all
    at full issue, NOTES.md; the mma count, MI / 4 per weight, only grows with the tile's rows,
    where the kernel is compute-bound anyway). It was 12.2 (PTX; 13.2 in SASS) while every copy
    recomputed its address per k tile (H100: 10-40% of the floor at M = 16-128); the per-block
    copy plan brought it to ~3-4.6."""
    _nvrtc()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import sass_loops

    expr = tile.expr("F16")
    result = _compiled("mma", "sm_90")
    loops = sass_loops.ptx_loops(result.ptx, result.lowered[expr])
    k_loop = max(loops, key=lambda body: sum("mma.sync" in ins for ins in body))
    other = sum("mma.sync" not in ins for ins in k_loop)
    per_weight = other / sass_loops.weights_per_iteration(expr)
    print(f"{expr}: {len(k_loop)} PTX instructions per k tile, {per_weight:.2f} per weight "
          "besides mma.sync")
    assert per_weight <= 5.0


@pytest.mark.parametrize("expr", build.instantiations("attention"))
def test_decode_attention_loads_every_slot_before_the_first_score(expr):
    """attention.cu's at_scan issues the 16 keys' and 16 values' loads of a warp's slots before
    any warp reduction (one memory round trip per warp; the first version waited on each slot's
    loads in turn: 23.8 us per layer on an H100). In the PTX: the position, GM query heads and
    32 key/value loads precede the first shfl.sync."""
    _nvrtc()
    gm = int(re.search(r", (\d+)>$", expr)[1])
    result = _compiled("attention", "sm_90")
    body = result.ptx[result.ptx.index(f".entry {result.lowered[expr]}("):]
    lines = [line.strip() for line in body[:body.index("\n}\n")].splitlines()]
    first_shuffle = next(i for i, line in enumerate(lines) if "shfl.sync" in line)
    loads = [line for line in lines[:first_shuffle] if "ld.global" in line]
    assert len(loads) >= 1 + gm + 2 * 16, loads


@pytest.mark.parametrize("tile", build.MMA_TILES, ids=str)
def test_mma_tiles_fit_and_b_rows_are_conflict_free(tile):
    assert 2 <= tile.stages <= 4 and tile.stages * tile.stage_bytes <= STATIC_SMEM_LIMIT
    stride = emulate.b_stride(tile)
    for ks in range(tile.bk // 16):  # the lanes' four 4-byte loads bw[0] ... of one k16 step
        for wn in range(tile.warps_n):
            for dr in (0, 1, 8, 9):
                banks = {((ks * 16 + 2 * t + dr) * stride + wn * 8 + g) % 32
                         for t in range(4) for g in range(8)}
                assert len(banks) == 32


def test_mma_tile_mirror_matches_the_compiled_kernel():
    """build.MmaTile mirrors gemm_mma.cu's MmaTile: ptxas's static shared memory is its STAGES
    x STAGE_BYTES plus the fused split-K's 4-byte `last` flag, and the block size it was
    compiled for (__launch_bounds__, PTX .maxntid) is the `threads` the launch uses."""
    _nvrtc()
    result = _compiled("mma", "sm_90")
    reports = _function_reports(result.log)
    for tile in build.MMA_TILES:
        for tag in build.DTYPE_TAGS:
            name = result.lowered[tile.expr(tag)]
            assert reports[name]["smem"] == tile.stages * tile.stage_bytes + 4, (tile, tag)
            body = result.ptx[result.ptx.index(f".entry {name}("):]
            maxntid = re.search(r"\.maxntid (\d+), 1, 1", body[:body.index("{")])
            assert maxntid and int(maxntid[1]) == tile.threads, (tile, tag)


def _c_ternary(expr: str, **names: int) -> int:
    """Value of a C constant expression of ==, >= and nested ?: over integer names."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1].strip()
    if "?" not in expr:
        return int(eval(expr, {"__builtins__": {}}, dict(names)))  # comparisons and ints
    cond, rest = expr.split("?", 1)
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ":" and depth == 0:
            break
    return (_c_ternary(rest[:i], **names) if _c_ternary(cond, **names)
            else _c_ternary(rest[i + 1:], **names))


def test_direct_kernel_tables_match_their_sources():
    """plan.py's copies of gemv_direct.cu's GdShape::VEC and GdFlush::STEPS and mma_direct.cu's
    MdDepth::VALUE (the emulation's load widths, 16-bit flush interval and buffer rotation)
    are the values the .cu files compile with."""
    gd = (build.KERNEL_DIR / "gemv_direct.cu").read_text()
    md = (build.KERNEL_DIR / "mma_direct.cu").read_text()
    vec = re.search(r"struct GdShape \{\s*static constexpr int VEC = (.*?);", gd)[1]
    flush = re.search(r"struct GdFlush \{ static constexpr int STEPS = (.*?); \};", gd)[1]
    bf16_flush = re.search(r"struct GdFlush<BF16, MT> \{ static constexpr int STEPS = (.*?); \};",
                           gd)[1]
    depth = re.search(r"struct MdDepth \{ static constexpr int VALUE = (.*?); \};", md)[1]
    for mt in build.GEMV_DIRECT_ROWS:
        assert GEMV_DIRECT_VEC[mt] == _c_ternary(vec, MT=mt), mt
        assert gemv_direct_flush("F16", mt) == _c_ternary(flush, MT=mt), mt
        assert gemv_direct_flush("BF16", mt) == _c_ternary(bf16_flush, MT=mt), mt
    for nt, _ in build.MMA_DIRECT_CONFIGS.values():
        assert MMA_DIRECT_DEPTH[nt] == _c_ternary(depth, NT=nt), nt


def _file_constants(name: str) -> dict[str, int]:
    """The `constexpr int NAME = EXPR;` lines of a kernel file at file scope, evaluated in order
    (C integer arithmetic: / is floor division for these positive values)."""
    values: dict[str, int] = {}
    text = (build.KERNEL_DIR / name).read_text()
    for m in re.finditer(r"^constexpr int (\w+) = ([^;]+);", text, re.MULTILINE):
        values[m[1]] = int(eval(m[2].replace("/", "//"), {"__builtins__": {}}, dict(values)))
    return values


def test_plan_constants_are_the_kernel_files():
    """plan.py plans every CUDA-core and direct launch with its copies of the block geometry:
    gemv.cu's GEMV_NT / GEMV_KC / GEMV_THREADS also stand for gemv_direct.cu's GD_* and
    mma_direct.cu's MD_*, and the dequant and reduce kernels' thread counts are copied too.
    The emulation uses the same copies, so it could not see one drift: the files are read."""
    from awq_kernels import plan

    gemv, gd, md = (_file_constants(f) for f in ("gemv.cu", "gemv_direct.cu", "mma_direct.cu"))
    for nt, kc, threads in ((gemv["GEMV_NT"], gemv["GEMV_KC"], gemv["GEMV_THREADS"]),
                            (gd["GD_NT"], gd["GD_KC"], gd["GD_THREADS"]),
                            (md["MD_NT"], md["MD_KC"], md["MD_THREADS"])):
        assert (nt, kc, threads) == (plan.GEMV_NT, plan.GEMV_KC, plan.GEMV_THREADS)
    assert _file_constants("dequant.cu")["DEQUANT_THREADS"] == plan.DEQUANT_THREADS
    assert _file_constants("splitk_reduce.cu")["REDUCE_THREADS"] == plan.REDUCE_THREADS
