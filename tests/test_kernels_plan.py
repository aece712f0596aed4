"""awq_kernels' launch plans on CPU (plan.py, pure Python): every planned grid covers the
output and K with every split non-empty, within the split caps and one wave of resident
blocks. (Which kernel an M gets: test_kernels_dispatch.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from awq_kernels import api, build
from awq_kernels.dispatch import choose
from awq_kernels.plan import (
    GEMV_DIRECT_BLOCKS_PER_SM,
    GEMV_KC,
    GEMV_NT,
    MMA_BK,
    MMA_BN,
    MMA_DIRECT_BLOCKS_PER_SM,
    MMA_DIRECT_MAX_M,
    MMA_MAX_M,
    MMA_SPLIT_BLOCKS_PER_SM,
    mma_blocks_per_sm,
    overlap_slices,
    plan_dequant,
    plan_gemv,
    plan_gemv_direct,
    plan_mma,
    plan_mma_direct,
    plan_reduce,
    row_chunks,
)


@pytest.mark.parametrize("cap", [1, 2, 5, 16])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (2, 14336, 4096), (8, 4096, 14336),
                                   (16, 576, 192)])
def test_split_caps_bound_every_planner(cap, m, k, n):
    launches = [plan_mma(m, n, k, 132, blocks_per_sm=4, max_splits=cap),
                plan_mma(m, n, k, 132, max_splits=cap)]
    if m <= 8:
        launches += [plan_gemv(m, n, k, 132, cap), plan_gemv_direct(m, n, k, 132, cap),
                     plan_mma_direct(m, n, k, 132, cap)]
    for launch in launches:
        steps = k // (launch.tile.bk if launch.tile else 32)
        assert 1 <= launch.splits <= cap
        assert ((launch.splits - 1) * launch.k_per_split < steps
                <= launch.splits * launch.k_per_split)
    if m <= 8:  # a cap below the planner's own choice is the split count it gets
        own = plan_gemv_direct(m, n, k, 132).splits
        assert plan_gemv_direct(m, n, k, 132, cap).splits == min(own, cap)


@pytest.mark.parametrize("tile", build.MMA_TILES, ids=str)
@pytest.mark.parametrize("m,k,n", [(16, 4096, 4096), (64, 4096, 14336), (130, 576, 192),
                                   (256, 14336, 4096)])
@pytest.mark.parametrize("blocks_per_sm", [0, 4])
def test_plan_mma_with_a_given_tile_covers_output_and_k(tile, m, k, n, blocks_per_sm):
    launch = plan_mma(m, n, k, 132, blocks_per_sm=blocks_per_sm, tile=tile)
    assert launch.tile == tile and launch.block == (tile.threads, 1, 1)
    assert launch.grid[0] * tile.bn >= n > (launch.grid[0] - 1) * tile.bn
    assert launch.grid[1] * tile.bm >= m > (launch.grid[1] - 1) * tile.bm
    steps = k // tile.bk
    assert launch.grid[2] == launch.splits
    assert (launch.splits - 1) * launch.k_per_split < steps <= launch.splits * launch.k_per_split


@pytest.mark.parametrize("tile", build.MMA_TILES, ids=str)
def test_mma_split_plans_fit_one_wave(tile):
    for m, k, n in [(16, 4096, 4096), (16, 4096, 14336), (64, 8192, 28672), (128, 4096, 4096),
                    (256, 14336, 4096), (32, 576, 1536)]:
        for per_sm in (0, 4):
            launch = plan_mma(m, n, k, 132, blocks_per_sm=per_sm, tile=tile)
            blocks = launch.grid[0] * launch.grid[1] * launch.grid[2]
            assert launch.splits == 1 or blocks <= mma_blocks_per_sm(tile) * 132, (m, k, n)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k,n", [(4096, 4096), (8192, 28672), (14336, 4096), (576, 192),
                                 (160, 320)])
def test_plan_gemv_direct_covers_output_and_k(m, k, n):
    launch = plan_gemv_direct(m, n, k, num_sms=132)
    assert launch.config >= m and launch.grid[0] * GEMV_NT >= n
    steps, splits = k // GEMV_KC, launch.grid[1]
    assert splits == launch.splits >= 1
    assert (splits - 1) * launch.k_per_split < steps <= splits * launch.k_per_split


@pytest.mark.parametrize("m", [1, 2, 8, 9, 16, 17, 31, 32, 33, 64])
@pytest.mark.parametrize("k,n", [(4096, 4096), (8192, 28672), (14336, 4096), (576, 192),
                                 (160, 320), (4096, 128256)])
def test_plan_mma_direct_covers_output_and_k(m, k, n):
    launch = plan_mma_direct(m, n, k, num_sms=132)
    mt = launch.config  # the smallest row capacity that holds m rows
    assert mt >= m and (mt == 8 or mt // 2 < m)
    assert launch.grid[0] * GEMV_NT >= n > (launch.grid[0] - 1) * GEMV_NT
    steps, splits = k // GEMV_KC, launch.grid[1]
    assert splits == launch.splits >= 1
    assert (splits - 1) * launch.k_per_split < steps <= splits * launch.k_per_split
    # the fp32 partials (splits x M x N x 4 bytes) stay at most half the packed weight bytes
    # (K x N / 2)
    assert splits == 1 or splits * m * n * 4 <= k * n / 4


@pytest.mark.parametrize("m", [1, 63, 64, 65, 128, 129, 300])
def test_mma_direct_row_chunks_cover_m(m):
    chunks = row_chunks(m, MMA_DIRECT_MAX_M)  # mma_direct's launches
    assert [r0 for r0, _ in chunks] == list(range(0, m, 64))
    assert all(0 < rows <= 64 for _, rows in chunks) and sum(rows for _, rows in chunks) == m


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 17, 33, 100, 128, 255, 256, 777, 1023])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (576, 192),
                                 (128, 64)])
def test_plan_covers_output_and_k(m, k, n):
    """The plan `auto` launches for M rows (none for dequantize + cuBLAS), and the forced mma
    kernel's, cover the output and split K into non-empty ranges that add up to K."""
    kernel = choose(m).kernel
    launches = [(plan_mma(m, n, k, num_sms=132), "mma")]
    if kernel == "gemv_direct":
        launches.append((plan_gemv_direct(m, n, k, num_sms=132), "direct"))
    elif kernel == "mma_direct":
        launches.append((plan_mma_direct(m, n, k, num_sms=132), "direct"))
    elif kernel == "mma_split":
        launches.append((plan_mma(m, n, k, 132, blocks_per_sm=MMA_SPLIT_BLOCKS_PER_SM), "mma"))
    else:
        assert kernel == "dequant" and m >= 65
    for launch, kind in launches:
        if kind == "direct":
            assert launch.config >= m and launch.grid[0] * GEMV_NT >= n
            steps, splits = k // GEMV_KC, launch.grid[1]
        else:
            assert launch.grid[0] * MMA_BN >= n and launch.grid[1] * launch.config >= m
            steps, splits = k // MMA_BK, launch.grid[2]
        assert splits == launch.splits >= 1
        # every split non-empty, together exactly the k range
        assert (splits - 1) * launch.k_per_split < steps <= splits * launch.k_per_split


@pytest.mark.parametrize("m", [9, 16, 31, 64])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (576, 192)])
def test_plan_mma_split_reaches_more_blocks_and_covers_k(m, k, n):
    plain, split = plan_mma(m, n, k, 132), plan_mma(m, n, k, 132, blocks_per_sm=4)
    steps = k // MMA_BK
    assert split.grid[:2] == plain.grid[:2] and split.splits >= plain.splits
    assert (split.splits - 1) * split.k_per_split < steps <= split.splits * split.k_per_split
    blocks = split.grid[0] * split.grid[1] * split.splits
    one_wave = max(1, mma_blocks_per_sm(split.tile) * 132 // (split.grid[0] * split.grid[1]))
    # or K ran out, or one more split would pass one wave of the tile's resident blocks
    assert blocks >= 4 * 132 or split.splits in (min(16, max(1, steps // 4)), one_wave)


def test_small_grids_split_k():
    assert plan_gemv(1, 4096, 4096, 132).grid[0] * plan_gemv(1, 4096, 4096, 132).splits >= 132
    assert plan_mma(16, 4096, 4096, 132).splits > 1
    assert plan_mma(512, 4096, 4096, 132).splits == 1


@pytest.mark.parametrize("k,n", [(32, 64), (576, 192), (4096, 4096), (8192, 28672)])
def test_dequant_grid_covers_every_word_within_its_cap(k, n):
    """A thread per packed word (grid-stride past 32 blocks per SM), never a block with none."""
    blocks, threads = plan_dequant(k, n, 132).grid[0], plan_dequant(k, n, 132).block[0]
    words = k * n // 8
    assert 1 <= blocks <= 32 * 132
    assert blocks == 32 * 132 or (blocks - 1) * threads < words <= blocks * threads


@pytest.mark.parametrize("count", [64, 12 * 64, 4096 * 14336])
def test_reduce_grid_covers_every_quad_once(count):
    """splitk_reduce.cu: one thread per 4 outputs, and no block without one."""
    launch = plan_reduce(count, 3)
    quads, threads = count // 4, launch.block[0]
    assert launch.splits == 3
    assert (launch.grid[0] - 1) * threads < quads <= launch.grid[0] * threads


@pytest.mark.parametrize("n", [64, 192, 2048, 4032, 4096, 6144, 8256, 14336, 28672])
def test_overlap_slices_cover_n_in_wide_multiples_of_64(n):
    slices = overlap_slices(n)
    assert [n0 for n0, _ in slices] == [sum(nc for _, nc in slices[:i]) for i in range(len(slices))]
    assert sum(nc for _, nc in slices) == n and all(nc > 0 and nc % 64 == 0 for _, nc in slices)
    assert 1 <= len(slices) <= 4
    assert len(slices) == 1 or all(nc >= 2048 for _, nc in slices[:-1])
    assert overlap_slices(4096) == [(0, 2048), (2048, 2048)]
    assert len(overlap_slices(14336)) == 4 and len(overlap_slices(4095 // 64 * 64)) == 1


@pytest.mark.parametrize("name,most", [("mma", MMA_MAX_M), ("mma_split", MMA_MAX_M),
                                       ("mma_direct", MMA_DIRECT_MAX_M)])
def test_launches_stay_within_the_grid_limit(monkeypatch, name, most):
    """More rows than one launch takes (gemm_mma: 65535 block rows of BM = 16 in gridDim.y)
    go in launches of at most `most` rows, each on its own rows of x and y (CUDA faked)."""
    launches = []
    monkeypatch.setattr(api, "on_torch_stream",
                        lambda device: contextlib.nullcontext(("sm_90", 132)))
    monkeypatch.setattr(api, "run", lambda launch, arch, expr, args: launches.append(
        (launch, args[0].shape[0], args[4].shape[-2])))
    m, k, n, g = 2 * most + 3, 128, 64, 64
    x2 = torch.empty(m, k, dtype=torch.float16, device="meta")  # shapes only
    y2 = torch.empty(m, n, dtype=torch.float16, device="meta")
    packed = (torch.empty(k, n // 8, dtype=torch.int32, device="meta"),
              torch.empty(k // g, n // 8, dtype=torch.int32, device="meta"),
              torch.empty(k // g, n, dtype=torch.float16, device="meta"))
    tile = build.MMA_CONFIGS[16] if name != "mma_direct" else None
    api._launch_product(name, x2, *packed, g, y2, mma_tile=tile)
    rows = [r for _, r, _ in launches if r]
    assert sum(rows) == m and max(rows) <= most
    assert all(launch.grid[1] <= 65535 for launch, _, _ in launches)


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (2, 14336, 4096), (8, 4096, 14336)])
def test_direct_plans_fit_one_wave(m, k, n):
    """The direct kernels split K only up to one wave of their resident blocks (see
    plan._splits_in_one_wave: blocks past one wave ran with the GPU nearly idle)."""
    for planner, per_sm in ((plan_gemv_direct, GEMV_DIRECT_BLOCKS_PER_SM),
                            (plan_mma_direct, MMA_DIRECT_BLOCKS_PER_SM)):
        launch = planner(m, n, k, 132)
        blocks = launch.grid[0] * launch.splits
        assert launch.splits == 1 or blocks <= per_sm[launch.config] * 132, planner
        assert launch.splits > 1  # these shapes leave most of the wave to the splits


def test_mma_ladder_and_gemv_split_targets():
    """plan_mma halves BM down to 32 (not 16) while the tiles leave SMs without a block, and
    splits K only under half a wave of tiles; plan_gemv splits toward four blocks per SM."""
    assert plan_mma(64, 4096, 4096, 132).config == 32  # 64 tiles of BM 32 (128 of BM 16)
    assert plan_mma(16, 4096, 4096, 132).config == 16
    wide = plan_mma(128, 4096, 4096, 132)  # 128 tiles of BM 32: more than half of 132 SMs
    assert (wide.config, wide.splits) == (32, 1)
    gemv = plan_gemv(1, 14336, 4096, 132)  # N = 14336: 56 column tiles; 4 x 132 blocks: 10 splits
    assert gemv.splits == 10 and gemv.grid[0] * gemv.splits >= 4 * 132


@pytest.mark.parametrize("name,m,fuse", [("mma_split", 130, True), ("mma", 20, True),
                                         ("mma_direct", 3, True), ("gemv_direct", 1, True),
                                         ("gemv", 1, True), ("mma_split", 130, False)])
def test_launch_product_runs_the_planned_launches(monkeypatch, name, m, fuse):
    """_launch_product launches the planner's own plan for its kernel (mma_split with
    MMA_SPLIT_BLOCKS_PER_SM), the fused split-K with one counter per output tile (every kernel
    but gemv), else the partials' reduce over all M x N outputs (CUDA faked)."""
    launches, counters = [], []
    monkeypatch.setattr(api, "on_torch_stream", lambda device: contextlib.nullcontext(("90", 132)))
    monkeypatch.setattr(api, "run",
                        lambda launch, arch, expr, args: launches.append((launch, args)))
    monkeypatch.setattr(api, "splitk_counters",
                        lambda device, tiles: counters.append(tiles) or f"counters[{tiles}]")
    k, n, g = 4096, 4096, 128
    x2 = torch.empty(m, k, dtype=torch.float16, device="meta")  # shapes only
    y2 = torch.empty(m, n, dtype=torch.float16, device="meta")
    packed = (torch.empty(k, n // 8, dtype=torch.int32, device="meta"),
              torch.empty(k // g, n // 8, dtype=torch.int32, device="meta"),
              torch.empty(k // g, n, dtype=torch.float16, device="meta"))
    api._launch_product(name, x2, *packed, g, y2, fuse_splitk=fuse)
    plan = {"mma_split": lambda: plan_mma(m, n, k, 132, blocks_per_sm=MMA_SPLIT_BLOCKS_PER_SM),
            "mma": lambda: plan_mma(m, n, k, 132), "gemv": lambda: plan_gemv(m, n, k, 132),
            "mma_direct": lambda: plan_mma_direct(m, n, k, 132),
            "gemv_direct": lambda: plan_gemv_direct(m, n, k, 132)}[name]()
    assert plan.splits > 1 and launches[0][0] == plan
    tiles = plan.grid[0] * (plan.grid[1] if name.startswith("mma") and name != "mma_direct" else 1)
    if fuse and name != "gemv":
        assert counters == [tiles] and len(launches) == 1
        assert launches[0][1][-2] is y2 and launches[0][1][-1] == f"counters[{tiles}]"
    else:
        assert counters == [] and len(launches) == 2
        if name != "gemv":  # a fused kernel told to leave the sum to the reduce
            assert launches[0][1][-2:] == (None, None)
        reduce, args = launches[1]
        assert reduce == plan_reduce(m * n, plan.splits) and args[1] is y2
