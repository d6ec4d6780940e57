// Just enough of CUDA's execution model to run csrc/'s kernels on a CPU, for tests: blocks run one
// after another (in grid order or its reverse), a block's threads run as std::threads meeting at a
// std::barrier in __syncthreads() (so ThreadSanitizer sees the block's races), and __shared__ arrays
// are function statics (one block at a time uses them).
// Warps of 32 consecutive threads exchange registers for the warp-wide instructions the kernels use
// (__shfl_xor_sync and mma.sync m16n8k16 through warp_mma.cuh), meeting at a barrier of their own.
// cp.async copies (vector_access.cuh) land when their thread waits for them.
// It checks the kernels' index arithmetic, masking, staging, fragment layouts and math, not GPU-only
// behaviour (timing, bank conflicts, the tensor cores' internal summation order).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#define TWINS_KERNELS_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local EmulatedDim3 threadIdx;
inline EmulatedDim3 blockIdx;
inline EmulatedDim3 blockDim;
inline EmulatedDim3 gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

// What a warp's lanes hand each other in a warp-wide instruction.
struct EmulatedWarp {
  explicit EmulatedWarp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint32_t a[32][4];
  uint32_t b[32][2];
  float value[32];
};

inline thread_local EmulatedWarp* emulated_warp = nullptr;
inline thread_local int emulated_lane = 0;

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  EmulatedWarp& warp = *emulated_warp;
  warp.value[emulated_lane] = value;
  warp.barrier.arrive_and_wait();
  const float other = warp.value[emulated_lane ^ lane_mask];
  warp.barrier.arrive_and_wait();
  return other;
}

// A vector access of `bytes` bytes (4 or 16), which the GPU faults on unless both sides are aligned to it.
inline void emulated_aligned_copy(void* dst, const void* src, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    fprintf(stderr, "misaligned %zu-byte access: %p <- %p\n", bytes, dst, src);
    std::abort();
  }
  std::memcpy(dst, src, bytes);
}

// cp.async: the 16-byte copies a thread has issued and not yet waited for, in the groups it committed
// (oldest first) and those issued since. A group lands (is copied) when its thread waits for it, as late
// as the GPU may land it; a thread that ends with copies in flight is a kernel bug.
struct EmulatedAsyncCopy {
  void* dst;
  const void* src;
};
inline thread_local std::deque<std::vector<EmulatedAsyncCopy>> emulated_async_groups;
inline thread_local std::vector<EmulatedAsyncCopy> emulated_async_copies;  // not committed yet

inline void emulated_async_copy(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fprintf(stderr, "misaligned cp.async: %p <- %p\n", dst, src);
    std::abort();
  }
  emulated_async_copies.push_back({dst, src});
}

inline void emulated_async_commit() {
  emulated_async_groups.push_back(std::move(emulated_async_copies));
  emulated_async_copies.clear();
}

// cp.async.wait_group pending: every committed group but the `pending` newest lands.
inline void emulated_async_wait(size_t pending) {
  while (emulated_async_groups.size() > pending) {
    for (const EmulatedAsyncCopy& copy : emulated_async_groups.front()) std::memcpy(copy.dst, copy.src, 16);
    emulated_async_groups.pop_front();
  }
}

inline size_t emulated_async_in_flight() {
  size_t copies = emulated_async_copies.size();
  for (const auto& group : emulated_async_groups) copies += group.size();
  return copies;
}

// One 16-bit value of a fragment register: the lower index in the low half.
template <typename scalar_t>
float emulated_fragment_value(uint32_t reg, int half) {
  return static_cast<float>(scalar_t(static_cast<uint16_t>(reg >> (16 * half)), scalar_t::from_bits()));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: each lane hands in its fragments, then computes its
// own four elements of D = A B + C from the whole A and B, each element found where the PTX ISA puts it:
//   A (16x16) element (m, k): lane 4 (m % 8) + (k % 8) / 2, register m / 8 + 2 (k / 8), half k % 2
//   B (16x8)  element (k, n): lane 4 n + (k % 8) / 2,       register k / 8,             half k % 2
//   C, D (16x8) element (m, n): lane 4 (m % 8) + n / 2,     value 2 (m / 8) + n % 2
template <typename scalar_t>
void emulated_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  EmulatedWarp& warp = *emulated_warp;
  std::copy(a, a + 4, warp.a[emulated_lane]);
  std::copy(b, b + 2, warp.b[emulated_lane]);
  warp.barrier.arrive_and_wait();
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      if (4 * (m % 8) + n / 2 != emulated_lane) continue;
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) {
        const uint32_t a_reg = warp.a[4 * (m % 8) + (k % 8) / 2][m / 8 + 2 * (k / 8)];
        const uint32_t b_reg = warp.b[4 * n + (k % 8) / 2][k / 8];
        sum += emulated_fragment_value<scalar_t>(a_reg, k % 2) * emulated_fragment_value<scalar_t>(b_reg, k % 2);
      }
      d[2 * (m / 8) + n % 2] += sum;
    }
  }
  warp.barrier.arrive_and_wait();
}

using std::max;  // CUDA's device min/max overloads
using std::min;

// Blocks run in grid order, or in reverse with TWINS_KERNELS_EMULATION_BLOCKS=reversed: a GPU runs them
// in no set order, so two blocks writing the same element, or one reading what another writes, make the
// two orders disagree (tests/test_cuda_emulation.py compares them bit for bit).
inline bool emulated_blocks_reversed() {
  const char* order = std::getenv("TWINS_KERNELS_EMULATION_BLOCKS");
  return order != nullptr && std::strcmp(order, "reversed") == 0;
}

// kernel<<<grid, block>>>(args...) as emulated_launch(grid, block, [&] { kernel(args...); }), 2-D at most
template <typename Kernel>
void emulated_launch(EmulatedDim3 grid, EmulatedDim3 block, Kernel kernel) {
  blockDim = block;
  gridDim = grid;
  const unsigned threads = block.x * block.y;
  const unsigned blocks = grid.x * grid.y;
  const bool reversed = emulated_blocks_reversed();
  for (unsigned step = 0; step < blocks; ++step) {
    const unsigned linear = reversed ? blocks - 1 - step : step;
    blockIdx = {linear % grid.x, linear / grid.x, 0};
    std::barrier<> barrier(threads);
    emulated_block_barrier = &barrier;
    std::deque<EmulatedWarp> warps;  // 32 consecutive threads a warp, the last one possibly partial
    for (unsigned first = 0; first < threads; first += 32) warps.emplace_back(std::min(32u, threads - first));
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back([t, &block, &kernel, &warps] {
        threadIdx = {t % block.x, t / block.x, 0};
        emulated_warp = &warps[t / 32];
        emulated_lane = static_cast<int>(t % 32);
        kernel();
        if (const size_t copies = emulated_async_in_flight(); copies > 0) {
          fprintf(stderr, "thread %u of block %u ended with %zu cp.async copies never waited for\n", t,
                  blockIdx.x, copies);
          std::abort();
        }
      });
    }
    for (auto& worker : workers) worker.join();
  }
}

template <typename Kernel>
void emulated_launch(long blocks, unsigned threads, Kernel kernel) {
  emulated_launch({static_cast<unsigned>(blocks), 1, 0}, {threads, 1, 0}, kernel);
}
