// gemv.cu -- decode-sized products y[M, N] = x[M, K] @ W[K, N] for M <= MT <= 8 on CUDA cores.
//
// Inputs as in gemm_mma.cu (x [M, K] T; qweight [K, N/8] int32; qzeros [K/G, N/8] int32;
// scales [K/G, N] fp16), out [M, N] T, or fp32 partials [gridDim.y, M, N] when split over K.
// Constraints (checked in Python): K % KC == 0, G in {32, 64, 128}, N % 64 == 0, 16-byte
// aligned pointers, M <= MT.
//
// The weights are the only large operand, so the kernel is built to stream them once:
//   * Block = 256 columns x one K range (split-K over gridDim.y so that every SM gets blocks
//     even when N / 256 is small). Per stage the block copies a KC x 256 tile of packed
//     weights (32 rows x 128 bytes = 4 KB) with one 16-byte cp.async per thread, plus the KC
//     columns of x it needs and, at group starts, one row of scales and zeros. STAGES - 1
//     tiles are in flight per block. Measured on an H200: 8 stages instead of 4 gained only
//     5-25% (0.6-1.5 TB/s at M = 1), and time grows ~5 us per extra row of M on 4096x14336:
//     the kernel is bound by its instructions (dequant, fp32 widening, one __syncthreads per
//     4 KB stage), not by memory latency. gemv_direct.cu replaced it in `auto`; this kernel
//     stays for comparison (kernel="gemv").
//   * Compute mapping: lane l owns packed word l (columns 8l .. 8l+7 of the block); warp w
//     owns rows 4w .. 4w+3 of each stage tile. A warp's 32 four-byte shared loads of one row
//     are consecutive words: conflict-free. Each lane keeps MT x 8 fp32 accumulators.
//   * Dequant in registers: (word >> 4p) & 0x000F000F gives the nibbles of columns 2p, 2p+1
//     (AWQ order), the magic-number trick makes them a 16-bit pair, one fma subtracts the
//     zero exactly, one fma applies the scale; the pair is widened to fp32 for the products.
//   * Warps hold partial sums over different rows; at the end they meet in shared memory and
//     every thread adds one column over the 8 warps in a fixed order (deterministic).
#include "common.cuh"

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_THREADS = 32 * GEMV_WARPS;
constexpr int GEMV_NT = 256;                               // columns per block
constexpr int GEMV_NT_WORDS = GEMV_NT / 8;                 // 32 packed words: one per lane
constexpr int GEMV_KC = 32;                                // k rows per stage (divides every G)
constexpr int GEMV_ROWS_PER_WARP = GEMV_KC / GEMV_WARPS;   // 4
constexpr int GEMV_STAGES = 8;                            // 7 tiles (28 KB) in flight per block
constexpr int GEMV_W_CHUNKS = GEMV_KC * GEMV_NT_WORDS / 4; // 256 x 16 B: one per thread
constexpr int GEMV_X_ROW_CHUNKS = GEMV_KC * 2 / 16;        // 4 x 16 B per x row
constexpr int GEMV_S_CHUNKS = GEMV_NT * 2 / 16;            // 32 x 16 B of scales
constexpr int GEMV_Z_CHUNKS = GEMV_NT_WORDS / 4;           // 8 x 16 B of zeros
static_assert(GEMV_W_CHUNKS == GEMV_THREADS, "one weight chunk per thread per stage");

template <int MT> struct GemvSmem {
  u32 w[GEMV_STAGES][GEMV_KC * GEMV_NT_WORDS];
  u32 x[GEMV_STAGES][MT * GEMV_KC / 2];
  u32 s[GEMV_STAGES][GEMV_NT / 2];
  u32 z[GEMV_STAGES][GEMV_NT_WORDS];
};
// The cross-warp reduction (float [GEMV_WARPS][GEMV_NT], 8 KB) reuses sm.w once the K loop is
// done, which keeps the block under the 48 KB of static shared memory.
static_assert(GEMV_WARPS * GEMV_NT <= GEMV_STAGES * GEMV_KC * GEMV_NT_WORDS,
              "the reduction buffer must fit in the weight stages");

// Copies of stage tile `kc` (KC rows starting at kc * KC) into stage `st`.
template <int MT>
__device__ __forceinline__ void gemv_load_stage(GemvSmem<MT>& sm, int st, int kc,
                                                bool group_start, const u16* x,
                                                const u32* qweight, const u32* qzeros,
                                                const u16* scales, int M, int N, int K, int G,
                                                int n0) {
  const int tid = threadIdx.x, k0 = kc * GEMV_KC, nw = N / 8, n0w = n0 / 8;
  {
    const int r = tid / (GEMV_NT_WORDS / 4), c = tid % (GEMV_NT_WORDS / 4);
    const bool ok = n0w + c * 4 < nw;
    const u32* src = qweight + (size_t)(k0 + r) * nw + (ok ? n0w + c * 4 : 0);
    cp_async16(&sm.w[st][r * GEMV_NT_WORDS + c * 4], src, ok);
  }
  if (tid < MT * GEMV_X_ROW_CHUNKS) {
    const int m = tid / GEMV_X_ROW_CHUNKS, c = tid % GEMV_X_ROW_CHUNKS;
    const bool ok = m < M;
    cp_async16(&sm.x[st][m * (GEMV_KC / 2) + c * 4],
               x + (size_t)(ok ? m : 0) * K + k0 + c * 8, ok);
  }
  if (group_start) {
    const int grp = k0 / G;
    const int i = tid - MT * GEMV_X_ROW_CHUNKS;  // threads after the x copiers
    if (i >= 0 && i < GEMV_S_CHUNKS) {
      const bool ok = n0 + i * 8 < N;
      cp_async16(&sm.s[st][i * 4], scales + (size_t)grp * N + (ok ? n0 + i * 8 : 0), ok);
    } else if (i >= GEMV_S_CHUNKS && i < GEMV_S_CHUNKS + GEMV_Z_CHUNKS) {
      const int c = i - GEMV_S_CHUNKS;
      const bool ok = n0w + c * 4 < nw;
      cp_async16(&sm.z[st][c * 4], qzeros + (size_t)grp * nw + (ok ? n0w + c * 4 : 0), ok);
    }
  }
}

// Per-group constants of the lane's word as column pairs (2p, 2p+1): -(MAGIC + z), s.
template <typename T>
__device__ __forceinline__ void gemv_load_group(const u32* zrow, const u32* srow, int lane,
                                                u32 (&zneg)[4], u32 (&sp)[4]) {
  const u32 zw = zrow[lane];
  const uint4 sv = *reinterpret_cast<const uint4*>(srow + lane * 4);
  const u32 s01[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    zneg[p] = nibbles_to_magic_pair<T>(zw >> (4 * p)) ^ SIGN2;
    sp[p] = scale_pair<T>(s01[p]);
  }
}

// acc[m][j] += x[m][row] * W[row][8 * lane + j] for one packed word.
template <typename T, int MT>
__device__ __forceinline__ void gemv_row(u32 word, const u16* xs, int row, const u32 (&zneg)[4],
                                         const u32 (&sp)[4], float (&acc)[MT][8]) {
  float xf[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) xf[m] = to_float<T>(xs[m * GEMV_KC + row]);  // smem broadcast
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const u32 w2 = dequant_pair<T>(word >> (4 * p), zneg[p], sp[p]);
    const float w_even = to_float<T>((u16)(w2 & 0xFFFFu)), w_odd = to_float<T>((u16)(w2 >> 16));
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      acc[m][2 * p] = fmaf(xf[m], w_even, acc[m][2 * p]);
      acc[m][2 * p + 1] = fmaf(xf[m], w_odd, acc[m][2 * p + 1]);
    }
  }
}

// Grid: (N / 256 rounded up, splits); block: 256 threads.
// Split y handles stage tiles [y * kc_per_split, min(K / KC, (y + 1) * kc_per_split)).
template <typename T, int MT>
__global__ void __launch_bounds__(GEMV_THREADS)
awq_gemv(const u16* __restrict__ x, const u32* __restrict__ qweight,
         const u32* __restrict__ qzeros, const u16* __restrict__ scales, void* __restrict__ out,
         int M, int N, int K, int group_size, int kc_per_split) {
  __shared__ __align__(16) GemvSmem<MT> sm;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = blockIdx.x * GEMV_NT;
  const int kc_begin = blockIdx.y * kc_per_split;
  const int nk = min(K / GEMV_KC, kc_begin + kc_per_split) - kc_begin;

  float acc[MT][8];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.f;
  u32 zneg[4], sp[4];

#pragma unroll
  for (int s = 0; s < GEMV_STAGES - 1; ++s) {
    if (s < nk) {
      const int kc = kc_begin + s;
      gemv_load_stage<MT>(sm, s, kc, s == 0 || (kc * GEMV_KC) % group_size == 0, x, qweight,
                          qzeros, scales, M, N, K, group_size, n0);
    }
    cp_async_commit();
  }

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<GEMV_STAGES - 2>();
    __syncthreads();
    const int pre = it + GEMV_STAGES - 1;
    if (pre < nk) {
      const int kc = kc_begin + pre;
      gemv_load_stage<MT>(sm, pre % GEMV_STAGES, kc, (kc * GEMV_KC) % group_size == 0, x,
                          qweight, qzeros, scales, M, N, K, group_size, n0);
    }
    cp_async_commit();

    const int st = it % GEMV_STAGES;
    if (it == 0 || ((kc_begin + it) * GEMV_KC) % group_size == 0)
      gemv_load_group<T>(sm.z[st], sm.s[st], lane, zneg, sp);
    const u16* xs = reinterpret_cast<const u16*>(sm.x[st]);
#pragma unroll
    for (int rr = 0; rr < GEMV_ROWS_PER_WARP; ++rr) {
      const int row = warp * GEMV_ROWS_PER_WARP + rr;
      gemv_row<T, MT>(sm.w[st][row * GEMV_NT_WORDS + lane], xs, row, zneg, sp, acc);
    }
  }
  cp_async_wait<0>();

  // Cross-warp reduction, one output row m at a time; thread c owns column n0 + c. `red` aliases
  // the weight stages: every cp.async has landed (wait<0> above) and the first __syncthreads
  // below orders the last K iteration's reads of sm.w before the first write.
  float (*red)[GEMV_NT] = reinterpret_cast<float (*)[GEMV_NT]>(&sm.w[0][0]);
  const bool partial = gridDim.y > 1;
  const int col = n0 + threadIdx.x;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    __syncthreads();  // previous row's reads of `red` are done
#pragma unroll
    for (int j = 0; j < 8; ++j) red[warp][lane * 8 + j] = acc[m][j];
    __syncthreads();
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < GEMV_WARPS; ++w) sum += red[w][threadIdx.x];
    if (m < M && col < N) {
      if (partial)
        static_cast<float*>(out)[((size_t)blockIdx.y * M + m) * N + col] = sum;
      else
        static_cast<u16*>(out)[(size_t)m * N + col] = (u16)(pack2<T>(sum, 0.f) & 0xFFFFu);
    }
  }
}
