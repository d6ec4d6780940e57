// Which queries and keys an LSA thread block covers, and where they live: the geometry that
// attention.cuh's kernels run on (see there). Device code only, so the CPU emulation test can build it.
#pragma once

#include "attention.cuh"

namespace twins_kernels {

using attention::KeyRow;
using attention::Row;

// One block per (batch, window, head); one thread per window slot, for queries and keys alike.
template <typename scalar_t>
struct LsaGeometry {
  const scalar_t* qkv;
  const scalar_t* bias;  // (3C,) contiguous
  int64_t stride_b, stride_n, stride_c;
  scalar_t* out;              // (B, N, C)
  float* lse;                 // (B, heads, N)
  const float* delta;         // (B, heads, N)
  const scalar_t* grad_out;   // (B, N, C) contiguous
  scalar_t* grad_qkv;         // (B, N, 3C)
  float* pad_grad;            // (blocks, ws*ws, 2, head_dim): padded keys' dk, dv (zero mode)
  int height, width, chans, heads, head_dim, ws, windows_h, windows_w;
  bool mask_padding;

  struct Block {
    int64_t index, b;
    int h, y0, x0;
  };

  __device__ Block query_block(int64_t g) const {
    Block blk;
    blk.index = g;
    blk.h = static_cast<int>(g % heads);
    int64_t rest = g / heads;
    blk.x0 = static_cast<int>(rest % windows_w) * ws;
    rest /= windows_w;
    blk.y0 = static_cast<int>(rest % windows_h) * ws;
    blk.b = rest / windows_h;
    return blk;
  }
  __device__ Block key_block(int64_t g) const { return query_block(g); }
  __device__ int num_keys(const Block&) const { return ws * ws; }
  __device__ int num_queries(const Block&) const { return ws * ws; }
  __device__ int64_t tokens() const { return static_cast<int64_t>(height) * width; }

  __device__ bool inside(const Block& blk, int slot, int64_t& token) const {
    const int y = blk.y0 + slot / ws, x = blk.x0 + slot % ws;
    if (slot >= ws * ws || y >= height || x >= width) return false;
    token = static_cast<int64_t>(y) * width + x;
    return true;
  }
  __device__ bool query(const Block& blk, int slot, Row<scalar_t>& row) const {
    int64_t token;
    if (!inside(blk, slot, token)) return false;
    row.ptr = qkv + blk.b * stride_b + token * stride_n + static_cast<int64_t>(blk.h) * head_dim * stride_c;
    row.stride = stride_c;
    row.token = token;
    return true;
  }
  __device__ bool query_of(const Block& blk, int slot, Row<scalar_t>& row) const { return query(blk, slot, row); }
  __device__ bool key(const Block& blk, int slot, KeyRow<scalar_t>& key) const {
    if (slot >= ws * ws) return false;
    const int64_t k_channel = chans + blk.h * head_dim, v_channel = 2 * chans + blk.h * head_dim;
    int64_t token;
    if (inside(blk, slot, token)) {
      const scalar_t* base = qkv + blk.b * stride_b + token * stride_n;
      key.k = base + k_channel * stride_c;
      key.v = base + v_channel * stride_c;
      key.stride = stride_c;
      key.token = token;
      return true;
    }
    if (mask_padding) return false;
    key.k = bias + k_channel;
    key.v = bias + v_channel;
    key.stride = 1;
    key.token = -1;
    return true;
  }
  __device__ bool key_of(const Block& blk, int slot, KeyRow<scalar_t>& k) const { return key(blk, slot, k); }

  __device__ int64_t token_offset(const Block& blk, const Row<scalar_t>& row) const {
    return (blk.b * tokens() + row.token) * chans + blk.h * head_dim;
  }
  __device__ scalar_t* out_row(const Block& blk, const Row<scalar_t>& row) const {
    return out + token_offset(blk, row);
  }
  __device__ const scalar_t* grad_out_row(const Block& blk, const Row<scalar_t>& row) const {
    return grad_out + token_offset(blk, row);
  }
  __device__ int64_t lse_index(const Block& blk, const Row<scalar_t>& row) const {
    return (blk.b * heads + blk.h) * tokens() + row.token;
  }

  template <int kMax>
  __device__ void store_dq(const Block& blk, const Row<scalar_t>& row, const float (&dq)[kMax]) const {
    scalar_t* dst = grad_qkv + (blk.b * tokens() + row.token) * 3 * chans + blk.h * head_dim;
#pragma unroll
    for (int d = 0; d < kMax; ++d) {
      if (d < head_dim) dst[d] = static_cast<scalar_t>(dq[d]);
    }
  }
  template <int kMax>
  __device__ void store_dkdv(const Block& blk, int slot, const KeyRow<scalar_t>& key, const float (&dk)[kMax],
                             const float (&dv)[kMax]) const {
    if (key.token >= 0) {
      scalar_t* dst = grad_qkv + (blk.b * tokens() + key.token) * 3 * chans + chans + blk.h * head_dim;
#pragma unroll
      for (int d = 0; d < kMax; ++d) {
        if (d < head_dim) {
          dst[d] = static_cast<scalar_t>(dk[d]);
          dst[d + chans] = static_cast<scalar_t>(dv[d]);
        }
      }
      return;
    }
    float* dst = pad_grad + (blk.index * ws * ws + slot) * 2 * head_dim;
#pragma unroll
    for (int d = 0; d < kMax; ++d) {
      if (d < head_dim) {
        dst[d] = dk[d];
        dst[d + head_dim] = dv[d];
      }
    }
  }
};

}  // namespace twins_kernels
