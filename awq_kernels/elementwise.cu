// elementwise.cu -- the decoder's small element-wise steps, one kernel each: RMSNorm with its
// weight (rms_norm), the residual add and the RMSNorm after it (add_rms_norm), SwiGLU's
// silu(gate) * up (silu_mul), the rotary embedding of q and k (rotary), and in the CUDA-graph
// decode step the rotary embedding with the KV-cache writes of k and v (rotary_into_cache).
//
// Why: in a decode step of a CUDA-graph replay every kernel costs ~1.5-2.5 us however little it
// does; torch runs RMSNorm * weight as 2 kernels, silu(gate) * up as 2 and the rotary embedding as
// 4 (mul, roll, mul, add), plus residual adds and two cache writes, ~12 per decoder layer of ~17
// besides the products (H200 profile, 2026-12-04: 1.8-2.1 ms of a 6.3 ms Llama-3-8B-shaped
// token). These kernels do the same work in 5 per layer (attention.cu: the attention in 1).
//
// Numbers: each kernel rounds where torch's ops round (torch computes a 16-bit op in fp32 and
// rounds its result to the 16-bit type), so all but the norms give torch's bits; the norms differ
// only in the order of their sums of squares.
//
// All of them read and write 8 consecutive 16-bit values (16 bytes) per access: the last dimension
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

// The sum of `v` over the block's threads, in one fixed order (warps by butterfly, then the
// warps' sums in warp order), returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[EW_THREADS / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < EW_THREADS / 32; ++i) total += partial[i];
  return total;
}

// yr = w * (xr * rsqrt(sum_sq / D + eps) rounded to T), rounded to T: the second half of
// torch's `weight * F.rms_norm(x)` for one row whose sum of squares is known.
template <typename T>
__device__ __forceinline__ void normalize_row(const u16* xr, const u16* w, u16* yr, int D,
                                              float sum_sq, float eps) {
  const float inv = rsqrtf(sum_sq / (float)D + eps);
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float v[8], g[8];
    load8<T>(xr + c, v);
    load8<T>(w + c, g);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = round_t<T>(v[i] * inv) * g[i];
    store8<T>(yr + c, v);
  }
}

// y[r] = w * rms_norm(x[r]) for each row r (one block per row): torch's
// `weight * F.rms_norm(x, (D,), eps)`: the sum of squares in fp32, x * rsqrt(mean + eps) rounded
// to T, then times w rounded to T. x rows `x_stride` elements apart; y [rows, D] contiguous.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
rms_norm(const u16* __restrict__ x, const u16* __restrict__ w, u16* __restrict__ y, int D,
         int x_stride, float eps) {
  const u16* xr = x + (size_t)blockIdx.x * x_stride;
  float ss = 0.f;
  for (int c = threadIdx.x * 8; c < D; c += EW_THREADS * 8) {
    float v[8];
    load8<T>(xr + c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
  }
  normalize_row<T>(xr, w, y + (size_t)blockIdx.x * D, D, block_sum(ss), eps);
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

// 8 values of a head's first half (at xp) and their 8 partners half further, rotated with the
// cos / sin_signed values at the same places of cp / sp: y1 = x1 cos1 + x2 sin1,
// y2 = x2 cos2 + x1 sin2, each product rounded to T, then their sum; written to yp, yp + half.
template <typename T>
__device__ __forceinline__ void rotate8(const u16* xp, const u16* cp, const u16* sp, int half,
                                        u16* yp) {
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
  store8<T>(yp, y1);
  store8<T>(yp + half, y2);
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
  const int per_head = Dh / 16;
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
    rotate8<T>(xp, cos + (size_t)t * Dh + c, sin + (size_t)t * Dh + c, Dh / 2,
               y + (((size_t)b * T_len + t) * H + h) * Dh + c);
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
    store8<T>(sr + c, a);  // read back by normalize_row in this same thread only
  }
  normalize_row<T>(sr, w, y + (size_t)blockIdx.x * D, D, block_sum(ss), eps);
}

// One decode or prefill step's q/k/v into attention form: q and k rotated (as `rotary`), the
// rotated k and v written into the static KV cache at positions p0 .. p0 + T - 1 (p0 read from
// the device, so a CUDA graph replays it for any position), rotated q returned. Replaces one
// rotary kernel and two index_copy_ kernels.
//   q (B, T, H, Dh), k and v (B, T, Hkv, Dh): any strides, Dh contiguous (views of a fused
//   q/k/v output or separate projections); cos, sin (T, Dh); keys, values (B, Hkv, S, Dh)
//   contiguous; q_out (B, T, H, Dh) contiguous. The callers keep 0 <= p0, p0 + T <= S; past
//   that the cache is left as it was and q_out is NaN (the error shows, no other slot written).
// Units of 8 values: first the rotations of the H + Hkv heads (8 of a first half and their
// partners each), then the copies of v.
template <typename T>
__global__ void __launch_bounds__(EW_THREADS)
rotary_into_cache(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                  const u16* __restrict__ cos, const u16* __restrict__ sin,
                  u16* __restrict__ keys, u16* __restrict__ values, const long long* position,
                  u16* __restrict__ q_out, int B, int T_len, int H, int Hkv, int Dh, int S,
                  int qb, int qt, int qh, int kb, int kt, int kh, int vb, int vt, int vh) {
  const int per_head = Dh / 16, per_row = Dh / 8;
  const long long p0 = *position;
  if (p0 < 0 || p0 + T_len > S) {
    const size_t n = (size_t)B * T_len * H * Dh;
    for (size_t i = blockIdx.x * (size_t)EW_THREADS + threadIdx.x; i < n;
         i += (size_t)gridDim.x * EW_THREADS)
      q_out[i] = T::NAN16;
    return;
  }
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
      u16* yp = is_q ? q_out + (((size_t)b * T_len + t) * H + h) * Dh + c
                     : keys + (((size_t)b * Hkv + hk) * S + (size_t)(p0 + t)) * Dh + c;
      rotate8<T>(xp, cos + (size_t)t * Dh + c, sin + (size_t)t * Dh + c, Dh / 2, yp);
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
