// Host side of the attention kernels LSA and GSA share: which kernel family runs a call, and the launches.
#pragma once

#include "attention.cuh"
#include "attention_mma.cuh"
#include "twins_kernels.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <vector>

namespace twins_kernels {
namespace attention {

// fp16 and bf16 run the tensor-core kernels where the code the GPU runs was compiled for compute capability
// 8.0+ (mma.sync, cp.async); fp32 runs the scalar ones, its dots exact fp32 (tensor cores would round its
// inputs to tf32). The code's capability, not the GPU's: a build for older GPUs with PTX
// (TORCH_CUDA_ARCH_LIST="7.5+PTX") runs on an H100 JIT-compiled from compute_75, where the tensor-core
// kernels have no mma.sync and trap.
inline bool use_tensor_cores(const at::Tensor& t) {
  if (t.scalar_type() != at::kHalf && t.scalar_type() != at::kBFloat16) return false;
  return device_code_version(t.get_device()) >= 80;
}

// The backward's saved tensors, as the forward made them: out and grad_out (B, N, C) and the fp32 lse
// (B, heads, N), on the inputs' device (the kernels read them through raw pointers).
inline void check_saved_for_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& input, at::IntArrayRef tokens_shape, int64_t heads) {
  for (const auto* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK(t->device() == input.device(), "the backward's tensors must be on ", input.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(out.sizes() == tokens_shape, "out has shape ", out.sizes(), ", expected ", tokens_shape);
  TORCH_CHECK(grad_out.sizes() == tokens_shape, "grad_out has shape ", grad_out.sizes(), ", expected ",
              tokens_shape);
  const std::vector<int64_t> lse_shape{tokens_shape[0], heads, tokens_shape[1]};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lse_shape), "lse must be fp32 ",
              at::IntArrayRef(lse_shape), ", got ", lse.scalar_type(), " ", lse.sizes());
}

// A 1-D grid of ``blocks``, checked against grid.x's limit (2^31 - 1) rather than narrowed to unsigned.
inline unsigned grid_blocks(int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "a launch of ", blocks, " blocks is past CUDA's grid.x limit of 2^31 - 1");
  return static_cast<unsigned>(blocks);
}

// The rows a block covers: kMmaRows for the tensor-core kernels, scalar_rows (a thread each) otherwise.
inline int block_rows(bool tensor_cores, int scalar_rows) { return tensor_cores ? kMmaRows : scalar_rows; }

template <typename scalar_t, typename Geometry>
void launch_forward(const Geometry& geo, bool tensor_cores, int64_t blocks, int scalar_threads, float scale,
                    cudaStream_t stream) {
  with_attention_kernels<scalar_t>(geo, tensor_cores, scalar_threads, [&](auto forward, auto, auto, int threads) {
    forward<<<grid_blocks(blocks), threads, 0, stream>>>(geo, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// delta (B, heads, N) fp32 of grad_out and out, both contiguous (B, N, heads * head_dim) in scalar_t.
template <typename scalar_t>
void launch_delta(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor& delta, cudaStream_t stream) {
  const int64_t rows = grad_out.size(0) * grad_out.size(1), heads = delta.size(1);
  const int64_t blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  attention_delta_kernel<scalar_t><<<grid_blocks(blocks), kDeltaWarps * warp::kSize, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), delta.data_ptr<float>(), rows, grad_out.size(1),
      static_cast<int>(heads), static_cast<int>(grad_out.size(2) / heads));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename Geometry>
void launch_backward(const Geometry& geo, bool tensor_cores, int64_t query_blocks, int64_t key_blocks,
                     int scalar_threads, float scale, cudaStream_t stream) {
  with_attention_kernels<scalar_t>(geo, tensor_cores, scalar_threads, [&](auto, auto dq, auto dkdv, int threads) {
    // dq first: with geo.delta_in_dq it writes the delta dk/dv reads
    dq<<<grid_blocks(query_blocks), threads, 0, stream>>>(geo, scale);
    dkdv<<<grid_blocks(key_blocks), threads, 0, stream>>>(geo, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention
}  // namespace twins_kernels
