// wgmma_probe.cu -- a probe of the Hopper (sm_90a) warpgroup MMA layouts a future kernel of
// awq_kernels would rely on; no product path uses it. tests/test_wgmma_probe.py compiles it
// (NVRTC, sm_90a) on any machine and, on an H100/H200, checks one product against NumPy.
//
// One warpgroup (128 threads, 4 warps) computes D (64 x N, fp32) = A (64 x 16, fp16) x
// B (16 x N, fp16) with one wgmma.mma_async.m64nNk16, N = 8 or 64:
// - A from registers, in the layout assumed here (mma.m16n8k16's A fragment per warp, warp w
//   holding rows 16w .. 16w+15): lane l = 4g + t of warp w holds
//   a[0..1] = A[16w+g][2t..2t+1], a[2..3] = A[16w+g+8][2t..2t+1],
//   a[4..5] = A[16w+g][2t+8..2t+9], a[6..7] = A[16w+g+8][2t+8..2t+9];
// - B from shared memory, K-major without swizzle: 8 x 8 "core matrices" (8 rows of N, 8 k
//   values = 16 contiguous bytes each, 128 bytes per core), core (n / 8, k / 8) at byte
//   (n / 8) * sbo + (k / 8) * lbo: the descriptor's leading byte offset lbo is the distance of
//   core matrices along K, its stride byte offset sbo along N (the PTX ISA's wording);
// - D in registers as mma.m16n8k16's C fragment per warp and n8 column block j:
//   d[4j + 0..1] = D[16w+g][8j+2t..8j+2t+1], d[4j + 2..3] = D[16w+g+8][8j+2t..8j+2t+1].
// The host lays B out for the given (lbo, sbo) and compares D with A @ B: a match confirms all
// three assumptions at once; D is written raw (per thread and register) so a mismatch can be
// read back to the true layout.
// wgmma_probe_a_smem_n8 takes A from shared memory too, M-major (trans-a = 1): 8 x 8 cores of
// 8 k rows, each 16 contiguous bytes of 8 m values -- the AWQ word's own order once its 8
// columns are dequantized -- core (m / 8, k / 8) at (m / 8) * a_m + (k / 8) * a_k bytes, and a
// descriptor whose (lbo, sbo) the host sets to (a_k, a_m) or (a_m, a_k): which one reads it right
// is what the probe finds out.

typedef unsigned int u32;
typedef unsigned short u16;

template <int N>
__device__ void wgmma_n(float* d, const u32* a, unsigned long long desc);

template <>
__device__ void wgmma_n<8>(float* d, const u32* a, unsigned long long desc) {
  asm volatile(  // scale-d true: D += A B (d starts at zero)
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

template <>
__device__ void wgmma_n<64>(float* d, const u32* a, unsigned long long desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

__device__ unsigned long long smem_desc(const void* p, int lbo, int sbo) {
  // start address, leading and stride byte offsets (each >> 4, 14 bits), no swizzle
  const u32 addr = (u32)__cvta_generic_to_shared(p);
  return (unsigned long long)((addr & 0x3FFFF) >> 4) |
         ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
         ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32);
}

// a_regs [128 threads][4] (fp16 pairs as the fragment holds them), b_image: the shared-memory
// image of B (bytes, laid out by the host), d_out [128 threads][N / 2] fp32.
template <int N>
__device__ void probe(const u32* a_regs, const u32* b_image, int b_words, int lbo, int sbo,
                      float* d_out) {
  __shared__ alignas(128) u32 smem[2048];  // 8 KB: B for N <= 64 with room for padding
  const int t = threadIdx.x;
  for (int i = t; i < b_words; i += 128) smem[i] = b_image[i];
  // generic-proxy stores, read next by the tensor cores (async proxy)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  u32 a[4];
  for (int r = 0; r < 4; ++r) a[r] = a_regs[4 * t + r];
  float d[N / 2];
  for (int r = 0; r < N / 2; ++r) d[r] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  wgmma_n<N>(d, a, smem_desc(smem, lbo, sbo));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  for (int r = 0; r < N / 2; ++r) d_out[t * (N / 2) + r] = d[r];
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_n8(
    const u32* a_regs, const u32* b_image, int b_words, int lbo, int sbo, float* d_out) {
  probe<8>(a_regs, b_image, b_words, lbo, sbo, d_out);
}

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_n64(
    const u32* a_regs, const u32* b_image, int b_words, int lbo, int sbo, float* d_out) {
  probe<64>(a_regs, b_image, b_words, lbo, sbo, d_out);
}

// A and B both from shared memory: a_image (2 KB) then b_image (K-major as above, lbo 128,
// sbo 256); the A descriptor's offsets (a_lbo, a_sbo) as the host gives them.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe_a_smem_n8(
    const u32* a_image, const u32* b_image, int a_lbo, int a_sbo, float* d_out) {
  // A: the 2 KB image, then zeros: a descriptor read the wrong way round reaches up to byte
  // 7,422 (core (7, 1) at 7 * 1024 + 128), which must stay inside the allocation
  __shared__ alignas(128) u32 a_s[2048];
  __shared__ alignas(128) u32 b_s[64];   // 16 x 8 fp16
  const int t = threadIdx.x;
  for (int i = t; i < 2048; i += 128) a_s[i] = i < 512 ? a_image[i] : 0u;
  if (t < 64) b_s[t] = b_image[t];
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  const unsigned long long da = smem_desc(a_s, a_lbo, a_sbo), db = smem_desc(b_s, 128, 256);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(  // imm-trans-a 1: A M-major; imm-trans-b 0: B K-major
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, %4, %5, "
      "p, 1, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "l"(da), "l"(db));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  for (int r = 0; r < 4; ++r) d_out[t * 4 + r] = d[r];
}
