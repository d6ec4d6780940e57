// Runs csrc/peg_kernels.cuh on the CPU under emulate.h, in fp32, fp16 or bf16 tokens with fp32 weights
// and accumulation (as peg.cu launches them), on inputs from a file, for tests/test_cuda_emulation.py.
//   peg_harness DTYPE IN OUT B H W C ROW_BLOCKS LAYOUT X_OFFSET BIAS
//   IN: x (B,N,C), weight (C,9), bias (C), grad_out (B,N,C)
//   ROW_BLOCKS caps the conv's blocks a row (grid.y), as grid.y's limit caps them on a GPU
//   LAYOUT: token-major or channel-major, how x lies in memory (grad_out is token-major: the kernels read
//   each with its own strides); X_OFFSET: elements before x's first (1: x is not 16-byte aligned)
//   BIAS: bias, or no-bias (the forward's conv kernel without one, handed no bias pointer; IN's bias unread)
//   OUT (fp32): out = x (+ bias) + conv(x); grad_x = g + conv(g, flipped weight); sums (10, C) over the partials
#include "harness_io.h"  // before emulate.h: c10's headers must not see its __device__ stand-ins
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "peg_kernels.cuh"

using namespace twins_kernels::peg;

template <typename scalar_t>
static void run(FILE* in, FILE* out_file, char** argv) {
  const int batch = atoi(argv[0]), height = atoi(argv[1]), width = atoi(argv[2]), chans = atoi(argv[3]);
  const int64_t max_row_blocks = atol(argv[4]);
  const Layout x_layout = layout_named(argv[5]);
  const long x_offset = atol(argv[6]);
  const bool has_bias = std::string(argv[7]) == "bias";
  const long tokens = static_cast<long>(height) * width;
  const long elements = batch * tokens * chans;
  std::vector<scalar_t> x_storage(x_offset, scalar_t(NAN));
  const auto x_arranged = x_layout.arrange(read_as<scalar_t>(in, elements), batch, tokens, chans);
  x_storage.insert(x_storage.end(), x_arranged.begin(), x_arranged.end());
  const scalar_t* x = x_storage.data() + x_offset;
  TokenStrides x_strides;
  std::tie(x_strides.batch, x_strides.token, x_strides.channel) = x_layout.strides(batch, tokens, chans);
  const auto weight = read_floats(in, static_cast<size_t>(chans) * kTaps);
  const auto bias = read_floats(in, chans);
  const auto grad = read_as<scalar_t>(in, elements);
  const TokenStrides grad_strides{tokens * chans, chans, 1};

  std::vector<float> w9t(kTaps * chans);  // the (9, C) taps peg.cu hands the conv
  for (int c = 0; c < chans; ++c)
    for (int tap = 0; tap < kTaps; ++tap) w9t[tap * chans + c] = weight[c * kTaps + tap];

  std::vector<scalar_t> out(elements, scalar_t(NAN)), grad_x(elements, scalar_t(NAN));
  // the conv kernel peg.cu picks: 16 bytes of channels a thread where the tokens allow it
  auto conv = [&](const scalar_t* input, TokenStrides strides, const float* conv_bias, std::vector<scalar_t>& output,
                  auto launch_flags) {
    const int vec = conv_vector_width(input, w9t.data(), conv_bias, chans, strides);
    const EmulatedDim3 grid{static_cast<unsigned>(batch * height),
                            conv_blocks_per_row(width, chans, vec, max_row_blocks), 0};
    launch_flags(vec, [&](auto kernel) {
      emulated_launch(grid, {kConvThreads, 1, 0}, [&] {
        kernel(input, w9t.data(), conv_bias, output.data(), height, width, chans, strides);
      });
    });
  };
  if (has_bias) {
    conv(x, x_strides, bias.data(), out,
         [](int vec, auto launch) { with_conv_kernel<scalar_t, float, false, true>(vec, launch); });
  } else {
    conv(x, x_strides, nullptr, out,
         [](int vec, auto launch) { with_conv_kernel<scalar_t, float, false, false>(vec, launch); });
  }
  conv(grad.data(), grad_strides, nullptr, grad_x,
       [](int vec, auto launch) { with_conv_kernel<scalar_t, float, true, false>(vec, launch); });

  const int64_t rows = static_cast<int64_t>(batch) * height;
  const int64_t rows_per_program = (rows + 511) / 512;  // peg.cu's partition
  const int64_t programs = (rows + rows_per_program - 1) / rows_per_program;
  std::vector<float> partial(programs * kPartialSlots * chans, NAN);
  emulated_launch({static_cast<unsigned>(programs), static_cast<unsigned>((chans + kGradChannels - 1) / kGradChannels), 0},
                  {kGradChannels, kGradLanes, 0}, [&] {
                    peg_weight_grad_kernel<scalar_t, float>(grad.data(), x, partial.data(), height, width, chans,
                                                            rows, rows_per_program, grad_strides, x_strides);
                  });
  std::vector<float> sums(kPartialSlots * chans, 0.f);
  for (int64_t p = 0; p < programs; ++p)
    for (int64_t i = 0; i < kPartialSlots * chans; ++i) sums[i] += partial[p * kPartialSlots * chans + i];

  write_as_floats(out_file, out);
  write_as_floats(out_file, grad_x);
  write_as_floats(out_file, sums);
}

int main(int argc, char** argv) {
  FILE* in = fopen(argv[2], "rb");
  FILE* out_file = fopen(argv[3], "wb");
  dispatch_dtype(argv[1], [&](auto type) { run<typename decltype(type)::type>(in, out_file, argv + 4); });
  fclose(in);
  fclose(out_file);
  return 0;
}
