// mma_direct.cu -- small-batch products y[M, N] = x[M, K] @ W[K, N] for M <= 8 NT WM <= 64 on
// the tensor cores, the weights loaded straight from global memory into the mma fragments.
//
// Inputs and outputs as gemv_direct.cu: x [M, K] T; qweight [K, N/8] int32; qzeros [K/G, N/8]
// int32; scales [K/G, N] fp16; out [M, N] T, or fp32 partials [gridDim.y, M, N] when split over
// K (summed in the same launch by splitk_fused.cuh when `counters` is given).
// Constraints (checked in Python): K % 32 == 0, G in {32, 64, 128}, N % 64 == 0, 16-byte
// aligned pointers, M <= 8 * NT * WM.
//
// Why: at M = 2..32 the CUDA-core GEMVs spend one fma per weight and row (gemv_direct at MT = 8:
// 15 instructions per weight), and gemm_mma stages everything through shared memory with 2 warps
// per block at M = 16 (NOTES.md). Here the tensor cores do the multiplications and the weights
// never touch shared memory:
//   * Swapped operands: the mma computes y^T = W^T x^T, so the WEIGHTS are the m16 x k16 A
//     operand and x the k16 x n8 B operand; n8 is 8 rows of x (M <= 8 uses one mma per 16
//     columns and k16, M <= 32 four per warp), instead of padding M to 16.
//   * A fragment from packed words, no re-layout (lane = 4g + t): A rows g and g + 8, k pairs
//     (2t, 2t+1) and (2t+8, 2t+9). A lane loads 4 words of its packed word column `word` --
//     rows 2t, 2t+1, 2t+8, 2t+9 of the k16 step -- and the byte permutes of gemm_mma.cu give
//     (row k, row k+1) nibble pairs of one column: even columns from prmt 0x5410, odd from
//     0x7632. m16 tile i takes A row g = column 2i and A row g + 8 = column 2i + 1 of the
//     lane's word, so the 4 tiles cover the warp's 8 words x 8 columns = 64 columns with
//     16 dequantized pairs (shift, lop3, fma, fma each; bf16: after the scale's own rounding,
//     common.cuh dequant_pair) and 4 * NT mma per k16 step. The B fragment is two 4-byte loads of x per n8 tile (x row 8j + g,
//     k 2t.. and 2t + 8..).
//   * C fragment: lane holds rows 8j + 2t, 8j + 2t + 1 of y for all 8 columns of its word:
//     one 16-byte store per row (two for fp32 partials).
//   * Block = 8 warps = 256 columns (4 warps of 64, so every row's 128-byte line of packed words
//     is read by one block at about the same time) x 2 warps along K. The block's K range is cut
//     into chunks of 32 rows (2 k16 steps; 32 divides G, so a chunk lies in one group); warp
//     (wn, wk) takes the contiguous half wk of them. Each warp keeps DEPTH chunks of weight
//     loads in flight (8 words + the group's zeros word and scales per chunk) while it computes
//     one; x is loaded as each chunk is computed (L1 hits). No shared memory, no __syncthreads
//     in the K loop, no per-step conditions.
//   * Rows of x past M read row M - 1 and columns past N read word column g (valid memory; never
//     stored), so no load needs a condition.
//   * At the end the wk = 1 warp hands its accumulators to the wk = 0 warp of the same columns
//     through shared memory (fixed order), which stores them.
#include "common.cuh"
#include "splitk_fused.cuh"

constexpr int MD_WARPS_N = 4;                       // warps along N, 64 columns each
constexpr int MD_WARPS_K = 2;                       // warps along K (or along M: WM = 2)
constexpr int MD_THREADS = 32 * MD_WARPS_N * MD_WARPS_K;
constexpr int MD_NT = 64 * MD_WARPS_N;              // 256 columns per block (= splitk tile)
constexpr int MD_KC = 32;                           // rows per chunk and per split unit

// Chunks of weights a warp keeps in flight beyond the one it computes, by n8 tiles: bytes in
// flight per SM = warps per SM x DEPTH x 1 KB, >= 32 KB for the HBM's latency (NT <= 2: two
// blocks of 8 warps per SM within 128 registers; NT = 4: one block, 64 accumulators).
template <int NT> struct MdDepth { static constexpr int VALUE = NT == 1 ? 3 : (NT == 2 ? 2 : 4); };

// One chunk of a lane's streamed loads (13 registers and a flag). The x fragments are loaded when the
// chunk is computed instead (L1 hits: the block's 8 warps read the same rows of x), so that
// registers go to weights in flight.
struct MdChunk {
  u32 w[2][4];      // per k16 step: rows 2t, 2t+1, 2t+8, 2t+9 of the lane's word column
  bool group_start; // the chunk starts a group (or the warp's work): zw, sv are loaded
  u32 zw;           // the group's packed zeros word of the lane's column
  uint4 sv;         // the group's 8 fp16 scales of the lane's column
};

// The weight loads of one chunk (first row row0). `wq` points at row row0 + 2t of the lane's
// word column; `wrow` holds the word offsets of rows 1, 8, 9, 16, 17, 24, 25 below that
// (loop-invariant), so each load costs one address instruction.
__device__ __forceinline__ void md_load(MdChunk& c, const u32* wq, const int (&wrow)[7],
                                        bool group_start, const u32* zq, const u16* sq) {
  u32 w1[1];
#pragma unroll
  for (int r = 0; r < 8; ++r) {  // rows 0, 1, 8, 9 (step 0) and 16, 17, 24, 25 (step 1)
    ld_stream<1>(r == 0 ? wq : wq + wrow[r - 1], w1);
    c.w[r / 4][r % 4] = w1[0];
  }
  c.group_start = group_start;
  if (group_start) {  // uniform across the warp
    c.zw = __ldg(zq);
    c.sv = __ldg(reinterpret_cast<const uint4*>(sq));
  }
}

// The chunk's two k16 steps: load the x fragments (B: per step and n8 tile j, x[8j + g] at
// k + 2t, +1 and k + 2t + 8, +9, with `xq[j]` at the chunk's row + 2t), dequantize the A
// fragments of the 4 m16 tiles, one mma per m16 and n8 tile.
template <typename T, int NT>
__device__ __forceinline__ void md_compute(const MdChunk& c, const u16* const (&xq)[NT],
                                           const u32 (&zb)[8], const u32 (&sb)[8],
                                           float (&acc)[4][NT][4]) {
  u32 b[2][NT][2];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // even element offsets: 4-byte aligned
      b[s][j][0] = __ldg(reinterpret_cast<const u32*>(xq[j] + 16 * s));
      b[s][j][1] = __ldg(reinterpret_cast<const u32*>(xq[j] + 16 * s + 8));
    }
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const u32 even01 = prmt(c.w[s][0], c.w[s][1], 0x5410u);
    const u32 odd01 = prmt(c.w[s][0], c.w[s][1], 0x7632u);
    const u32 even89 = prmt(c.w[s][2], c.w[s][3], 0x5410u);
    const u32 odd89 = prmt(c.w[s][2], c.w[s][3], 0x7632u);
    const u32 even01_8 = even01 >> 8, odd01_8 = odd01 >> 8;  // for dequant_nibbles
    const u32 even89_8 = even89 >> 8, odd89_8 = odd89 >> 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // m16 tile i: A rows g, g + 8 = columns 2i, 2i + 1
      const u32 a[4] = {dequant_nibbles<T>(even01, even01_8, i, zb[2 * i], sb[2 * i]),
                        dequant_nibbles<T>(odd01, odd01_8, i, zb[2 * i + 1], sb[2 * i + 1]),
                        dequant_nibbles<T>(even89, even89_8, i, zb[2 * i], sb[2 * i]),
                        dequant_nibbles<T>(odd89, odd89_8, i, zb[2 * i + 1], sb[2 * i + 1])};
#pragma unroll
      for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], a, b[s][j]);
    }
  }
}

// Grid: (N / 256 rounded up, splits); block: 256 threads. Split y handles rows
// [y * kc_per_split * 32, min(K, (y + 1) * kc_per_split * 32)).
// WM = 1: the block's second row of 4 warps takes the second half of the split's K range
// (M <= 8 NT). WM = 2: it takes rows 8 NT .. 16 NT - 1 of x over the whole range instead
// (M <= 16 NT; each weight is loaded by two warps, the second time from L2), since 16 NT
// accumulator rows no longer fit one warp's registers.
template <typename T, int NT, int WM>
__global__ void __launch_bounds__(MD_THREADS, NT >= 4 ? 1 : 2)
awq_mma_direct(const u16* __restrict__ x, const u32* __restrict__ qweight,
               const u32* __restrict__ qzeros, const u16* __restrict__ scales,
               void* __restrict__ out, int M, int N, int K, int group_size, int kc_per_split,
               u16* __restrict__ y, int* __restrict__ counters) {
  constexpr int DEPTH = MdDepth<NT>::VALUE;
  constexpr int ACC = 4 * NT * 4;  // accumulators per lane
  static_assert(WM == 1 || WM == MD_WARPS_K, "the second row of warps splits K or M");
  __shared__ float red[MD_WARPS_N][WM == 1 ? ACC : 1][32];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int wn = warp % MD_WARPS_N, wr = warp / MD_WARPS_N;
  const int wk = WM == 1 ? wr : 0, m_base = WM == 1 ? 0 : wr * 8 * NT;
  const int nw = N / 8;
  const int word = blockIdx.x * (MD_NT / 8) + wn * 8 + g;  // the lane's packed word column
  const bool in_n = word < nw;  // the same for the whole warp (N % 64 == 0)
  const int wcol = in_n ? word : g;
  // The split's chunks of 32 rows, in two contiguous halves: warp wk takes half wk (a warp
  // walks consecutive rows, so it reloads zeros and scales only at its groups' starts); with
  // WM = 2 every warp takes them all.
  const int k_begin = blockIdx.y * kc_per_split * MD_KC;
  const int chunks = (min(K, k_begin + kc_per_split * MD_KC) - k_begin) / MD_KC;
  const int half = WM == 1 ? (chunks + 1) / 2 : chunks;
  const int q_begin = wk * half, mine = min(chunks, q_begin + half) - q_begin;
  const int row_first = k_begin + q_begin * MD_KC;
  const int group_shift = 31 - __clz(group_size);  // G is a power of two

  const int wrow[7] = {nw, 8 * nw, 9 * nw, 16 * nw, 17 * nw, 24 * nw, 25 * nw};
  const u32* wq = qweight + (size_t)(row_first + 2 * t) * nw + wcol;
  const u16* xq[NT];  // (M * K < 2^31: activations)
#pragma unroll
  for (int j = 0; j < NT; ++j)
    xq[j] = x + (size_t)min(m_base + 8 * j + g, M - 1) * K + row_first + 2 * t;
  const size_t w_chunk = (size_t)MD_KC * nw;  // words from one chunk to the next

  float acc[4][NT][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  u32 zb[8], sb[8];

  // Chunk q of this warp (q < mine): rows row_first + 32 q ...; loads issued DEPTH ahead.
  auto load = [&](MdChunk& c, int q) {
    const int row0 = row_first + q * MD_KC;
    const int grp = row0 >> group_shift;
    md_load(c, wq + q * w_chunk, wrow, q == 0 || (row0 & (group_size - 1)) == 0,
            qzeros + (size_t)grp * nw + wcol, scales + (size_t)grp * N + 8 * wcol);
  };
  // DEPTH + 1 register buffers used in rotation, unrolled so that every index is static (no
  // register moves): chunk q sits in buf[q % NBUF]; computing it, the warp first refills the
  // buffer of chunk q - 1 (just computed) with chunk q + DEPTH.
  constexpr int NBUF = DEPTH + 1;
  MdChunk buf[NBUF];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (d < mine) load(buf[d], d);
  for (int i = 0; i < mine; i += NBUF) {
#pragma unroll
    for (int d = 0; d < NBUF; ++d) {
      if (i + d < mine) {  // uniform across the warp
        if (i + d + DEPTH < mine) load(buf[(d + DEPTH) % NBUF], i + d + DEPTH);
        if (buf[d].group_start) group_pairs<T>(buf[d].zw, buf[d].sv, zb, sb);
        const u16* xc[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) xc[j] = xq[j] + (i + d) * MD_KC;
        md_compute<T, NT>(buf[d], xc, zb, sb, acc);
      }
    }
  }

  // WM = 1: the two K warps of the same columns meet in shared memory, wk = 0 adds wk = 1's
  // sums and stores them. WM = 2: every warp stores its own rows.
  if (WM == 1) {
    if (wk == 1) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) red[wn][(i * NT + j) * 4 + e][lane] = acc[i][j][e];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] += red[wn][(i * NT + j) * 4 + e][lane];
    }
  }
  const bool partial = gridDim.y > 1;
  if (wk == 0 && in_n) {
    // c0 = y[8j + 2t][column 2i], c1 = y[8j + 2t + 1][2i], c2, c3 the same rows at 2i + 1.
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m_base + 8 * j + 2 * t + h;
        if (m >= M) continue;
        float v[8];  // the 8 columns of the lane's word
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[2 * i] = acc[i][j][h];
          v[2 * i + 1] = acc[i][j][2 + h];
        }
        if (partial) {
          float* dst = static_cast<float*>(out) + ((size_t)blockIdx.y * M + m) * N + 8 * word;
          st_global16(dst, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
          st_global16(dst + 4, __float_as_uint(v[4]), __float_as_uint(v[5]),
                      __float_as_uint(v[6]), __float_as_uint(v[7]));
        } else {
          u16* dst = static_cast<u16*>(out) + (size_t)m * N + 8 * word;
          st_global16(dst, pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                      pack2<T>(v[6], v[7]));
        }
      }
  }
  if (partial && counters != nullptr)
    splitk_finish<T, MD_NT>(static_cast<const float*>(out), y, counters, M, N);
}
