// common.cuh -- element types, PTX wrappers and the int4 -> 16-bit dequantization shared by
// every kernel of awq_kernels.
//
// Why no <cuda_fp16.h>: the kernels keep 16-bit values as raw bits in 32-bit registers
// ("pairs": low half = element 0, high half = element 1) and use a handful of PTX instructions
// on them. Skipping the big fp16/bf16 headers keeps NVRTC compiles fast (the CPU CI compiles
// every kernel) and makes the bit-level tricks explicit.
//
// Element types are tag structs (F16, BF16) with a traits block (constants as pairs: the same
// 16-bit value in both halves):
//   MAGIC2  bits of the 16-bit float 2^e at which one unit of the mantissa equals 1.0,
//           so MAGIC | q (q < 16 in the low mantissa bits) is exactly the number 2^e + q.
//           fp16: 0x6400 = 1024.0 (10 mantissa bits); bf16: 0x4300 = 128.0 (7 mantissa bits).
//   ONE2    bits of 1.0 (used to express a subtraction as one fused multiply-add).
//   IN_PLACE_NIBBLES  whether the odd nibble pairs can be dequantized where they lie
//           (1024 + 16 q, fp16 only; see dequant_nibbles).
//   NAN16   bits of a quiet NaN: what a kernel writes where its input lies outside what it can
//           compute (a cache position past the cache), so the error shows downstream.
//
// The packed AWQ word (FORMAT.md): nibble i (bits 4i..4i+3) holds column ORDER[i] of an 8-column
// group, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]. So bits 0..15 hold the even columns (0, 2, 4, 6) and
// bits 16..31 the odd ones, and (word >> 4p) & 0x000F000F yields columns (2p, 2p+1) as a pair.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

struct F16 {
  static constexpr u32 MAGIC2 = 0x64006400u;  // (1024.0, 1024.0)
  static constexpr u32 ONE2 = 0x3C003C00u;    // (1.0, 1.0)
  static constexpr bool IN_PLACE_NIBBLES = true;  // see dequant_nibbles
  static constexpr u16 NAN16 = 0x7E00u;
};
struct BF16 {
  static constexpr u32 MAGIC2 = 0x43004300u;  // (128.0, 128.0)
  static constexpr u32 ONE2 = 0x3F803F80u;    // (1.0, 1.0)
  static constexpr bool IN_PLACE_NIBBLES = false;
  static constexpr u16 NAN16 = 0x7FC0u;
};

constexpr u32 SIGN2 = 0x80008000u;      // sign bits of both halves: xor negates a pair
constexpr u32 NEG_ZERO2 = 0x80008000u;  // (-0.0, -0.0): adding it changes nothing, even -0.0
constexpr u32 NIBBLE_MASK2 = 0x000F000Fu;

// ---------------------------------------------------------------------------------------------
// Pair arithmetic. Written as fma so one instruction form serves fp16 (sm_53+) and bf16 (sm_80+;
// add/sub/mul.bf16x2 only exist from sm_90).

// a * b + c on both halves, rounded once.
template <typename T> __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c);
template <> __device__ __forceinline__ u32 fma2<F16>(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <> __device__ __forceinline__ u32 fma2<BF16>(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Two floats -> one pair (lo in bits 0..15), rounded to nearest even.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<F16>(float lo, float hi) {
  u32 d;  // PTX puts the FIRST source in the upper half.
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
template <> __device__ __forceinline__ u32 pack2<BF16>(float lo, float hi) {
  u32 d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// One 16-bit value (raw bits) -> float; exact for both types.
template <typename T> __device__ __forceinline__ float to_float(u16 h);
template <> __device__ __forceinline__ float to_float<F16>(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
template <> __device__ __forceinline__ float to_float<BF16>(u16 h) {
  return __uint_as_float(((u32)h) << 16);  // bf16 is the upper half of an fp32
}

// The format stores scales as fp16 whatever the activation type: bf16 kernels convert each
// scale pair once per group in registers instead of keeping a converted copy in memory.
template <typename T> __device__ __forceinline__ u32 scale_pair(u32 fp16_pair) {
  return fp16_pair;
}
template <> __device__ __forceinline__ u32 scale_pair<BF16>(u32 fp16_pair) {
  return pack2<BF16>(to_float<F16>((u16)(fp16_pair & 0xFFFFu)),
                     to_float<F16>((u16)(fp16_pair >> 16)));
}

// ---------------------------------------------------------------------------------------------
// Bit tricks.

// (a & b) | c in ONE instruction: lop3's immediate is the expression applied to the operands'
// truth-table constants a = 0xF0, b = 0xCC, c = 0xAA: (0xF0 & 0xCC) | 0xAA = 0xEA.
__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Byte permute (PRMT): selector nibble i picks the output byte i from {b:a} (a = bytes 0..3).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// Low half copied into both halves: turns a per-column value into a (k, k+1) broadcast pair.
__device__ __forceinline__ u32 dup_lo(u32 p) { return prmt(p, p, 0x1010u); }
__device__ __forceinline__ u32 dup_hi(u32 p) { return prmt(p, p, 0x3232u); }

// Magic-number conversion: the two nibbles at bits 0..3 and 16..19 of `bits` become the pair
// (MAGIC + q_lo, MAGIC + q_hi), both exact; no integer -> float conversion instruction needed.
template <typename T> __device__ __forceinline__ u32 nibbles_to_magic_pair(u32 bits) {
  return lop3_and_or(bits, NIBBLE_MASK2, T::MAGIC2);
}

// (q - z) * s for a pair: `neg_magic_z` holds -(MAGIC + z). The subtraction is exact (small
// integers), so the result is (q - z) * s rounded once, with s as passed. fp16: s is the stored
// scale, so this is the reference dequantizer's value bit for bit. bf16: scale_pair<BF16> has
// already rounded s to bf16, so W = bf16((q - z) * bf16(s)), one ulp from bf16((q - z) * s) on
// ~15% of the weights (reference.dequantize_like_kernel models it; NOTES.md (e)).
template <typename T>
__device__ __forceinline__ u32 dequant_pair(u32 bits, u32 neg_magic_z, u32 s) {
  const u32 q_minus_z = fma2<T>(nibbles_to_magic_pair<T>(bits), T::ONE2, neg_magic_z);
  return fma2<T>(q_minus_z, s, NEG_ZERO2);
}

// Nibble pair p (bits 4p..4p+3 and 16+4p..16+4p+3, p = 0..3) of a packed word w, as
// (q - z) * s; `w8` = w >> 8, shifted once per word by the caller. For fp16 the pairs p = 1, 3
// are masked in place instead of shifted down: MAGIC | (q << 4) = 1024 + 16 q, exact (fp16's unit
// stays 1 below 2048), and fma(x, 1/16, -(64 + z)) = q - z, exact; so a word needs one shift
// instead of three, and those pairs' zero constant is -(64 + z) (zero_nibbles). bf16 cannot:
// with 7 mantissa bits 128 + 16 q passes 256, so it shifts every pair (w >> 4p) as before.
constexpr u32 HIGH_NIBBLE_MASK2 = 0x00F000F0u;
constexpr u32 SIXTEENTH2_F16 = 0x2C002C00u;  // (1/16, 1/16) in fp16
constexpr u32 NINE_SIXTY2_F16 = 0x63806380u;  // (960, 960): 1024 + z - 960 = 64 + z

// p is a compile-time constant wherever these are called (fully unrolled loops over p).
template <typename T>
__device__ __forceinline__ u32 dequant_nibbles(u32 w, u32 w8, int p, u32 zneg, u32 s) {
  if constexpr (T::IN_PLACE_NIBBLES) {
    const bool in_place = p % 2 == 1;
    const u32 x = lop3_and_or(p < 2 ? w : w8, in_place ? HIGH_NIBBLE_MASK2 : NIBBLE_MASK2,
                              T::MAGIC2);
    const u32 q_minus_z = fma2<T>(x, in_place ? SIXTEENTH2_F16 : T::ONE2, zneg);
    return fma2<T>(q_minus_z, s, NEG_ZERO2);
  } else {
    return dequant_pair<T>(w >> (4 * p), zneg, s);
  }
}

// The zero constant dequant_nibbles expects for nibble pair p of the zeros word zw: -(MAGIC + z),
// or for fp16's in-place pairs -(64 + z) = -(MAGIC + z) + 960 (exact).
template <typename T> __device__ __forceinline__ u32 zero_nibbles(u32 zw, int p) {
  const u32 neg_magic_z = nibbles_to_magic_pair<T>(zw >> (4 * p)) ^ SIGN2;
  if constexpr (T::IN_PLACE_NIBBLES) {
    if (p % 2 == 1) return fma2<T>(neg_magic_z, T::ONE2, NINE_SIXTY2_F16);
  }
  return neg_magic_z;
}

// Per-group constants of one packed word column as (k, k+1) broadcast pairs, column j = 0..7:
// zb[j] = zero_nibbles(zeros word, j / 2) twice (-(MAGIC + z_j); fp16, odd j / 2: -(64 + z_j)),
// sb[j] = s_j twice (converted to T), from the column's packed zeros word and its 8 fp16
// scales (4 pairs). The mma kernels' B (or A) fragments pair rows
// k, k+1 of one column, hence the broadcast. Rebuilt once per group.
template <typename T>
__device__ __forceinline__ void group_pairs(u32 zw, uint4 sv, u32 (&zb)[8], u32 (&sb)[8]) {
  const u32 s01[4] = {sv.x, sv.y, sv.z, sv.w};  // scale pairs of columns (2p, 2p+1)
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const u32 zp = zero_nibbles<T>(zw, p);  // columns 2p, 2p+1
    zb[2 * p] = dup_lo(zp);
    zb[2 * p + 1] = dup_hi(zp);
    const u32 sp = scale_pair<T>(s01[p]);
    sb[2 * p] = dup_lo(sp);
    sb[2 * p + 1] = dup_hi(sp);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor cores.

// d += a * b on the tensor cores, fp32 accumulation.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4],
                                                               const u32 (&b)[2]);
template <> __device__ __forceinline__ void mma16816<F16>(float (&d)[4], const u32 (&a)[4],
                                                          const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<BF16>(float (&d)[4], const u32 (&a)[4],
                                                           const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---------------------------------------------------------------------------------------------
// Asynchronous copies (sm_80+): global -> shared without a register round trip, so a multi-stage
// pipeline keeps several tiles in flight per thread.

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

// 16-byte copy; when `valid` is false nothing is read and the 16 shared bytes are zero-filled
// (out-of-range rows and columns then contribute exact zeros).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
// The same with a shared address from smem_addr and the source byte count (16, or 0 to only
// zero-fill), for kernels that work both out ahead of their copy loops.
__device__ __forceinline__ void cp_async16_bytes(u32 smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// VEC consecutive packed words, which a kernel reads exactly once: no L1 allocation, and a
// 256-byte L2 prefetch (the neighbouring columns' warps read the rest of those lines next).
template <int VEC> __device__ __forceinline__ void ld_stream(const u32* p, u32 (&w)[VEC]);
template <> __device__ __forceinline__ void ld_stream<4>(const u32* p, u32 (&w)[4]) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
template <> __device__ __forceinline__ void ld_stream<2>(const u32* p, u32 (&w)[2]) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];"
               : "=r"(w[0]), "=r"(w[1]) : "l"(p));
}
template <> __device__ __forceinline__ void ld_stream<1>(const u32* p, u32 (&w)[1]) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
}

// 16-byte global store of 4 words (callers guarantee 16-byte alignment).
__device__ __forceinline__ void st_global16(void* p, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n"
               ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// Sum over the 32 lanes of a warp (butterfly: every lane ends with the same total).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

