// PEG's device kernels: the depthwise 3x3 conv on (B, N, C) tokens and the weight/bias gradient
// reduction. Device code and plain host helpers only, so the CPU emulation test builds it with g++.
#pragma once

#include "vector_access.cuh"

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

// Channels a thread of the conv handles: 16 bytes of them where every token's channels are contiguous
// and 16-byte aligned (16-byte loads for each tap's values and weights, a 16-byte store), else one.
template <typename scalar_t, typename acc_t>
__host__ int conv_vector_width(const scalar_t* x, const acc_t* w9t, const acc_t* bias, int chans, TokenStrides s) {
  constexpr int kVector = 16 / sizeof(scalar_t);
  const bool vector = s.channel == 1 && chans % kVector == 0 && s.token * sizeof(scalar_t) % 16 == 0 &&
                      s.batch * sizeof(scalar_t) % 16 == 0 && aligned_16(x) && aligned_16(w9t) &&
                      (bias == nullptr || aligned_16(bias));
  return vector ? kVector : 1;
}

// The conv's grid is (B * H, conv_blocks_per_row): blockIdx.x a map row, so that index has 2^31 of room;
// blockIdx.y covers the row's W * C elements, vec a thread, and at most max_blocks of them (grid.y's
// limit, 65535: a long row of many channels, W * C / vec past 16.7M elements, loops over its blocks).
constexpr int64_t kMaxGridY = 65535;
__host__ inline unsigned conv_blocks_per_row(int width, int chans, int vec, int64_t max_blocks = kMaxGridY) {
  const int64_t blocks = (static_cast<int64_t>(width) * chans / vec + kConvThreads - 1) / kConvThreads;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

// out = x + bias + conv3x3(x), kVec channels of one token a thread (chans % kVec == 0); w9t holds the
// taps as (9, C), a tap's weights for neighbouring channels side by side.
template <typename scalar_t, typename acc_t, int kVec, bool kFlip, bool kHasBias>
__global__ void peg_conv3x3_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w9t,
                                   const acc_t* __restrict__ bias, scalar_t* __restrict__ out, int height,
                                   int width, int chans, TokenStrides s) {
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / height);
  const int h = static_cast<int>(row % height);
  const int64_t row_elements = static_cast<int64_t>(width) * chans;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x * kVec;
  for (int64_t element = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
       element < row_elements; element += step) {
    const int row_element = static_cast<int>(element);  // W * C < 2^31 (peg.cu): 32-bit division
    const int w = row_element / chans;
    const int c = row_element % chans;
    const scalar_t* x_bc = x + b * s.batch + c * s.channel;
    auto token = [&](int hh, int ww) { return x_bc + (static_cast<int64_t>(hh) * width + ww) * s.token; };

    alignas(16) scalar_t values[kVec];
    alignas(16) acc_t weights[kVec];
    acc_t acc[kVec];
    copy_values<kVec>(values, token(h, w));
    if constexpr (kHasBias) copy_values<kVec>(weights, bias + c);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = static_cast<acc_t>(values[e]) + (kHasBias ? weights[e] : acc_t(0));
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const int hh = h + i - 1;
      if (hh < 0 || hh >= height) continue;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        const int ww = w + j - 1;
        if (ww < 0 || ww >= width) continue;
        const int tap = kFlip ? (kTaps - 1) - (i * 3 + j) : i * 3 + j;
        copy_values<kVec>(values, token(hh, ww));
        copy_values<kVec>(weights, w9t + tap * chans + c);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += weights[e] * static_cast<acc_t>(values[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) values[e] = static_cast<scalar_t>(acc[e]);
    copy_values<kVec>(out + row * row_elements + element, values);
  }
}

// Calls launch(kernel) with the conv kernel for vec (1, or the 16 bytes conv_vector_width may give).
template <typename scalar_t, typename acc_t, bool kFlip, bool kHasBias, typename Launch>
__host__ void with_conv_kernel(int vec, Launch launch) {
  if (vec == 1) {
    launch(peg_conv3x3_kernel<scalar_t, acc_t, 1, kFlip, kHasBias>);
  } else {
    launch(peg_conv3x3_kernel<scalar_t, acc_t, 16 / sizeof(scalar_t), kFlip, kHasBias>);
  }
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
    if (c < chans) partial[(static_cast<int64_t>(blockIdx.x) * kPartialSlots + k) * chans + c] = total;
  }
}

}  // namespace peg
}  // namespace twins_kernels
