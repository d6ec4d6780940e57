// Runs csrc/peg_kernels.cuh on the CPU under emulate.h, on fp32 inputs from a file, for
// tests/test_cuda_emulation.py.
//   peg_harness IN OUT B H W C      IN: x (B,N,C), weight (C,9), bias (C), grad_out (B,N,C)
//   OUT: out = x + bias + conv(x); grad_x = g + conv(g, flipped weight); sums (10, C) over the partials
#include "emulate.h"
#include "harness_io.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "peg_kernels.cuh"

using namespace twins_kernels::peg;

int main(int argc, char** argv) {
  FILE* in = fopen(argv[1], "rb");
  FILE* out_file = fopen(argv[2], "wb");
  const int batch = atoi(argv[3]), height = atoi(argv[4]), width = atoi(argv[5]), chans = atoi(argv[6]);
  const long elements = static_cast<long>(batch) * height * width * chans;
  const auto x = read_floats(in, elements);
  const auto weight = read_floats(in, static_cast<size_t>(chans) * kTaps);
  const auto bias = read_floats(in, chans);
  const auto grad = read_floats(in, elements);
  const TokenStrides strides{static_cast<int64_t>(height) * width * chans, chans, 1};

  std::vector<float> out(elements, NAN), grad_x(elements, NAN);
  const EmulatedDim3 grid{static_cast<unsigned>(batch * height),
                          static_cast<unsigned>((width * chans + kConvThreads - 1) / kConvThreads), 0};
  emulated_launch(grid, {kConvThreads, 1, 0}, [&] {
    peg_conv3x3_kernel<float, float, false, true>(x.data(), weight.data(), bias.data(), out.data(), height, width,
                                                  chans, strides);
  });
  emulated_launch(grid, {kConvThreads, 1, 0}, [&] {
    peg_conv3x3_kernel<float, float, true, false>(grad.data(), weight.data(), nullptr, grad_x.data(), height, width,
                                                  chans, strides);
  });

  const int64_t rows = static_cast<int64_t>(batch) * height;
  const int64_t rows_per_program = (rows + 511) / 512;  // peg.cu's partition
  const int64_t programs = (rows + rows_per_program - 1) / rows_per_program;
  std::vector<float> partial(programs * kPartialSlots * chans, NAN);
  emulated_launch({static_cast<unsigned>(programs), static_cast<unsigned>((chans + kGradChannels - 1) / kGradChannels), 0},
                  {kGradChannels, kGradLanes, 0}, [&] {
                    peg_weight_grad_kernel<float, float>(grad.data(), x.data(), partial.data(), height, width, chans,
                                                         rows, rows_per_program, strides, strides);
                  });
  std::vector<float> sums(kPartialSlots * chans, 0.f);
  for (int64_t p = 0; p < programs; ++p)
    for (int64_t i = 0; i < kPartialSlots * chans; ++i) sums[i] += partial[p * kPartialSlots * chans + i];

  for (const auto* v : {&out, &grad_x, &sums}) write_floats(out_file, *v);
  fclose(in);
  fclose(out_file);
  return 0;
}
