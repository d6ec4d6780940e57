// GSA (timm GlobalSubSampleAttn) attention core: queries (B, N, C) from the q Linear, keys and values
// (B, M, 2C) from the kv Linear on the sub-sampled tokens, read by head strides; out (B, N, C) in token
// order, ready for proj. Nothing of size N x M is stored: the backward recomputes from the log-sum-exp.
#include "attention_launch.cuh"
#include "gsa_geometry.cuh"
#include "outputs.h"
#include "twins_kernels.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace twins_kernels {
namespace {

template <typename scalar_t>
GsaGeometry<scalar_t> make_geometry(const at::Tensor& q, const at::Tensor& kv, int64_t heads, bool tensor_cores) {
  GsaGeometry<scalar_t> geo{};
  geo.set_shape(q.size(1), kv.size(1), q.size(2), heads, attention::block_rows(tensor_cores, kGsaScalarRows));
  geo.q = q.data_ptr<scalar_t>();
  geo.q_stride_b = q.stride(0);
  geo.q_stride_n = q.stride(1);
  geo.q_stride_c = q.stride(2);
  geo.kv = kv.data_ptr<scalar_t>();
  geo.kv_stride_b = kv.stride(0);
  geo.kv_stride_m = kv.stride(1);
  geo.kv_stride_c = kv.stride(2);
  geo.set_delta_source(tensor_cores);
  return geo;
}

// How many key blocks share one key tile's loop over the queries: enough for about two blocks an SM when
// the key tiles alone are few (M = 49 keys is one key tile a batch element and head). The Triton
// backward splits the same way.
int64_t dkdv_query_splits(const at::Tensor& q, int64_t key_blocks, int64_t query_tiles) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  return std::max<int64_t>(1, std::min<int64_t>(query_tiles, 2 * sms / key_blocks));
}

void check_gsa(const at::Tensor& q, const at::Tensor& kv, int64_t heads) {
  TORCH_CHECK(q.is_cuda() && kv.is_cuda() && q.device() == kv.device(), "q and kv must be on one CUDA device, got ",
              q.device(), " and ", kv.device());
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3, "q must be (B, N, C) and kv (B, M, 2C), got ", q.sizes(), " and ",
              kv.sizes());
  TORCH_CHECK(kv.size(0) == q.size(0) && kv.size(2) == 2 * q.size(2), "kv has shape ", kv.sizes(),
              ", expected (", q.size(0), ", M, ", 2 * q.size(2), ")");
  TORCH_CHECK(kv.size(1) >= 1, "kv must hold at least one key");
  TORCH_CHECK(heads > 0 && q.size(2) % heads == 0, "C=", q.size(2), " is not divisible by num_heads=", heads);
  TORCH_CHECK(q.size(2) / heads >= 16 && q.size(2) / heads <= 128, "head_dim must be in 16..128, got ",
              q.size(2) / heads);
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype, got ", q.scalar_type(), " and ",
              kv.scalar_type());
  TORCH_CHECK(q.scalar_type() != at::kDouble, "the cuda backend supports fp32, fp16 and bf16, got ", q.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gsa_attention_forward(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                         double scale) {
  check_gsa(q, kv, num_heads);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = empty_output({q.size(0), num_heads, q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool tensor_cores = attention::use_tensor_cores(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gsa_attention_forward", [&] {
    auto geo = make_geometry<scalar_t>(q, kv, num_heads, tensor_cores);
    geo.out = out.data_ptr<scalar_t>();
    geo.lse = lse.data_ptr<float>();
    attention::launch_forward<scalar_t>(geo, tensor_cores, geo.query_blocks(q.size(0)), kGsaScalarRows,
                                        static_cast<float>(scale), c10::cuda::getCurrentCUDAStream());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gsa_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                          const at::Tensor& kv, const at::Tensor& out,
                                                          const at::Tensor& lse, int64_t num_heads, double scale) {
  check_gsa(q, kv, num_heads);
  attention::check_saved_for_backward(grad_out, out, lse, q, q.sizes(), num_heads);
  const c10::cuda::CUDAGuard guard(q.device());
  auto grad_q = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_kv = empty_output(kv.sizes(), kv.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_q.numel() == 0) return {grad_q, grad_kv.zero_()};
  const auto grad = grad_out.to(q.scalar_type()).contiguous();
  auto delta = empty_output({q.size(0), num_heads, q.size(1)}, q.options().dtype(at::kFloat));
  const auto lse_c = lse.contiguous();
  const bool tensor_cores = attention::use_tensor_cores(q);
  at::Tensor grad_kv_partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gsa_attention_backward", [&] {
    auto geo = make_geometry<scalar_t>(q, kv, num_heads, tensor_cores);
    if (!geo.delta_in_dq) {
      attention::launch_delta<scalar_t>(grad, out.to(q.scalar_type()).contiguous(), delta,
                                        c10::cuda::getCurrentCUDAStream());
    }
    geo.lse = const_cast<float*>(lse_c.data_ptr<float>());
    geo.delta = delta.data_ptr<float>();
    geo.grad_out = grad.data_ptr<scalar_t>();
    geo.grad_q = grad_q.data_ptr<scalar_t>();
    geo.grad_kv = grad_kv.data_ptr<scalar_t>();
    geo.split_queries(q.size(0), dkdv_query_splits(q, geo.key_blocks(q.size(0)), geo.query_tiles),
                      attention::kMmaRows);
    if (geo.query_splits > 1) {
      grad_kv_partial =
          empty_output({geo.query_splits, kv.size(0), kv.size(1), kv.size(2)}, q.options().dtype(at::kFloat));
      geo.grad_kv_partial = grad_kv_partial.data_ptr<float>();
    }
    attention::launch_backward<scalar_t>(geo, tensor_cores, geo.query_blocks(q.size(0)), geo.key_blocks(q.size(0)),
                                         kGsaScalarRows, static_cast<float>(scale), c10::cuda::getCurrentCUDAStream());
  });
  if (grad_kv_partial.defined()) grad_kv.copy_(grad_kv_partial.sum(0));  // fixed order: deterministic
  return {grad_q, grad_kv};
}

}  // namespace twins_kernels
