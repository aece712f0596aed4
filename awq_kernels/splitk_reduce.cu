// splitk_reduce.cu -- out[i] = T(sum over s of partial[s, i]) for the split-K kernels.
//
// Inputs: partial [splits, count] fp32 (count = M * N), out [count] T.
// Constraints: count % 4 == 0 (N % 64 == 0), 16-byte aligned pointers.
//
// Mapping: one thread per 4 consecutive outputs: `splits` 16-byte loads, added in split order
// (so two runs give identical bits, unlike atomics), one 8-byte store.
#include "common.cuh"

constexpr int REDUCE_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(REDUCE_THREADS)
splitk_reduce(const float* __restrict__ partial, u16* __restrict__ out, int splits, int count) {
  const int i = (blockIdx.x * REDUCE_THREADS + threadIdx.x) * 4;
  if (i >= count) return;
  float4 acc = *reinterpret_cast<const float4*>(partial + i);
  for (int s = 1; s < splits; ++s) {
    const float4 v = *reinterpret_cast<const float4*>(partial + (size_t)s * count + i);
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  uint2 packed;
  packed.x = pack2<T>(acc.x, acc.y);
  packed.y = pack2<T>(acc.z, acc.w);
  *reinterpret_cast<uint2*>(out + i) = packed;
}
