// dequant.cu -- W[K, N] = (q - z) * s in T (fp16 or bf16) from the AWQ packed format, for the
// large-M path (dequantize once, then a cuBLAS matmul whose cost dwarfs this pass).
//
// Inputs: qweight [K, N/8] int32, qzeros [K/G, N/8] int32, scales [K/G, N] fp16; out
// [K, NC] T: the columns n0 .. n0+NC-1 of W (all of it: n0 = 0, NC = N; a slice lets the
// overlapped path of api.py dequantize the next columns while cuBLAS multiplies these).
// Constraints (checked in Python): N % 64 == 0, n0 and NC multiples of 64, n0 + NC <= N,
// K % G == 0, 16-byte aligned pointers.
//
// Mapping: one thread per packed word (row k, word column c): a 4-byte load of the word
// (consecutive threads, consecutive words: coalesced), the group's zero word and 8 scales
// (16 bytes; re-read by the G rows of a group, so mostly L1/L2 hits), and one 16-byte store of
// the 8 dequantized columns 8c .. 8c+7 in natural order. Grid-stride loop over K * NC / 8 words.
#include "common.cuh"

constexpr int DEQUANT_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(DEQUANT_THREADS)
awq_dequant(const u32* __restrict__ qweight, const u32* __restrict__ qzeros,
            const u16* __restrict__ scales, u16* __restrict__ out, int K, int N,
            int group_size, int n0, int NC) {
  const int nw = N / 8, ncw = NC / 8;  // packed words per row: of W, of the slice
  const size_t words = (size_t)K * ncw;
  for (size_t i = (size_t)blockIdx.x * DEQUANT_THREADS + threadIdx.x; i < words;
       i += (size_t)gridDim.x * DEQUANT_THREADS) {
    const int k = (int)(i / ncw), cs = (int)(i % ncw), c = n0 / 8 + cs;
    const int grp = k / group_size;
    const u32 q = qweight[(size_t)k * nw + c];
    const u32 zw = qzeros[(size_t)grp * nw + c];
    const uint4 sv = *reinterpret_cast<const uint4*>(scales + (size_t)grp * N + c * 8);
    const u32 s01[4] = {sv.x, sv.y, sv.z, sv.w};
    u32 o[4];  // o[p] = columns (2p, 2p+1)
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const u32 zneg = nibbles_to_magic_pair<T>(zw >> (4 * p)) ^ SIGN2;
      o[p] = dequant_pair<T>(q >> (4 * p), zneg, scale_pair<T>(s01[p]));
    }
    st_global16(out + (size_t)k * NC + cs * 8, o[0], o[1], o[2], o[3]);
  }
}
