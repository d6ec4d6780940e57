// The CUDA runtime API as csrc/'s host code uses it, for its build with g++ on CPU tensors
// (tests/cuda_emulation/host_emulation.cpp): launches run under emulate.h, and the device's properties
// are the ones a test sets (TWINS_KERNELS_EMULATION_SMS: the multiprocessor count, default an H100's 132).
#pragma once

#include <cstddef>
#include <cstdlib>

using cudaStream_t = struct EmulatedStream*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument";
}

// A launch's error, reported (and cleared) by the next cudaGetLastError, as the runtime does
inline cudaError_t emulated_pending_error = cudaSuccess;

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emulated_pending_error;
  emulated_pending_error = cudaSuccess;
  return error;
}

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  const char* sms = std::getenv("TWINS_KERNELS_EMULATION_SMS");
  *value = sms != nullptr ? std::atoi(sms) : 132;
  return cudaSuccess;
}
