// Which of the extension's code a GPU runs. The driver picks for each GPU a binary built for it, or PTX
// it JIT-compiles; the instructions the kernels were compiled with (__CUDA_ARCH__) follow that choice, and
// a GPU newer than every binary and PTX of the build (TORCH_CUDA_ARCH_LIST) has no code at all.
#include "twins_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace twins_kernels {
namespace {

// Stands for every kernel of the extension, which compiles them all for the same architectures.
__global__ void device_code_probe_kernel() {}

}  // namespace

int64_t device_code_version(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, device_code_probe_kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // the answer is "none": not an error for the next launch check to report
    return 0;
  }
  C10_CUDA_CHECK(status);
  return attributes.ptxVersion;
}

}  // namespace twins_kernels
