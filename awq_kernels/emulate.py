"""NumPy emulation of the kernels' bit tricks and thread -> data mappings.

No GPU here, so the CPU tests run the kernels' index math in NumPy, instruction for
instruction where it matters: the cp.async copies into (swizzled, padded) shared memory,
ldmatrix, the byte permutes, the lop3 / magic-number dequantization on 16-bit patterns, the
mma.sync fragment layouts (PTX ISA, m16n8k16) and the output stores. Lanes are vectorized:
per-lane registers are arrays of shape (32,). Mirrors gemm_mma.cu, gemv.cu and dequant.cu;
emulate_direct.py mirrors gemv_direct.cu and mma_direct.cu, emulate_ops.py elementwise.cu and
attention.cu, with the helpers here.
"""

from __future__ import annotations

import numpy as np

from .plan import GEMV_KC, GEMV_NT, Launch

U32 = np.uint32
MAGIC2 = {"F16": U32(0x64006400), "BF16": U32(0x43004300)}
ONE2 = {"F16": U32(0x3C003C00), "BF16": U32(0x3F803F80)}
SIGN2 = NEG_ZERO2 = U32(0x80008000)
NIBBLE_MASK2 = U32(0x000F000F)
WARP_N = 64
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


HIGH_NIBBLE_MASK2, SIXTEENTH2_F16, NINE_SIXTY2_F16 = (U32(0x00F000F0), U32(0x2C002C00),
                                                      U32(0x63806380))


def dequant_nibbles(tag: str, w, w8, p: int, zneg, s) -> np.ndarray:
    """common.cuh's dequant_nibbles: fp16 masks pairs p = 1, 3 in place (1024 + 16 q) and
    scales them by 1/16 while subtracting; bf16 shifts every pair down."""
    if tag != "F16":
        return dequant_pair(tag, shr(w, 4 * p), zneg, s)
    in_place = p % 2 == 1
    src = np.asarray(w if p < 2 else w8, dtype=U32)
    x = (src & (HIGH_NIBBLE_MASK2 if in_place else NIBBLE_MASK2)) | MAGIC2[tag]
    q_minus_z = fma2(tag, x, SIXTEENTH2_F16 if in_place else ONE2[tag], zneg)
    return fma2(tag, q_minus_z, s, NEG_ZERO2)


def zero_nibbles(tag: str, zw, p: int) -> np.ndarray:
    """common.cuh's zero_nibbles: -(MAGIC + z), fp16's in-place pairs -(64 + z)."""
    neg_magic_z = nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2
    if tag == "F16" and p % 2 == 1:
        return fma2(tag, neg_magic_z, ONE2[tag], NINE_SIXTY2_F16)
    return neg_magic_z


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


def a_chunk_offset(r, c, bk=32):
    """gemm_mma.cu's a_chunk_offset<BK>: word offset of x chunk c of row r, XOR-swizzled."""
    swizzle = (r >> 1) & 3 if bk == 32 else r & 7
    return r * (bk // 2) + ((c ^ swizzle) << 2)


def b_stride(tile) -> int:
    return tile.bn // 8 + 4


class _StageCopies:
    """gemm_mma.cu's StageCopies: each thread's copies worked out at the block's first k tile
    (flat element offsets into x, qweight and the group rows; shared word offsets; byte
    counts), then issued for the k tiles in order, every source advanced by a constant."""

    def __init__(self, x, qweight, qzeros, scales16, tile, threads, m0, n0, kt_begin):
        m, k = x.shape
        nw, n0w, k0 = qweight.shape[1], n0 // 8, kt_begin * tile.bk
        n = scales16.shape[1]
        a_row, b_row = tile.bk // 8, tile.bn // 32  # 16-byte chunks per x / weight row
        self.tile, self.flat = tile, (x.reshape(-1), qweight.reshape(-1))
        self.raw = {"s": scales16.reshape(-1).astype(np.uint16).tobytes(),  # the group rows
                    "z": qzeros.reshape(-1).astype(U32).tobytes()}
        self.a, self.b, self.g = [], [], []  # [src offset, dst word, bytes] per copy
        for i in range(tile.bm * a_row):
            r, c = divmod(i, a_row)
            ok = m0 + r < m
            self.a.append([(m0 + r if ok else 0) * k + k0 + 8 * c, a_chunk_offset(r, c, tile.bk),
                           16 if ok else 0])
        for i in range(tile.bk * b_row):
            r, c = divmod(i, b_row)
            ok = n0w + 4 * c < nw
            self.b.append([(k0 + r) * nw + (n0w + 4 * c if ok else 0),
                           r * b_stride(tile) + 4 * c, 16 if ok else 0])
        self.b_step = tile.bk * nw
        for i in range(min(threads, tile.bn // 8 + tile.bn // 32)):
            if i < tile.bn // 8:  # scale chunk i: (source, byte offset in it, row bytes, ...)
                ok = n0 + 8 * i < n
                self.g.append(("s", 2 * (n0 + 8 * i if ok else 0), 2 * n, 4 * i, 16 if ok else 0))
            else:
                c = i - tile.bn // 8
                ok = n0w + 4 * c < nw
                self.g.append(("z", 4 * (n0w + 4 * c if ok else 0), 4 * nw, 4 * c, 16 if ok else 0))

    def issue(self, kt, group_start, g_size):
        """Shared memory of one stage after this tile's copies (k tile `kt`, the next in order)."""
        tile, (x_flat, w_flat) = self.tile, self.flat
        a = np.zeros(tile.bm * tile.bk // 2, U32)
        for copy in self.a:
            src, dst, nbytes = copy
            if nbytes:
                a[dst:dst + 4] = words_of_halves(x_flat[src:src + 8])
            copy[0] += tile.bk
        b = np.zeros(tile.bk * b_stride(tile), U32)
        for copy in self.b:
            src, dst, nbytes = copy
            if nbytes:
                b[dst:dst + 4] = w_flat[src:src + 4]
            copy[0] += self.b_step
        s, z = np.zeros(tile.bn // 2, U32), np.zeros(tile.bn // 8, U32)
        if group_start:
            grp = kt * tile.bk // g_size
            for which, offset, row_bytes, dst, nbytes in self.g:
                if nbytes:
                    start = grp * row_bytes + offset
                    words = np.frombuffer(self.raw[which][start:start + 16], U32)
                    (s if which == "s" else z)[dst:dst + 4] = words
        return a, b, s, z


def group_pairs(tag, z, s, word):
    """A group's zero and scale pairs of packed word column `word` (common.cuh group_pairs):
    z the group's packed zeros words, s its scales as words of two halves; (zb, sb), 8 pairs
    each, entry j both halves column 8 word + j's value."""
    zw, zb, sb = z[word], [None] * 8, [None] * 8
    for p in range(4):
        zp = zero_nibbles(tag, zw, p)
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
    tile = launch.tile
    bk = tile.bk
    mi = tile.bm // (16 * tile.warps_m)
    out = np.full((launch.splits, m, n), np.nan, np.float32)
    g, t = LANE // 4, LANE % 4
    for bz in range(launch.grid[2]):
        kt_begin = bz * launch.k_per_split
        kt_end = min(k // bk, kt_begin + launch.k_per_split)
        for by in range(launch.grid[1]):
            for bx in range(launch.grid[0]):
                n0, m0 = bx * tile.bn, by * tile.bm
                accs = {(wm, wn): np.zeros((mi, 8, 4, 32)) for wm in range(tile.warps_m)
                        for wn in range(tile.warps_n)}
                groups = {}
                copies = _StageCopies(x, qweight, qzeros, scales16, tile, tile.threads, m0, n0,
                                      kt_begin)
                for kt in range(kt_begin, kt_end):
                    start = kt == kt_begin or (kt * bk) % g_size == 0
                    a_s, b_s, s_s, z_s = copies.issue(kt, start, g_size)
                    for (wm, wn), acc in accs.items():
                        word = wn * 8 + g
                        if start:
                            groups[wm, wn] = group_pairs(tag, z_s, s_s, word)
                        for ks in range(bk // 16):
                            rec = None if record is None else (record, kt * bk + ks * 16, n0)
                            _mma_k16_step(tag, tile, a_s, b_s, ks, wm, word, groups[wm, wn],
                                          acc, rec)
                for (wm, wn), acc in accs.items():
                    if n0 + wn * WARP_N < n:
                        _mma_store(out[bz], acc, m0 + wm * mi * 16 + g, n0 + wn * WARP_N + 16 * t)
    return out


def _mma_k16_step(tag, tile, a_s, b_s, ks, wm, word, group, acc, rec):
    """One k16 step of warp row wm on packed word column `word` of the stage: the A fragments
    of its MI m16 tiles from the x tile (ldmatrix.x4), the B fragments of its 8 columns
    dequantized from 4 packed words, MI x 8 mma. `rec`: (record list, the step's first k, the
    block's first column), or None."""
    mi = tile.bm // (16 * tile.warps_m)
    stride, t = b_stride(tile), LANE % 4
    zb, sb = group
    a = []
    for i in range(mi):
        r = (wm * mi + i) * 16 + LANE % 16
        addr = a_chunk_offset(r, ks * 2 + LANE // 16, tile.bk)
        a.append([a_s[addr[8 * q + LANE // 4] + LANE % 4] for q in range(4)])  # ldmatrix.x4
    base = (ks * 16 + 2 * t) * stride + word
    w0, w1 = b_s[base], b_s[base + stride]
    w8, w9 = b_s[base + 8 * stride], b_s[base + 9 * stride]
    even = (prmt(w0, w1, 0x5410), prmt(w8, w9, 0x5410))
    odd = (prmt(w0, w1, 0x7632), prmt(w8, w9, 0x7632))
    for p in range(4):
        for j, src in ((2 * p, even), (2 * p + 1, odd)):
            b = [dequant_nibbles(tag, src[h], shr(src[h], 8), p, zb[j], sb[j]) for h in range(2)]
            if rec is not None:
                record, k0, n0 = rec
                for h in range(2):
                    kk, nn = k0 + 2 * t + 8 * h, n0 + 8 * word + j
                    record.append((kk, nn, lo(b[h])))
                    record.append((kk + 1, nn, hi(b[h])))
            for i in range(mi):
                mma16816(acc[i, j], a[i], b, tag)


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
            # (8, 32): column of acc[.., j, l]
            cols = (n0 + 8 * LANE[:, None] + np.arange(8)[None]).T
            for mm in range(min(m, mt)):
                valid = cols < n
                out[by, mm, cols[valid]] = total[mm][valid]
    return out


# ----------------------------------------------------------------------------- dequant


def emulate_dequant(tag, qweight, qzeros, scales16, g_size, n0: int = 0,
                    nc: int | None = None) -> np.ndarray:
    """W bits [K, NC] (uint16), columns n0 .. n0+NC-1, as dequant.cu writes them: thread i of
    the grid-stride loop takes word i of the slice, at row i // (NC/8), word column
    n0/8 + i % (NC/8) of the packed tensors (read through their flat index, as the kernel)."""
    k, nw = qweight.shape
    ncw = (nw * 8 if nc is None else nc) // 8
    i = np.arange(k * ncw)
    row, cs = i // ncw, i % ncw
    c, grp = n0 // 8 + cs, row // g_size
    q = qweight.reshape(-1)[row * nw + c]                       # (K * NC/8,)
    zw = qzeros.reshape(-1)[grp * nw + c]
    s = words_of_halves(scales16).reshape(-1)                   # scale pairs, 4 per word
    out = np.zeros((k * ncw, 8), np.uint16)
    for p in range(4):
        zneg = nibbles_to_magic_pair(tag, shr(zw, 4 * p)) ^ SIGN2
        w2 = dequant_pair(tag, shr(q, 4 * p), zneg, scale_pair(tag, s[grp * nw * 4 + c * 4 + p]))
        out[:, 2 * p], out[:, 2 * p + 1] = lo(w2), hi(w2)
    return out.reshape(k, ncw * 8)
