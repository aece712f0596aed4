// gemv_int8.cu -- y[M, N] = (x[M, K] @ q[N, K]^T) * s[N] for M <= MT <= 8: an 8-bit lm_head
// (awq_ref.quant.int8_head) at decode sizes.
//
// q int8 [N, K] row-major (a row is one vocabulary entry, K contiguous), s fp32 [N] per row, x
// T [M, K], y T [M, N]. Constraints (checked in Python): K % 16 == 0, 16-byte aligned pointers.
//
// One warp per output row n, 8 rows per block: lane l reads 16 consecutive int8 of the row at
// k = 16 l + 512 i (one 16-byte load that does not allocate in L1: each byte is read once), the
// matching 16 values of each x row (L1 hits: every warp reads the same x), and accumulates
// q * x in fp32; the lanes then add by butterfly and lane 0 writes y = acc * s rounded once.
// Memory-bound by design: one byte per weight, ~3 instructions per weight at M = 1.
#include "common.cuh"

constexpr int G8_WARPS = 8;  // rows per block
constexpr int G8_STEP = 512; // k per warp iteration: 32 lanes x 16 int8

// The 4 signed bytes of w as floats, byte 0 first (exact).
__device__ __forceinline__ void s8x4_to_float(u32 w, float (&f)[4]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) f[b] = (float)(signed char)((w >> (8 * b)) & 0xFFu);
}

template <typename T, int MT>
__global__ void __launch_bounds__(32 * G8_WARPS)
gemv_int8(const u16* __restrict__ x, const u32* __restrict__ q, const float* __restrict__ s,
          u16* __restrict__ y, int M, int N, int K) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * G8_WARPS + threadIdx.x / 32;
  if (n >= N) return;  // whole warps: no shuffle below misses a lane
  const u32* qr = q + (size_t)n * (K / 4);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int k = 16 * lane; k < K; k += G8_STEP) {
    u32 w[4];
    ld_stream<4>(qr + k / 4, w);
    float qf[16];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float f[4];
      s8x4_to_float(w[j], f);
#pragma unroll
      for (int b = 0; b < 4; ++b) qf[4 * j + b] = f[b];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * K + k);
      const uint4 a = __ldg(xp), b = __ldg(xp + 1);
      const u32 xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc[m] = fmaf(qf[2 * j], to_float<T>((u16)(xs[j] & 0xFFFFu)), acc[m]);
        acc[m] = fmaf(qf[2 * j + 1], to_float<T>((u16)(xs[j] >> 16)), acc[m]);
      }
    }
  }
  const float scale = s[n];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
    const float total = warp_sum(acc[m]);
    if (lane == 0) y[(size_t)m * N + n] = (u16)(pack2<T>(total * scale, 0.f) & 0xFFFFu);
  }
}
