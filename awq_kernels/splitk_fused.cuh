// splitk_fused.cuh -- split-K summed in the same launch (gemv_direct.cu, mma_direct.cu).
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
  if (col < N) {
    for (int m = 0; m < M; ++m) {
      float sum = __ldcg(partials + (size_t)m * N + col);  // split 0; L2 reads, not stale L1
      for (int s = 1; s < static_cast<int>(gridDim.y); ++s)
        sum += __ldcg(partials + ((size_t)s * M + m) * N + col);
      y[(size_t)m * N + col] = (u16)(pack2<T>(sum, 0.f) & 0xFFFFu);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}
