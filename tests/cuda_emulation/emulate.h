// Just enough of CUDA's execution model to run the attention kernels on a CPU, for tests: blocks run
// one after another, a block's threads run as std::threads meeting at a std::barrier in
// __syncthreads(), and __shared__ arrays are function statics (one block at a time uses them).
// It checks the kernels' index arithmetic, masking, staging and math, not GPU-only behaviour.
#pragma once

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

// kernel<<<blocks, threads>>>(args...) as emulated_launch(blocks, threads, [&] { kernel(args...); })
template <typename Kernel>
void emulated_launch(long blocks, unsigned threads, Kernel kernel) {
  blockDim.x = threads;
  for (long block = 0; block < blocks; ++block) {
    blockIdx.x = static_cast<unsigned>(block);
    std::barrier<> barrier(threads);
    emulated_block_barrier = &barrier;
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back([t, &kernel] {
        threadIdx.x = t;
        kernel();
      });
    }
    for (auto& worker : workers) worker.join();
  }
}
