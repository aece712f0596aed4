// splitk_fused.cuh -- split-K summed in the same launch (gemv_direct.cu, mma_direct.cu;
// gemm_mma.cu through splitk_finish_tile).
//
// A kernel split over K (gridDim.y splits of its K range, gridDim.x column tiles of TILE
// columns, TILE threads per block) first writes its fp32 partial sums to partials [splits, M, N];
// then every block calls splitk_finish. It counts the block as done on its column tile; the
// block that finishes a tile last adds the tile's partials in split order -- the same sums in the
// same order as splitk_reduce.cu, so the same bits -- writes y [M, N] and sets the tile's counter
// back to zero for the next launch (counters start zeroed; api.py keeps one set per stream).
// The atomic only counts arrivals; it adds nothing, so the result is deterministic.
#pragma once
#include "common.cuh"

constexpr int SPLITK_FINISH_MAX = 16;  // plan.MAX_SPLITS: the splits the planners ever make

// Sum of the `splits` partials p[0], p[stride], ... in split order (the reduce kernel's order).
// Up to SPLITK_FINISH_MAX every load is issued before the first add: one L2 round trip on the
// finishing block's critical path instead of one per few splits. __ldcg: L2, not a stale L1.
__device__ __forceinline__ float sum_splits(const float* p, int splits, size_t stride) {
  if (splits > SPLITK_FINISH_MAX) {
    float sum = __ldcg(p);
    for (int s = 1; s < splits; ++s) sum += __ldcg(p + s * stride);
    return sum;
  }
  float part[SPLITK_FINISH_MAX];
#pragma unroll
  for (int s = 0; s < SPLITK_FINISH_MAX; ++s) part[s] = s < splits ? __ldcg(p + s * stride) : 0.f;
  float sum = part[0];
#pragma unroll
  for (int s = 1; s < SPLITK_FINISH_MAX; ++s)
    if (s < splits) sum += part[s];
  return sum;
}

template <typename T, int TILE>
__device__ __forceinline__ void splitk_finish(const float* partials, u16* y, int* counters,
                                              int M, int N) {
  __shared__ int last;
  __threadfence();  // this thread's partials are visible device-wide before the block counts
  __syncthreads();
  if (threadIdx.x == 0)
    last = atomicAdd(&counters[blockIdx.x], 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // pairs with the other blocks' fences: their partials are visible now
  const int col = blockIdx.x * TILE + threadIdx.x;  // thread t adds column t of the tile
  const int splits = static_cast<int>(gridDim.y);
  if (col < N) {
    for (int m = 0; m < M; ++m) {
      const float sum = sum_splits(partials + (size_t)m * N + col, splits, (size_t)M * N);
      y[(size_t)m * N + col] = (u16)(pack2<T>(sum, 0.f) & 0xFFFFu);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// The same for a 2-D grid of output tiles split over blockIdx.z (gemm_mma.cu): the block of
// tile (blockIdx.x, blockIdx.y), rows m0 .. m0 + TILE_M - 1 and columns n0 .. n0 + TILE_N - 1,
// THREADS threads; its counter is counters[blockIdx.y * gridDim.x + blockIdx.x]. The last block
// of the tile adds its splits in split order (the reduce kernel's sums: the same bits).
template <typename T, int TILE_M, int TILE_N, int THREADS>
__device__ __forceinline__ void splitk_finish_tile(const float* partials, u16* y, int* counters,
                                                   int M, int N, int m0, int n0) {
  __shared__ int last;
  const int tile = blockIdx.y * gridDim.x + blockIdx.x, splits = static_cast<int>(gridDim.z);
  __threadfence();  // this thread's partials are visible device-wide before the block counts
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[tile], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // pairs with the other blocks' fences: their partials are visible now
  for (int i = threadIdx.x; i < TILE_M * TILE_N; i += THREADS) {
    const int row = m0 + i / TILE_N, col = n0 + i % TILE_N;
    if (row >= M || col >= N) continue;
    const float sum = sum_splits(partials + (size_t)row * N + col, splits, (size_t)M * N);
    y[(size_t)row * N + col] = (u16)(pack2<T>(sum, 0.f) & 0xFFFFu);
  }
  if (threadIdx.x == 0) counters[tile] = 0;
}

