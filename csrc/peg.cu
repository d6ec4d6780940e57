// PEG (timm PosConv, stride 1) on (B, N, C) tokens: forward conv, and the weight/bias gradient reduction.
#include "peg_kernels.cuh"
#include "outputs.h"
#include "twins_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace twins_kernels {
namespace {

using peg::kConvThreads;
using peg::kGradChannels;
using peg::kGradLanes;
using peg::kPartialSlots;
using peg::kTaps;
using peg::peg_weight_grad_kernel;
using peg::TokenStrides;

// Row blocks of the weight-gradient reduction; the same partition as the Triton backend, so that
// the result depends only on the shape.
constexpr int64_t kWeightGradPrograms = 512;

void check_tokens(const at::Tensor& t, const char* name, int64_t height, int64_t width) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 3, name, " must be (B, N, C) tokens, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) == height * width, name, " has N=", t.size(1), " tokens, expected H*W=", height * width);
  TORCH_CHECK(height * width * t.size(2) < (int64_t(1) << 31), name, ": one image's H*W*C must fit in 31 bits, got ",
              height, "*", width, "*", t.size(2));
}

TokenStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

at::Tensor peg_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t height, int64_t width, bool flip_weight) {
  check_tokens(x, "x", height, width);
  const int64_t chans = x.size(2);
  TORCH_CHECK(weight.numel() == chans * kTaps, "weight must be (C, 1, 3, 3) with C=", chans, ", got ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || bias->numel() == chans, "bias must be (C,) with C=", chans, ", got ",
              bias->sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = empty_output({x.size(0), x.size(1), chans}, x.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_conv3x3", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const auto w9t = weight.reshape({chans, kTaps}).t().to(acc_options).contiguous();  // (9, C)
    const auto bias_acc = bias.has_value() ? bias->to(acc_options).contiguous() : w9t;
    const int vec = peg::conv_vector_width(x.data_ptr<scalar_t>(), w9t.data_ptr<acc_t>(),
                                           bias.has_value() ? bias_acc.data_ptr<acc_t>() : nullptr,
                                           static_cast<int>(chans), strides_of(x));
    const dim3 grid(x.size(0) * height, peg::conv_blocks_per_row(static_cast<int>(width), static_cast<int>(chans), vec));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kConvThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w9t.data_ptr<acc_t>(),
                                                bias_acc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                                                static_cast<int>(height), static_cast<int>(width),
                                                static_cast<int>(chans), strides_of(x));
    };
    if (flip_weight) {
      bias.has_value() ? peg::with_conv_kernel<scalar_t, acc_t, true, true>(vec, launch)
                       : peg::with_conv_kernel<scalar_t, acc_t, true, false>(vec, launch);
    } else {
      bias.has_value() ? peg::with_conv_kernel<scalar_t, acc_t, false, true>(vec, launch)
                       : peg::with_conv_kernel<scalar_t, acc_t, false, false>(vec, launch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor peg_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t height, int64_t width) {
  check_tokens(x, "x", height, width);
  check_tokens(grad_out, "grad_out", height, width);
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out and x must be on one CUDA device, got ", grad_out.device(),
              " and ", x.device());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out has shape ", grad_out.sizes(), ", expected ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out and x must share a dtype, got ",
              grad_out.scalar_type(), " and ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t chans = x.size(2);
  const int64_t rows = x.size(0) * height;
  if (rows == 0 || width == 0 || chans == 0) {  // no tokens: zero sums, where a launch would have no blocks
    return at::zeros({kPartialSlots, chans}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  }
  const int64_t rows_per_program = std::max<int64_t>(1, (rows + kWeightGradPrograms - 1) / kWeightGradPrograms);
  const int64_t programs = (rows + rows_per_program - 1) / rows_per_program;
  at::Tensor sums;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto partial = empty_output({programs, kPartialSlots, chans}, acc_options);
    const dim3 grid(programs, (chans + kGradChannels - 1) / kGradChannels);
    const dim3 block(kGradChannels, kGradLanes);
    peg_weight_grad_kernel<scalar_t, acc_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), static_cast<int>(height),
        static_cast<int>(width), static_cast<int>(chans), rows, rows_per_program, strides_of(grad_out),
        strides_of(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums = partial.sum(0);
  });
  return sums;
}

}  // namespace twins_kernels
