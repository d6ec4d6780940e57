// The current stream csrc/'s host code launches on: the emulation runs each launch to its end in turn.
#pragma once

#include <cuda_runtime.h>

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream() { return {}; }

}  // namespace c10::cuda
