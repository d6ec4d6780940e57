// 16-byte vector accesses: one instruction on the GPU, which faults unless both sides are 16-byte
// aligned. Under the CPU emulation (tests/cuda_emulation/emulate.h) they are emulated_aligned_copy,
// which checks that alignment.
#pragma once

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace twins_kernels {

__device__ __forceinline__ void copy_16_bytes(void* dst, const void* src) {
#ifndef TWINS_KERNELS_CUDA_EMULATION
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  emulated_aligned_copy(dst, src, 16);
#endif
}

// kCount values from src to dst: one access where kCount is 1, else 16-byte accesses (kCount * sizeof(T)
// a multiple of 16, both sides aligned to 16).
template <int kCount, typename T>
__device__ __forceinline__ void copy_values(T* dst, const T* src) {
  if constexpr (kCount == 1) {
    dst[0] = src[0];
  } else {
    static_assert(kCount * sizeof(T) % 16 == 0, "whole 16-byte accesses");
#pragma unroll
    for (int k = 0; k < static_cast<int>(kCount * sizeof(T) / 16); ++k) {
      copy_16_bytes(reinterpret_cast<char*>(dst) + 16 * k, reinterpret_cast<const char*>(src) + 16 * k);
    }
  }
}

__host__ __device__ __forceinline__ bool aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace twins_kernels
