// Runs csrc/'s LSA and GSA attention kernels (forward, dq, dk/dv) on the CPU under emulate.h, in fp32,
// fp16 or bf16 (the c10::Half / c10::BFloat16 the extension dispatches to), on inputs from a file (fp32,
// converted), and writes every result as fp32 to another file for tests/test_cuda_emulation.py.
// KERNELS picks the family: scalar (attention.cuh, any dtype) or mma (attention_mma.cuh, fp16/bf16),
// with the block sizes the host code gives each.
//   attention_harness lsa DTYPE KERNELS IN OUT B H W C heads ws scale mask_padding LAYOUT
//     IN: qkv (B,N,3C), qkv_bias (3C), grad_out (B,N,C)   OUT: out, lse, grad_qkv, pad_grad (zero mode)
//   attention_harness gsa DTYPE KERNELS IN OUT B N M C heads scale query_splits LAYOUT
//     IN: q (B,N,C), kv (B,M,2C), grad_out (B,N,C)        OUT: out, lse, grad_q, grad_kv
//     (query_splits: about how many key blocks share a key tile's queries, as gsa.cu picks per GPU)
//   LAYOUT: token-major or channel-major, how the kernels find qkv (q and kv) in memory (Layout below)
// A GPU block finds in shared memory whatever ran there before it; emulated, __shared__ arrays are
// statics, zero at first and then what the last block wrote. So a case first runs the same kernels
// (the same instantiation: head_dim rounded up as the host code dispatches it) on NaN inputs at the
// rounded head_dim, one image and one head, which leaves NaN in the shared tiles' every column: a
// kernel that then reads an element it did not write computes with NaN, and the comparison with the
// reference fails.
#include "harness_io.h"  // before emulate.h: c10's headers must not see its __device__ stand-ins
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "attention_mma.cuh"
#include "gsa_geometry.cuh"
#include "lsa_geometry.cuh"

using namespace twins_kernels;

// Forward, then the backward: delta (attention_delta_kernel, unless dq computes it), dq and dk/dv, with the
// family's kernels.
template <typename scalar_t, typename Geometry>
static void run_kernels(Geometry& geo, bool tensor_cores, long query_blocks, long key_blocks, int threads,
                        float scale, std::vector<float>& delta, const std::vector<scalar_t>& grad_out,
                        const std::vector<scalar_t>& out, long batch, long tokens, int chans, int heads) {
  auto run = [&](auto forward, auto dq, auto dkdv, int block_threads) {
    emulated_launch(query_blocks, block_threads, [&] { forward(geo, scale); });
    const long rows = batch * tokens;
    delta.assign(batch * heads * tokens, NAN);
    if (!geo.delta_in_dq) {
      emulated_launch((rows + attention::kDeltaWarps - 1) / attention::kDeltaWarps,
                      attention::kDeltaWarps * warp::kSize, [&] {
                        attention::attention_delta_kernel(grad_out.data(), out.data(), delta.data(), rows, tokens,
                                                          heads, chans / heads);
                      });
    }
    geo.delta = delta.data();
    emulated_launch(query_blocks, block_threads, [&] { dq(geo, scale); });
    emulated_launch(key_blocks, block_threads, [&] { dkdv(geo, scale); });
  };
  attention::with_attention_kernels<scalar_t>(geo, tensor_cores, threads, run);
}

// The head_dim the kernels for ``head_dim`` are instantiated for (their shared tiles' width).
static int instantiated_head_dim(int head_dim) {
  int width = 0;
  attention::dispatch_head_dim(head_dim, [&](auto max_head_dim) { width = decltype(max_head_dim)::value; });
  return width;
}

// The NaN run's case: one image and one head at the instantiated head_dim, so the same kernels and blocks
// as ``c``'s write NaN into every column of their shared tiles.
template <typename Case>
static Case nan_run_case(Case c) {
  c.chans = instantiated_head_dim(c.chans / c.heads);
  c.batch = 1;
  c.heads = 1;
  return c;
}

// Whether this run first leaves NaN in the shared tiles: the plain build's grid-order run. A sanitized
// build looks for races and stray accesses, and a reversed run must give the grid-order run's bits anyway.
static bool nan_run_first() {
#if defined(TWINS_KERNELS_EMULATION_SANITIZED)
  return false;
#else
  return !emulated_blocks_reversed();
#endif
}

template <typename scalar_t>
static std::vector<scalar_t> nans(size_t n) {
  return std::vector<scalar_t>(n, scalar_t(NAN));
}

struct LsaCase {
  long batch;
  int height, width, chans, heads, ws;
  float scale;
  bool mask;
  Layout layout;
};

// out, lse, grad_qkv, pad_grad (zero mode) of the LSA kernels on qkv (B,N,3C), qkv_bias (3C), grad_out (B,N,C)
template <typename scalar_t>
static void lsa_kernels(const LsaCase& c, bool tensor_cores, std::vector<scalar_t>& qkv, std::vector<scalar_t>& bias,
                        const std::vector<scalar_t>& grad_out, FILE* outf) {
  const long tokens = static_cast<long>(c.height) * c.width;
  LsaGeometry<scalar_t> geo{};
  geo.set_shape(c.height, c.width, c.chans, c.heads, c.ws, tensor_cores ? attention::kMmaRows : c.ws * c.ws);
  const std::vector<scalar_t> arranged = c.layout.arrange(qkv, c.batch, tokens, 3 * c.chans);
  geo.qkv = arranged.data();
  geo.bias = bias.data();
  std::tie(geo.stride_b, geo.stride_n, geo.stride_c) = c.layout.strides(c.batch, tokens, 3 * c.chans);
  geo.mask_padding = c.mask;
  geo.set_delta_source(tensor_cores);
  const long blocks = geo.blocks(c.batch);
  auto out = nans<scalar_t>(c.batch * tokens * c.chans), grad_qkv = nans<scalar_t>(c.batch * tokens * 3 * c.chans);
  auto lse = nans<float>(c.batch * c.heads * tokens);
  std::vector<float> pad_grad(geo.padded_window_heads(c.batch) * c.ws * c.ws * 2 * geo.head_dim, 0.f);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_qkv = grad_qkv.data();
  geo.pad_grad = pad_grad.data();
  run_kernels(geo, tensor_cores, blocks, blocks, lsa_scalar_threads(c.ws), c.scale, delta,
              grad_out, out, c.batch, tokens, c.chans, c.heads);
  if (outf == nullptr) return;
  write_as_floats(outf, out);
  write_as_floats(outf, lse);
  write_as_floats(outf, grad_qkv);
  write_as_floats(outf, pad_grad);
}

template <typename scalar_t>
static void run_lsa(FILE* in, FILE* outf, bool tensor_cores, char** argv) {
  LsaCase c{atol(argv[0]), atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]),
            static_cast<float>(atof(argv[6])), atoi(argv[7]) != 0, layout_named(argv[8])};
  const long tokens = static_cast<long>(c.height) * c.width;
  auto qkv = read_as<scalar_t>(in, c.batch * tokens * 3 * c.chans);
  auto bias = read_as<scalar_t>(in, 3 * c.chans);
  auto grad_out = read_as<scalar_t>(in, c.batch * tokens * c.chans);

  if (nan_run_first()) {
    const LsaCase wide = nan_run_case(c);  // the same windows
    auto wide_qkv = nans<scalar_t>(tokens * 3 * wide.chans), wide_bias = nans<scalar_t>(3 * wide.chans);
    lsa_kernels(wide, tensor_cores, wide_qkv, wide_bias, nans<scalar_t>(tokens * wide.chans), nullptr);
  }
  lsa_kernels(c, tensor_cores, qkv, bias, grad_out, outf);
}

struct GsaCase {
  long batch, tokens, keys;
  int chans, heads;
  float scale;
  long splits;
  Layout layout;
};

// out, lse, grad_q, grad_kv of the GSA kernels on q (B,N,C), kv (B,M,2C), grad_out (B,N,C)
template <typename scalar_t>
static void gsa_kernels(const GsaCase& c, bool tensor_cores, std::vector<scalar_t>& q, std::vector<scalar_t>& kv,
                        const std::vector<scalar_t>& grad_out, FILE* outf) {
  GsaGeometry<scalar_t> geo{};
  geo.set_shape(c.tokens, c.keys, c.chans, c.heads, tensor_cores ? attention::kMmaRows : kGsaScalarRows);
  const std::vector<scalar_t> arranged_q = c.layout.arrange(q, c.batch, c.tokens, c.chans);
  const std::vector<scalar_t> arranged_kv = c.layout.arrange(kv, c.batch, c.keys, 2 * c.chans);
  geo.q = arranged_q.data();
  std::tie(geo.q_stride_b, geo.q_stride_n, geo.q_stride_c) = c.layout.strides(c.batch, c.tokens, c.chans);
  geo.kv = arranged_kv.data();
  std::tie(geo.kv_stride_b, geo.kv_stride_m, geo.kv_stride_c) = c.layout.strides(c.batch, c.keys, 2 * c.chans);
  geo.set_delta_source(tensor_cores);
  auto out = nans<scalar_t>(c.batch * c.tokens * c.chans), grad_q = nans<scalar_t>(c.batch * c.tokens * c.chans);
  auto grad_kv = nans<scalar_t>(c.batch * c.keys * 2 * c.chans);
  auto lse = nans<float>(c.batch * c.heads * c.tokens);
  std::vector<float> delta;
  geo.out = out.data();
  geo.lse = lse.data();
  geo.grad_out = grad_out.data();
  geo.grad_q = grad_q.data();
  geo.grad_kv = grad_kv.data();
  geo.split_queries(c.batch, c.splits, attention::kMmaRows);
  auto partial = nans<float>(geo.query_splits > 1 ? geo.query_splits * geo.partial_stride : 0);
  geo.grad_kv_partial = partial.data();
  run_kernels(geo, tensor_cores, geo.query_blocks(c.batch), geo.key_blocks(c.batch), kGsaScalarRows, c.scale, delta,
              grad_out, out, c.batch, c.tokens, c.chans, c.heads);
  if (outf == nullptr) return;
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

template <typename scalar_t>
static void run_gsa(FILE* in, FILE* outf, bool tensor_cores, char** argv) {
  GsaCase c{atol(argv[0]), atol(argv[1]), atol(argv[2]), atoi(argv[3]), atoi(argv[4]),
            static_cast<float>(atof(argv[5])), atol(argv[6]), layout_named(argv[7])};
  auto q = read_as<scalar_t>(in, c.batch * c.tokens * c.chans);
  auto kv = read_as<scalar_t>(in, c.batch * c.keys * 2 * c.chans);
  auto grad_out = read_as<scalar_t>(in, c.batch * c.tokens * c.chans);

  if (nan_run_first()) {
    const GsaCase wide = nan_run_case(c);  // the same query and key blocks
    auto wide_q = nans<scalar_t>(c.tokens * wide.chans), wide_kv = nans<scalar_t>(c.keys * 2 * wide.chans);
    gsa_kernels(wide, tensor_cores, wide_q, wide_kv, nans<scalar_t>(c.tokens * wide.chans), nullptr);
  }
  gsa_kernels(c, tensor_cores, q, kv, grad_out, outf);
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
