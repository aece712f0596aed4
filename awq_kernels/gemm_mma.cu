// gemm_mma.cu -- tensor-core GEMM  y[M, N] = x[M, K] @ W[K, N]  with W in the AWQ packed format.
//
// Inputs (raw bits; T = F16 or BF16 is the activation/output type):
//   x        [M, K]   T, row-major                          (u16 bits)
//   qweight  [K, N/8] int32, 8 nibbles along N, AWQ order  (u32)
//   qzeros   [K/G, N/8] int32, packed like qweight          (u32)
//   scales   [K/G, N] fp16 (even for T = BF16)              (u16 bits)
//   out      [M, N] T when gridDim.z == 1, else fp32 partial sums [gridDim.z, M, N]
//            (split-K; splitk_reduce.cu adds them in a fixed order, so results are deterministic;
//            or, when `counters` is given, the last block of each output tile adds them in the
//            same order and writes y [M, N]: splitk_fused.cuh).
// Constraints (checked in Python): K % BK == 0, G in {32, 64, 128} and G % BK == 0 (so one BK
// tile lies in one group), N % WARP_N == 0, every pointer 16-byte aligned.
//
// Block tile BM x BN x BK, WARPS_M x WARPS_N warps, each warp owns (16*MI) x 64 of the output.
// The tile is a template parameter (build.MmaTile lists the compiled ones): the default ladder
// is BM = 16, 32, 64, 128 with WARPS_M = 1, 2, 2, 2 (MI = 1, 1, 2, 4), WARPS_N = 2 (BN = 128),
// BK = 32; wider tiles (WARPS_N = 4, BN = 256) and deeper ones (BK = 64, G >= 64 only) move
// more bytes per __syncthreads and share one x tile among more warps, for the benchmark's
// tile sweep to judge. STAGES (cp.async pipeline depth) is 4, or fewer where 4 stages would
// pass the 48 KB of static shared memory. plan.py picks the tile by M and splits K when there
// are too few tiles for the SMs.
// A STAGES-deep cp.async pipeline brings, per k tile: the x tile (BM x BK halves), the packed
// weight tile (BK rows x BN/8 words), and -- only when the tile starts a group -- one row of
// scales and zeros. Out-of-range rows/columns are zero-filled.
//
// The data mapping that makes the packed words usable by mma.sync m16n8k16 WITHOUT any shared
// memory re-layout (lane = 4*g + t, g = lane / 4, t = lane % 4):
//   * mma B fragment for an n8 tile: lane holds B[k][g] for k = 2t, 2t+1 (reg 0), 2t+8, 2t+9
//     (reg 1). We let the mma column g stand for PACKED WORD g of the warp (8 real columns) and
//     the n8 tile j for column j inside that word. A lane thus dequantizes 4 whole words (rows
//     2t, 2t+1, 2t+8, 2t+9 of its word column) into the B fragments of all 8 n8 tiles.
//   * Two words of consecutive rows are interleaved with one byte permute: bits 0..15 of both
//     hold the even columns (AWQ order), bits 16..31 the odd ones; so prmt 0x5410 / 0x7632 gives
//     words whose nibble pairs at (4p, 16+4p) are (row k, row k+1) of ONE column -- exactly the
//     (k, k+1) pair a B register needs. The magic-number trick then yields the fp16/bf16 pair.
//   * mma C fragment: lane holds rows g and g+8, mma columns 2t and 2t+1, i.e. packed words 2t
//     and 2t+1, i.e. 16 consecutive real columns 16t .. 16t+15 of the warp's 64: two 16-byte
//     stores per row.
//   * A comes from shared memory through ldmatrix.x4; the 16-byte chunks of each x row are
//     XOR-swizzled so the 8 row addresses of one 8x8 matrix hit 8 different bank groups:
//     BK = 32 (64-byte rows, two rows per 128 bytes): chunk ^ ((row >> 1) & 3);
//     BK = 64 (128-byte rows): chunk ^ (row & 7).
//   * B rows are padded to B_STRIDE = BN/8 + 4 words (20 or 36; = 4 mod 16): the 4 rows 2t
//     (t = 0..3) a warp reads at once then start 8 banks apart (2 * B_STRIDE = 8 mod 32),
//     conflict-free with the 8 words g.
#include "common.cuh"
#include "splitk_fused.cuh"

constexpr int WARP_N = 64;  // 8 packed words x 8 columns per warp
constexpr int SMEM_LIMIT = 48 * 1024;  // static shared memory without an opt-in

// Tile geometry from the template parameters (mirrored by build.MmaTile).
template <int BM, int WARPS_N, int BK> struct MmaTile {
  static constexpr int BN = WARPS_N * WARP_N;           // columns per block
  static constexpr int BN_WORDS = BN / 8;               // packed words per block row
  static constexpr int A_ROW_WORDS = BK / 2;            // one x row of the tile in smem
  static constexpr int A_ROW_CHUNKS = A_ROW_WORDS / 4;  // 16-byte chunks per x row: 4 or 8
  static constexpr int B_STRIDE = BN_WORDS + 4;         // padded packed-weight row (header)
  static constexpr int B_ROW_CHUNKS = BN_WORDS / 4;
  static constexpr int S_CHUNKS = BN * 2 / 16;          // one row of BN fp16 scales
  static constexpr int Z_CHUNKS = BN_WORDS / 4;         // one row of packed zeros
  static constexpr int STAGE_BYTES = 4 * (BM * A_ROW_WORDS + BK * B_STRIDE + BN / 2 + BN_WORDS);
  static constexpr int STAGES = SMEM_LIMIT / STAGE_BYTES < 4 ? SMEM_LIMIT / STAGE_BYTES : 4;
  static_assert(BK == 32 || BK == 64, "BK is 32 or 64");
  static_assert(STAGES >= 2, "a stage of this tile does not fit twice in shared memory");
};

template <int BM, int WARPS_N, int BK> struct MmaSmem {
  using Tile = MmaTile<BM, WARPS_N, BK>;
  u32 a[Tile::STAGES][BM * Tile::A_ROW_WORDS];
  u32 b[Tile::STAGES][BK * Tile::B_STRIDE];
  u32 s[Tile::STAGES][Tile::BN / 2];
  u32 z[Tile::STAGES][Tile::BN_WORDS];
};

// Word offset of 16-byte chunk `c` of x row `r` in the swizzled A tile (header).
template <int BK> __device__ __forceinline__ int a_chunk_offset(int r, int c) {
  constexpr int ROW_WORDS = BK / 2;
  const int swizzle = BK == 32 ? (r >> 1) & 3 : r & 7;
  return r * ROW_WORDS + ((c ^ swizzle) << 2);
}

// Four 8x8 b16 matrices from shared memory; lane L supplies the row address of matrix L / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u32* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Per-group constants of the lane's packed word column, from shared memory (group_pairs).
template <typename T>
__device__ __forceinline__ void load_group(const u32* zrow, const u32* srow, int word,
                                           u32 (&zb)[8], u32 (&sb)[8]) {
  group_pairs<T>(zrow[word], *reinterpret_cast<const uint4*>(srow + word * 4), zb, sb);
}

// One k16 step of the warp: A fragments via ldmatrix, then for each of the 8 n8 tiles its B
// fragment is dequantized from the 4 packed words (w0, w1 = rows 2t, 2t+1; w8, w9 = rows 2t+8,
// 2t+9 of the lane's word column) right before its mma, so only one B fragment is live at a
// time (keeps MI = 2 within its 168-register budget, below).
template <typename T, int MI>
__device__ __forceinline__ void mma_k16(const u32 (&a)[MI][4], u32 w0, u32 w1, u32 w8, u32 w9,
                                        const u32 (&zb)[8], const u32 (&sb)[8],
                                        float (&acc)[MI][8][4]) {
  // prmt 0x5410 = (low 16 bits of w0, low 16 of w1): the even columns of rows k, k+1;
  // 0x7632 = (high 16 of w0, high 16 of w1): the odd columns.
  const u32 even01 = prmt(w0, w1, 0x5410u), odd01 = prmt(w0, w1, 0x7632u);
  const u32 even89 = prmt(w8, w9, 0x5410u), odd89 = prmt(w8, w9, 0x7632u);
  const u32 even01_8 = even01 >> 8, odd01_8 = odd01 >> 8;  // for dequant_nibbles
  const u32 even89_8 = even89 >> 8, odd89_8 = odd89 >> 8;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const u32 b_even[2] = {dequant_nibbles<T>(even01, even01_8, p, zb[2 * p], sb[2 * p]),
                           dequant_nibbles<T>(even89, even89_8, p, zb[2 * p], sb[2 * p])};
#pragma unroll
    for (int i = 0; i < MI; ++i) mma16816<T>(acc[i][2 * p], a[i], b_even);
    const u32 b_odd[2] = {dequant_nibbles<T>(odd01, odd01_8, p, zb[2 * p + 1], sb[2 * p + 1]),
                          dequant_nibbles<T>(odd89, odd89_8, p, zb[2 * p + 1], sb[2 * p + 1])};
#pragma unroll
    for (int i = 0; i < MI; ++i) mma16816<T>(acc[i][2 * p + 1], a[i], b_odd);
  }
}

// A tile needs scales/zeros iff it starts the block's k range or a new group (G a power of 2).
template <int BK>
__device__ __forceinline__ bool starts_group(int kt, int kt_begin, int group_size) {
  return kt == kt_begin || ((kt * BK) & (group_size - 1)) == 0;
}

// The cp.async copies one thread issues for each k tile. Which x rows, weight rows and 16-byte
// chunks a thread copies is the same at every k tile; only k moves. So the addresses are
// worked out once, before the K loop, and the k tiles, loaded in order, advance them by a
// constant: a stage costs a pointer add and a cp.async per copy. (Recomputing row, column,
// bounds and 64-bit address per copy and tile, as the first version did, made the K loop
// ~840 SASS instructions per k tile of which ~200 dequantize and multiply: issue-bound at
// 13 instructions per weight, tools/sass_loops.py.)
// Thread i copies x chunk i (+ THREADS ...), weight chunk i (+ THREADS ...), and at group
// starts scale chunk i (i < S_CHUNKS) or zero chunk i - S_CHUNKS (i < S_CHUNKS + Z_CHUNKS).
template <int BM, int WARPS_N, int BK, int THREADS> struct StageCopies {
  using Tile = MmaTile<BM, WARPS_N, BK>;
  using Smem = MmaSmem<BM, WARPS_N, BK>;
  static constexpr int A_CHUNKS = BM * Tile::A_ROW_CHUNKS, B_CHUNKS = BK * Tile::B_ROW_CHUNKS;
  static constexpr int A_COPIES = (A_CHUNKS + THREADS - 1) / THREADS;
  static constexpr int B_COPIES = (B_CHUNKS + THREADS - 1) / THREADS;
  static_assert(Tile::S_CHUNKS + Tile::Z_CHUNKS <= THREADS, "one scale or zero copy per thread");

  const u16* a_src[A_COPIES];  // x chunk at the next k tile (row 0 when past M: not read)
  u32 a_dst[A_COPIES];         // its shared address in stage 0
  int a_bytes[A_COPIES];       // 16, or 0 for a row past M (zero-filled)
  const u32* b_src[B_COPIES];  // packed-weight chunk at the next k tile
  u32 b_dst[B_COPIES];
  int b_bytes[B_COPIES];       // 16, or 0 for words past N
  const char* g_src;           // scale or zero chunk of group 0 (nullptr: none)
  size_t g_row_bytes;          // one group row of scales (2N) or zeros (N / 2)
  u32 g_dst, g_stage_bytes;
  int g_bytes;
  size_t b_step;               // words per k tile: BK * N / 8

  __device__ __forceinline__ StageCopies(Smem& sm, const u16* x, const u32* qweight,
                                         const u32* qzeros, const u16* scales, int M, int N,
                                         int K, int m0, int n0, int kt_begin) {
    const int nw = N / 8, n0w = n0 / 8, k0 = kt_begin * BK;
#pragma unroll
    for (int j = 0; j < A_COPIES; ++j) {
      const int i = threadIdx.x + j * THREADS, r = i / Tile::A_ROW_CHUNKS;
      const int c = i % Tile::A_ROW_CHUNKS;
      const bool ok = m0 + r < M;
      a_src[j] = x + (size_t)(ok ? m0 + r : 0) * K + k0 + c * 8;
      a_dst[j] = smem_addr(&sm.a[0][a_chunk_offset<BK>(r, c)]);
      a_bytes[j] = ok ? 16 : 0;
    }
#pragma unroll
    for (int j = 0; j < B_COPIES; ++j) {
      const int i = threadIdx.x + j * THREADS, r = i / Tile::B_ROW_CHUNKS;
      const int c = i % Tile::B_ROW_CHUNKS;
      const bool ok = n0w + c * 4 < nw;
      b_src[j] = qweight + (size_t)(k0 + r) * nw + (ok ? n0w + c * 4 : 0);
      b_dst[j] = smem_addr(&sm.b[0][r * Tile::B_STRIDE + c * 4]);
      b_bytes[j] = ok ? 16 : 0;
    }
    b_step = (size_t)BK * nw;
    const int i = threadIdx.x;
    g_src = nullptr;
    g_row_bytes = 0;
    g_dst = g_stage_bytes = 0;
    g_bytes = 0;
    if (i < Tile::S_CHUNKS) {
      const bool ok = n0 + i * 8 < N;
      g_src = reinterpret_cast<const char*>(scales + (ok ? n0 + i * 8 : 0));
      g_row_bytes = (size_t)N * 2;
      g_dst = smem_addr(&sm.s[0][i * 4]);
      g_stage_bytes = sizeof(sm.s[0]);
      g_bytes = ok ? 16 : 0;
    } else if (i < Tile::S_CHUNKS + Tile::Z_CHUNKS) {
      const int c = i - Tile::S_CHUNKS;
      const bool ok = n0w + c * 4 < nw;
      g_src = reinterpret_cast<const char*>(qzeros + (ok ? n0w + c * 4 : 0));
      g_row_bytes = (size_t)nw * 4;
      g_dst = smem_addr(&sm.z[0][c * 4]);
      g_stage_bytes = sizeof(sm.z[0]);
      g_bytes = ok ? 16 : 0;
    }
  }

  // Copies of the next k tile (`kt`, the tiles come in order) into stage `st`.
  // group_shift = log2(G): the group index is a shift, not a division (G is a power of 2).
  __device__ __forceinline__ void issue(int st, int kt, bool group_start, int group_shift) {
#pragma unroll
    for (int j = 0; j < A_COPIES; ++j) {
      if (A_CHUNKS % THREADS == 0 || threadIdx.x + j * THREADS < A_CHUNKS)
        cp_async16_bytes(a_dst[j] + st * (u32)sizeof(Smem::a[0]), a_src[j], a_bytes[j]);
      a_src[j] += BK;
    }
#pragma unroll
    for (int j = 0; j < B_COPIES; ++j) {
      if (B_CHUNKS % THREADS == 0 || threadIdx.x + j * THREADS < B_CHUNKS)
        cp_async16_bytes(b_dst[j] + st * (u32)sizeof(Smem::b[0]), b_src[j], b_bytes[j]);
      b_src[j] += b_step;
    }
    if (group_start && g_src != nullptr) {
      const int grp = (kt * BK) >> group_shift;
      cp_async16_bytes(g_dst + st * g_stage_bytes, g_src + grp * g_row_bytes, g_bytes);
    }
  }
};

// Write the warp's accumulators: per m16 tile, rows g and g+8, 16 consecutive columns each.
template <typename T, int MI>
__device__ __forceinline__ void store_tile(const float (&acc)[MI][8][4], void* out, int M, int N,
                                           int row0, int col0, bool partial) {
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row g (c0, c1); h = 1: row g + 8 (c2, c3)
      const int row = row0 + i * 16 + h * 8;
      if (row >= M) continue;
      float v[16];  // v[j] = word 2t column j, v[8 + j] = word 2t+1 column j
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = acc[i][j][2 * h];
        v[8 + j] = acc[i][j][2 * h + 1];
      }
      if (partial) {
        float* dst = static_cast<float*>(out) + (size_t)blockIdx.z * M * N + (size_t)row * N + col0;
#pragma unroll
        for (int q = 0; q < 4; ++q)
          st_global16(dst + 4 * q, __float_as_uint(v[4 * q]), __float_as_uint(v[4 * q + 1]),
                      __float_as_uint(v[4 * q + 2]), __float_as_uint(v[4 * q + 3]));
      } else {
        u16* dst = static_cast<u16*>(out) + (size_t)row * N + col0;
#pragma unroll
        for (int q = 0; q < 2; ++q)
          st_global16(dst + 8 * q, pack2<T>(v[8 * q], v[8 * q + 1]),
                      pack2<T>(v[8 * q + 2], v[8 * q + 3]), pack2<T>(v[8 * q + 4], v[8 * q + 5]),
                      pack2<T>(v[8 * q + 6], v[8 * q + 7]));
      }
    }
  }
}

// Occupancy target in warps per SM by accumulator size: MI = 1 -> 16 warps (<= 128 registers),
// MI = 2 -> 12 (<= 168), MI = 4 -> 8 (<= 255). More warps hide more latency, but capping the
// registers below what MI needs would spill the accumulators to local memory.
__host__ __device__ constexpr int mma_min_blocks(int mi, int warps) {
  return (mi == 1 ? 16 : (mi == 2 ? 12 : 8)) / warps;
}

// Grid: (N / BN rounded up, M / BM rounded up, splits); block: 32 * WARPS_M * WARPS_N threads.
// Split z handles k tiles [z * k_tiles_per_split, min(K / BK, (z + 1) * k_tiles_per_split)).
template <typename T, int BM, int WARPS_M, int WARPS_N, int BK>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N,
                                  mma_min_blocks(BM / (16 * WARPS_M), WARPS_M * WARPS_N))
awq_gemm_mma(const u16* __restrict__ x, const u32* __restrict__ qweight,
             const u32* __restrict__ qzeros, const u16* __restrict__ scales, void* __restrict__ out,
             int M, int N, int K, int group_size, int k_tiles_per_split,
             u16* __restrict__ y, int* __restrict__ counters) {
  using Tile = MmaTile<BM, WARPS_N, BK>;
  constexpr int STAGES = Tile::STAGES;
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr int MI = BM / (16 * WARPS_M);  // m16 tiles per warp
  static_assert(MI * 16 * WARPS_M == BM, "BM must be a multiple of 16 * WARPS_M");
  __shared__ __align__(16) MmaSmem<BM, WARPS_N, BK> sm;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int n0 = blockIdx.x * Tile::BN, m0 = blockIdx.y * BM;
  const int kt_begin = blockIdx.z * k_tiles_per_split;
  const int kt_end = min(K / BK, kt_begin + k_tiles_per_split);
  const int nk = kt_end - kt_begin;
  const int word = wn * 8 + g;  // this lane's packed word column inside the block

  float acc[MI][8][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
  u32 zb[8], sb[8];

  StageCopies<BM, WARPS_N, BK, THREADS> copies(sm, x, qweight, qzeros, scales, M, N, K, m0, n0,
                                                kt_begin);
  const int group_shift = 31 - __clz(group_size);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) {
      const int kt = kt_begin + s;
      copies.issue(s, kt, starts_group<BK>(kt, kt_begin, group_size), group_shift);
    }
    cp_async_commit();  // always commit: keeps the group count uniform for wait_group
  }

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();  // tile `it` has landed (for this thread) ...
    __syncthreads();              // ... for all threads; and stage (it - 1) is free again
    const int pre = it + STAGES - 1;
    if (pre < nk) {
      const int kt = kt_begin + pre;
      copies.issue(pre % STAGES, kt, starts_group<BK>(kt, kt_begin, group_size), group_shift);
    }
    cp_async_commit();

    const int st = it % STAGES;
    if (starts_group<BK>(kt_begin + it, kt_begin, group_size))
      load_group<T>(sm.z[st], sm.s[st], word, zb, sb);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      u32 a[MI][4];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        // ldmatrix.x4: lanes 0-7, 8-15, 16-23, 24-31 give the row addresses of matrices 0-3 =
        // (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) of this
        // m16 x k16 slice; lane 4g + t receives row g, elements 2t, 2t+1 of each: exactly
        // a0..a3 of the m16n8k16 A fragment.
        const int r = (wm * MI + i) * 16 + (lane % 16);
        ldmatrix_x4(a[i], &sm.a[st][a_chunk_offset<BK>(r, ks * 2 + lane / 16)]);
      }
      const u32* bw = &sm.b[st][(ks * 16 + 2 * t) * Tile::B_STRIDE + word];
      mma_k16<T, MI>(a, bw[0], bw[Tile::B_STRIDE], bw[8 * Tile::B_STRIDE],
                     bw[9 * Tile::B_STRIDE], zb, sb, acc);
    }
  }

  const int col0 = n0 + wn * WARP_N + 16 * t;
  if (n0 + wn * WARP_N < N)  // N % WARP_N == 0: a warp's 64 columns are all in or all out
    store_tile<T, MI>(acc, out, M, N, m0 + wm * MI * 16 + g, col0, gridDim.z > 1);
  if (gridDim.z > 1 && counters != nullptr)  // split-K summed in this launch (splitk_fused.cuh)
    splitk_finish_tile<T, BM, Tile::BN, THREADS>(static_cast<const float*>(out), y, counters, M,
                                                 N, m0, n0);
}
