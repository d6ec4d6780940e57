// Which of the extension's code a GPU runs. The driver picks for each GPU a binary built for it, or PTX
// it JIT-compiles; the instructions the kernels were compiled with (__CUDA_ARCH__) follow that choice, and
// a GPU newer than every binary and PTX of the build (TORCH_CUDA_ARCH_LIST) has no code at all.
#include "twins_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <atomic>

namespace twins_kernels {
namespace {

// Stands for every kernel of the extension, which compiles them all for the same architectures.
__global__ void device_code_probe_kernel() {}

int64_t query_device_code_version(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, device_code_probe_kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // the answer is "none": not an error for the next launch check to report
    return 0;
  }
  C10_CUDA_CHECK(status);  // PTX the driver cannot JIT-compile (newer than the driver, say): its own words
  return attributes.ptxVersion;
}

// The answer never changes within a process, and the attention asks on every call: one query per GPU.
// Two threads asking at once may both query; they store the same answer.
constexpr int64_t kCachedDevices = 64;
std::atomic<int64_t> known_versions[kCachedDevices];  // version + 1 once known, 0 before

}  // namespace

int64_t device_code_version(int64_t device) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "device_code_version: no CUDA device ", device,
              " (", static_cast<int>(c10::cuda::device_count()), " visible)");
  if (device >= kCachedDevices) return query_device_code_version(device);
  int64_t known = known_versions[device].load(std::memory_order_relaxed);
  if (known == 0) {
    known = query_device_code_version(device) + 1;
    known_versions[device].store(known, std::memory_order_relaxed);
  }
  return known - 1;
}

}  // namespace twins_kernels
