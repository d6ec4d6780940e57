// Runs csrc/'s LSA and GSA attention kernels (forward, dq, dk/dv) on the CPU under emulate.h, in fp32,
// fp16 or bf16 (the c10::Half / c10::BFloat16 the extension dispatches to), on inputs from a file (fp32,
// converted), and writes every result as fp32 to another file for tests/test_cuda_emulation.py.
//   attention_harness lsa DTYPE IN OUT B H W C heads ws scale mask_padding
//     IN: qkv (B,N,3C), qkv_bias (3C), grad_out (B,N,C)   OUT: out, lse, grad_qkv, pad_grad (zero mode)
//   attention_harness gsa DTYPE IN OUT B N M C heads scale
//     IN: q (B,N,C), kv (B,M,2C), grad_out (B,N,C)        OUT: out, lse, grad_q, grad_kv
#include "harness_io.h"  // before emulate.h: c10's headers must not see its __device__ stand-ins
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gsa_geometry.cuh"
#include "lsa_geometry.cuh"

using namespace twins_kernels;

// delta[b, h, n] = sum_d grad_out[b, n, h*D + d] * out[b, n, h*D + d] in fp32: what the host code computes
template <typename scalar_t>
static std::vector<float> row_dots(const std::vector<scalar_t>& g, const std::vector<scalar_t>& o, long batch,
                                   long tokens, int chans, int heads) {
  const int head_dim = chans / heads;
  std::vector<float> delta(batch * heads * tokens);
  for (long b = 0; b < batch; ++b)
    for (long n = 0; n < tokens; ++n)
      for (int h = 0; h < heads; ++h) {
        float sum = 0.f;
        for (int d = 0; d < head_dim; ++d) {
          const long i = (b * tokens + n) * chans + h * head_dim + d;
          sum += static_cast<float>(g[i]) * static_cast<float>(o[i]);
        }
        delta[(b * heads + h) * tokens + n] = sum;
      }
  return delta;
}

template <typename scalar_t, typename Geometry>
static void run_kernels(Geometry& geo, long query_blocks, long key_blocks, unsigned threads, float scale,
                        std::vector<float>& delta, const std::vector<scalar_t>& grad_out,
                        const std::vector<scalar_t>& out, long batch, long tokens, int chans, int heads) {
  attention::dispatch_head_dim(geo.head_dim, [&](auto max_head_dim) {
    constexpr int kMax = decltype(max_head_dim)::value;
    emulated_launch(query_blocks, threads, [&] { attention::attention_forward_kernel<scalar_t, kMax>(geo, scale); });
    delta = row_dots(grad_out, out, batch, tokens, chans, heads);
    geo.delta = delta.data();
    emulated_launch(query_blocks, threads, [&] { attention::attention_dq_kernel<scalar_t, kMax>(geo, scale); });
    emulated_launch(key_blocks, threads, [&] { attention::attention_dkdv_kernel<scalar_t, kMax>(geo, scale); });
  });
}

template <typename scalar_t>
static void run_lsa(FILE* in, FILE* outf, char** argv) {
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
  geo.qkv = qkv.data();
  geo.bias = bias.data();
  geo.stride_b = tokens * 3 * chans;
  geo.stride_n = 3 * chans;
  geo.stride_c = 1;
  geo.height = height;
  geo.width = width;
  geo.chans = chans;
  geo.heads = heads;
  geo.head_dim = chans / heads;
  geo.ws = ws;
  geo.windows_h = (height + ws - 1) / ws;
  geo.windows_w = (width + ws - 1) / ws;
  geo.mask_padding = mask;
  const long blocks = batch * geo.windows_h * geo.windows_w * heads;
  std::vector<scalar_t> out(batch * tokens * chans, scalar_t(NAN)), grad_qkv(batch * tokens * 3 * chans, scalar_t(NAN));
  std::vector<float> lse(batch * heads * tokens, NAN), pad_grad(blocks * ws * ws * 2 * geo.head_dim, 0.f);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_qkv = grad_qkv.data();
  geo.pad_grad = pad_grad.data();
  run_kernels(geo, blocks, blocks, static_cast<unsigned>((ws * ws + 31) / 32 * 32), scale, delta, grad_out, out,
              batch, tokens, chans, heads);
  write_as_floats(outf, out);
  write_as_floats(outf, lse);
  write_as_floats(outf, grad_qkv);
  write_as_floats(outf, pad_grad);
}

template <typename scalar_t>
static void run_gsa(FILE* in, FILE* outf, char** argv) {
  const long batch = atol(argv[0]), tokens = atol(argv[1]), keys = atol(argv[2]);
  const int chans = atoi(argv[3]), heads = atoi(argv[4]);
  const float scale = static_cast<float>(atof(argv[5]));
  auto q = read_as<scalar_t>(in, batch * tokens * chans);
  auto kv = read_as<scalar_t>(in, batch * keys * 2 * chans);
  auto grad_out = read_as<scalar_t>(in, batch * tokens * chans);
  GsaGeometry<scalar_t> geo{};
  geo.q = q.data();
  geo.q_stride_b = tokens * chans;
  geo.q_stride_n = chans;
  geo.q_stride_c = 1;
  geo.kv = kv.data();
  geo.kv_stride_b = keys * 2 * chans;
  geo.kv_stride_m = 2 * chans;
  geo.kv_stride_c = 1;
  geo.tokens = tokens;
  geo.keys = keys;
  geo.chans = chans;
  geo.heads = heads;
  geo.head_dim = chans / heads;
  geo.query_tiles = (tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  geo.key_tiles = (keys + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<scalar_t> out(batch * tokens * chans, scalar_t(NAN)), grad_q(batch * tokens * chans, scalar_t(NAN));
  std::vector<scalar_t> grad_kv(batch * keys * 2 * chans, scalar_t(NAN));
  std::vector<float> lse(batch * heads * tokens, NAN);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_q = grad_q.data();
  geo.grad_kv = grad_kv.data();
  run_kernels(geo, batch * heads * geo.query_tiles, batch * heads * geo.key_tiles, kRowsPerBlock, scale, delta,
              grad_out, out, batch, tokens, chans, heads);
  write_as_floats(outf, out);
  write_as_floats(outf, lse);
  write_as_floats(outf, grad_q);
  write_as_floats(outf, grad_kv);
}

int main(int argc, char** argv) {
  const std::string op = argv[1];
  FILE* in = fopen(argv[3], "rb");
  FILE* outf = fopen(argv[4], "wb");
  dispatch_dtype(argv[2], [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    if (op == "lsa") {
      run_lsa<scalar_t>(in, outf, argv + 5);
    } else {
      run_gsa<scalar_t>(in, outf, argv + 5);
    }
  });
  fclose(in);
  fclose(outf);
  return 0;
}
