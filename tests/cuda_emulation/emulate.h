// Just enough of CUDA's execution model to run csrc/'s kernels on a CPU, for tests: blocks run one
// after another (in grid order or its reverse), a block's threads meet at a barrier in __syncthreads(),
// and __shared__ arrays are function statics (one block at a time uses them).
// Warps of 32 consecutive threads exchange registers for the warp-wide instructions the kernels use
// (__shfl_xor_sync and mma.sync m16n8k16 through warp_mma.cuh), meeting at a barrier of their own,
// where every lane must run the same instruction with a mask naming the whole warp. That barrier
// orders memory, which a GPU's warp instructions do not (__syncwarp does): under ThreadSanitizer a
// lane's shared-memory write that another lane reads after only a shuffle or an mma is not reported.
// cp.async copies (vector_access.cuh) fill their destination with NaN bits when issued and land when
// their thread waits for them: the GPU writes it at some moment in between, so any thread's read in
// between is a race, and finds NaN here (and ThreadSanitizer sees the write at issue).
// It checks the kernels' index arithmetic, masking, staging, fragment layouts and math, not GPU-only
// behaviour (timing, bank conflicts, the tensor cores' internal summation order).
//
// A block's threads are fibers that one OS thread runs in turn, each until it waits at a barrier: an
// mma.sync is two warp barriers, and as OS threads meeting at std::barrier the futex wake-ups of 32-256
// threads on a few cores took 2-3x the kernels' own time in the kernel (system time). A fiber switch is
// a few register moves (emulated_switch, x86-64): glibc's swapcontext, which the fibers first used, saves
// the x87 environment and makes a signal-mask system call at every switch, ~70% of the tensor-core
// kernels' emulated time.
// The sanitized builds run them as OS threads instead: ThreadSanitizer sees races between threads (a
// shared-memory access that no barrier orders), and AddressSanitizer knows an OS thread's stack.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

// g++ -fsanitize=thread or address: a block's threads are OS threads (above)
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define TWINS_KERNELS_EMULATION_SANITIZED 1
#include <barrier>
#include <thread>
#elif defined(__x86_64__)
#include <sys/mman.h>
#include <unistd.h>
#else
#error "emulate.h switches fibers in x86-64 code (emulated_switch); its sanitized builds, on OS threads, run anywhere"
#endif

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

inline EmulatedDim3 blockIdx;
inline EmulatedDim3 blockDim;
inline EmulatedDim3 gridDim;

struct EmulatedThread;

#if defined(TWINS_KERNELS_EMULATION_SANITIZED)
class EmulatedBarrier {
 public:
  explicit EmulatedBarrier(unsigned participants) : barrier_(participants) {}
  void arrive_and_wait() { barrier_.arrive_and_wait(); }

 private:
  std::barrier<> barrier_;
};
#else
// Saves the running fiber's callee-saved registers on its stack and its stack pointer in *save, then loads
// the stack pointer `load` and the registers saved there, and returns to where that fiber switched away
// (or, on a new fiber's stack, to its entry). The x87 control word and MXCSR, callee-saved too, are left
// alone: nothing here changes rounding modes, so every fiber runs with the same ones. A process running
// with a CET shadow stack would fault at that return (the glibc here, 2.36, enables none).
[[gnu::naked, gnu::noinline]] inline void emulated_switch(void** /*save*/, void* /*load*/) {
  __asm__(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// The fibers that may run (in turn, first in first out), and the stack pointer of the scheduler that runs them.
inline std::deque<EmulatedThread*> emulated_runnable;
inline void* emulated_scheduler = nullptr;

// The last thread to arrive wakes the others and goes on; the others give up the OS thread until then.
class EmulatedBarrier {
 public:
  explicit EmulatedBarrier(unsigned participants) : participants_(participants) {}
  void arrive_and_wait();

 private:
  unsigned participants_;
  std::vector<EmulatedThread*> waiting_;
};
#endif

// What a warp's lanes hand each other in a warp-wide instruction.
struct EmulatedWarp {
  explicit EmulatedWarp(unsigned lanes) : barrier(lanes), lanes(lanes) {}
  EmulatedBarrier barrier;
  unsigned lanes;
  const char* instruction[32];
  unsigned member_mask[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float value[32];
};

// A lane's arrival at a warp-wide instruction, having handed in its operands: every lane of the warp
// meets there (the warp barrier). The GPU requires the lanes a mask names to execute the same instruction
// together (mma.sync.aligned: all 32), and the emulation pairs whole warps, so each lane's instruction
// and mask must be every other lane's, the mask naming the whole warp; anything else stops the run.
inline void emulated_warp_arrive(EmulatedWarp& warp, int lane, const char* instruction, unsigned mask) {
  warp.instruction[lane] = instruction;
  warp.member_mask[lane] = mask;
  warp.barrier.arrive_and_wait();
  const unsigned whole_warp = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1;
  for (unsigned other = 0; other < warp.lanes; ++other) {
    if (std::strcmp(warp.instruction[other], instruction) != 0 || warp.member_mask[other] != whole_warp) {
      fprintf(stderr, "warp of %u lanes: lane %d runs %s (mask %#x) where lane %u runs %s (mask %#x)\n", warp.lanes,
              lane, instruction, mask, other, warp.instruction[other], warp.member_mask[other]);
      std::abort();
    }
  }
}

// cp.async: the 16-byte copies a thread has issued and not yet waited for, in the groups it committed
// (oldest first) and those issued since. A group lands (is copied) when its thread waits for it, as late
// as the GPU may land it; a thread that ends with copies in flight is a kernel bug.
struct EmulatedAsyncCopy {
  void* dst;
  const void* src;
};

// An emulated CUDA thread's own state: what CUDA keeps in registers or per thread.
struct EmulatedThread {
  EmulatedDim3 index;  // threadIdx
  unsigned linear = 0;
  EmulatedWarp* warp = nullptr;
  int lane = 0;
  std::deque<std::vector<EmulatedAsyncCopy>> async_groups;
  std::vector<EmulatedAsyncCopy> async_copies;  // not committed yet
#if !defined(TWINS_KERNELS_EMULATION_SANITIZED)
  void* stack_pointer = nullptr;  // where emulated_switch saved the fiber
  bool finished = false;
#endif
};

// The running thread's state: set by each OS thread for itself, or by the scheduler for the fiber it
// switches to.
inline thread_local EmulatedThread* emulated_thread = nullptr;
#define threadIdx (emulated_thread->index)

inline EmulatedBarrier* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  EmulatedWarp& warp = *emulated_thread->warp;
  const int lane = emulated_thread->lane;
  warp.value[lane] = value;
  emulated_warp_arrive(warp, lane, "__shfl_xor_sync", mask);
  if (static_cast<unsigned>(lane ^ lane_mask) >= warp.lanes) {
    fprintf(stderr, "lane %d of a warp of %u lanes reads lane %d in __shfl_xor_sync\n", lane, warp.lanes,
            lane ^ lane_mask);
    std::abort();
  }
  const float other = warp.value[lane ^ lane_mask];
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

inline void emulated_async_copy(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fprintf(stderr, "misaligned cp.async: %p <- %p\n", dst, src);
    std::abort();
  }
  std::memset(dst, 0xff, 16);  // NaN in fp32, fp16 and bf16
  emulated_thread->async_copies.push_back({dst, src});
}

inline void emulated_async_commit() {
  EmulatedThread& thread = *emulated_thread;
  thread.async_groups.push_back(std::move(thread.async_copies));
  thread.async_copies.clear();
}

// cp.async.wait_group pending: every committed group but the `pending` newest lands.
inline void emulated_async_wait(size_t pending) {
  auto& groups = emulated_thread->async_groups;
  while (groups.size() > pending) {
    for (const EmulatedAsyncCopy& copy : groups.front()) std::memcpy(copy.dst, copy.src, 16);
    groups.pop_front();
  }
}

inline size_t emulated_async_in_flight() {
  size_t copies = emulated_thread->async_copies.size();
  for (const auto& group : emulated_thread->async_groups) copies += group.size();
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
  EmulatedWarp& warp = *emulated_thread->warp;
  const int lane = emulated_thread->lane;
  std::copy(a, a + 4, warp.a[lane]);
  std::copy(b, b + 2, warp.b[lane]);
  emulated_warp_arrive(warp, lane, "mma.sync.aligned.m16n8k16", 0xffffffffu);
  for (int value = 0; value < 4; ++value) {  // this lane's elements of D, by the layout above
    const int m = lane / 4 + 8 * (value / 2), n = 2 * (lane % 4) + value % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      const uint32_t a_reg = warp.a[4 * (m % 8) + (k % 8) / 2][m / 8 + 2 * (k / 8)];
      const uint32_t b_reg = warp.b[4 * n + (k % 8) / 2][k / 8];
      sum += emulated_fragment_value<scalar_t>(a_reg, k % 2) * emulated_fragment_value<scalar_t>(b_reg, k % 2);
    }
    d[value] += sum;
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

#if defined(TWINS_KERNELS_EMULATION_SANITIZED)
// One block: each thread runs ``body`` on an OS thread of its own.
inline void emulated_run_block(std::vector<EmulatedThread>& threads, const std::function<void()>& body) {
  std::vector<std::thread> workers;
  for (EmulatedThread& thread : threads) {
    workers.emplace_back([&thread, &body] {
      emulated_thread = &thread;
      body();
    });
  }
  for (auto& worker : workers) worker.join();
}
#else
constexpr size_t kEmulatedStackBytes = 256 << 10;

// The fibers' stacks, kept from block to block, each above a page that faults: a stack that overflows
// stops the harness instead of writing over its neighbour.
inline char* emulated_fiber_stack(size_t index) {
  static std::vector<char*> stacks;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= index) {
    void* memory = mmap(nullptr, page + kEmulatedStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED || mprotect(memory, page, PROT_NONE) != 0) {
      perror("a fiber stack");
      std::abort();
    }
    stacks.push_back(static_cast<char*>(memory) + page);
  }
  return stacks[index];
}

inline const std::function<void()>* emulated_fiber_body = nullptr;

// Where a new fiber starts, switched to with nothing below its frame: it switches away at its end, for good.
[[noreturn]] inline void emulated_fiber_entry() {
  (*emulated_fiber_body)();
  emulated_thread->finished = true;
  emulated_switch(&emulated_thread->stack_pointer, emulated_scheduler);
  __builtin_unreachable();
}

inline void EmulatedBarrier::arrive_and_wait() {
  if (waiting_.size() + 1 == participants_) {
    emulated_runnable.insert(emulated_runnable.end(), waiting_.begin(), waiting_.end());
    waiting_.clear();
    return;
  }
  waiting_.push_back(emulated_thread);
  emulated_switch(&emulated_thread->stack_pointer, emulated_scheduler);
}

// A new fiber's stack, laid out as emulated_switch leaves a fiber's: six registers (zero) under the return
// address, here the fiber's entry. Its slot is 16-byte aligned, so that the entry starts with the stack
// pointer a call would leave (8 below a multiple of 16); above it, a null return address it never takes.
inline void* emulated_fiber_start(char* stack) {
  auto* top = reinterpret_cast<uintptr_t*>(stack + kEmulatedStackBytes);
  uintptr_t* entry = top - 2;
  entry[1] = 0;
  entry[0] = reinterpret_cast<uintptr_t>(&emulated_fiber_entry);
  std::fill(entry - 6, entry, uintptr_t{0});
  return entry - 6;
}

// One block: each thread runs ``body`` as a fiber, and the fibers take turns until every one has ended.
inline void emulated_run_block(std::vector<EmulatedThread>& threads, const std::function<void()>& body) {
  emulated_fiber_body = &body;
  for (size_t t = 0; t < threads.size(); ++t) {
    threads[t].stack_pointer = emulated_fiber_start(emulated_fiber_stack(t));
    emulated_runnable.push_back(&threads[t]);
  }
  while (!emulated_runnable.empty()) {
    emulated_thread = emulated_runnable.front();
    emulated_runnable.pop_front();
    emulated_switch(&emulated_scheduler, emulated_thread->stack_pointer);
  }
  emulated_thread = nullptr;
  for (const EmulatedThread& thread : threads) {
    if (!thread.finished) {  // on a GPU, a block that never finishes
      fprintf(stderr, "block %u: thread %u waits at a barrier that not all of its block's (or warp's) threads reach\n",
              blockIdx.x, thread.linear);
      std::abort();
    }
  }
}
#endif

// Whether the GPU refuses a launch of ``grid`` blocks of ``block`` threads (cudaErrorInvalidConfiguration)
inline bool emulated_launch_refused(EmulatedDim3 grid, EmulatedDim3 block) {
  return grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || block.x < 1 || block.y < 1 ||
         block.x * block.y > 1024;
}

// kernel<<<grid, block>>>(args...) as emulated_launch(grid, block, [&] { kernel(args...); }), 2-D at most
template <typename Kernel>
void emulated_launch(EmulatedDim3 grid, EmulatedDim3 block, Kernel kernel) {
  if (emulated_launch_refused(grid, block)) {
    fprintf(stderr, "invalid launch configuration: grid (%u, %u), block (%u, %u)\n", grid.x, grid.y, block.x,
            block.y);
    std::abort();
  }
  blockDim = block;
  gridDim = grid;
  const unsigned threads = block.x * block.y;
  const unsigned blocks = grid.x * grid.y;
  const bool reversed = emulated_blocks_reversed();
  const std::function<void()> body = [&kernel] {
    kernel();
    if (const size_t copies = emulated_async_in_flight(); copies > 0) {
      fprintf(stderr, "thread %u of block %u ended with %zu cp.async copies never waited for\n",
              emulated_thread->linear, blockIdx.x, copies);
      std::abort();
    }
  };
  for (unsigned step = 0; step < blocks; ++step) {
    const unsigned linear = reversed ? blocks - 1 - step : step;
    blockIdx = {linear % grid.x, linear / grid.x, 0};
    EmulatedBarrier barrier(threads);
    emulated_block_barrier = &barrier;
    std::deque<EmulatedWarp> warps;  // 32 consecutive threads a warp, the last one possibly partial
    for (unsigned first = 0; first < threads; first += 32) warps.emplace_back(std::min(32u, threads - first));
    std::vector<EmulatedThread> block_threads(threads);
    for (unsigned t = 0; t < threads; ++t) {
      EmulatedThread& thread = block_threads[t];
      thread.index = {t % block.x, t / block.x, 0};
      thread.linear = t;
      thread.warp = &warps[t / 32];
      thread.lane = static_cast<int>(t % 32);
    }
    emulated_run_block(block_threads, body);
  }
}

template <typename Kernel>
void emulated_launch(long blocks, unsigned threads, Kernel kernel) {
  emulated_launch({blocks > 0 && blocks <= 2147483647 ? static_cast<unsigned>(blocks) : 0u, 1, 0}, {threads, 1, 0},
                  kernel);
}
