// gemv_direct.cu -- decode products y[M, N] = x[M, K] @ W[K, N] for M <= MT <= 8, the weights
// loaded straight from global memory into registers, the products formed in 16-bit pairs.
//
// Inputs and outputs as gemv.cu: x [M, K] T; qweight [K, N/8] int32; qzeros [K/G, N/8] int32;
// scales [K/G, N] fp16; out [M, N] T, or fp32 partials [gridDim.y, M, N] when split over K.
// Constraints (checked in Python): K % 32 == 0, G in {32, 64, 128}, N % 64 == 0, 16-byte
// aligned pointers, M <= MT.
//
// Why a second GEMV: gemv.cu measured 0.6-1.5 TB/s at M = 1 on an H200, bound by instructions,
// not memory (NOTES.md: 9.2 instructions per weight in SASS at M = 1; per pair: shift, lop3, two
// fma for the dequant, two widenings to fp32, two fp32 fma) plus a cp.async + __syncthreads per
// 4 KB stage.
// This kernel is written to issue fewer instructions per weight byte:
//   * No shared-memory staging. Block = 256 columns x one K range (split-K over gridDim.y, as
//     gemv.cu), cut into chunks of CH = U * VEC rows dealt round-robin to the 8 warps, so each
//     warp streams its own chunks and no warp waits for another until the end. A chunk is U
//     steps of VEC rows x 256 columns: per step, lane (c, r) loads VEC packed words (8 * VEC
//     columns) of row r with one 16- (VEC = 4), 8- or 4-byte ld.global.nc that does not allocate
//     in L1 (each byte is read once); a row's 32 words are one 128-byte line. All U loads of a
//     chunk are issued before any is used (U x 16 B per lane in flight for VEC = 4).
//   * Per pair of columns (2p, 2p+1) of a word: shift, lop3 (magic number), fma (- zero), fma
//     (x scale) as in common.cuh -- the weight rounded once (bf16: after the scale's own
//     rounding, common.cuh dequant_pair) -- then per row ONE fma.x2 multiplies it by the row's
//     x duplicated into both halves and adds it to a 16-bit pair accumulator: 4 + M
//     instructions per 2 weights.
//   * The 16-bit accumulators are flushed into fp32 after each chunk (U = 8 for fp16 at
//     MT <= 4; 4 for bf16 and for MT = 8, GdFlush): each flush sums at most U rounded products,
//     so the rounding stays within the tolerance: ~4-5e-4 relative for fp16, ~2-3e-3 for bf16,
//     measured in the emulation tests).
//   * Zeros and scales are loaded when a warp's chunk is in a new group (a chunk never straddles
//     one: CH divides 32, which divides G): at most once per chunk, no per-step conditions.
//   * At the end: the ROWS lanes holding the same columns add by shuffles (butterfly, fixed
//     order), the 8 warps meet in shared memory and thread t adds column t over the warps in a
//     fixed order. Split over K, the last block of each column tile also adds the splits (in
//     split order) in the same launch, so no second kernel: one atomic per block only counts
//     arrivals, it adds nothing, and the result is deterministic.
#include "common.cuh"
#include "splitk_fused.cuh"

constexpr int GD_WARPS = 8;
constexpr int GD_THREADS = 32 * GD_WARPS;
constexpr int GD_NT = 256;                // columns per block
constexpr int GD_NT_WORDS = GD_NT / 8;    // 32 packed words per row of the tile
constexpr int GD_KC = 32;                 // split unit: rows per block = kc_per_split * GD_KC

// Lane geometry for a row capacity MT: fewer words per lane as MT grows keeps the fp32
// accumulators (MT x 8 * VEC per lane) at 32 registers (64 for MT = 8).
template <int MT> struct GdShape {
  static constexpr int VEC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);  // packed words per lane load
  static constexpr int LANES_PER_ROW = GD_NT_WORDS / VEC;      // 8, 16, 32
  static constexpr int ROWS = 32 / LANES_PER_ROW;              // rows per warp step (= VEC)
  static constexpr int PAIRS = 4 * VEC;                        // column pairs per lane
};

// Steps per chunk (= per flush of the 16-bit accumulators): bf16 rounds 8x coarser than fp16,
// and MT = 8 keeps U x MT x values in registers.
template <typename T, int MT> struct GdFlush { static constexpr int STEPS = MT >= 8 ? 4 : 8; };
template <int MT> struct GdFlush<BF16, MT> { static constexpr int STEPS = 4; };

// Zeros and scales of group `grp` for the lane's VEC words, as column pairs (2p, 2p+1) of word
// v at index 4v + p: -(MAGIC + z) and s.
template <typename T, int VEC>
__device__ __forceinline__ void gd_load_group(const u32* qzeros, const u16* scales, int grp,
                                              int nw, int N, int word0,
                                              u32 (&zneg)[4 * VEC], u32 (&sp)[4 * VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const u32 zw = __ldg(qzeros + (size_t)grp * nw + word0 + v);
    const uint4 sv = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + 8 * (word0 + v)));
    const u32 s4[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      zneg[4 * v + p] = nibbles_to_magic_pair<T>(zw >> (4 * p)) ^ SIGN2;
      sp[4 * v + p] = scale_pair<T>(s4[p]);
    }
  }
}

// Grid: (N / 256 rounded up, splits); block: 256 threads.
// Split y handles rows [y * kc_per_split * 32, min(K, (y + 1) * kc_per_split * 32)), cut into
// chunks of CH = U * VEC rows; warp w takes chunks w, w + 8, w + 16, ... Since CH divides 32
// (so every split is whole chunks) and G (so a chunk lies in one group), the loop has no
// per-step conditions: one group check per chunk, then U steps of straight-line code.
//
// Split-K in one launch (counters != nullptr and gridDim.y > 1): every block writes its fp32
// partials to `out` [splits, M, N] as above, then counts itself done on its column tile; the
// block that finishes a tile last adds the tile's partials in split order -- the same sums in
// the same order as splitk_reduce.cu, so the same bits -- writes them to y [M, N] and sets the
// tile's counter back to zero for the next launch (counters start zeroed; see runtime.py).
template <typename T, int MT>
__global__ void __launch_bounds__(GD_THREADS, MT >= 8 ? 1 : 2)
awq_gemv_direct(const u16* __restrict__ x, const u32* __restrict__ qweight,
                const u32* __restrict__ qzeros, const u16* __restrict__ scales,
                void* __restrict__ out, int M, int N, int K, int group_size, int kc_per_split,
                u16* __restrict__ y, int* __restrict__ counters) {
  using S = GdShape<MT>;
  constexpr int VEC = S::VEC, PAIRS = S::PAIRS, U = GdFlush<T, MT>::STEPS, CH = U * VEC;
  static_assert(GD_KC % CH == 0 && 32 % CH == 0, "chunks tile a split and fit in a group");
  __shared__ float red[GD_WARPS][GD_NT];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = lane % S::LANES_PER_ROW, r = lane / S::LANES_PER_ROW;
  const int nw = N / 8;
  const int word0 = blockIdx.x * GD_NT_WORDS + c * VEC;  // the lane's first packed word column
  // Lanes past N (VEC divides 8 and N/8 % 8 == 0: all VEC words or none) read column 0
  // instead: valid memory, and their sums are never stored. Rows of x past M likewise read
  // row M - 1. So no load needs a condition.
  const int wcol = word0 < nw ? word0 : 0;
  const int k_begin = blockIdx.y * kc_per_split * GD_KC;
  const int chunks = (min(K, k_begin + kc_per_split * GD_KC) - k_begin) / CH;
  int xoff[MT];  // offsets of the x rows (M * K < 2^31: activations, not weights)
#pragma unroll
  for (int m = 0; m < MT; ++m) xoff[m] = min(m, M - 1) * K;

  float acc[MT][2 * PAIRS];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 2 * PAIRS; ++j) acc[m][j] = 0.f;
  u32 zneg[PAIRS], sp[PAIRS];
  int loaded_group = -1;

  for (int q = warp; q < chunks; q += GD_WARPS) {
    const int row0 = k_begin + q * CH;  // the chunk's first row; lane rows row0 + u * VEC + r
    // Issue every load of the chunk first: weights (streamed) and x (tiny, L1/L2 hits).
    const u32* wp = qweight + (size_t)(row0 + r) * nw + wcol;
    u32 w[U][VEC];
    u32 x2[U][MT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ld_stream<VEC>(wp + (size_t)u * VEC * nw, w[u]);
#pragma unroll
      for (int m = 0; m < MT; ++m) x2[u][m] = dup_lo(__ldg(x + xoff[m] + row0 + u * VEC + r));
    }
    const int group = row0 / group_size;
    if (group != loaded_group) {  // uniform across the warp
      gd_load_group<T, VEC>(qzeros, scales, group, nw, N, wcol, zneg, sp);
      loaded_group = group;
    }
    u32 h[MT][PAIRS];  // 16-bit pair accumulators of this chunk
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) h[m][i] = 0u;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int v = 0; v < VEC; ++v)
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const u32 wv = dequant_pair<T>(w[u][v] >> (4 * p), zneg[4 * v + p], sp[4 * v + p]);
#pragma unroll
          for (int m = 0; m < MT; ++m) h[m][4 * v + p] = fma2<T>(x2[u][m], wv, h[m][4 * v + p]);
        }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        acc[m][2 * i] += to_float<T>((u16)(h[m][i] & 0xFFFFu));
        acc[m][2 * i + 1] += to_float<T>((u16)(h[m][i] >> 16));
      }
  }

  // Lanes (c, 0..ROWS-1) hold the same columns: butterfly over them (fixed order, and every
  // lane ends with the same sum since a + b == b + a).
#pragma unroll
  for (int off = S::LANES_PER_ROW; off < 32; off *= 2)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 2 * PAIRS; ++j)
        acc[m][j] += __shfl_xor_sync(0xFFFFFFFFu, acc[m][j], off);

  // Across warps, one output row m at a time; thread t owns column n0 + t. Column 2i (2i + 1)
  // of the lane's 8 * VEC columns is acc[m][2i] (acc[m][2i + 1]), i = 4v + p.
  const bool partial = gridDim.y > 1;
  const int col = blockIdx.x * GD_NT + threadIdx.x;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    __syncthreads();  // the previous row's reads of `red` are done
    if (r == 0) {
#pragma unroll
      for (int j = 0; j < 2 * PAIRS; ++j) red[warp][c * 8 * VEC + j] = acc[m][j];
    }
    __syncthreads();
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < GD_WARPS; ++wi) sum += red[wi][threadIdx.x];
    if (m < M && col < N) {
      if (partial)
        static_cast<float*>(out)[((size_t)blockIdx.y * M + m) * N + col] = sum;
      else
        static_cast<u16*>(out)[(size_t)m * N + col] = (u16)(pack2<T>(sum, 0.f) & 0xFFFFu);
    }
  }
  if (partial && counters != nullptr)
    splitk_finish<T, GD_NT>(static_cast<const float*>(out), y, counters, M, N);
}
