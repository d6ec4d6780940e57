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

// 16 bytes from global to shared memory without passing through registers (cp.async.cg, compute
// capability 8.0+): the copies a thread issues are in flight together, and need no register to land in,
// until it waits for them (async_copy_wait_all, or async_copy_wait for the groups it committed); only
// then may it read dst, and the block's other threads only after a barrier that follows; and no thread
// may still read what dst held (a barrier between such reads and the issue). Under the CPU emulation dst
// turns NaN at the issue and the copy lands at that wait, so a read of dst in between finds NaN (and
// ThreadSanitizer sees writes at both ends of the window the GPU writes in). Both sides 16-byte aligned.
__device__ __forceinline__ void async_copy_16_bytes(void* dst_shared, const void* src_global) {
#if defined(TWINS_KERNELS_CUDA_EMULATION)
  emulated_async_copy(dst_shared, src_global);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src_global) : "memory");
#else
  copy_16_bytes(dst_shared, src_global);
#endif
}

// Every async_copy_16_bytes this thread issued has landed.
__device__ __forceinline__ void async_copy_wait_all() {
#if defined(TWINS_KERNELS_CUDA_EMULATION)
  emulated_async_commit();
  emulated_async_wait(0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The copies this thread issued since its last commit form a group (possibly empty) ...
__device__ __forceinline__ void async_copy_commit() {
#if defined(TWINS_KERNELS_CUDA_EMULATION)
  emulated_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// ... and every group but the kPending newest it committed has landed.
template <int kPending>
__device__ __forceinline__ void async_copy_wait() {
#if defined(TWINS_KERNELS_CUDA_EMULATION)
  emulated_async_wait(kPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
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
