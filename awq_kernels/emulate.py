"""NumPy emulation of the kernels' bit tricks and thread -> data mappings.

No GPU here, so the CPU tests run the kernels' index math in NumPy, instruction for
instruction where it matters: the cp.async copies into (swizzled, padded) shared memory,
ldmatrix, the byte permutes, the lop3 / magic-number dequantization on 16-bit patterns, the
mma.sync fragment layouts (PTX ISA, m16n8k16) and the output stores. Lanes are vectorized:
per-lane registers are arrays of shape (32,). Mirrors gemm_mma.cu, gemv.cu, gemv_direct.cu,
mma_direct.cu and dequant.cu.
"""

from __future__ import annotations

import numpy as np

from .build import MMA_CONFIGS, MMA_DIRECT_CONFIGS
from .plan import GEMV_DIRECT_VEC, GEMV_KC, GEMV_NT, MMA_BK, MMA_BN, Launch, gemv_direct_flush

U32 = np.uint32
MAGIC2 = {"F16": U32(0x64006400), "BF16": U32(0x43004300)}
ONE2 = {"F16": U32(0x3C003C00), "BF16": U32(0x3F803F80)}
SIGN2 = NEG_ZERO2 = U32(0x80008000)
NIBBLE_MASK2 = U32(0x000F000F)
STAGES, B_STRIDE, A_ROW_WORDS, WARP_N, WARPS_N = 4, 20, 16, 64, 2
LANE = np.arange(32)

# ----------------------------------------------------------------------------- 16-bit values


def to_f32(tag: str, h: np.ndarray) -> np.ndarray:
    h = np.asarray(h).astype(np.uint16)
    if tag == "F16":
        return h.view(np.float16).astype(np.float32)
    return (h.astype(U32) << U32(16)).view(np.float32)


def from_f64(tag: str, f: np.ndarray) -> np.ndarray:
    """Round to nearest even into 16-bit bits (uint16)."""
    f = np.asarray(f, dtype=np.float64)
    if tag == "F16":
        return f.astype(np.float16).view(np.uint16)
    u = f.astype(np.float32).view(U32)  # exact for every value the kernels round here
    return ((u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) >> U32(16)).astype(np.uint16)


def lo(p):
    return (np.asarray(p, dtype=U32) & U32(0xFFFF)).astype(np.uint16)


def hi(p):
    return (np.asarray(p, dtype=U32) >> U32(16)).astype(np.uint16)


def pair(lo16, hi16) -> np.ndarray:
    return np.asarray(lo16).astype(U32) | (np.asarray(hi16).astype(U32) << U32(16))


def words_of_halves(h: np.ndarray) -> np.ndarray:
    """(..., 2w) uint16 -> (..., w) uint32, little endian (how 16-byte copies land)."""
    return pair(h[..., 0::2], h[..., 1::2])


# ----------------------------------------------------------------------------- instructions


def prmt(a, b, selector: int) -> np.ndarray:
    src = (np.asarray(b, dtype=np.uint64) << np.uint64(32)) | np.asarray(a, dtype=np.uint64)
    out = np.zeros(np.broadcast(a, b).shape, dtype=np.uint64)
    for i in range(4):
        idx = (selector >> (4 * i)) & 0x7
        out |= ((src >> np.uint64(8 * idx)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out.astype(U32)


def fma2(tag: str, a, b, c) -> np.ndarray:
    """fma.rn.{f16,bf16}x2: exact a * b + c (float64 is exact for the kernels' operands)."""
    def half(f):
        return from_f64(tag, to_f32(tag, f(a)).astype(np.float64) * to_f32(tag, f(b))
                        + to_f32(tag, f(c)))
    return pair(half(lo), half(hi))


def nibbles_to_magic_pair(tag: str, bits) -> np.ndarray:
    return (np.asarray(bits, dtype=U32) & NIBBLE_MASK2) | MAGIC2[tag]  # lop3 0xEA


def dequant_pair(tag: str, bits, neg_magic_z, s) -> np.ndarray:
    q_minus_z = fma2(tag, nibbles_to_magic_pair(tag, bits), ONE2[tag], neg_magic_z)
    return fma2(tag, q_minus_z, s, NEG_ZERO2)


def scale_pair(tag: str, fp16_pair) -> np.ndarray:
    if tag == "F16":
        return np.asarray(fp16_pair, dtype=U32)
    return pair(from_f64("BF16", to_f32("F16", lo(fp16_pair))),
                from_f64("BF16", to_f32("F16", hi(fp16_pair))))


def shr(v, n: int) -> np.ndarray:
    return np.asarray(v, dtype=U32) >> U32(n)


def mma16816(acc: np.ndarray, a: list, b: list, tag: str) -> None:
    """acc (4, 32) += A (16x16) @ B (16x8) with the PTX m16n8k16 fragment layouts."""
    g, t = LANE // 4, LANE % 4
    am = np.zeros((16, 16))
    bm = np.zeros((16, 8))
    for reg, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        am[g + dr, 2 * t + dc] = to_f32(tag, lo(a[reg]))
        am[g + dr, 2 * t + dc + 1] = to_f32(tag, hi(a[reg]))
    for reg in range(2):
        bm[2 * t + 8 * reg, g] = to_f32(tag, lo(b[reg]))
        bm[2 * t + 8 * reg + 1, g] = to_f32(tag, hi(b[reg]))
    d = am @ bm
    acc += np.stack([d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]])


# ----------------------------------------------------------------------------- tensor-core GEMM


def a_chunk_offset(r, c):
    return r * A_ROW_WORDS + ((c ^ ((r >> 1) & 3)) << 2)


def _mma_load_stage(x, qweight, qzeros, scales16, g_size, bm, m0, n0, kt, group_start):
    """Shared memory of one stage after the cp.async copies of gemm_mma.cu's load_stage."""
    m = x.shape[0]
    nw, n0w, k0 = qweight.shape[1], n0 // 8, kt * MMA_BK
    a = np.zeros(bm * A_ROW_WORDS, U32)
    for i in range(bm * 4):
        r, c = divmod(i, 4)
        if m0 + r < m:
            a[a_chunk_offset(r, c):][:4] = words_of_halves(x[m0 + r, k0 + 8 * c:k0 + 8 * c + 8])
    b = np.zeros(MMA_BK * B_STRIDE, U32)
    for i in range(MMA_BK * 4):
        r, c = divmod(i, 4)
        if n0w + 4 * c < nw:
            b[r * B_STRIDE + 4 * c:][:4] = qweight[k0 + r, n0w + 4 * c:n0w + 4 * c + 4]
    s, z = np.zeros(MMA_BN // 2, U32), np.zeros(MMA_BN // 8, U32)
    if group_start:
        grp = k0 // g_size
        n_ok = min(MMA_BN, scales16.shape[1] - n0)
        s[:n_ok // 2] = words_of_halves(scales16[grp, n0:n0 + n_ok])
        z[:n_ok // 8] = qzeros[grp, n0w:n0w + n_ok // 8]
    return a, b, s, z


def _mma_load_group(tag, z, s, word):
    zw, zb, sb = z[word], [None] * 8, [None] * 8
    for p in range(4):
        zp = nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2
        zb[2 * p], zb[2 * p + 1] = prmt(zp, zp, 0x1010), prmt(zp, zp, 0x3232)
        sp = scale_pair(tag, s[word * 4 + p])
        sb[2 * p], sb[2 * p + 1] = prmt(sp, sp, 0x1010), prmt(sp, sp, 0x3232)
    return zb, sb


def emulate_mma(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N), NaN where the kernel writes nothing.

    x: uint16 bits [M, K]; qweight/qzeros: uint32; scales16: uint16 bits. `record`, if a list,
    receives (k, n, bits) arrays: every dequantized B-fragment element and where it belongs.
    """
    m, k = x.shape
    n = qweight.shape[1] * 8
    bm, warps_m = launch.config, MMA_CONFIGS[launch.config]
    mi = bm // (16 * warps_m)
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    g, t = LANE // 4, LANE % 4
    for bz in range(launch.grid[2]):
        kt_begin = bz * launch.k_per_split
        kt_end = min(k // MMA_BK, kt_begin + launch.k_per_split)
        for by in range(launch.grid[1]):
            for bx in range(launch.grid[0]):
                n0, m0 = bx * MMA_BN, by * bm
                accs = {(wm, wn): np.zeros((mi, 8, 4, 32)) for wm in range(warps_m)
                        for wn in range(WARPS_N)}
                groups = {}
                for kt in range(kt_begin, kt_end):
                    start = kt == kt_begin or (kt * MMA_BK) % g_size == 0
                    a_s, b_s, s_s, z_s = _mma_load_stage(x, qweight, qzeros, scales16, g_size,
                                                         bm, m0, n0, kt, start)
                    for (wm, wn), acc in accs.items():
                        word = wn * 8 + g
                        if start:
                            groups[wm, wn] = _mma_load_group(tag, z_s, s_s, word)
                        zb, sb = groups[wm, wn]
                        for ks in range(MMA_BK // 16):
                            a = []
                            for i in range(mi):
                                r = (wm * mi + i) * 16 + LANE % 16
                                addr = a_chunk_offset(r, ks * 2 + LANE // 16)
                                a.append([a_s[addr[8 * q + LANE // 4] + LANE % 4]
                                          for q in range(4)])  # ldmatrix.x4
                            base = (ks * 16 + 2 * t) * B_STRIDE + word
                            w0, w1 = b_s[base], b_s[base + B_STRIDE]
                            w8, w9 = b_s[base + 8 * B_STRIDE], b_s[base + 9 * B_STRIDE]
                            even = (prmt(w0, w1, 0x5410), prmt(w8, w9, 0x5410))
                            odd = (prmt(w0, w1, 0x7632), prmt(w8, w9, 0x7632))
                            for p in range(4):
                                for j, src in ((2 * p, even), (2 * p + 1, odd)):
                                    b = [dequant_pair(tag, shr(src[h], 4 * p), zb[j], sb[j])
                                         for h in range(2)]
                                    if record is not None:
                                        for h in range(2):
                                            kk = kt * MMA_BK + ks * 16 + 2 * t + 8 * h
                                            nn = n0 + 8 * word + j
                                            record.append((kk, nn, lo(b[h])))
                                            record.append((kk + 1, nn, hi(b[h])))
                                    for i in range(mi):
                                        mma16816(acc[i, j], a[i], b, tag)
                for (wm, wn), acc in accs.items():
                    if n0 + wn * WARP_N < n:
                        _mma_store(out[bz], acc, m0 + wm * mi * 16 + g, n0 + wn * WARP_N + 16 * t)
    return out


def _mma_store(out, acc, row0, col0):
    """store_tile: rows g and g + 8 of each m16 tile, 16 consecutive columns per lane."""
    m = out.shape[0]
    for i in range(acc.shape[0]):
        for h in range(2):
            row = row0 + i * 16 + h * 8
            for lane in np.nonzero(row < m)[0]:
                v = np.concatenate([acc[i, :, 2 * h, lane], acc[i, :, 2 * h + 1, lane]])
                out[row[lane], col0[lane]:col0[lane] + 16] = v


# ----------------------------------------------------------------------------- GEMV


def emulate_gemv(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N) of gemv.cu, NaN where nothing is written."""
    m, k = x.shape
    n = qweight.shape[1] * 8
    mt, warps, rows_per_warp = launch.config, 8, GEMV_KC // 8
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    xs_all = np.zeros((mt, k), np.uint16)
    xs_all[:m] = x  # rows >= M are zero-filled copies
    for by in range(launch.grid[1]):
        kc_begin = by * launch.k_per_split
        kc_end = min(k // GEMV_KC, kc_begin + launch.k_per_split)
        for bx in range(launch.grid[0]):
            n0 = bx * GEMV_NT
            n_ok = min(GEMV_NT, n - n0)
            acc = np.zeros((warps, mt, 8, 32), np.float32)
            for kc in range(kc_begin, kc_end):
                k0 = kc * GEMV_KC
                w_s = np.zeros((GEMV_KC, 32), U32)
                w_s[:, :n_ok // 8] = qweight[k0:k0 + GEMV_KC, n0 // 8:(n0 + n_ok) // 8]
                if kc == kc_begin or k0 % g_size == 0:
                    z_s = np.zeros(32, U32)
                    s_s = np.zeros(128, U32)
                    z_s[:n_ok // 8] = qzeros[k0 // g_size, n0 // 8:(n0 + n_ok) // 8]
                    s_s[:n_ok // 2] = words_of_halves(scales16[k0 // g_size, n0:n0 + n_ok])
                    zneg = [nibbles_to_magic_pair(tag, shr(z_s[LANE], 4 * p)) ^ SIGN2
                            for p in range(4)]
                    sp = [scale_pair(tag, s_s[LANE * 4 + p]) for p in range(4)]
                for w in range(warps):
                    for rr in range(rows_per_warp):
                        row = w * rows_per_warp + rr
                        xf = to_f32(tag, xs_all[:, k0 + row])  # (MT,)
                        for p in range(4):
                            w2 = dequant_pair(tag, shr(w_s[row, LANE], 4 * p), zneg[p], sp[p])
                            if record is not None:
                                nn = n0 + 8 * LANE
                                record.append((np.full(32, k0 + row), nn + 2 * p, lo(w2)))
                                record.append((np.full(32, k0 + row), nn + 2 * p + 1, hi(w2)))
                            acc[w, :, 2 * p] += xf[:, None] * to_f32(tag, lo(w2))[None]
                            acc[w, :, 2 * p + 1] += xf[:, None] * to_f32(tag, hi(w2))[None]
            total = acc[0].copy()
            for w in range(1, warps):  # fixed-order cross-warp sum
                total += acc[w]
            cols = (n0 + 8 * LANE[:, None] + np.arange(8)[None]).T  # (8, 32): column of acc[.., j, l]
            for mm in range(min(m, mt)):
                valid = cols < n
                out[by, mm, cols[valid]] = total[mm][valid]
    return out


# ----------------------------------------------------------------------------- dequant


def emulate_dequant(tag, qweight, qzeros, scales16, g_size) -> np.ndarray:
    """W bits [K, N] (uint16) as dequant.cu writes them, one packed word per thread."""
    k, nw = qweight.shape
    grp = np.arange(k)[:, None] // g_size
    zw = qzeros[grp, np.arange(nw)[None]]                      # (K, N/8)
    s = words_of_halves(scales16).reshape(-1, nw, 4)[grp[:, 0]]  # (K, N/8, 4) scale pairs
    out = np.zeros((k, nw, 8), np.uint16)
    for p in range(4):
        zneg = nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2
        w2 = dequant_pair(tag, shr(qweight, 4 * p), zneg, scale_pair(tag, s[..., p]))
        out[..., 2 * p], out[..., 2 * p + 1] = lo(w2), hi(w2)
    return out.reshape(k, nw * 8)


# ----------------------------------------------------------------------------- gemv_direct


def emulate_gemv_direct(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N) of gemv_direct.cu, NaN where nothing is written,
    including the 16-bit pair accumulators and their flush after every chunk."""
    m, k = x.shape
    n = qweight.shape[1] * 8
    nw = n // 8
    mt = launch.config
    vec = GEMV_DIRECT_VEC[mt]
    lanes_per_row, flush = 32 // vec, gemv_direct_flush(tag, mt)
    rows_per_chunk = flush * vec
    c, r = LANE % lanes_per_row, LANE // lanes_per_row
    pairs = 4 * vec
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    for by in range(launch.grid[1]):
        k_begin = by * launch.k_per_split * GEMV_KC
        chunks = (min(k, k_begin + launch.k_per_split * GEMV_KC) - k_begin) // rows_per_chunk
        for bx in range(launch.grid[0]):
            word0 = bx * (GEMV_NT // 8) + c * vec  # (32,)
            valid = word0 < nw
            wcol = np.where(valid, word0, 0)  # lanes past N read column 0, never stored
            acc = np.zeros((8, mt, 2 * pairs, 32), np.float32)  # (warp, m, column j, lane)
            for warp in range(8):
                loaded_group, zneg, sp = -1, [], []
                for q in range(warp, chunks, 8):
                    row0 = k_begin + q * rows_per_chunk
                    if row0 // g_size != loaded_group:
                        loaded_group = row0 // g_size
                        zneg, sp = [], []
                        for v in range(vec):
                            zw = qzeros[loaded_group, wcol + v]
                            for p in range(4):
                                cols = 8 * (wcol + v) + 2 * p
                                s_pair = pair(scales16[loaded_group, cols],
                                              scales16[loaded_group, cols + 1])
                                zneg.append(nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2)
                                sp.append(scale_pair(tag, s_pair))
                    h = np.zeros((mt, pairs, 32), U32)
                    for u in range(flush):
                        row = row0 + u * vec + r  # (32,)
                        x2 = [pair(x[min(mm, m - 1), row], x[min(mm, m - 1), row])
                              for mm in range(mt)]
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
                    acc[warp, :, 0::2] += to_f32(tag, lo(h))  # fp32 adds, in the kernel's order
                    acc[warp, :, 1::2] += to_f32(tag, hi(h))
            off = lanes_per_row
            while off < 32:  # butterfly over the lanes holding the same columns
                acc = acc + acc[..., LANE ^ off]
                off *= 2
            red = np.zeros((8, mt, GEMV_NT), np.float32)
            for warp in range(8):
                for j in range(2 * pairs):
                    red[warp][:, c[r == 0] * 8 * vec + j] = acc[warp][:, j][:, r == 0]
            total = np.zeros((mt, GEMV_NT), np.float32)
            for warp in range(8):  # fixed-order cross-warp sum
                total += red[warp]
            n0 = bx * GEMV_NT
            n_ok = min(GEMV_NT, n - n0)
            for mm in range(min(m, mt)):
                out[by, mm, n0:n0 + n_ok] = total[mm, :n_ok]
    return out


# ----------------------------------------------------------------------------- mma_direct


def emulate_mma_direct(tag, x, qweight, qzeros, scales16, g_size, launch: Launch, record=None):
    """fp32 partial sums (splits, M, N) of mma_direct.cu, NaN where nothing is written: the
    weights as the A operand (A rows g, g + 8 of m16 tile i = columns 2i, 2i + 1 of the lane's
    word), x as the B operand (n8 tile j = rows 8j..8j+7); per 64 columns two warps, each
    taking half of K (WM = 1) or all of K for its 8 NT rows (WM = 2)."""
    m, k = x.shape
    n = qweight.shape[1] * 8
    nw = n // 8
    nt, wm_count = MMA_DIRECT_CONFIGS[launch.config]
    g, t = LANE // 4, LANE % 4
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
                    for q in range(min(chunks, q_begin + half) - q_begin):
                        row0 = row_first + q * GEMV_KC
                        if q == 0 or row0 % g_size == 0:  # group_pairs
                            grp = row0 // g_size
                            zb, sb = [None] * 8, [None] * 8
                            for p in range(4):
                                zp = nibbles_to_magic_pair(tag, shr(qzeros[grp, wcol], 4 * p)) ^ SIGN2
                                zb[2 * p], zb[2 * p + 1] = prmt(zp, zp, 0x1010), prmt(zp, zp, 0x3232)
                                cols = 8 * wcol + 2 * p
                                sp = scale_pair(tag, pair(scales16[grp, cols], scales16[grp, cols + 1]))
                                sb[2 * p], sb[2 * p + 1] = prmt(sp, sp, 0x1010), prmt(sp, sp, 0x3232)
                        for s in range(2):
                            kk = row0 + 16 * s + 2 * t  # (32,)
                            w0, w1 = qweight[kk, wcol], qweight[kk + 1, wcol]
                            w8, w9 = qweight[kk + 8, wcol], qweight[kk + 9, wcol]
                            even01, odd01 = prmt(w0, w1, 0x5410), prmt(w0, w1, 0x7632)
                            even89, odd89 = prmt(w8, w9, 0x5410), prmt(w8, w9, 0x7632)
                            b = []
                            for j in range(nt):
                                row = np.minimum(m_base + 8 * j + g, m - 1)
                                b.append([pair(x[row, kk], x[row, kk + 1]),
                                          pair(x[row, kk + 8], x[row, kk + 9])])
                            for i in range(4):
                                a = [dequant_pair(tag, shr(even01, 4 * i), zb[2 * i], sb[2 * i]),
                                     dequant_pair(tag, shr(odd01, 4 * i), zb[2 * i + 1], sb[2 * i + 1]),
                                     dequant_pair(tag, shr(even89, 4 * i), zb[2 * i], sb[2 * i]),
                                     dequant_pair(tag, shr(odd89, 4 * i), zb[2 * i + 1], sb[2 * i + 1])]
                                if record is not None and in_n:
                                    for reg, (dk, dc) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                                        col = 8 * word + 2 * i + dc
                                        record.append((kk + dk, col, lo(a[reg])))
                                        record.append((kk + dk + 1, col, hi(a[reg])))
                                for j in range(nt):
                                    mma16816(acc[i, j], a, b[j], tag)
                    accs.append(acc.astype(np.float32))
                if not in_n:
                    continue
                if wm_count == 1:  # wk = 0 adds wk = 1's sums
                    stores = [(0, accs[0] + accs[1])]
                else:  # each row of warps its own rows
                    stores = [(wr * 8 * nt, accs[wr]) for wr in range(2)]
                for m_base, total in stores:
                    for j in range(nt):
                        for h in range(2):  # c0/c2: row 8j + 2t, c1/c3: row 8j + 2t + 1
                            row = m_base + 8 * j + 2 * t + h
                            for lane in np.nonzero(row < m)[0]:
                                for i in range(4):
                                    col = 8 * word[lane] + 2 * i
                                    out[by, row[lane], col] = total[i, j, h, lane]
                                    out[by, row[lane], col + 1] = total[i, j, 2 + h, lane]
    return out


# ----------------------------------------------------------------------------- elementwise.cu


def _round(tag: str, f) -> np.ndarray:
    """round_t: to the 16-bit type and back to float32."""
    return to_f32(tag, from_f64(tag, np.asarray(f, np.float32)))


def _gather8(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """load8 at each element offset: (units,) -> (units, 8) values of a flat 16-bit buffer."""
    return flat[offsets[:, None] + np.arange(8)[None]]


def emulate_rotary(tag, x_flat, x_offset, shape, strides, cos, sin):
    """rotary<T>: x (B, T, H, Dh) at x_offset in the flat 16-bit buffer x_flat with element
    strides (sb, st, sh, 1); cos, sin (T, Dh) 16-bit bits. Returns y (B, T, H, Dh) bits, each
    unit of 8 placed by the kernel's own index arithmetic."""
    b_len, t_len, h_len, dh = shape
    sb, st, sh = strides
    half = dh // 2
    per_head = half // 8
    i = np.arange(b_len * t_len * h_len * per_head)
    c = (i % per_head) * 8
    rest = i // per_head
    h = rest % h_len
    rest = rest // h_len
    t = rest % t_len
    b = rest // t_len
    xp = x_offset + b * sb + t * st + h * sh + c
    cp = t * dh + c
    x1, x2 = to_f32(tag, _gather8(x_flat, xp)), to_f32(tag, _gather8(x_flat, xp + half))
    cos_flat, sin_flat = cos.reshape(-1), sin.reshape(-1)
    c1, c2 = to_f32(tag, _gather8(cos_flat, cp)), to_f32(tag, _gather8(cos_flat, cp + half))
    s1, s2 = to_f32(tag, _gather8(sin_flat, cp)), to_f32(tag, _gather8(sin_flat, cp + half))
    y1 = _round(tag, x1 * c1) + _round(tag, x2 * s1)  # float32 sums, as the kernel's
    y2 = _round(tag, x2 * c2) + _round(tag, x1 * s2)
    y = np.zeros(b_len * t_len * h_len * dh, np.uint16)
    yp = ((b * t_len + t) * h_len + h) * dh + c
    y[yp[:, None] + np.arange(8)[None]] = from_f64(tag, y1)
    y[yp[:, None] + half + np.arange(8)[None]] = from_f64(tag, y2)
    return y.reshape(shape)


def emulate_silu_mul(tag, g_flat, g_offset, g_stride, u_flat, u_offset, u_stride, rows, f):
    """silu_mul<T>: gate / up rows at the given offsets and row strides of flat 16-bit buffers;
    y [rows, F] bits. expf is float64 here (the kernel's is within 2 ulp of it)."""
    i = np.arange(rows * f // 8)
    r, c = i // (f // 8), (i % (f // 8)) * 8
    g = to_f32(tag, _gather8(g_flat, g_offset + r * g_stride + c))
    u = to_f32(tag, _gather8(u_flat, u_offset + r * u_stride + c))
    silu = (g / (1.0 + np.exp(-g.astype(np.float64)))).astype(np.float32)
    y = np.zeros(rows * f, np.uint16)
    y[(r * f + c)[:, None] + np.arange(8)[None]] = from_f64(tag, _round(tag, silu) * u)
    return y.reshape(rows, f)


def emulate_rms_norm(tag, x_flat, x_offset, x_stride, w, rows, d, eps, threads=256):
    """rms_norm<T>: one block per row; thread k sums the squares of its 8-value chunks
    k * 8, k * 8 + 8 * threads, ..., warps by butterfly, warps' sums in order. y [rows, D] bits."""
    y = np.zeros((rows, d), np.uint16)
    wf = to_f32(tag, w)
    for row in range(rows):
        x = to_f32(tag, x_flat[x_offset + row * x_stride:][:d])
        per_thread = np.zeros(threads, np.float32)
        for k in range(threads):
            for c in range(k * 8, d, threads * 8):
                for v in x[c:c + 8]:
                    per_thread[k] = np.float32(v * v + per_thread[k])  # fmaf, exact here
        sums = per_thread.reshape(-1, 32)
        for off in (16, 8, 4, 2, 1):  # butterfly: lane l adds lane l ^ off
            sums = sums + sums[:, np.arange(32) ^ off]
        total = np.float32(0)
        for s in sums[:, 0]:
            total = np.float32(total + s)
        inv = np.float32(1.0 / np.sqrt(np.float64(total / np.float32(d)) + eps))
        y[row] = from_f64(tag, _round(tag, x * inv) * wf)
    return y


def emulate_add_rms_norm(tag, x_flat, x_offset, x_stride, d_flat, d_offset, d_stride, w, rows, d,
                         eps, threads=256):
    """add_rms_norm<T>: (s, y) bits [rows, D]: s = x + delta rounded, y = rms_norm(s) * w."""
    s = np.zeros((rows, d), np.uint16)
    for row in range(rows):
        a = to_f32(tag, x_flat[x_offset + row * x_stride:][:d])
        b = to_f32(tag, d_flat[d_offset + row * d_stride:][:d])
        s[row] = from_f64(tag, a + b)  # float32 sum, rounded once to T
    return s, emulate_rms_norm(tag, s.reshape(-1), 0, d, w, rows, d, eps, threads)


def emulate_rotary_into_cache(tag, flats, offsets, strides, shapes, cos, sin, keys, values, p0):
    """rotary_into_cache<T>: q, k, v given as (flat 16-bit buffer, element offset, (sb, st, sh))
    each; shapes = (B, T, H, Hkv, Dh); keys, values (B, Hkv, S, Dh) bits, written in place (a
    copy is returned); returns (q_out bits (B, T, H, Dh), keys, values). The kernel's unit
    decomposition: rotations of the H + Hkv heads first, then the copies of v."""
    b_len, t_len, h_len, hkv, dh = shapes
    keys, values = keys.copy(), values.copy()
    s_len = keys.shape[2]
    half, per_head, per_row = dh // 2, dh // 16, dh // 8
    cos_flat, sin_flat = cos.reshape(-1), sin.reshape(-1)
    q_out = np.zeros(b_len * t_len * h_len * dh, np.uint16)
    k_flat, v_flat = keys.reshape(-1), values.reshape(-1)
    rot_units = b_len * t_len * (h_len + hkv) * per_head
    for i in range(rot_units):
        c = (i % per_head) * 8
        rest = i // per_head
        h = rest % (h_len + hkv)
        rest //= h_len + hkv
        t, b = rest % t_len, rest // t_len
        src = 0 if h < h_len else 1
        head = h if h < h_len else h - h_len
        sb, st, sh = strides[src]
        xp = offsets[src] + b * sb + t * st + head * sh + c
        x1, x2 = to_f32(tag, flats[src][xp:xp + 8]), to_f32(tag, flats[src][xp + half:xp + half + 8])
        cp = t * dh + c
        c1, c2 = to_f32(tag, cos_flat[cp:cp + 8]), to_f32(tag, cos_flat[cp + half:cp + half + 8])
        s1, s2 = to_f32(tag, sin_flat[cp:cp + 8]), to_f32(tag, sin_flat[cp + half:cp + half + 8])
        y1 = from_f64(tag, _round(tag, x1 * c1) + _round(tag, x2 * s1))
        y2 = from_f64(tag, _round(tag, x2 * c2) + _round(tag, x1 * s2))
        if src == 0:
            out, yp = q_out, ((b * t_len + t) * h_len + head) * dh + c
        else:
            out, yp = k_flat, ((b * hkv + head) * s_len + p0 + t) * dh + c
        out[yp:yp + 8], out[yp + half:yp + half + 8] = y1, y2
    for j in range(b_len * t_len * hkv * per_row):
        c = (j % per_row) * 8
        rest = j // per_row
        head = rest % hkv
        rest //= hkv
        t, b = rest % t_len, rest // t_len
        sb, st, sh = strides[2]
        vp = offsets[2] + b * sb + t * st + head * sh + c
        yp = ((b * hkv + head) * s_len + p0 + t) * dh + c
        v_flat[yp:yp + 8] = flats[2][vp:vp + 8]
    return q_out.reshape(b_len, t_len, h_len, dh), keys, values


def emulate_decode_attention(tag, q, keys, values, p, chunk=64, warps=4):
    """decode_attention<T, Dh>: q bits (B, 1, H, Dh), keys / values bits (B, Hkv, S, Dh),
    slots 0..p. Mirrors the kernel's split / warp / online-softmax structure and both merges
    in float32. Returns y bits (B, 1, H, Dh)."""
    b_len, _, h_len, dh = q.shape
    hkv, s_len = keys.shape[1], keys.shape[2]
    group, splits, per_warp = h_len // hkv, -(-s_len // chunk), chunk // warps
    scale = np.float32(dh ** -0.5)
    f32 = np.float32

    def merge(parts):  # [(m, l, acc)] -> (m, l, acc), in order; m = -inf: empty
        m_all = max(m for m, _, _ in parts)
        l_all, a_all = f32(0), np.zeros(dh, f32)
        for m, l_, a in parts:
            f = f32(0) if m == -np.inf else f32(np.exp(f32(m - m_all)))
            l_all = f32(l_all + l_ * f)
            a_all = (a_all + a * f).astype(f32)
        return m_all, l_all, a_all

    y = np.zeros((b_len, 1, h_len, dh), np.uint16)
    for b in range(b_len):
        for hk in range(hkv):
            kf = to_f32(tag, keys[b, hk])
            vf = to_f32(tag, values[b, hk])
            for h in range(group):
                head = hk * group + h
                qv = (to_f32(tag, q[b, 0, head]) * scale).astype(f32)
                split_parts = []
                for sp in range(splits):
                    warp_parts = []
                    for w in range(warps):
                        m, l_, acc = f32(-np.inf), f32(0), np.zeros(dh, f32)
                        s_begin = sp * chunk + w * per_warp
                        for s in range(s_begin, min(s_begin + per_warp, p + 1)):
                            dot = f32(np.dot(qv, kf[s]))
                            m_new = max(m, dot)
                            corr, pe = f32(np.exp(f32(m - m_new))), f32(np.exp(f32(dot - m_new)))
                            l_ = f32(l_ * corr + pe)
                            acc = (acc * corr + pe * vf[s]).astype(f32)
                            m = m_new
                        warp_parts.append((m, l_, acc))
                    split_parts.append(merge(warp_parts))
                _, l_all, a_all = merge(split_parts)
                y[b, 0, head] = from_f64(tag, a_all / l_all)
    return y
