"""NumPy emulation of the direct-load kernels, gemv_direct.cu and mma_direct.cu: their thread
-> data mappings (no shared memory: each lane's loads straight from the packed tensors), their
16-bit arithmetic and the order of every sum. Built on emulate.py's instruction helpers."""

from __future__ import annotations

import numpy as np

from .build import MMA_DIRECT_CONFIGS
from .emulate import (
    LANE,
    SIGN2,
    U32,
    dequant_nibbles,
    dequant_pair,
    fma2,
    group_pairs,
    hi,
    lo,
    mma16816,
    nibbles_to_magic_pair,
    pair,
    prmt,
    scale_pair,
    shr,
    to_f32,
    words_of_halves,
)
from .plan import GEMV_DIRECT_VEC, GEMV_KC, GEMV_NT, MMA_DIRECT_DEPTH, Launch, gemv_direct_flush

# ----------------------------------------------------------------------------- gemv_direct


def emulate_gemv_direct(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N) of gemv_direct.cu, NaN where nothing is written,
    including the 16-bit pair accumulators and their flush after every chunk."""
    m, k = x.shape
    n = qweight.shape[1] * 8
    mt = launch.config
    vec = GEMV_DIRECT_VEC[mt]
    lanes_per_row, flush = 32 // vec, gemv_direct_flush(tag, mt)
    rows_per_chunk = flush * vec
    c = LANE % lanes_per_row
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    for by in range(launch.grid[1]):
        k_begin = by * launch.k_per_split * GEMV_KC
        chunks = (min(k, k_begin + launch.k_per_split * GEMV_KC) - k_begin) // rows_per_chunk
        for bx in range(launch.grid[0]):
            word0 = bx * (GEMV_NT // 8) + c * vec  # (32,) the lane's first packed word column
            acc = np.zeros((8, mt, 8 * vec, 32), np.float32)  # (warp, m, column j, lane)
            for warp in range(8):  # warp w takes chunks w, w + 8, ...
                loaded_group, group = -1, None
                for q in range(warp, chunks, 8):
                    row0 = k_begin + q * rows_per_chunk
                    if row0 // g_size != loaded_group:
                        loaded_group = row0 // g_size
                        group = _gd_group(tag, qzeros, scales16, loaded_group, word0, vec)
                    h = _gd_chunk(tag, x, qweight, row0, word0, group, mt, vec, flush, record)
                    acc[warp, :, 0::2] += to_f32(tag, lo(h))  # fp32 adds, in the kernel's order
                    acc[warp, :, 1::2] += to_f32(tag, hi(h))
            total = _gd_block_sum(acc, vec)
            n0 = bx * GEMV_NT
            n_ok = min(GEMV_NT, n - n0)
            for mm in range(min(m, mt)):
                out[by, mm, n0:n0 + n_ok] = total[mm, :n_ok]
    return out


def _gd_group(tag, qzeros, scales16, grp, word0, vec):
    """A group's negated zero pairs (magic-number form) and scale pairs for the lane's vec
    words from word0 (lanes past N read column 0): pair i = 4 v + p is columns 2p, 2p + 1 of
    word v."""
    wcol = np.where(word0 < qzeros.shape[1], word0, 0)
    zneg, sp = [], []
    for v in range(vec):
        zw = qzeros[grp, wcol + v]
        for p in range(4):
            cols = 8 * (wcol + v) + 2 * p
            zneg.append(nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2)
            sp.append(scale_pair(tag, pair(scales16[grp, cols], scales16[grp, cols + 1])))
    return zneg, sp


def _gd_chunk(tag, x, qweight, row0, word0, group, mt, vec, flush, record):
    """One chunk of a warp: `flush` steps of `vec` rows; in step u the lane takes row
    row0 + u vec + r and its vec words from word0, and adds x[m, row] (as a pair) times each
    dequantized weight pair into the 16-bit pair accumulators h (mt, 4 vec, lane), which the
    caller flushes into fp32 after the chunk."""
    m = x.shape[0]
    valid = word0 < qweight.shape[1]
    wcol = np.where(valid, word0, 0)
    r = LANE // (32 // vec)  # the lane's row within a step
    zneg, sp = group
    h = np.zeros((mt, 4 * vec, 32), U32)
    for u in range(flush):
        row = row0 + u * vec + r  # (32,)
        x2 = [pair(x[min(mm, m - 1), row], x[min(mm, m - 1), row]) for mm in range(mt)]
        for v in range(vec):
            word = qweight[row, wcol + v]
            for p in range(4):
                i = 4 * v + p
                wp = dequant_pair(tag, shr(word, 4 * p), zneg[i], sp[i])
                if record is not None:
                    col = 8 * (word0 + v) + 2 * p
                    record.append((row[valid], col[valid], lo(wp)[valid]))
                    record.append((row[valid], col[valid] + 1, hi(wp)[valid]))
                for mm in range(mt):
                    h[mm, i] = fma2(tag, x2[mm], wp, h[mm, i])
    return h


def _gd_block_sum(acc, vec):
    """(mt, GEMV_NT) block sums: a butterfly over the lanes holding the same columns, then the
    8 warps added in a fixed order."""
    lanes_per_row = 32 // vec
    c, r = LANE % lanes_per_row, LANE // lanes_per_row
    off = lanes_per_row
    while off < 32:
        acc = acc + acc[..., LANE ^ off]
        off *= 2
    mt = acc.shape[1]
    red = np.zeros((8, mt, GEMV_NT), np.float32)
    for warp in range(8):
        for j in range(8 * vec):
            red[warp][:, c[r == 0] * 8 * vec + j] = acc[warp][:, j][:, r == 0]
    total = np.zeros((mt, GEMV_NT), np.float32)
    for warp in range(8):  # fixed-order cross-warp sum
        total += red[warp]
    return total


# ----------------------------------------------------------------------------- mma_direct


def rotation_order(mine: int, depth: int) -> list[int]:
    """The chunks mma_direct's K loop computes, in order, following its DEPTH + 1 register
    buffers: prologue loads chunks 0..DEPTH-1; step (i, d) refills buffer (d + DEPTH) % NBUF
    with chunk i + d + DEPTH, then computes buffer d. Asserts no buffer is overwritten before
    it is computed."""
    nbuf = depth + 1
    buf: list[int | None] = [d if d < mine else None for d in range(depth)] + [None]
    order = []
    for i in range(0, mine, nbuf):
        for d in range(nbuf):
            if i + d < mine:
                if i + d + depth < mine:
                    slot = (d + depth) % nbuf
                    assert buf[slot] is None or buf[slot] in order, "overwritten before use"
                    buf[slot] = i + d + depth
                order.append(buf[d])
    return order


def emulate_mma_direct(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N) of mma_direct.cu, NaN where nothing is written: the
    weights as the A operand (A rows g, g + 8 of m16 tile i = columns 2i, 2i + 1 of the lane's
    word), x as the B operand (n8 tile j = rows 8j..8j+7); per 64 columns two warps, each
    taking half of K (WM = 1) or all of K for its 8 NT rows (WM = 2)."""
    m, k = x.shape
    n = qweight.shape[1] * 8
    nw = n // 8
    nt, wm_count = MMA_DIRECT_CONFIGS[launch.config]
    g = LANE // 4
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    for by in range(launch.grid[1]):
        k_begin = by * launch.k_per_split * GEMV_KC
        chunks = (min(k, k_begin + launch.k_per_split * GEMV_KC) - k_begin) // GEMV_KC
        half = (chunks + 1) // 2 if wm_count == 1 else chunks
        for bx in range(launch.grid[0]):
            for wn in range(4):
                word = bx * (GEMV_NT // 8) + wn * 8 + g  # (32,)
                in_n = bool(word[0] < nw)  # N % 64 == 0: the whole warp or none
                wcol = word if in_n else g
                accs = []
                for wr in range(2):  # the block's two rows of warps
                    wk, m_base = (wr, 0) if wm_count == 1 else (0, wr * 8 * nt)
                    acc = np.zeros((4, nt, 4, 32))
                    q_begin = wk * half
                    row_first = k_begin + q_begin * GEMV_KC
                    mine = min(chunks, q_begin + half) - q_begin
                    for q in rotation_order(mine, MMA_DIRECT_DEPTH[nt]):
                        row0 = row_first + q * GEMV_KC
                        if q == 0 or row0 % g_size == 0:  # group_pairs
                            grp = row0 // g_size
                            zb, sb = group_pairs(tag, qzeros[grp], words_of_halves(scales16[grp]),
                                                     wcol)
                        for s in range(2):
                            _md_k16_step(tag, x, qweight, row0 + 16 * s, wcol, m_base, nt, zb, sb,
                                         acc, record if in_n else None, word)
                    accs.append(acc.astype(np.float32))
                if not in_n:
                    continue
                if wm_count == 1:  # wk = 0 adds wk = 1's sums
                    stores = [(0, accs[0] + accs[1])]
                else:  # each row of warps its own rows
                    stores = [(wr * 8 * nt, accs[wr]) for wr in range(2)]
                for m_base, total in stores:
                    _md_store(out[by], total, m_base, word)
    return out


def _md_k16_step(tag, x, qweight, k0, wcol, m_base, nt, zb, sb, acc, record, word):
    """One k16 step of a warp (rows k0 .. k0 + 15): the lanes' 4 packed words, their A
    fragments for the 4 m16 tiles (dequantized), x's B fragments, 4 NT mma into acc."""
    m = x.shape[0]
    g, t = LANE // 4, LANE % 4
    kk = k0 + 2 * t  # (32,)
    w0, w1 = qweight[kk, wcol], qweight[kk + 1, wcol]
    w8, w9 = qweight[kk + 8, wcol], qweight[kk + 9, wcol]
    even01, odd01 = prmt(w0, w1, 0x5410), prmt(w0, w1, 0x7632)
    even89, odd89 = prmt(w8, w9, 0x5410), prmt(w8, w9, 0x7632)
    b = []
    for j in range(nt):  # rows past M read row M - 1 (never stored)
        row = np.minimum(m_base + 8 * j + g, m - 1)
        b.append([pair(x[row, kk], x[row, kk + 1]), pair(x[row, kk + 8], x[row, kk + 9])])
    for i in range(4):
        a = [dequant_nibbles(tag, v, shr(v, 8), i, zb[2 * i + h % 2], sb[2 * i + h % 2])
             for h, v in enumerate((even01, odd01, even89, odd89))]
        if record is not None:
            for reg, (dk, dc) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                col = 8 * word + 2 * i + dc
                record.append((kk + dk, col, lo(a[reg])))
                record.append((kk + dk + 1, col, hi(a[reg])))
        for j in range(nt):
            mma16816(acc[i, j], a, b[j], tag)


def _md_store(out, total, m_base, word):
    """The C fragments: lane (g, t) holds rows 8j + 2t (c0, c2) and 8j + 2t + 1 (c1, c3) of
    n8 tile j, columns 2i, 2i + 1 of its word for m16 tile i; rows past M are not stored."""
    m = out.shape[0]
    t = LANE % 4
    for j in range(total.shape[1]):
        for h in range(2):
            row = m_base + 8 * j + 2 * t + h
            for lane in np.nonzero(row < m)[0]:
                for i in range(4):
                    col = 8 * word[lane] + 2 * i
                    out[row[lane], col] = total[i, j, h, lane]
                    out[row[lane], col + 1] = total[i, j, 2 + h, lane]
