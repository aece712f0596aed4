// attention.cu -- attention of one new token per sequence over the static KV cache (the
// CUDA-graph decode step): y[b, h] = softmax(q[b, h] . keys[b, h / G, 0..p] * scale)
// @ values[b, h / G, 0..p], p = *position, G = H / Hkv query heads per KV head. Replaces the
// masked SDPA over all S slots (6.65 us per layer on the H200, cuDNN, plus the mask's kernels).
//
// Flash-decoding: block (b * Hkv + hk, split) takes slots [split * 64, split * 64 + 64) of one
// KV head for its G query heads, 16 slots per warp; lane l holds dims l * E .. l * E + E - 1
// (E = Dh / 32). A warp keeps a running max m, sum l and weighted sum of values per head
// (online softmax, fp32); the 4 warps merge in shared memory and the block writes
// (m, l, acc[Dh]) per head to `partials`; the last block of a KV head (one atomic counts
// arrivals, as splitk_fused.cuh) merges the splits that hold slots <= p, in split order, and
// writes y. Blocks wholly past p only count their arrival: under a CUDA graph S is the cache's
// length, not the text's, and a partial past p would be empty (m = -inf, weight 0 in the merge,
// so leaving it out changes no sum). Deterministic: every sum in a fixed order. A warp's 16
// slots are loaded at once and its heads reduced side by side (at_scan: latency).
// Layouts: q (B, 1, H, Dh) with strides (q_sb, q_sh), Dh contiguous; keys and values
// (B, Hkv, S, Dh) contiguous; y (B, 1, H, Dh) contiguous; G <= AT_GMAX. The callers keep
// 0 <= p < S; a p outside the cache makes y NaN (no slot read, the counters untouched).
#include "common.cuh"
#include "splitk_fused.cuh"

constexpr int AT_WARPS = 4, AT_CHUNK = 64, AT_GMAX = 8;
constexpr int AT_THREADS = 32 * AT_WARPS;
#define AT_NEG_INF __int_as_float(0xff800000)  // -inf (no <math.h> under NVRTC here)

// E consecutive 16-bit values (E / 2 words) -> floats.
template <typename T, int E> __device__ __forceinline__ void load_e(const u16* p, float (&f)[E]) {
  u32 w[E / 2];
  if constexpr (E == 2) {
    w[0] = *reinterpret_cast<const u32*>(p);
  } else {
    static_assert(E == 4, "Dh = 64 or 128");
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) f[e] = to_float<T>((u16)((e % 2 ? w[e / 2] >> 16 : w[e / 2]) & 0xFFFFu));
}

// The weight of a partial softmax with max m_part inside a union with max m_total
// (m_part = -inf: an empty partial, weight 0).
__device__ __forceinline__ float merge_scale(float m_part, float m_total) {
  return m_part == AT_NEG_INF ? 0.f : expf(m_part - m_total);
}

// One warp's online softmax over slots [s_begin, s_end) (at most AT_CHUNK / AT_WARPS = 16)
// for the GM query-head slots of a KV head (heads >= G have q = 0 and are never stored):
// running max m, sum l of exp(score - m) and acc = sum of exp(score - m) * value (this lane's
// E dims). qv holds q * scale.
// Written for latency, since a decode step runs this once per layer on a short cache: every
// slot's key and value loads are issued before the first score (one memory round trip, not one
// per slot), and the GM heads' dot products and warp sums are independent code, so their
// shuffles overlap (the first version reduced one head after the other, each slot waiting for
// its loads: 23.8 us per layer on an H100 against cuDNN SDPA's 6.6 us). The arithmetic, and so
// every bit, is the first version's: per slot and head the same fma order, the same butterfly,
// the same online-softmax update.
template <typename T, int E, int GM>
__device__ __forceinline__ void at_scan(const u16* keys, const u16* values, int s_begin,
                                        int s_end, int lane, const float (&qv)[GM][E],
                                        float (&m)[GM], float (&l)[GM], float (&acc)[GM][E]) {
  constexpr int DH = 32 * E, SLOTS = AT_CHUNK / AT_WARPS;
  float kf[SLOTS][E], vf[SLOTS][E];
#pragma unroll
  for (int j = 0; j < SLOTS; ++j) {
    if (s_begin + j < s_end) {  // slots past p are not read (p < S: checked at entry)
      load_e<T, E>(keys + (size_t)(s_begin + j) * DH + lane * E, kf[j]);
      load_e<T, E>(values + (size_t)(s_begin + j) * DH + lane * E, vf[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < SLOTS; ++j) {
    if (s_begin + j >= s_end) break;  // uniform across the warp
    float dot[GM];
#pragma unroll
    for (int h = 0; h < GM; ++h) {
      dot[h] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot[h] = fmaf(qv[h][e], kf[j][e], dot[h]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)  // warp_sum's butterfly, the GM heads side by side
#pragma unroll
      for (int h = 0; h < GM; ++h) dot[h] += __shfl_xor_sync(0xFFFFFFFFu, dot[h], off);
#pragma unroll
    for (int h = 0; h < GM; ++h) {
      const float m_new = fmaxf(m[h], dot[h]);
      const float corr = expf(m[h] - m_new);  // 0 while m = -inf
      const float pe = expf(dot[h] - m_new);
      l[h] = l[h] * corr + pe;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = acc[h][e] * corr + pe * vf[j][e];
      m[h] = m_new;
    }
  }
}

// The union of `count` partials (m, l, acc[DH]), `stride` floats apart, at dim d: writes
// (m, l, acc[d]) to `out` if given and returns acc[d] / l. Added in order: the same bits on
// every run. GLOBAL: the partials are other blocks' (read from L2, not a stale L1).
template <bool GLOBAL>
__device__ __forceinline__ float at_merge(const float* parts, int count, int stride, int d,
                                          float* out) {
  auto ld = [](const float* a) { return GLOBAL ? __ldcg(a) : *a; };
  float m_all = AT_NEG_INF;
  for (int i = 0; i < count; ++i) m_all = fmaxf(m_all, ld(parts + i * stride));
  float l_all = 0.f, a_all = 0.f;
  for (int i = 0; i < count; ++i) {
    const float f = merge_scale(ld(parts + i * stride), m_all);
    l_all += ld(parts + i * stride + 1) * f;
    a_all += ld(parts + i * stride + 2 + d) * f;
  }
  if (out != nullptr) {
    out[2 + d] = a_all;
    if (d == 0) {
      out[0] = m_all;
      out[1] = l_all;
    }
  }
  return a_all / l_all;  // used by the final merge only (l > 0 there: slot 0 is always seen)
}

// Grid (B * Hkv, cdiv(S, 64)), block 128 threads; partials [B * Hkv, splits, G, 2 + Dh] fp32;
// counters: one per KV head, zero at launch, left zero. GM >= G: query heads per KV head the
// registers hold (4 or 8; ops.py picks the smaller that fits).
template <typename T, int DH, int GM>
__global__ void __launch_bounds__(AT_THREADS)
decode_attention(const u16* __restrict__ q, const u16* __restrict__ keys,
                 const u16* __restrict__ values, const long long* position,
                 float* __restrict__ partials, u16* __restrict__ y, int* __restrict__ counters,
                 int H, int Hkv, int S, int q_sb, int q_sh, float scale) {
  constexpr int E = DH / 32;
  constexpr int PART = 2 + DH;  // floats per head in a partial: m, l, acc[DH]
  static_assert(GM <= AT_GMAX, "at most AT_GMAX query heads per KV head");
  __shared__ float warp_parts[GM][AT_WARPS][PART];  // the block's 4 warps, per head

  const int G = H / Hkv;
  const int bh = blockIdx.x, b = bh / Hkv, hk = bh % Hkv;
  const int split = blockIdx.y, splits = gridDim.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long long p = *position;
  if (p < 0 || p >= S) {  // outside the cache (a direct call; the model's callers check): y is
    if (split == 0)       // NaN; every block of the launch returns here, so no counter moves
      for (int i = threadIdx.x; i < G * DH; i += AT_THREADS)
        y[((size_t)b * H + hk * G + i / DH) * DH + i % DH] = T::NAN16;
    return;
  }
  const int used = (int)min((long long)splits, p / AT_CHUNK + 1);  // splits holding slots <= p

  if (split < used) {  // block-uniform
    float qv[GM][E], m[GM], l[GM], acc[GM][E];
#pragma unroll
    for (int h = 0; h < GM; ++h) {
      m[h] = AT_NEG_INF;
      l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = qv[h][e] = 0.f;
      if (h < G) {
        load_e<T, E>(q + (size_t)b * q_sb + (size_t)(hk * G + h) * q_sh + lane * E, qv[h]);
#pragma unroll
        for (int e = 0; e < E; ++e) qv[h][e] *= scale;
      }
    }
    const size_t kv_head = ((size_t)b * Hkv + hk) * S * DH;
    const int s_begin = split * AT_CHUNK + warp * (AT_CHUNK / AT_WARPS);
    const int s_end = (int)min((long long)(s_begin + AT_CHUNK / AT_WARPS), p + 1);
    at_scan<T, E, GM>(keys + kv_head, values + kv_head, s_begin, s_end, lane, qv, m, l, acc);

    // The block's 4 warps -> one partial per head, in `partials`.
#pragma unroll
    for (int h = 0; h < GM; ++h) {
      if (h >= G) break;
      if (lane == 0) {
        warp_parts[h][warp][0] = m[h];
        warp_parts[h][warp][1] = l[h];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) warp_parts[h][warp][2 + lane * E + e] = acc[h][e];
    }
    __syncthreads();
    float* part = partials + (size_t)(bh * splits + split) * G * PART;
    for (int i = threadIdx.x; i < G * DH; i += AT_THREADS)
      at_merge<false>(&warp_parts[i / DH][0][0], AT_WARPS, PART, i % DH, part + (i / DH) * PART);
  }

  // The last block of this KV head (of all `splits`) merges the used ones in order, writes y.
  if (!splitk_last_arrival(&counters[bh], splits)) return;
  const float* parts = partials + (size_t)bh * splits * G * PART;
  for (int i = threadIdx.x; i < G * DH; i += AT_THREADS) {
    const int h = i / DH, d = i % DH;
    const float v = at_merge<true>(parts + h * PART, used, G * PART, d, nullptr);
    y[((size_t)b * H + hk * G + h) * DH + d] = (u16)(pack2<T>(v, 0.f) & 0xFFFFu);
  }
  if (threadIdx.x == 0) counters[bh] = 0;
}
