// Host entry points of the CUDA backend; csrc/bindings.cpp registers them as torch.ops.twins_kernels_cuda.*
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace twins_kernels {

// The compute capability (x 10) that the extension's code for GPU ``device`` was compiled for: the PTX
// version of the binary or JIT-compiled PTX the driver picks for it; 0 where the build has no code it can run.
int64_t device_code_version(int64_t device);

// x + bias + depthwise 3x3 conv (zero padding) of tokens x (B, H*W, C), any strides; weight (C, 1, 3, 3).
// flip_weight rotates the kernel by 180 degrees (the input gradient is this op on grad_out, flipped, no bias).
at::Tensor peg_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t height, int64_t width, bool flip_weight);

// (10, C) sums over B*H*W: rows 0..8 the weight taps (row-major 3x3), row 9 the bias gradient;
// fp32 (fp64 for double inputs). Deterministic: fixed partition, no atomics.
at::Tensor peg_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t height, int64_t width);

}  // namespace twins_kernels

namespace twins_kernels {

// LSA attention core on qkv (B, N, 3C) = the qkv Linear on the N real tokens (any strides); qkv_bias (3C,).
// Returns out (B, N, C) in token order and lse (B, heads, N) fp32. mask_padding: mmseg's semantics
// (valid queries ignore padded keys); otherwise timm's (padded keys hold the bias).
std::tuple<at::Tensor, at::Tensor> lsa_forward(const at::Tensor& qkv, const at::Tensor& qkv_bias, int64_t height,
                                               int64_t width, int64_t ws, int64_t num_heads, double scale,
                                               bool mask_padding);

// Returns grad_qkv (B, N, 3C) and the qkv bias's share from padded keys (3C,) fp32 (zeros when masking).
std::tuple<at::Tensor, at::Tensor> lsa_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                const at::Tensor& qkv_bias, const at::Tensor& out,
                                                const at::Tensor& lse, int64_t height, int64_t width, int64_t ws,
                                                int64_t num_heads, double scale, bool mask_padding);

// GSA attention core: q (B, N, C), kv (B, M, 2C) (any strides) -> out (B, N, C), lse (B, heads, N) fp32.
std::tuple<at::Tensor, at::Tensor> gsa_attention_forward(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                         double scale);

// Returns grad_q (B, N, C) and grad_kv (B, M, 2C).
std::tuple<at::Tensor, at::Tensor> gsa_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                          const at::Tensor& kv, const at::Tensor& out,
                                                          const at::Tensor& lse, int64_t num_heads, double scale);

}  // namespace twins_kernels
