// c10's CUDA error checks on the emulated runtime (../../cuda_runtime.h): a failed call throws as c10's does.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                       \
  do {                                                                             \
    const cudaError_t emulated_error = (EXPR);                                     \
    TORCH_CHECK(emulated_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(emulated_error)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
