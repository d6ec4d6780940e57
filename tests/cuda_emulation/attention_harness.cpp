// Runs csrc/'s LSA and GSA attention kernels (forward, dq, dk/dv) on the CPU under emulate.h, in fp32,
// fp16 or bf16 (the c10::Half / c10::BFloat16 the extension dispatches to), on inputs from a file (fp32,
// converted), and writes every result as fp32 to another file for tests/test_cuda_emulation.py.
// KERNELS picks the family: scalar (attention.cuh, any dtype) or mma (attention_mma.cuh, fp16/bf16),
// with the block sizes the host code gives each.
//   attention_harness lsa DTYPE KERNELS IN OUT B H W C heads ws scale mask_padding
//     IN: qkv (B,N,3C), qkv_bias (3C), grad_out (B,N,C)   OUT: out, lse, grad_qkv, pad_grad (zero mode)
//   attention_harness gsa DTYPE KERNELS IN OUT B N M C heads scale query_splits
//     IN: q (B,N,C), kv (B,M,2C), grad_out (B,N,C)        OUT: out, lse, grad_q, grad_kv
//     (query_splits: about how many key blocks share a key tile's queries, as gsa.cu picks per GPU)
#include "harness_io.h"  // before emulate.h: c10's headers must not see its __device__ stand-ins
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention_mma.cuh"
#include "gsa_geometry.cuh"
#include "lsa_geometry.cuh"

using namespace twins_kernels;

// Forward, then the backward: delta (attention_delta_kernel), dq and dk/dv, with the family's kernels.
template <typename scalar_t, typename Geometry>
static void run_kernels(Geometry& geo, bool tensor_cores, long query_blocks, long key_blocks, int threads,
                        float scale, std::vector<float>& delta, const std::vector<scalar_t>& grad_out,
                        const std::vector<scalar_t>& out, long batch, long tokens, int chans, int heads) {
  auto run = [&](auto forward, auto dq, auto dkdv, int block_threads) {
    emulated_launch(query_blocks, block_threads, [&] { forward(geo, scale); });
    const long rows = batch * tokens;
    delta.assign(batch * heads * tokens, NAN);
    emulated_launch((rows + attention::kDeltaWarps - 1) / attention::kDeltaWarps,
                    attention::kDeltaWarps * warp::kSize, [&] {
                      attention::attention_delta_kernel(grad_out.data(), out.data(), delta.data(), rows, tokens,
                                                        heads, chans / heads);
                    });
    geo.delta = delta.data();
    emulated_launch(query_blocks, block_threads, [&] { dq(geo, scale); });
    emulated_launch(key_blocks, block_threads, [&] { dkdv(geo, scale); });
  };
  attention::with_attention_kernels<scalar_t>(geo, tensor_cores, threads, run);
}

template <typename scalar_t>
static void run_lsa(FILE* in, FILE* outf, bool tensor_cores, char** argv) {
  const long batch = atol(argv[0]);
  const int height = atoi(argv[1]), width = atoi(argv[2]), chans = atoi(argv[3]), heads = atoi(argv[4]);
  const int ws = atoi(argv[5]);
  const float scale = static_cast<float>(atof(argv[6]));
  const bool mask = atoi(argv[7]) != 0;
  const long tokens = static_cast<long>(height) * width;
  auto qkv = read_as<scalar_t>(in, batch * tokens * 3 * chans);
  auto bias = read_as<scalar_t>(in, 3 * chans);
  auto grad_out = read_as<scalar_t>(in, batch * tokens * chans);
  LsaGeometry<scalar_t> geo{};
  geo.set_shape(height, width, chans, heads, ws, tensor_cores ? attention::kMmaRows : ws * ws);
  geo.qkv = qkv.data();
  geo.bias = bias.data();
  geo.stride_b = tokens * 3 * chans;
  geo.stride_n = 3 * chans;
  geo.stride_c = 1;
  geo.mask_padding = mask;
  const long blocks = geo.blocks(batch);
  std::vector<scalar_t> out(batch * tokens * chans, scalar_t(NAN)), grad_qkv(batch * tokens * 3 * chans, scalar_t(NAN));
  std::vector<float> lse(batch * heads * tokens, NAN);
  std::vector<float> pad_grad(geo.padded_window_heads(batch) * ws * ws * 2 * geo.head_dim, 0.f);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_qkv = grad_qkv.data();
  geo.pad_grad = pad_grad.data();
  run_kernels(geo, tensor_cores, blocks, blocks, lsa_scalar_threads(ws), scale, delta,
              grad_out, out, batch, tokens, chans, heads);
  write_as_floats(outf, out);
  write_as_floats(outf, lse);
  write_as_floats(outf, grad_qkv);
  write_as_floats(outf, pad_grad);
}

template <typename scalar_t>
static void run_gsa(FILE* in, FILE* outf, bool tensor_cores, char** argv) {
  const long batch = atol(argv[0]), tokens = atol(argv[1]), keys = atol(argv[2]);
  const int chans = atoi(argv[3]), heads = atoi(argv[4]);
  const float scale = static_cast<float>(atof(argv[5]));
  const long splits = atol(argv[6]);
  auto q = read_as<scalar_t>(in, batch * tokens * chans);
  auto kv = read_as<scalar_t>(in, batch * keys * 2 * chans);
  auto grad_out = read_as<scalar_t>(in, batch * tokens * chans);
  GsaGeometry<scalar_t> geo{};
  geo.set_shape(tokens, keys, chans, heads, tensor_cores ? attention::kMmaRows : kGsaScalarRows);
  geo.q = q.data();
  geo.q_stride_b = tokens * chans;
  geo.q_stride_n = chans;
  geo.q_stride_c = 1;
  geo.kv = kv.data();
  geo.kv_stride_b = keys * 2 * chans;
  geo.kv_stride_m = 2 * chans;
  geo.kv_stride_c = 1;
  std::vector<scalar_t> out(batch * tokens * chans, scalar_t(NAN)), grad_q(batch * tokens * chans, scalar_t(NAN));
  std::vector<scalar_t> grad_kv(batch * keys * 2 * chans, scalar_t(NAN));
  std::vector<float> lse(batch * heads * tokens, NAN);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_q = grad_q.data();
  geo.grad_kv = grad_kv.data();
  geo.split_queries(batch, splits, attention::kMmaRows);
  std::vector<float> partial(geo.query_splits > 1 ? geo.query_splits * geo.partial_stride : 0, NAN);
  geo.grad_kv_partial = partial.data();
  run_kernels(geo, tensor_cores, geo.query_blocks(batch), geo.key_blocks(batch), kGsaScalarRows, scale, delta,
              grad_out, out, batch, tokens, chans, heads);
  if (geo.query_splits > 1) {  // the host's sum of the splits' shares, in fp32, in split order
    for (long i = 0; i < geo.partial_stride; ++i) {
      float sum = 0.f;
      for (int split = 0; split < geo.query_splits; ++split) sum += partial[split * geo.partial_stride + i];
      grad_kv[i] = static_cast<scalar_t>(sum);
    }
  }
  write_as_floats(outf, out);
  write_as_floats(outf, lse);
  write_as_floats(outf, grad_q);
  write_as_floats(outf, grad_kv);
}

int main(int argc, char** argv) {
  const std::string op = argv[1], kernels = argv[3];
  if (kernels != "scalar" && kernels != "mma") {
    fprintf(stderr, "kernels %s: expected scalar or mma\n", kernels.c_str());
    return 2;
  }
  const bool tensor_cores = kernels == "mma";
  FILE* in = fopen(argv[4], "rb");
  FILE* outf = fopen(argv[5], "wb");
  dispatch_dtype(argv[2], [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    if (tensor_cores && !attention::kTensorCoreDtype<scalar_t>) {
      fprintf(stderr, "the mma kernels take fp16 or bf16\n");
      exit(2);
    }
    if (op == "lsa") {
      run_lsa<scalar_t>(in, outf, tensor_cores, argv + 6);
    } else {
      run_gsa<scalar_t>(in, outf, tensor_cores, argv + 6);
    }
  });
  fclose(in);
  fclose(outf);
  return 0;
}
