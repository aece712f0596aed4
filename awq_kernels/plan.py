"""Which kernel, tile config, grid and split-K factor a product of a given shape gets.

Pure Python (no torch, no CUDA) so the dispatch rules are unit-tested on CPU. The constants
mirror the named tile constants of the .cu files; build.py holds the compiled configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .build import GEMV_DIRECT_ROWS, GEMV_ROWS, MMA_CONFIGS, MMA_DIRECT_CONFIGS, MmaTile

KERNELS = ("auto", "auto_direct", "gemv", "gemv_direct", "mma", "mma_split", "mma_direct",
           "dequant", "dequant_overlap")
GROUP_SIZES = (32, 64, 128)
N_MULTIPLE = 64           # WARP_N of gemm_mma.cu: a warp's 64 columns are all valid or all not
K_MULTIPLE = 32           # BK of gemm_mma.cu and GEMV_KC of gemv.cu

MMA_BK, MMA_BN = 32, 128  # the ladder's tiles (build.MMA_CONFIGS); a sweep tile has its own
# also GD_NT / GD_KC / GD_THREADS (gemv_direct.cu) and MD_NT / MD_KC / MD_THREADS (mma_direct.cu)
GEMV_NT, GEMV_KC, GEMV_THREADS = 256, 32, 256
DEQUANT_THREADS, REDUCE_THREADS = 256, 256

GEMV_MAX_M = max(GEMV_ROWS)   # the most rows kernel="gemv" takes (`auto` no longer picks it)
# gemv_direct.cu: packed words per lane load by row capacity MT (GdShape::VEC), and how many
# steps its 16-bit accumulators run before a flush into fp32 (GdFlush::STEPS).
GEMV_DIRECT_VEC = {1: 4, 2: 2, 4: 1, 8: 1}


def gemv_direct_flush(tag: str, mt: int) -> int:
    """GdFlush<T, MT>::STEPS: steps per chunk of gemv_direct.cu."""
    return 4 if tag == "BF16" or mt >= 8 else 8


GEMV_DIRECT_MAX_M = max(GEMV_DIRECT_ROWS)
# mma_direct.cu: n8 tiles NT -> chunks in flight per warp (MdDepth); row capacities in build.
MMA_DIRECT_DEPTH = {1: 3, 2: 2, 4: 4}
MMA_DIRECT_MAX_M = max(MMA_DIRECT_CONFIGS)  # rows per launch; more rows: one launch per 64
# auto_direct's upper bound for mma_direct: predicted faster than dequantize + cuBLAS up to about
# M = 128; measured on an H100 it was not (1.46-2.66x slower than the best from M = 32 on;
# dispatch.DEFAULT is `auto`).
MMA_DIRECT_AUTO_MAX_M = 128
MAX_SPLITS = 16               # bounds the fp32 partial-sum traffic of split-K
MIN_K_TILES_PER_SPLIT = 4     # a split shorter than the pipeline mostly waits

# Blocks of gemv_direct.cu / mma_direct.cu resident on one SM, by row capacity: 256 threads at
# the registers ptxas gives them for sm_90 (16,384 in each of an SM's 4 sub-partitions, a warp's
# all from one; tests/test_kernels_compile.py checks these against its report,
# tests/test_kernels_gpu.py against the driver's occupancy). Their split-K fills exactly one
# wave of such blocks (see `_splits_in_one_wave`).
GEMV_DIRECT_BLOCKS_PER_SM = {1: 2, 2: 2, 4: 2, 8: 1}     # 121-128 registers; MT = 8: 156-166
MMA_DIRECT_BLOCKS_PER_SM = {8: 2, 16: 2, 32: 1, 64: 1}   # 128 registers; NT = 4: 222
# The same for gemm_mma.cu by block tile (BM, WARPS_M, WARPS_N, BK), the lower of fp16 and
# bf16: its split-K never plans past one wave of them either (plan_mma).
MMA_BLOCKS_PER_SM = {(16, 1, 2, 32): 8, (32, 2, 2, 32): 5, (64, 2, 2, 32): 3, (128, 2, 2, 32): 2,
                     (16, 1, 2, 64): 7, (16, 1, 4, 32): 4, (16, 1, 4, 64): 4, (32, 1, 4, 32): 3,
                     (32, 1, 4, 64): 3, (64, 1, 4, 32): 2, (64, 2, 4, 32): 1, (128, 2, 4, 32): 1}


def mma_blocks_per_sm(tile: MmaTile) -> int:
    return MMA_BLOCKS_PER_SM[(tile.bm, tile.warps_m, tile.warps_n, tile.bk)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a `family` (build.SOURCES); build.*_expr names its template
    instantiation from the dtype tag and `config` / `tile`."""

    family: str                 # build.SOURCES key: "mma", "gemv", "mma_direct", ...
    config: int                 # BM for mma, MT (row capacity) for the others, else 0
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    splits: int = 1             # > 1: fp32 partials over K, summed in the same launch
                                # (splitk_fused.cuh) or by a "reduce" launch after it
    k_per_split: int = 0        # per split: k tiles of tile.bk rows (mma); units of GEMV_KC
                                # rows (gemv, gemv_direct, mma_direct)
    tile: MmaTile | None = None  # mma: the block tile (its BK is the k tile)


def _splits(tiles: int, k_steps: int, target_blocks: int,
            max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(splits, k steps per split) so that tiles * splits reaches target_blocks (see _cut_k)."""
    return _cut_k(k_steps, min(cdiv(target_blocks, tiles), max_splits))


def _splits_in_one_wave(tiles: int, k_steps: int, slots: int,
                        max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """The most splits whose blocks (tiles x splits) still fit in one wave of `slots` resident
    blocks (one split if the tiles alone fill it), as `_splits` otherwise.

    Why not more: a block of the direct kernels is one short latency chain (its loads, its
    sums, the split-K tail), so blocks past one wave wait for a whole chain and then run with
    the GPU nearly idle. Measured on the H100 at M = 1 (docs/gpu/h100-2026-12-05, 264 slots,
    splits then chosen for 4 blocks per SM): the line through the two one-wave shapes
    (4096x4096, 14336x4096) is 9.8 us + bytes / 2.97 TB/s, and the others ran over it by
    2.4 us (4096x6144, 1.45 waves), 6.5 (4096x14336, 2.12), 5.7 (5120x13824, 2.05) and 8.5
    (8192x28672, 2.12), but 0.4 (28672x8192, 1.94: two full waves); 14336x4096 took 20.1 us and
    4096x14336, the same bytes, 26.6 (torch's int4 kernel: 20.9 and 20.2)."""
    return _cut_k(k_steps, min(max(1, slots // tiles), max_splits))


def _cut_k(k_steps: int, want: int) -> tuple[int, int]:
    """(splits, k steps per split) for at most `want` splits, all non-empty; every split but
    the last is at least MIN_K_TILES_PER_SPLIT long where K allows (the last holds what is left:
    K = 416 rows of 32 into 3 splits gives 5, 5 and 3 steps)."""
    want = max(1, min(want, k_steps // MIN_K_TILES_PER_SPLIT))
    per_split = cdiv(k_steps, want)
    return cdiv(k_steps, per_split), per_split


# "mma_split": split K up to this many blocks per SM (`auto` at M 9..64)
MMA_SPLIT_BLOCKS_PER_SM = 4


def check_mma_tile(tile: MmaTile, group_size: int) -> None:
    """A tile's k tile must lie in one group (gemm_mma.cu: G % BK == 0)."""
    if group_size % tile.bk:
        raise ValueError(f"mma tile {tile} needs group_size a multiple of BK = {tile.bk}, "
                         f"got {group_size}")


def plan_mma(m: int, n: int, k: int, num_sms: int, blocks_per_sm: int = 0,
             tile: MmaTile | None = None, max_splits: int = MAX_SPLITS) -> Launch:
    """Without `tile`: the smallest ladder BM (16..128) holding M, halved (not below 32) while
    the tiles number fewer than the SMs (so SMs may stay idle: M = 100, N = 4096 gives 128
    blocks on 132 SMs); split K
    when far fewer tiles than SMs, or (blocks_per_sm > 0) until about blocks_per_sm blocks per
    SM: at M = 16 the tiles alone give under 2 warps per SM (2 warps per block), too few to
    keep loads in flight. Never past one wave of the tile's resident blocks (a tile with 1-3 of
    them per SM would otherwise run 1.3-4 waves, and the sweep would rank it on that)."""
    if tile is None:
        n_tiles = cdiv(n, MMA_BN)
        bm = min(max(MMA_CONFIGS), max(min(MMA_CONFIGS), 1 << (m - 1).bit_length()))
        while bm > 32 and cdiv(m, bm) * n_tiles < num_sms:
            bm //= 2
        tile = MMA_CONFIGS[bm]
    n_tiles = cdiv(n, tile.bn)
    tiles = cdiv(m, tile.bm) * n_tiles
    k_steps = k // tile.bk
    splits, per_split = (1, k_steps)
    one_wave = min(max_splits, max(1, mma_blocks_per_sm(tile) * num_sms // tiles))
    if blocks_per_sm and tiles < blocks_per_sm * num_sms:
        splits, per_split = _splits(tiles, k_steps, blocks_per_sm * num_sms, one_wave)
    elif 2 * tiles <= num_sms:  # under half a wave: the partial-sum traffic is worth it
        splits, per_split = _splits(tiles, k_steps, num_sms, one_wave)
    return Launch("mma", tile.bm, (n_tiles, cdiv(m, tile.bm), splits), (tile.threads, 1, 1),
                  splits, per_split, tile)


def plan_gemv(m: int, n: int, k: int, num_sms: int, max_splits: int = MAX_SPLITS) -> Launch:
    """Smallest row capacity MT >= m; split K until about four blocks per SM (bytes in flight)."""
    mt = next(r for r in GEMV_ROWS if r >= m)
    n_tiles = cdiv(n, GEMV_NT)
    splits, per_split = _splits(n_tiles, k // GEMV_KC, 4 * num_sms, max_splits)
    return Launch("gemv", mt, (n_tiles, splits, 1), (GEMV_THREADS, 1, 1), splits, per_split)


def plan_gemv_direct(m: int, n: int, k: int, num_sms: int, max_splits: int = MAX_SPLITS
                     ) -> Launch:
    """Smallest row capacity MT >= m; 256-column tiles (as plan_gemv), split over K (32-row
    units) to fill one wave of resident blocks."""
    mt = next(r for r in GEMV_DIRECT_ROWS if r >= m)
    n_tiles = cdiv(n, GEMV_NT)
    splits, per_split = _splits_in_one_wave(n_tiles, k // GEMV_KC,
                                            GEMV_DIRECT_BLOCKS_PER_SM[mt] * num_sms, max_splits)
    return Launch("gemv_direct", mt, (n_tiles, splits, 1), (GEMV_THREADS, 1, 1), splits, per_split)


def plan_mma_direct(m: int, n: int, k: int, num_sms: int, max_splits: int = MAX_SPLITS
                    ) -> Launch:
    """Smallest row capacity MT >= m (build.MMA_DIRECT_CONFIGS); 256-column tiles split over K
    (32-row units) to fill one wave of resident blocks, but with the fp32 partials (splits x M
    x N x 4 bytes, written and read back) at most half the packed weight bytes (K x N / 2):
    splits <= K / (16 M)."""
    mt = next(r for r in MMA_DIRECT_CONFIGS if r >= m)
    n_tiles = cdiv(n, GEMV_NT)
    splits, per_split = _splits_in_one_wave(n_tiles, k // GEMV_KC,
                                            MMA_DIRECT_BLOCKS_PER_SM[mt] * num_sms,
                                            max_splits=max(1, min(max_splits, k // (16 * m))))
    return Launch("mma_direct", mt, (n_tiles, splits, 1), (GEMV_THREADS, 1, 1), splits,
                  per_split)


def row_chunks(m: int, most: int) -> list[tuple[int, int]]:
    """(first row, rows) of each launch when one launch takes at most `most` of the M rows."""
    return [(r, min(most, m - r)) for r in range(0, m, most)]


# gemm_mma's grid has one block row per BM rows in gridDim.y (at most 65535): with the smallest
# tile (BM = 16) one launch takes this many rows; more rows take several launches
MMA_MAX_M = 65535 * 16


def plan_dequant(k: int, n: int, num_sms: int) -> Launch:
    words = k * n // 8
    # 32 blocks of 256 threads per SM: 4 waves of resident blocks (2048 threads per SM), then
    # the kernel's grid-stride loop
    blocks = min(cdiv(words, DEQUANT_THREADS), 32 * num_sms)
    return Launch("dequant", 0, (blocks, 1, 1), (DEQUANT_THREADS, 1, 1))


# "dequant_overlap": W dequantized in column slices on a second stream while cuBLAS multiplies
# the slice before, so only the first slice's dequantization is exposed. A slice keeps at least
# this many columns (M = 1024 gives 8 x 16 = 128 output tiles of 128 x 128: about a wave of
# cuBLAS blocks on 132 SMs) and there are at most OVERLAP_MAX_SLICES of them.
OVERLAP_MIN_COLUMNS = 2048
OVERLAP_MAX_SLICES = 4


def overlap_slices(n: int) -> list[tuple[int, int]]:
    """(first column, columns) of each slice: as many as fit OVERLAP_MIN_COLUMNS (at most
    OVERLAP_MAX_SLICES), multiples of N_MULTIPLE, the last holding what is left."""
    slices = max(1, min(OVERLAP_MAX_SLICES, n // OVERLAP_MIN_COLUMNS))
    width = cdiv(n // N_MULTIPLE, slices) * N_MULTIPLE
    return [(n0, min(width, n - n0)) for n0 in range(0, n, width)]


def plan_reduce(count: int, splits: int) -> Launch:
    return Launch("reduce", 0, (cdiv(count // 4, REDUCE_THREADS), 1, 1), (REDUCE_THREADS, 1, 1),
                  splits)
