// The CUDA extension's own host code (csrc/lsa.cu, gsa.cu, peg.cu and bindings.cpp: argument checks,
// outputs, dtype dispatch, the kernels' geometry from the tensors' sizes and strides, launch
// configurations, and the reductions after the kernels) built with g++ as a library of CPU ops,
// torch.ops.twins_kernels_emulated, whose launches run the kernels under emulate.h. The extension's GPU code
// runs only on a GPU; this runs the same host code on machines without one.
// tests/cuda_host_emulation.py builds it from a copy of csrc/ in which each kernel<<<...>>>(args) launch
// reads emulated_chevron(kernel, ...)(args), each is_cuda() check is_cpu() (CPU tensors stand in for the
// GPU's), and the ops are registered as twins_kernels_emulated for CPU tensors. host/ stands in for the CUDA
// runtime and c10's CUDA headers; the device's code version is TWINS_KERNELS_EMULATION_DEVICE_CODE (default
// 90: the tensor-core kernels for fp16 and bf16; below 80, the scalar ones).
#include <ATen/Dispatch.h>  // c10's and ATen's headers before emulate.h: they must not see its stand-ins
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>  // host/'s

#include "emulate.h"

// kernel<<<grid, block, shared_bytes, stream>>>(args...) as the copy of csrc/ writes it:
// emulated_chevron(kernel, grid, block, shared_bytes, stream)(args...). A launch the GPU refuses runs
// nothing and leaves its error for the next cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK), as the runtime
// does; the others run to their end, in turn.
template <typename Kernel>
auto emulated_chevron(Kernel kernel, dim3 grid, dim3 block, size_t, cudaStream_t) {
  return [=](const auto&... args) {
    const EmulatedDim3 blocks{grid.x, grid.y, 0}, threads{block.x, block.y, 0};
    if (grid.z != 1 || block.z != 1 || emulated_launch_refused(blocks, threads)) {
      emulated_pending_error = cudaErrorInvalidConfiguration;
      return;
    }
    emulated_launch(blocks, threads, [&] { kernel(args...); });
  };
}

#include "bindings.cpp"
#include "gsa.cu"
#include "lsa.cu"
#include "peg.cu"

namespace twins_kernels {

int64_t device_code_version(int64_t) {
  const char* version = std::getenv("TWINS_KERNELS_EMULATION_DEVICE_CODE");
  return version != nullptr ? std::atoi(version) : 90;
}

}  // namespace twins_kernels
