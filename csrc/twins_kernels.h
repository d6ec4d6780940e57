// Host entry points of the CUDA backend; csrc/bindings.cpp registers them as torch.ops.twins_kernels_cuda.*
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace twins_kernels {

// x + bias + depthwise 3x3 conv (zero padding) of tokens x (B, H*W, C), any strides; weight (C, 1, 3, 3).
// flip_weight rotates the kernel by 180 degrees (the input gradient is this op on grad_out, flipped, no bias).
at::Tensor peg_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t height, int64_t width, bool flip_weight);

// (10, C) sums over B*H*W: rows 0..8 the weight taps (row-major 3x3), row 9 the bias gradient;
// fp32 (fp64 for double inputs). Deterministic: fixed partition, no atomics.
at::Tensor peg_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t height, int64_t width);

}  // namespace twins_kernels
