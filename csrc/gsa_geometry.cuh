// Which queries and keys a GSA thread block covers, and where they live: the geometry that
// attention.cuh's kernels run on (see there). Device code only, so the CPU emulation test can build it.
#pragma once

#include "attention.cuh"

namespace twins_kernels {

using attention::KeyRow;
using attention::Row;

constexpr int kRowsPerBlock = 128;  // queries per query block, keys per key block

template <typename scalar_t>
struct GsaGeometry {
  const scalar_t* q;
  int64_t q_stride_b, q_stride_n, q_stride_c;
  const scalar_t* kv;
  int64_t kv_stride_b, kv_stride_m, kv_stride_c;
  scalar_t* out;             // (B, N, C)
  float* lse;                // (B, heads, N)
  const float* delta;        // (B, heads, N)
  const scalar_t* grad_out;  // (B, N, C) contiguous
  scalar_t* grad_q;          // (B, N, C)
  scalar_t* grad_kv;         // (B, M, 2C)
  int64_t tokens, keys;
  int chans, heads, head_dim;
  int64_t query_tiles, key_tiles;

  struct Block {
    int64_t b, start;
    int h;
  };

  __device__ Block tile_block(int64_t g, int64_t tiles) const {
    Block blk;
    blk.start = (g % tiles) * kRowsPerBlock;
    const int64_t bh = g / tiles;
    blk.h = static_cast<int>(bh % heads);
    blk.b = bh / heads;
    return blk;
  }
  __device__ Block query_block(int64_t g) const { return tile_block(g, query_tiles); }
  __device__ Block key_block(int64_t g) const { return tile_block(g, key_tiles); }
  __device__ int num_keys(const Block&) const { return static_cast<int>(keys); }
  __device__ int num_queries(const Block&) const { return static_cast<int>(tokens); }

  __device__ bool query_at(const Block& blk, int64_t token, Row<scalar_t>& row) const {
    if (token >= tokens) return false;
    row.ptr = q + blk.b * q_stride_b + token * q_stride_n + static_cast<int64_t>(blk.h) * head_dim * q_stride_c;
    row.stride = q_stride_c;
    row.token = token;
    return true;
  }
  __device__ bool key_at(const Block& blk, int64_t index, KeyRow<scalar_t>& key) const {
    if (index >= keys) return false;
    const scalar_t* base = kv + blk.b * kv_stride_b + index * kv_stride_m;
    key.k = base + static_cast<int64_t>(blk.h) * head_dim * kv_stride_c;
    key.v = base + static_cast<int64_t>(chans + blk.h * head_dim) * kv_stride_c;
    key.stride = kv_stride_c;
    key.token = index;
    return true;
  }
  __device__ bool query(const Block& blk, int slot, Row<scalar_t>& row) const {
    return query_at(blk, blk.start + slot, row);
  }
  __device__ bool key(const Block& blk, int j, KeyRow<scalar_t>& key) const { return key_at(blk, j, key); }
  __device__ bool key_of(const Block& blk, int slot, KeyRow<scalar_t>& key) const {
    return key_at(blk, blk.start + slot, key);
  }
  __device__ bool query_of(const Block& blk, int i, Row<scalar_t>& row) const { return query_at(blk, i, row); }

  __device__ int64_t token_offset(const Block& blk, const Row<scalar_t>& row) const {
    return (blk.b * tokens + row.token) * chans + blk.h * head_dim;
  }
  __device__ scalar_t* out_row(const Block& blk, const Row<scalar_t>& row) const {
    return out + token_offset(blk, row);
  }
  __device__ const scalar_t* grad_out_row(const Block& blk, const Row<scalar_t>& row) const {
    return grad_out + token_offset(blk, row);
  }
  __device__ int64_t lse_index(const Block& blk, const Row<scalar_t>& row) const {
    return (blk.b * heads + blk.h) * tokens + row.token;
  }

  template <int kMax>
  __device__ void store_dq(const Block& blk, const Row<scalar_t>& row, const float (&dq)[kMax]) const {
    scalar_t* dst = grad_q + token_offset(blk, row);
#pragma unroll
    for (int d = 0; d < kMax; ++d) {
      if (d < head_dim) dst[d] = static_cast<scalar_t>(dq[d]);
    }
  }
  template <int kMax>
  __device__ void store_dkdv(const Block& blk, int, const KeyRow<scalar_t>& key, const float (&dk)[kMax],
                             const float (&dv)[kMax]) const {
    scalar_t* dst = grad_kv + (blk.b * keys + key.token) * 2 * chans + blk.h * head_dim;
#pragma unroll
    for (int d = 0; d < kMax; ++d) {
      if (d < head_dim) {
        dst[d] = static_cast<scalar_t>(dk[d]);
        dst[d + chans] = static_cast<scalar_t>(dv[d]);
      }
    }
  }
};

}  // namespace twins_kernels
