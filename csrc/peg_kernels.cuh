// PEG's device kernels: the depthwise 3x3 conv on (B, N, C) tokens and the weight/bias gradient
// reduction. Device code only, so the CPU emulation test can build it.
#pragma once

#include <cstdint>

namespace twins_kernels {
namespace peg {

constexpr int kTaps = 9;
constexpr int kPartialSlots = kTaps + 1;
constexpr int kConvThreads = 256;
constexpr int kGradChannels = 32;  // threadIdx.x: adjacent channels, so loads coalesce
constexpr int kGradLanes = 8;      // threadIdx.y: tokens of a row, strided

struct TokenStrides {
  int64_t batch, token, channel;
};

// One thread per (token, channel) of one map row; blockIdx.x is the row (b * H + h), so the row index
// has 2^31 of room while blockIdx.y covers the W * C elements of the row.
template <typename scalar_t, typename acc_t, bool kFlip, bool kHasBias>
__global__ void peg_conv3x3_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w9,
                                   const acc_t* __restrict__ bias, scalar_t* __restrict__ out, int height,
                                   int width, int chans, TokenStrides s) {
  const int64_t row = blockIdx.x;
  const int element = blockIdx.y * blockDim.x + threadIdx.x;
  if (element >= width * chans) return;
  const int b = static_cast<int>(row / height);
  const int h = static_cast<int>(row % height);
  const int w = element / chans;
  const int c = element % chans;
  const scalar_t* x_bc = x + b * s.batch + c * s.channel;

  acc_t acc = static_cast<acc_t>(x_bc[(static_cast<int64_t>(h) * width + w) * s.token]);
  if (kHasBias) acc += bias[c];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const int hh = h + i - 1;
    if (hh < 0 || hh >= height) continue;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int ww = w + j - 1;
      if (ww < 0 || ww >= width) continue;
      const int tap = kFlip ? (kTaps - 1) - (i * 3 + j) : i * 3 + j;
      acc += w9[c * kTaps + tap] * static_cast<acc_t>(x_bc[(static_cast<int64_t>(hh) * width + ww) * s.token]);
    }
  }
  out[row * width * chans + element] = static_cast<scalar_t>(acc);
}

// partial[p, slot, c]: block p's sums over its rows of g * shifted x (9 slots) and of g (slot 9).
template <typename scalar_t, typename acc_t>
__global__ void peg_weight_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                       acc_t* __restrict__ partial, int height, int width, int chans, int64_t rows,
                                       int64_t rows_per_program, TokenStrides sg, TokenStrides sx) {
  __shared__ acc_t lane_sums[kPartialSlots][kGradLanes][kGradChannels];
  const int c = blockIdx.y * kGradChannels + threadIdx.x;
  acc_t acc[kPartialSlots];
#pragma unroll
  for (int k = 0; k < kPartialSlots; ++k) acc[k] = acc_t(0);

  if (c < chans) {
    const int64_t row_start = blockIdx.x * rows_per_program;
    const int64_t row_end = min(row_start + rows_per_program, rows);
    for (int64_t row = row_start; row < row_end; ++row) {
      const int64_t b = row / height;
      const int h = static_cast<int>(row % height);
      const scalar_t* g_bc = g + b * sg.batch + c * sg.channel;
      const scalar_t* x_bc = x + b * sx.batch + c * sx.channel;
      for (int w = threadIdx.y; w < width; w += kGradLanes) {
        const acc_t gv = static_cast<acc_t>(g_bc[(static_cast<int64_t>(h) * width + w) * sg.token]);
        acc[kTaps] += gv;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const int hh = h + i - 1;
          if (hh < 0 || hh >= height) continue;
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int ww = w + j - 1;
            if (ww < 0 || ww >= width) continue;
            acc[i * 3 + j] += gv * static_cast<acc_t>(x_bc[(static_cast<int64_t>(hh) * width + ww) * sx.token]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPartialSlots; ++k) lane_sums[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  // a fixed summation order over the lanes: bitwise reproducible
  for (int k = threadIdx.y; k < kPartialSlots; k += kGradLanes) {
    acc_t total = acc_t(0);
    for (int lane = 0; lane < kGradLanes; ++lane) total += lane_sums[k][lane][threadIdx.x];
    if (c < chans) partial[(blockIdx.x * kPartialSlots + k) * chans + c] = total;
  }
}

}  // namespace peg
}  // namespace twins_kernels
