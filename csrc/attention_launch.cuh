// Host side of the attention kernels LSA and GSA share: which kernel family runs a call, and the launches.
#pragma once

#include "attention.cuh"
#include "attention_mma.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace twins_kernels {
namespace attention {

// fp16 and bf16 on compute capability 8.0+ run the tensor-core kernels; fp32 runs the scalar ones, its
// dots exact fp32 (tensor cores would round its inputs to tf32).
inline bool use_tensor_cores(const at::Tensor& t) {
  if (t.scalar_type() != at::kHalf && t.scalar_type() != at::kBFloat16) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major >= 8;
}

// The rows a block covers: kMmaRows for the tensor-core kernels, scalar_rows (a thread each) otherwise.
inline int block_rows(bool tensor_cores, int scalar_rows) { return tensor_cores ? kMmaRows : scalar_rows; }

template <typename scalar_t, typename Geometry>
void launch_forward(const Geometry& geo, bool tensor_cores, int64_t blocks, int scalar_threads, float scale,
                    cudaStream_t stream) {
  with_attention_kernels<scalar_t>(geo, tensor_cores, scalar_threads, [&](auto forward, auto, auto, int threads) {
    forward<<<blocks, threads, 0, stream>>>(geo, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// delta (B, heads, N) fp32 of grad_out and out, both contiguous (B, N, heads * head_dim) in scalar_t.
template <typename scalar_t>
void launch_delta(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor& delta, cudaStream_t stream) {
  const int64_t rows = grad_out.size(0) * grad_out.size(1), heads = delta.size(1);
  const int64_t blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  attention_delta_kernel<scalar_t><<<blocks, kDeltaWarps * warp::kSize, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), delta.data_ptr<float>(), rows, grad_out.size(1),
      static_cast<int>(heads), static_cast<int>(grad_out.size(2) / heads));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename Geometry>
void launch_backward(const Geometry& geo, bool tensor_cores, int64_t query_blocks, int64_t key_blocks,
                     int scalar_threads, float scale, cudaStream_t stream) {
  with_attention_kernels<scalar_t>(geo, tensor_cores, scalar_threads, [&](auto, auto dq, auto dkdv, int threads) {
    dq<<<query_blocks, threads, 0, stream>>>(geo, scale);
    dkdv<<<key_blocks, threads, 0, stream>>>(geo, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention
}  // namespace twins_kernels
