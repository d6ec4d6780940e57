// Warp-level tensor-core primitives for 16-bit attention tiles: mma.sync m16n8k16 with fp32
// accumulators, the fragment loads that feed it, and reductions over the lanes that share a row.
//
// Register layouts of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"): lane l is in group g = l / 4 (a row of A and C, a column of B) at position t = l % 4.
//   A (16x16, row major):  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                          a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8):              b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8, fp32):     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// A 32-bit register holds two 16-bit values, the one with the lower index in its low half. So the
// accumulators of two neighbouring 16x8 tiles are, packed to 16 bits, the A fragment of their 16x16
// product with the next operand: attention's P (and dS) go from one mma to the next in registers.
//
// 16-bit tiles in shared memory are raw bits (uint16_t), the bits the fp16/bf16 tensors hold.
// Under the CPU emulation (tests/cuda_emulation/emulate.h, which defines TWINS_KERNELS_CUDA_EMULATION)
// the mma, the shuffle and the vector accesses are emulate.h's functions.
#pragma once

#ifdef __CUDACC__
#include <cuda.h>
#include <cuda_runtime.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace twins_kernels {
namespace warp {

constexpr int kSize = 32;

__device__ __forceinline__ int lane_group() { return (threadIdx.x % kSize) / 4; }
__device__ __forceinline__ int lane_in_group() { return threadIdx.x % 4; }

template <typename scalar_t>
__device__ __forceinline__ uint16_t bits(scalar_t value) {
  return value.x;
}

template <typename scalar_t>
__device__ __forceinline__ uint16_t round_to_bits(float value) {
  return scalar_t(value).x;  // round to nearest even, as the conversion instructions do
}

__device__ __forceinline__ uint32_t pack(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

// p[0] and p[1] as one register; p is 4-byte aligned
__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
#ifndef TWINS_KERNELS_CUDA_EMULATION
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t value;
  emulated_aligned_copy(&value, p, sizeof(value));
  return value;
#endif
}

// value to p[0] (low half) and p[1] (high half); p is 4-byte aligned
__device__ __forceinline__ void store_pair(uint16_t* p, uint32_t value) {
#ifndef TWINS_KERNELS_CUDA_EMULATION
  *reinterpret_cast<uint32_t*>(p) = value;
#else
  emulated_aligned_copy(p, &value, sizeof(value));
#endif
}

// Fragment loads from a row-major tile t with kStride elements a row (kStride even).
// A: rows m0.., columns k0.. of t.
template <int kStride>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* t, int m0, int k0) {
  const uint16_t* p = t + (m0 + lane_group()) * kStride + k0 + 2 * lane_in_group();
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * kStride);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * kStride + 8);
}

// B whose element (k, n) is t[n0 + n][k0 + k]: t holds B transposed (K for S = Q K^T).
template <int kStride>
__device__ __forceinline__ void load_b_transposed(uint32_t (&b)[2], const uint16_t* t, int n0, int k0) {
  const uint16_t* p = t + (n0 + lane_group()) * kStride + k0 + 2 * lane_in_group();
  b[0] = load_pair(p);
  b[1] = load_pair(p + 8);
}

// B whose element (k, n) is t[k0 + k][n0 + n]: t holds B as is (V for O = P V).
template <int kStride>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const uint16_t* t, int k0, int n0) {
  const uint16_t* p = t + (k0 + 2 * lane_in_group()) * kStride + n0 + lane_group();
  b[0] = pack(p[0], p[kStride]);
  b[1] = pack(p[8 * kStride], p[9 * kStride]);
}

// The A fragment of columns 16 kk .. 16 kk + 15 of a 16-row product held as accumulators c[n] (one 16x8
// tile each), rounded to scalar_t.
template <typename scalar_t, int kTiles>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c)[kTiles][4], int kk) {
  const float(&left)[4] = c[2 * kk];
  const float(&right)[4] = c[2 * kk + 1];
  a[0] = pack(round_to_bits<scalar_t>(left[0]), round_to_bits<scalar_t>(left[1]));
  a[1] = pack(round_to_bits<scalar_t>(left[2]), round_to_bits<scalar_t>(left[3]));
  a[2] = pack(round_to_bits<scalar_t>(right[0]), round_to_bits<scalar_t>(right[1]));
  a[3] = pack(round_to_bits<scalar_t>(right[2]), round_to_bits<scalar_t>(right[3]));
}

// d += a b on the tensor cores, fp32 accumulation; every lane of the warp must take part.
template <typename scalar_t>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>,
                "tensor-core tiles are fp16 or bf16");
#if defined(TWINS_KERNELS_CUDA_EMULATION)
  emulated_mma_m16n8k16<scalar_t>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the host code launches tensor-core kernels only on code compiled for 8.0+ (device_code.cu)
#endif
}

// The products attention is made of, for the 16 rows of a warp (C: kTiles accumulator tiles of 8 columns).
// c += a t^T: a the warp's rows as A fragments (kSteps of 16 columns), t a staged tile whose rows are
// the product's columns (S = Q K^T with t = K).
template <typename scalar_t, int kStride, int kSteps, int kTiles>
__device__ __forceinline__ void mma_rows_tile_transposed(float (&c)[kTiles][4], const uint32_t (&a)[kSteps][4],
                                                         const uint16_t* t) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      uint32_t b[2];
      load_b_transposed<kStride>(b, t, 8 * n, 16 * kk);
      mma<scalar_t>(c[n], a[kk], b);
    }
  }
}

// c += p t: p the accumulators of an earlier product (kInnerTiles of 8 columns, rounded to scalar_t), t a
// staged tile with a row per column of p (O += P V with t = V).
template <typename scalar_t, int kStride, int kInnerTiles, int kTiles>
__device__ __forceinline__ void mma_accumulators_tile(float (&c)[kTiles][4], const float (&p)[kInnerTiles][4],
                                                      const uint16_t* t) {
#pragma unroll
  for (int kk = 0; kk < kInnerTiles / 2; ++kk) {
    uint32_t a[4];
    accumulators_to_a<scalar_t>(a, p, kk);
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      uint32_t b[2];
      load_b<kStride>(b, t, 16 * kk, 8 * n);
      mma<scalar_t>(c[n], a, b);
    }
  }
}

// The maximum and the sum of a value over the four lanes of a group (the lanes holding one row).
__device__ __forceinline__ float group_max(float value) {
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}

__device__ __forceinline__ float group_sum(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

// The sum of a value over the warp's lanes, in every lane; the same order each time: deterministic.
__device__ __forceinline__ float sum(float value) {
  for (int mask = kSize / 2; mask > 0; mask /= 2) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

}  // namespace warp
}  // namespace twins_kernels
