"""Public entry points: gemm (y = x @ W) and dequantize (W) for the AWQ packed format.

Every call runs check -> allocate -> launch. All checks run on tensor metadata before anything
touches CUDA, so wrong inputs raise the same TypeError/ValueError on any machine. Kernels are
compiled on first use (build.get_kernel) and launched through CuPy on torch's current stream
(runtime.py), with tensors passed as raw device addresses (zero copy, and no per-call DLPack
wrapping, which dominated the host time of a call; ordering is right because all runs on
torch's stream).
"""

from __future__ import annotations

import torch

from . import build
from .build import MmaTile
from .dispatch import Dispatch, resolve
from .plan import (
    GEMV_DIRECT_MAX_M,
    GEMV_MAX_M,
    GROUP_SIZES,
    K_MULTIPLE,
    KERNELS,
    MAX_SPLITS,
    MMA_DIRECT_MAX_M,
    MMA_MAX_M,
    MMA_SPLIT_BLOCKS_PER_SM,
    N_MULTIPLE,
    check_mma_tile,
    overlap_slices,
    plan_dequant,
    plan_gemv,
    plan_gemv_direct,
    plan_mma,
    plan_mma_direct,
    plan_reduce,
    row_chunks,
)
from .runtime import (
    ACTIVATION_DTYPES,
    i32,
    on_torch_stream,
    require_dtype,
    require_int,
    require_layout_and_device,
    require_shape,
    require_tensor,
    run,
    splitk_counters,
)


def check_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> tuple[int, int]:
    """Validate the packed-format tensors' types and shapes; return (K, N)."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        require_tensor(name, t)
    require_dtype("qweight", qweight, (torch.int32,))
    require_dtype("qzeros", qzeros, (torch.int32,))
    require_dtype("scales", scales, (torch.float16,))
    group_size = require_int("group_size", group_size)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [K, N/8], got shape {list(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k == 0 or k % group_size:
        raise ValueError(f"K = {k} (qweight rows) must be a positive multiple of "
                         f"group_size = {group_size}")
    if n == 0 or n % N_MULTIPLE:
        raise ValueError(f"N = {n} (8 * qweight columns) must be a positive multiple of "
                         f"{N_MULTIPLE}")
    assert k % K_MULTIPLE == 0  # every supported group size is a multiple of the k tile
    require_shape("qzeros", qzeros, (k // group_size, n // 8))
    require_shape("scales", scales, (k // group_size, n))
    return k, n


def check_gemm_args(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                    scales: torch.Tensor, group_size: int, out: torch.Tensor | None = None,
                    kernel: str = "auto", mma_tile: MmaTile | None = None,
                    max_splits: int = MAX_SPLITS, dispatch: Dispatch | None = None
                    ) -> tuple[int, int, int]:
    """Validate everything `gemm` receives; return (M, K, N). Touches no device."""
    require_tensor("x", x)
    require_dtype("x", x, tuple(ACTIVATION_DTYPES))
    k, n = check_packed(qweight, qzeros, scales, group_size)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if dispatch is not None and (not isinstance(dispatch, Dispatch) or kernel != "auto"):
        raise ValueError(f"dispatch must be a dispatch.Dispatch and applies to kernel 'auto' "
                         f"only (kernel {kernel!r}, dispatch {type(dispatch).__name__})")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K = {k}], got {list(x.shape)}")
    m = x.numel() // k
    max_splits = require_int("max_splits", max_splits)
    if not 1 <= max_splits <= MAX_SPLITS:
        raise ValueError(f"max_splits must be in 1..{MAX_SPLITS}, got {max_splits}")
    if mma_tile is not None:
        if kernel not in ("mma", "mma_split"):
            raise ValueError(f"mma_tile applies to kernel 'mma' or 'mma_split', not {kernel!r}")
        if mma_tile not in build.MMA_TILES:
            raise ValueError(f"mma_tile {mma_tile} is not compiled; build.MMA_TILES lists those")
        check_mma_tile(mma_tile, group_size)
    if kernel == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"kernel='gemv' handles at most {GEMV_MAX_M} rows, got M = {m}")
    if kernel == "gemv_direct" and m > GEMV_DIRECT_MAX_M:
        raise ValueError(f"kernel='gemv_direct' handles at most {GEMV_DIRECT_MAX_M} rows, "
                         f"got M = {m}")
    tensors = {"x": x, "qweight": qweight, "qzeros": qzeros, "scales": scales}
    if out is not None:
        require_tensor("out", out)
        require_dtype("out", out, (x.dtype,))
        require_shape("out", out, (*x.shape[:-1], n))
        for name, t in tensors.items():  # blocks write y while others still read x
            if _overlap(out, t):
                raise ValueError(f"out must not share memory with {name}")
        tensors["out"] = out
    require_layout_and_device(tensors)
    return m, k, n


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes of two tensors (each contiguous, as checked) intersect."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a.numel() > 0 and b.numel() > 0 and a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
         group_size: int, *, out: torch.Tensor | None = None,
         kernel: str = "auto", fuse_splitk: bool = True,
         mma_tile: MmaTile | None = None, max_splits: int = MAX_SPLITS,
         dispatch: Dispatch | None = None) -> torch.Tensor:
    """y = x @ W with W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n] (AWQ "gemm" format).

    Args (all CUDA, contiguous, 16-byte aligned, one device):
        x:        [..., K] float16 or bfloat16 activations, row-major.
        qweight:  [K, N/8] int32; 8 4-bit codes per int32 along N, nibble i holding column
                  8c + [0, 2, 4, 6, 1, 3, 5, 7][i].
        qzeros:   [K/G, N/8] int32, zero points packed like qweight.
        scales:   [K/G, N] float16 (also for bfloat16 x; converted in the kernel).
        group_size: G in (32, 64, 128). Requires K % G == 0 and N % 64 == 0.
        out:      optional [..., N] tensor of x's dtype to write into (every element written).
        kernel:   "auto" (by M = rows of x, `dispatch`'s rule; by default the fastest
                  measured on an H100: <= 2 gemv_direct, <= 8 mma_direct, <= 64 mma_split,
                  else dequantize + torch.matmul),
                  "auto_direct" (gemv_direct at M = 1, mma_direct for M <= 128, else as
                  auto), or one of "gemv" (M <= 8),
                  "gemv_direct" (M <= 8; registers instead of shared memory, 16-bit
                  products), "mma", "mma_split" (the mma kernel split over K to ~4 blocks per
                  SM), "mma_direct" (tensor cores fed from registers; launches of <= 64 rows),
                  "dequant" (dequantize, then torch.matmul), "dequant_overlap" (the same in
                  column slices, each dequantized on a side stream while the matmul of the
                  slice before runs).
        fuse_splitk: every kernel but gemv and dequant: add the K splits in the same launch
                  (the last block of each output tile does it; same bits) instead of a
                  second kernel.
        mma_tile: "mma"/"mma_split" only: this compiled block tile (build.MMA_TILES) instead
                  of the one chosen by M; for the benchmark's tile sweep.
        max_splits: at most this many K splits (1..16; 1: none) for every kernel that splits
                  K (all but dequant); the planners' choice is kept below it. For the sweep.
        dispatch: kernel "auto" only: this rule (dispatch.Dispatch: kernel, tile and split cap
                  by M) instead of dispatch.DEFAULT; e.g. one derived from a GPU's tile sweep
                  (dispatch.from_sweep). A tile whose BK does not divide group_size is replaced
                  by the one chosen by M.
    Returns:
        y: [..., N] in x's dtype; fp32 accumulation, deterministic (sums in a fixed order; the
        fused split-K's one atomic per block only counts arrivals).
    """
    m, k, n = check_gemm_args(x, qweight, qzeros, scales, group_size, out, kernel, mma_tile,
                              max_splits, dispatch)
    choice = resolve(m, group_size, kernel, mma_tile, max_splits, dispatch)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    x2, y2 = x.view(m, k), y.view(m, n)  # (M, K), (M, N)
    if choice.kernel == "dequant":
        torch.matmul(x2, dequantize(qweight, qzeros, scales, group_size, dtype=x.dtype), out=y2)
    elif choice.kernel == "dequant_overlap":
        _dequant_matmul_overlapped(x2, qweight, qzeros, scales, group_size, y2)
    else:
        _launch_product(choice.kernel, x2, qweight, qzeros, scales, group_size, y2, fuse_splitk,
                        choice.tile, choice.max_splits)
    return y


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, dtype: torch.dtype = torch.float16,
               columns: tuple[int, int] | None = None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """W [K, N] in `dtype` (float16 or bfloat16), W[k, n] = (q - z) * s rounded once (bfloat16:
    the scale is rounded to bfloat16 first, as reference.dequantize_like_kernel states); with
    `columns` = (n0, NC) only W[:, n0:n0 + NC] (n0 and NC multiples of 64), contiguous; into
    `out` ([K, NC] of `dtype`) when given.

    qweight [K, N/8] int32, qzeros [K/G, N/8] int32, scales [K/G, N] float16, as for `gemm`.
    """
    k, n = check_packed(qweight, qzeros, scales, group_size)
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    n0, nc = (0, n) if columns is None else (require_int("columns[0]", columns[0]),
                                              require_int("columns[1]", columns[1]))
    if n0 % N_MULTIPLE or nc % N_MULTIPLE or not (0 <= n0 and 0 < nc and n0 + nc <= n):
        raise ValueError(f"columns (n0, NC) = {columns} must be multiples of {N_MULTIPLE} "
                         f"with 0 <= n0, 0 < NC, n0 + NC <= N = {n}")
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    if out is not None:
        require_tensor("out", out)
        require_dtype("out", out, (dtype,))
        require_shape("out", out, (k, nc))
        for name, t in tensors.items():  # blocks write w while others still read the codes
            if _overlap(out, t):
                raise ValueError(f"out must not share memory with {name}")
        tensors["out"] = out
    require_layout_and_device(tensors)
    w = torch.empty((k, nc), dtype=dtype, device=qweight.device) if out is None else out
    tag = ACTIVATION_DTYPES[dtype]
    with on_torch_stream(qweight.device) as (arch, num_sms):
        launch = plan_dequant(k, nc, num_sms)
        run(launch, arch, build.dequant_expr(tag),
             (qweight, qzeros, scales, w, i32(k), i32(n), i32(group_size), i32(n0), i32(nc)))
    return w


def _dequant_matmul_overlapped(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                               scales: torch.Tensor, group_size: int, y2: torch.Tensor) -> None:
    """y2 (M, N) = x2 (M, K) @ W slice by slice (plan.overlap_slices): every slice is
    dequantized on a side stream, each matmul on torch's stream waits for its own slice only,
    so slice i + 1 is dequantized while cuBLAS multiplies slice i (memory-bound beside
    compute-bound) and only the first slice's dequantization is exposed. Each output column is
    one matmul over all of K, as in "dequant" (cuBLAS may pick another algorithm for the
    narrower shape, so the bits may differ from it; repeated calls give the same bits).
    torch.mm writes a column slice of y2 in place (cuBLAS's leading dimension): no copy.
    The slices are allocated on torch's stream (its memory pool, as "dequant"'s W): main waits
    for every slice before it goes on, so their memory is free for main's next use."""
    main = torch.cuda.current_stream(x2.device)
    k = qweight.shape[0]
    slices = [(n0, nc, torch.empty((k, nc), dtype=x2.dtype, device=x2.device))
              for n0, nc in overlap_slices(y2.shape[1])]
    side = torch.cuda.Stream(device=x2.device)  # one of torch's pooled streams
    side.wait_stream(main)  # x2, the packed weights, y2 and the slices' memory are ready on main
    done = []
    with torch.cuda.stream(side):
        for n0, nc, w in slices:
            dequantize(qweight, qzeros, scales, group_size, x2.dtype, columns=(n0, nc), out=w)
            done.append(torch.cuda.Event())
            done[-1].record(side)
    for (n0, nc, w), event in zip(slices, done):
        main.wait_event(event)
        torch.mm(x2, w, out=y2[:, n0:n0 + nc])  # (M, NC), row stride N: cuBLAS's ldc


def _launch_product(name: str, x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                    scales: torch.Tensor, group_size: int, y2: torch.Tensor,
                    fuse_splitk: bool = True, mma_tile: MmaTile | None = None,
                    max_splits: int = MAX_SPLITS, sum_splits: bool = True) -> None:
    """One gemv/mma launch into y2 (M, N), or into fp32 partials plus the split-K reduction
    (in the same launch, except for gemv.cu, when `fuse_splitk` and counters are at hand).
    sum_splits=False (benchmark.py only) stops after the partials, leaving y2 unwritten: the
    time the split-K sum costs is then measurable as a difference."""
    (m, k), n = x2.shape, y2.shape[1]
    most = {"mma_direct": MMA_DIRECT_MAX_M, "mma": MMA_MAX_M, "mma_split": MMA_MAX_M}.get(name)
    if most is not None and m > most:
        for r0, rows in row_chunks(m, most):  # more rows than one launch holds
            _launch_product(name, x2[r0:r0 + rows], qweight, qzeros, scales, group_size,
                            y2[r0:r0 + rows], fuse_splitk, mma_tile, max_splits, sum_splits)
        return
    tag = ACTIVATION_DTYPES[x2.dtype]
    with on_torch_stream(x2.device) as (arch, num_sms):
        if name == "gemv":
            launch = plan_gemv(m, n, k, num_sms, max_splits)
            expr = build.gemv_expr(tag, launch.config)
        elif name == "gemv_direct":
            launch = plan_gemv_direct(m, n, k, num_sms, max_splits)
            expr = build.gemv_direct_expr(tag, launch.config)
        elif name == "mma_direct":
            launch = plan_mma_direct(m, n, k, num_sms, max_splits)
            expr = build.mma_direct_expr(tag, launch.config)
        else:
            per_sm = MMA_SPLIT_BLOCKS_PER_SM if name == "mma_split" else 0
            launch = plan_mma(m, n, k, num_sms, blocks_per_sm=per_sm, tile=mma_tile,
                              max_splits=max_splits)
            expr = build.mma_expr(tag, launch.tile)
        target = y2
        if launch.splits > 1:  # (splits, M, N) fp32 partial sums
            target = torch.empty((launch.splits, m, n), dtype=torch.float32, device=x2.device)
        args = (x2, qweight, qzeros, scales, target, i32(m), i32(n), i32(k),
                i32(group_size), i32(launch.k_per_split))
        counters = None
        if name != "gemv":  # the kernels with the fused split-K (splitk_fused.cuh)
            if launch.splits > 1 and fuse_splitk and sum_splits:  # one counter per output tile
                tiles = launch.grid[0] * (launch.grid[1] if launch.family == "mma" else 1)
                counters = splitk_counters(x2.device, tiles)
            args += (None if counters is None else y2, counters)
        run(launch, arch, expr, args)
        if launch.splits > 1 and counters is None and sum_splits:
            reduce = plan_reduce(m * n, launch.splits)
            run(reduce, arch, build.reduce_expr(tag),
                 (target, y2, i32(launch.splits), i32(m * n)))
