// LSA (timm LocallyGroupedAttn) attention core on the qkv GEMM's output, by index arithmetic: no pad,
// no window reshapes. Positions past the map's right/bottom edge are either keys holding the qkv bias
// (timm's zero padding) or excluded (mmseg's masking); queries there are cropped, so never computed.
#include "attention_launch.cuh"
#include "lsa_geometry.cuh"
#include "outputs.h"
#include "twins_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace twins_kernels {
namespace {

struct LsaShape {
  int64_t batch, tokens, chans, head_dim;
};

LsaShape check_lsa(const at::Tensor& qkv, const at::Tensor& bias, int64_t height, int64_t width, int64_t ws,
                   int64_t heads) {
  TORCH_CHECK(qkv.is_cuda() && bias.is_cuda() && qkv.device() == bias.device(),
              "qkv and qkv_bias must be on one CUDA device, got ", qkv.device(), " and ", bias.device());
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "qkv must be (B, N, 3C), got ", qkv.sizes());
  TORCH_CHECK(qkv.size(1) == height * width, "qkv has N=", qkv.size(1), ", expected H*W=", height * width);
  TORCH_CHECK(ws >= 2 && ws <= 16, "ws must be in 2..16, got ", ws);
  const int64_t chans = qkv.size(2) / 3;
  TORCH_CHECK(heads > 0 && chans % heads == 0, "C=", chans, " is not divisible by num_heads=", heads);
  const int64_t head_dim = chans / heads;
  TORCH_CHECK(head_dim >= 16 && head_dim <= 128, "head_dim must be in 16..128, got ", head_dim);
  TORCH_CHECK(bias.numel() == 3 * chans, "qkv_bias must have 3C=", 3 * chans, " elements, got ", bias.numel());
  TORCH_CHECK(qkv.scalar_type() != at::kDouble, "the cuda backend supports fp32, fp16 and bf16, got ",
              qkv.scalar_type());
  return {qkv.size(0), qkv.size(1), chans, head_dim};
}

template <typename scalar_t>
LsaGeometry<scalar_t> make_geometry(const at::Tensor& qkv, const at::Tensor& bias, const LsaShape& shape,
                                    int64_t height, int64_t width, int64_t ws, int64_t heads, bool mask_padding,
                                    bool tensor_cores) {
  LsaGeometry<scalar_t> geo{};
  geo.set_shape(height, width, shape.chans, heads, ws,
                attention::block_rows(tensor_cores, static_cast<int>(ws * ws)));
  geo.qkv = qkv.data_ptr<scalar_t>();
  geo.bias = bias.data_ptr<scalar_t>();
  geo.stride_b = qkv.stride(0);
  geo.stride_n = qkv.stride(1);
  geo.stride_c = qkv.stride(2);
  geo.mask_padding = mask_padding;
  geo.set_delta_source(tensor_cores);
  return geo;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lsa_forward(const at::Tensor& qkv, const at::Tensor& qkv_bias, int64_t height,
                                               int64_t width, int64_t ws, int64_t num_heads, double scale,
                                               bool mask_padding) {
  const auto shape = check_lsa(qkv, qkv_bias, height, width, ws, num_heads);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = empty_output({shape.batch, shape.tokens, shape.chans}, qkv.options());
  auto lse = empty_output({shape.batch, num_heads, shape.tokens}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const auto bias = qkv_bias.to(qkv.scalar_type()).contiguous();
  const bool tensor_cores = attention::use_tensor_cores(qkv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "lsa_forward", [&] {
    auto geo = make_geometry<scalar_t>(qkv, bias, shape, height, width, ws, num_heads, mask_padding, tensor_cores);
    geo.out = out.data_ptr<scalar_t>();
    geo.lse = lse.data_ptr<float>();
    attention::launch_forward<scalar_t>(geo, tensor_cores, geo.blocks(shape.batch), lsa_scalar_threads(ws),
                                        static_cast<float>(scale), c10::cuda::getCurrentCUDAStream());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> lsa_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                const at::Tensor& qkv_bias, const at::Tensor& out,
                                                const at::Tensor& lse, int64_t height, int64_t width, int64_t ws,
                                                int64_t num_heads, double scale, bool mask_padding) {
  const auto shape = check_lsa(qkv, qkv_bias, height, width, ws, num_heads);
  const std::vector<int64_t> tokens_shape{shape.batch, shape.tokens, shape.chans};
  attention::check_saved_for_backward(grad_out, out, lse, qkv, tokens_shape, num_heads);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto grad_qkv = empty_output({shape.batch, shape.tokens, 3 * shape.chans}, qkv.options());
  auto grad_bias = at::zeros({3 * shape.chans}, qkv.options().dtype(at::kFloat));
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_bias};
  const auto grad = grad_out.to(qkv.scalar_type()).contiguous();
  auto delta = empty_output({shape.batch, num_heads, shape.tokens}, qkv.options().dtype(at::kFloat));
  const bool has_padding = !mask_padding && (height % ws != 0 || width % ws != 0);
  at::Tensor pad_grad;  // (B * padded windows * heads, ws*ws, 2, head_dim): the padded keys' dk, dv
  const auto bias = qkv_bias.to(qkv.scalar_type()).contiguous();
  const auto lse_c = lse.contiguous();
  const bool tensor_cores = attention::use_tensor_cores(qkv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "lsa_backward", [&] {
    auto geo = make_geometry<scalar_t>(qkv, bias, shape, height, width, ws, num_heads, mask_padding, tensor_cores);
    if (!geo.delta_in_dq) {
      attention::launch_delta<scalar_t>(grad, out.to(qkv.scalar_type()).contiguous(), delta,
                                        c10::cuda::getCurrentCUDAStream());
    }
    geo.lse = const_cast<float*>(lse_c.data_ptr<float>());
    geo.delta = delta.data_ptr<float>();
    geo.grad_out = grad.data_ptr<scalar_t>();
    geo.grad_qkv = grad_qkv.data_ptr<scalar_t>();
    if (has_padding) {
      pad_grad = at::zeros({geo.padded_window_heads(shape.batch), ws * ws, 2, shape.head_dim}, grad_bias.options());
      geo.pad_grad = pad_grad.data_ptr<float>();
    }
    const int64_t blocks = geo.blocks(shape.batch);
    attention::launch_backward<scalar_t>(geo, tensor_cores, blocks, blocks, lsa_scalar_threads(ws),
                                         static_cast<float>(scale), c10::cuda::getCurrentCUDAStream());
  });
  if (has_padding) {
    // the padded keys stand in with the bias: their dk, dv are the bias's share, summed per head into
    // (h, 2, d); the dims are an explicit IntArrayRef because torch 2.11's headers find a braced list
    // ambiguous (DimnameList overload) and refuse to compile it
    const auto per_head = pad_grad.view({-1, num_heads, ws * ws, 2, shape.head_dim}).sum(at::IntArrayRef{0, 2});
    grad_bias.narrow(0, shape.chans, 2 * shape.chans).copy_(per_head.permute({1, 0, 2}).reshape({-1}));
  }
  return {grad_qkv, grad_bias};
}

}  // namespace twins_kernels
