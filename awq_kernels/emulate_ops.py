"""NumPy emulation of elementwise.cu and attention.cu (awq_kernels.ops): the kernels' index
arithmetic over strided views and their roundings, for CPU tests against awq_ref's torch code.
Lanes and threads are vectorized or looped; the 16-bit helpers come from emulate.py."""

from __future__ import annotations

import numpy as np

from .emulate import from_f64, to_f32

NAN16 = {"F16": 0x7E00, "BF16": 0x7FC0}  # the traits' quiet NaN bits (common.cuh)


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
    if p0 < 0 or p0 + t_len > s_len:  # outside the cache: q NaN, the cache as it was
        return np.full((b_len, t_len, h_len, dh), NAN16[tag], np.uint16), keys, values
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
        x1, x2 = (to_f32(tag, flats[src][xp:xp + 8]),
                  to_f32(tag, flats[src][xp + half:xp + half + 8]))
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


def emulate_decode_attention(tag, q, keys, values, p, chunk=64, warps=4, skip_empty=True):
    """decode_attention<T, Dh>: q bits (B, 1, H, Dh), keys / values bits (B, Hkv, S, Dh),
    slots 0..p. Mirrors the kernel's split / warp / online-softmax structure and both merges
    in float32 (its structure, not every bit: the dot products here are NumPy's order, and nvcc
    fuses the updates' multiply-adds); the final merge takes the splits holding slots <= p, as
    the kernel does (skip_empty=False: every split, the empty ones as m = -inf, as it did until
    session 22). Returns y bits (B, 1, H, Dh)."""
    b_len, _, h_len, dh = q.shape
    hkv, s_len = keys.shape[1], keys.shape[2]
    if p < 0 or p >= s_len:  # outside the cache: NaN, nothing read
        return np.full((b_len, 1, h_len, dh), NAN16[tag], np.uint16)
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
                for sp in range(min(splits, p // chunk + 1) if skip_empty else splits):
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


# ----------------------------------------------------------------------------- gemv_int8.cu


def emulate_gemv_int8(tag, x, q, s):
    """gemv_int8<T, MT>: x bits [M, K], q int8 [N, K], s fp32 [N] -> y bits [M, N]. Lane l of
    row n's warp adds q * x over k = 16 l + 512 i (in k order, fp32 fma), the lanes' sums by
    butterfly, then one multiply by s and one rounding."""
    m, k = x.shape
    xf = to_f32(tag, x)
    qf = q.astype(np.float32)
    lanes = np.zeros((m, q.shape[0], 32), np.float32)
    for lane in range(32):
        for k0 in range(16 * lane, k, 512):
            for kk in range(k0, k0 + 16):
                lanes[:, :, lane] = (lanes[:, :, lane]
                                     + (xf[:, kk, None] * qf[None, :, kk]).astype(np.float32))
    for off in (16, 8, 4, 2, 1):  # butterfly: lane l adds lane l ^ off
        lanes = lanes + lanes[..., np.arange(32) ^ off]
    return from_f64(tag, (lanes[..., 0] * s[None, :].astype(np.float32)).astype(np.float32))
