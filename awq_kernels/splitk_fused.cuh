// splitk_fused.cuh -- split-K summed in the same launch (gemv_direct.cu, mma_direct.cu;
// gemm_mma.cu through splitk_finish_tile; attention.cu's split merge uses splitk_last_arrival).
//
// A kernel split over K (gridDim.y splits of its K range, gridDim.x column tiles of TILE
// columns, TILE threads per block) first writes its fp32 partial sums to partials [splits, M, N];
// then every block calls splitk_finish. It counts the block as done on its column tile; the
// block that finishes a tile last adds the tile's partials in split order -- the same sums in the
// same order as splitk_reduce.cu, so the same bits -- writes y [M, N] and sets the tile's counter
// back to zero for the next launch (counters start zeroed; runtime.py keeps one set per stream).
// The atomic only counts arrivals; it adds nothing, so the result is deterministic.
#pragma once
#include "common.cuh"

constexpr int SPLITK_FINISH_MAX = 16;  // plan.MAX_SPLITS: the splits the planners ever make

// Sum of the `splits` partials of four consecutive columns, p[0..3], p[stride..], ... in split
// order (the reduce kernel's sums). Up to SPLITK_FINISH_MAX every 16-byte load is issued before
// the first add: one L2 round trip on the finishing block's critical path instead of one per few
// splits. __ldcg: L2, not a stale L1. p and stride are multiples of 4 floats (N % 64 == 0).
// Precondition: splits <= SPLITK_FINISH_MAX (the API caps max_splits there; a CPU test checks
// the two constants agree).
__device__ __forceinline__ float4 sum_splits4(const float* p, int splits, size_t stride) {
  const float4* q = reinterpret_cast<const float4*>(p);
  const size_t step = stride / 4;
  float4 part[SPLITK_FINISH_MAX];
#pragma unroll
  for (int s = 0; s < SPLITK_FINISH_MAX; ++s)
    part[s] = s < splits ? __ldcg(q + s * step) : make_float4(0.f, 0.f, 0.f, 0.f);
  float4 sum = part[0];
#pragma unroll
  for (int s = 1; s < SPLITK_FINISH_MAX; ++s)
    if (s < splits) {
      sum.x += part[s].x; sum.y += part[s].y; sum.z += part[s].z; sum.w += part[s].w;
    }
  return sum;
}

// Counts this block as done on its output tile; true in the block that finishes the tile last,
// which may then read every split's partials. Called by every thread of the block.
__device__ __forceinline__ bool splitk_last_arrival(int* counter, int splits) {
  __shared__ int last;
  __threadfence();  // this thread's partials are visible device-wide before the block counts
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (last) __threadfence();  // pairs with the other blocks' fences: their partials are visible
  return last;
}

// y[row, col .. col + 3] = the sums of their splits (one 8-byte store).
template <typename T>
__device__ __forceinline__ void finish_quad(const float* partials, u16* y, int splits, int M,
                                            int N, int row, int col) {
  const float4 sum = sum_splits4(partials + (size_t)row * N + col, splits, (size_t)M * N);
  uint2 packed;
  packed.x = pack2<T>(sum.x, sum.y);
  packed.y = pack2<T>(sum.z, sum.w);
  *reinterpret_cast<uint2*>(y + (size_t)row * N + col) = packed;
}

// Column tiles of TILE columns, TILE threads per block. The last block of a tile sums its
// M x TILE outputs as M x TILE / 4 quads of columns, thread t taking quads t, t + TILE, ...: one
// L2 round trip per 4 rows of M (2 at M = 8), where one thread per column took one per row.
template <typename T, int TILE>
__device__ __forceinline__ void splitk_finish(const float* partials, u16* y, int* counters,
                                              int M, int N) {
  const int splits = static_cast<int>(gridDim.y);
  if (!splitk_last_arrival(&counters[blockIdx.x], splits)) return;
  constexpr int QUADS = TILE / 4;  // column quads per row of the tile
  for (int i = threadIdx.x; i < M * QUADS; i += TILE) {
    const int row = i / QUADS, col = blockIdx.x * TILE + 4 * (i % QUADS);
    if (col < N) finish_quad<T>(partials, y, splits, M, N, row, col);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// The same for a 2-D grid of output tiles split over blockIdx.z (gemm_mma.cu): the block of
// tile (blockIdx.x, blockIdx.y), rows m0 .. m0 + TILE_M - 1 and columns n0 .. n0 + TILE_N - 1,
// THREADS threads; its counter is counters[blockIdx.y * gridDim.x + blockIdx.x]. The last block
// of the tile adds its splits in split order (the reduce kernel's sums: the same bits), a quad
// of columns per thread at a time.
template <typename T, int TILE_M, int TILE_N, int THREADS>
__device__ __forceinline__ void splitk_finish_tile(const float* partials, u16* y, int* counters,
                                                   int M, int N, int m0, int n0) {
  const int tile = blockIdx.y * gridDim.x + blockIdx.x, splits = static_cast<int>(gridDim.z);
  if (!splitk_last_arrival(&counters[tile], splits)) return;
  constexpr int QUADS = TILE_N / 4;
  for (int i = threadIdx.x; i < TILE_M * QUADS; i += THREADS) {
    const int row = m0 + i / QUADS, col = n0 + 4 * (i % QUADS);
    if (row < M && col < N) finish_quad<T>(partials, y, splits, M, N, row, col);
  }
  if (threadIdx.x == 0) counters[tile] = 0;
}
