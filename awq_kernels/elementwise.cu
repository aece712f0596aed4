// elementwise.cu -- the decoder's small element-wise steps, one kernel each: RMSNorm with its
// weight, SwiGLU's silu(gate) * up, and the rotary embedding of q and k.
//
// Why: in a decode step of a CUDA-graph replay every kernel costs ~1.5-2.5 us however little it
// does; torch runs RMSNorm * weight as 2 kernels, silu(gate) * up as 2 and the rotary embedding as
// 4 (mul, roll, mul, add), ~12 per decoder layer of ~17 besides the products (H200 profile,
// 2026-12-04: 1.8-2.1 ms of a 6.3 ms Llama-3-8B-shaped token). These three kernels do the same
// work in 4 per layer.
//
// Numbers: each kernel rounds where torch's ops round (torch computes a 16-bit op in fp32 and
// rounds its result to the 16-bit type), so the rotary embedding and SwiGLU give torch's bits;
// RMSNorm differs only in the order of its sum of squares.
//
// All three read and write 8 consecutive 16-bit values (16 bytes) per access: the last dimension
// is contiguous and a multiple of 8 (16 for the rotary's half), row strides are multiples of 8
// elements and base pointers 16-byte aligned (checked in Python, awq_kernels/ops.py).
#include "common.cuh"

constexpr int EW_THREADS = 256;

// 8 consecutive 16-bit values <-> 8 floats (exact).
template <typename T> __device__ __forceinline__ void load8(const u16* p, float (&v)[8]) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = to_float<T>((u16)(ws[i] & 0xFFFFu));
    v[2 * i + 1] = to_float<T>((u16)(ws[i] >> 16));
  }
}
template <typename T> __device__ __forceinline__ void store8(u16* p, const float (&v)[8]) {
  st_global16(p, pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
              pack2<T>(v[6], v[7]));
}

// f rounded to T and widened back: what an op with a T result hands to the next op.
template <typename T> __device__ __forceinline__ float round_t(float f) {
  return to_float<T>((u16)(pack2<T>(f, 0.f) & 0xFFFFu));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// y[r] = w * rms_norm(x[r]) for each row r (one block per row): torch's
// `weight * F.rms_norm(x, (D,), eps)`: the sum of squares in fp32, x * rsqrt(mean + eps) rounded
// to T, then times w rounded to T. x rows `x_stride` elements apart; y [rows, D] contiguous.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
rms_norm(const u16* __restrict__ x, const u16* __restrict__ w, u16* __restrict__ y, int D,
         int x_stride, float eps) {
  __shared__ float partial[EW_THREADS / 32];
  const u16* xr = x + (size_t)blockIdx.x * x_stride;
  float ss = 0.f;
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float v[8];
    load8<T>(xr + c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
  }
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < EW_THREADS / 32; ++i) total += partial[i];  // the same order everywhere
  const float inv = rsqrtf(total / (float)D + eps);
  u16* yr = y + (size_t)blockIdx.x * D;
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float v[8], g[8];
    load8<T>(xr + c, v);
    load8<T>(w + c, g);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = round_t<T>(v[i] * inv) * g[i];
    store8<T>(yr + c, v);
  }
}

// y = silu(gate) * up, [rows, F]: torch's `F.silu(gate) * up` (silu = g / (1 + exp(-g)) in fp32,
// rounded to T, then the product rounded to T). gate and up rows `g_stride` / `u_stride`
// elements apart (the two halves of a fused gate_up output); y contiguous. One thread per 8
// values, grid-stride.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
silu_mul(const u16* __restrict__ gate, const u16* __restrict__ up, u16* __restrict__ y, int rows,
         int F, int g_stride, int u_stride) {
  const int per_row = F / 8;
  for (size_t i = blockIdx.x * (size_t)EW_THREADS + threadIdx.x; i < (size_t)rows * per_row;
       i += (size_t)gridDim.x * EW_THREADS) {
    const int r = (int)(i / per_row), c = (int)(i % per_row) * 8;
    float g[8], u[8];
    load8<T>(gate + (size_t)r * g_stride + c, g);
    load8<T>(up + (size_t)r * u_stride + c, u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = round_t<T>(g[j] / (1.0f + expf(-g[j]))) * u[j];
    store8<T>(y + (size_t)r * F + c, g);
  }
}

// Rotary embedding of x (B, T, H, Dh) -> y (B, T, H, Dh) contiguous, cos and sin_signed (T, Dh)
// contiguous (awq_ref.model.rotary_tables: -sin in the first half, +sin in the second):
// torch's `x * cos + roll(x, Dh / 2) * sin_signed`, i.e. with x = (x1, x2) halves
//   y1 = x1 cos1 + x2 sin1,  y2 = x2 cos2 + x1 sin2,
// each product rounded to T, then their sum. x strides (sb, st, sh) in elements, Dh contiguous.
// One thread per 8 values of a first half and their 8 partners.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
rotary(const u16* __restrict__ x, const u16* __restrict__ cos, const u16* __restrict__ sin,
       u16* __restrict__ y, int B, int T_len, int H, int Dh, int sb, int st, int sh) {
  const int half = Dh / 2, per_head = half / 8;
  const size_t units = (size_t)B * T_len * H * per_head;
  for (size_t i = blockIdx.x * (size_t)EW_THREADS + threadIdx.x; i < units;
       i += (size_t)gridDim.x * EW_THREADS) {
    const int c = (int)(i % per_head) * 8;
    size_t rest = i / per_head;
    const int h = (int)(rest % H);
    rest /= H;
    const int t = (int)(rest % T_len);
    const int b = (int)(rest / T_len);
    const u16* xp = x + (size_t)b * sb + (size_t)t * st + (size_t)h * sh + c;
    const u16* cp = cos + (size_t)t * Dh + c;
    const u16* sp = sin + (size_t)t * Dh + c;
    float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], y1[8], y2[8];
    load8<T>(xp, x1);
    load8<T>(xp + half, x2);
    load8<T>(cp, c1);
    load8<T>(cp + half, c2);
    load8<T>(sp, s1);
    load8<T>(sp + half, s2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      y1[j] = round_t<T>(x1[j] * c1[j]) + round_t<T>(x2[j] * s1[j]);
      y2[j] = round_t<T>(x2[j] * c2[j]) + round_t<T>(x1[j] * s2[j]);
    }
    u16* yp = y + (((size_t)b * T_len + t) * H + h) * Dh + c;
    store8<T>(yp, y1);
    store8<T>(yp + half, y2);
  }
}

// s = x + delta (rounded to T, as torch's add) and y = w * rms_norm(s), one block per row: the
// residual add that precedes a norm, in the norm's kernel. x and delta rows x_stride /
// d_stride elements apart; s and y [rows, D] contiguous.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
add_rms_norm(const u16* __restrict__ x, const u16* __restrict__ delta, const u16* __restrict__ w,
             u16* __restrict__ s, u16* __restrict__ y, int D, int x_stride, int d_stride,
             float eps) {
  __shared__ float partial[EW_THREADS / 32];
  const u16* xr = x + (size_t)blockIdx.x * x_stride;
  const u16* dr = delta + (size_t)blockIdx.x * d_stride;
  u16* sr = s + (size_t)blockIdx.x * D;
  float ss = 0.f;
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float a[8], b[8];
    load8<T>(xr + c, a);
    load8<T>(dr + c, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      a[i] = round_t<T>(a[i] + b[i]);
      ss = fmaf(a[i], a[i], ss);
    }
    store8<T>(sr + c, a);  // read back below by this same thread only
  }
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < EW_THREADS / 32; ++i) total += partial[i];
  const float inv = rsqrtf(total / (float)D + eps);
  u16* yr = y + (size_t)blockIdx.x * D;
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float v[8], g[8];
    load8<T>(sr + c, v);
    load8<T>(w + c, g);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = round_t<T>(v[i] * inv) * g[i];
    store8<T>(yr + c, v);
  }
}

// One decode or prefill step's q/k/v into attention form: q and k rotated (as `rotary`), the
// rotated k and v written into the static KV cache at positions p0 .. p0 + T - 1 (p0 read from
// the device, so a CUDA graph replays it for any position), rotated q returned. Replaces one
// rotary kernel and two index_copy_ kernels.
//   q (B, T, H, Dh), k and v (B, T, Hkv, Dh): any strides, Dh contiguous (views of a fused
//   q/k/v output or separate projections); cos, sin (T, Dh); keys, values (B, Hkv, S, Dh)
//   contiguous; q_out (B, T, H, Dh) contiguous. p0 + T <= S (checked by the caller).
// Units of 8 values: first the rotations of the H + Hkv heads (8 of a first half and their
// partners each), then the copies of v.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
rotary_into_cache(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                  const u16* __restrict__ cos, const u16* __restrict__ sin,
                  u16* __restrict__ keys, u16* __restrict__ values, const long long* position,
                  u16* __restrict__ q_out, int B, int T_len, int H, int Hkv, int Dh, int S,
                  int qb, int qt, int qh, int kb, int kt, int kh, int vb, int vt, int vh) {
  const int half = Dh / 2, per_head = half / 8, per_row = Dh / 8;
  const long long p0 = *position;
  const size_t rot_units = (size_t)B * T_len * (H + Hkv) * per_head;
  const size_t v_units = (size_t)B * T_len * Hkv * per_row;
  for (size_t i = blockIdx.x * (size_t)EW_THREADS + threadIdx.x; i < rot_units + v_units;
       i += (size_t)gridDim.x * EW_THREADS) {
    if (i < rot_units) {
      const int c = (int)(i % per_head) * 8;
      size_t rest = i / per_head;
      const int h = (int)(rest % (H + Hkv));
      rest /= H + Hkv;
      const int t = (int)(rest % T_len);
      const int b = (int)(rest / T_len);
      const bool is_q = h < H;
      const int hk = h - H;
      const u16* xp = is_q ? q + (size_t)b * qb + (size_t)t * qt + (size_t)h * qh + c
                           : k + (size_t)b * kb + (size_t)t * kt + (size_t)hk * kh + c;
      const u16* cp = cos + (size_t)t * Dh + c;
      const u16* sp = sin + (size_t)t * Dh + c;
      float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], y1[8], y2[8];
      load8<T>(xp, x1);
      load8<T>(xp + half, x2);
      load8<T>(cp, c1);
      load8<T>(cp + half, c2);
      load8<T>(sp, s1);
      load8<T>(sp + half, s2);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        y1[j] = round_t<T>(x1[j] * c1[j]) + round_t<T>(x2[j] * s1[j]);
        y2[j] = round_t<T>(x2[j] * c2[j]) + round_t<T>(x1[j] * s2[j]);
      }
      u16* yp = is_q ? q_out + (((size_t)b * T_len + t) * H + h) * Dh + c
                     : keys + (((size_t)b * Hkv + hk) * S + (size_t)(p0 + t)) * Dh + c;
      store8<T>(yp, y1);
      store8<T>(yp + half, y2);
    } else {
      const size_t j = i - rot_units;
      const int c = (int)(j % per_row) * 8;
      size_t rest = j / per_row;
      const int hk = (int)(rest % Hkv);
      rest /= Hkv;
      const int t = (int)(rest % T_len);
      const int b = (int)(rest / T_len);
      const uint4 val = *reinterpret_cast<const uint4*>(
          v + (size_t)b * vb + (size_t)t * vt + (size_t)hk * vh + c);
      *reinterpret_cast<uint4*>(values + (((size_t)b * Hkv + hk) * S + (size_t)(p0 + t)) * Dh + c) = val;
    }
  }
}

// Attention of one new token per sequence over the static KV cache (the CUDA-graph decode
// step): y[b, h] = softmax(q[b, h] . keys[b, h / G, 0..p] * scale) @ values[b, h / G, 0..p],
// p = *position, G = H / Hkv query heads per KV head; replaces the masked SDPA over all S slots
// (which also launches kernels for the mask).
// Flash-decoding: block (b * Hkv + hk, split) takes positions [split * 64, split * 64 + 64)
// of one KV head for its G query heads, 16 per warp; lane l holds dims l * E .. l * E + E - 1
// (E = Dh / 32). A warp keeps a running max m, sum l and weighted sum of values per head
// (online softmax, fp32), the 4 warps combine in shared memory, and the block writes
// (m, l, acc[Dh]) per head to `partials`; the last block of a KV head (one atomic counts
// arrivals, as splitk_fused.cuh) combines the splits in split order and writes y. Blocks past p
// write an empty partial (m = -inf). q (B, 1, H, Dh) with strides (q_sb, q_sh); keys and
// values (B, Hkv, S, Dh) contiguous; y (B, 1, H, Dh) contiguous; G <= AT_GMAX.
constexpr int AT_WARPS = 4, AT_CHUNK = 64, AT_GMAX = 8;
#define AT_NEG_INF __int_as_float(0xff800000)  // -inf (no <math.h> under NVRTC here)

template <int E> __device__ __forceinline__ void load_e(const u16* p, u32 (&w)[E / 2]);
template <> __device__ __forceinline__ void load_e<2>(const u16* p, u32 (&w)[1]) {
  w[0] = *reinterpret_cast<const u32*>(p);
}
template <> __device__ __forceinline__ void load_e<4>(const u16* p, u32 (&w)[2]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  w[0] = v.x;
  w[1] = v.y;
}

// (m, l, acc) of two partial softmaxes -> their union (m = -inf: empty).
__device__ __forceinline__ float merge_scale(float m_part, float m_total) {
  return m_part == AT_NEG_INF ? 0.f : expf(m_part - m_total);
}

template <typename T, int DH>
__global__ void __launch_bounds__(32 * AT_WARPS)
decode_attention(const u16* __restrict__ q, const u16* __restrict__ keys,
                 const u16* __restrict__ values, const long long* position,
                 float* __restrict__ partials, u16* __restrict__ y, int* __restrict__ counters,
                 int H, int Hkv, int S, int q_sb, int q_sh, float scale) {
  constexpr int E = DH / 32;
  constexpr int PART = 2 + DH;  // floats per head in a partial: m, l, acc[DH]
  __shared__ float sm_m[AT_WARPS][AT_GMAX], sm_l[AT_WARPS][AT_GMAX];
  __shared__ float sm_acc[AT_WARPS][AT_GMAX][DH];
  __shared__ int last;

  const int G = H / Hkv;
  const int bh = blockIdx.x, b = bh / Hkv, hk = bh % Hkv;
  const int split = blockIdx.y, splits = gridDim.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long long p = *position;

  float qv[AT_GMAX][E], m[AT_GMAX], l[AT_GMAX], acc[AT_GMAX][E];
#pragma unroll
  for (int h = 0; h < AT_GMAX; ++h) {
    m[h] = AT_NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = qv[h][e] = 0.f;
    if (h < G) {
      u32 w[E / 2];
      load_e<E>(q + (size_t)b * q_sb + (size_t)(hk * G + h) * q_sh + lane * E, w);
#pragma unroll
      for (int e = 0; e < E; ++e)
        qv[h][e] = to_float<T>((u16)((e % 2 ? w[e / 2] >> 16 : w[e / 2]) & 0xFFFFu)) * scale;
    }
  }

  const size_t kv_head = ((size_t)b * Hkv + hk) * S;
  const int s_begin = split * AT_CHUNK + warp * (AT_CHUNK / AT_WARPS);
  const int s_end = (int)min((long long)(s_begin + AT_CHUNK / AT_WARPS), p + 1);
  for (int s = s_begin; s < s_end; ++s) {
    u32 kw[E / 2], vw[E / 2];
    load_e<E>(keys + (kv_head + s) * DH + lane * E, kw);
    load_e<E>(values + (kv_head + s) * DH + lane * E, vw);
    float kf[E], vf[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kf[e] = to_float<T>((u16)((e % 2 ? kw[e / 2] >> 16 : kw[e / 2]) & 0xFFFFu));
      vf[e] = to_float<T>((u16)((e % 2 ? vw[e / 2] >> 16 : vw[e / 2]) & 0xFFFFu));
    }
#pragma unroll
    for (int h = 0; h < AT_GMAX; ++h) {
      if (h >= G) break;
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot = fmaf(qv[h][e], kf[e], dot);
      dot = warp_sum(dot);
      const float m_new = fmaxf(m[h], dot);
      const float corr = expf(m[h] - m_new);  // m = -inf at first: 0
      const float pe = expf(dot - m_new);
      l[h] = l[h] * corr + pe;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = acc[h][e] * corr + pe * vf[e];
      m[h] = m_new;
    }
  }

  // The block's 4 warps -> one partial per head.
#pragma unroll
  for (int h = 0; h < AT_GMAX; ++h) {
    if (h >= G) break;
    if (lane == 0) {
      sm_m[warp][h] = m[h];
      sm_l[warp][h] = l[h];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp][h][lane * E + e] = acc[h][e];
  }
  __syncthreads();
  float* part = partials + (size_t)(bh * splits + split) * G * PART;
  for (int i = threadIdx.x; i < G * DH; i += 32 * AT_WARPS) {
    const int h = i / DH, d = i % DH;
    float m_all = AT_NEG_INF;
    for (int w = 0; w < AT_WARPS; ++w) m_all = fmaxf(m_all, sm_m[w][h]);
    float l_all = 0.f, a_all = 0.f;
    for (int w = 0; w < AT_WARPS; ++w) {
      const float f = merge_scale(sm_m[w][h], m_all);
      l_all += sm_l[w][h] * f;
      a_all += sm_acc[w][h][d] * f;
    }
    part[h * PART + 2 + d] = a_all;
    if (d == 0) {
      part[h * PART] = m_all;
      part[h * PART + 1] = l_all;
    }
  }

  // The last block of this KV head adds the splits (in split order) and writes y.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[bh], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* parts = partials + (size_t)bh * splits * G * PART;
  for (int i = threadIdx.x; i < G * DH; i += 32 * AT_WARPS) {
    const int h = i / DH, d = i % DH;
    float m_all = AT_NEG_INF;
    for (int sp = 0; sp < splits; ++sp) m_all = fmaxf(m_all, __ldcg(parts + (sp * G + h) * PART));
    float l_all = 0.f, a_all = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float* ph = parts + (sp * G + h) * PART;
      const float f = merge_scale(__ldcg(ph), m_all);
      l_all += __ldcg(ph + 1) * f;
      a_all += __ldcg(ph + 2 + d) * f;
    }
    y[((size_t)b * H + hk * G + h) * DH + d] = (u16)(pack2<T>(a_all / l_all, 0.f) & 0xFFFFu);
  }
  if (threadIdx.x == 0) counters[bh] = 0;
}
