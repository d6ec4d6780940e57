// Just enough of CUDA's execution model to run csrc/'s kernels on a CPU, for tests: blocks run
// one after another, a block's threads run as std::threads meeting at a std::barrier in
// __syncthreads(), and __shared__ arrays are function statics (one block at a time uses them).
// It checks the kernels' index arithmetic, masking, staging and math, not GPU-only behaviour.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local EmulatedDim3 threadIdx;
inline EmulatedDim3 blockIdx;
inline EmulatedDim3 blockDim;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

using std::max;  // CUDA's device min/max overloads
using std::min;

// kernel<<<grid, block>>>(args...) as emulated_launch(grid, block, [&] { kernel(args...); }), 2-D at most
template <typename Kernel>
void emulated_launch(EmulatedDim3 grid, EmulatedDim3 block, Kernel kernel) {
  blockDim = block;
  const unsigned threads = block.x * block.y;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = {bx, by, 0};
      std::barrier<> barrier(threads);
      emulated_block_barrier = &barrier;
      std::vector<std::thread> workers;
      for (unsigned t = 0; t < threads; ++t) {
        workers.emplace_back([t, &block, &kernel] {
          threadIdx = {t % block.x, t / block.x, 0};
          kernel();
        });
      }
      for (auto& worker : workers) worker.join();
    }
  }
}

template <typename Kernel>
void emulated_launch(long blocks, unsigned threads, Kernel kernel) {
  emulated_launch({static_cast<unsigned>(blocks), 1, 0}, {threads, 1, 0}, kernel);
}
