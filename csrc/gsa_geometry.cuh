// Which queries and keys a GSA thread block covers, and where they live: the geometry that
// attention.cuh's and attention_mma.cuh's kernels run on (see attention.cuh). Device code and plain
// host set-up only, so the CPU emulation test builds it with g++.
#pragma once

#include "attention_mma.cuh"

namespace twins_kernels {

using attention::KeyGradRow;
using attention::KeyRow;
using attention::Row;

constexpr int kGsaScalarRows = 128;  // queries (keys) a block of the scalar kernels covers, a thread each

template <typename scalar_t>
struct GsaGeometry {
  const scalar_t* q;
  int64_t q_stride_b, q_stride_n, q_stride_c;
  const scalar_t* kv;
  int64_t kv_stride_b, kv_stride_m, kv_stride_c;
  scalar_t* out;             // (B, N, C)
  float* lse;                // (B, heads, N)
  float* delta;              // (B, heads, N)
  bool delta_in_dq;          // the dq kernel computes delta (set_delta_source)
  const scalar_t* grad_out;  // (B, N, C) contiguous
  scalar_t* grad_q;          // (B, N, C)
  scalar_t* grad_kv;         // (B, M, 2C), or, when a key block's queries are split:
  float* grad_kv_partial;    // (query_splits, B, M, 2C) fp32, each split's share, summed on the host
  int64_t tokens, keys;
  int chans, heads, head_dim;
  int block_rows;                 // queries a query block covers, keys a key block covers
  int64_t query_tiles, key_tiles;  // blocks a batch element and head
  int query_splits;               // key blocks a key tile: each loops over queries_per_split queries
  int64_t queries_per_split, partial_stride;

  // Sets the shape and the block size; the pointers and strides are the caller's to fill.
  __host__ void set_shape(int64_t n, int64_t m, int64_t c, int64_t num_heads, int rows) {
    tokens = n;
    keys = m;
    chans = static_cast<int>(c);
    heads = static_cast<int>(num_heads);
    head_dim = static_cast<int>(c / num_heads);
    block_rows = rows;
    query_tiles = (n + rows - 1) / rows;
    key_tiles = (m + rows - 1) / rows;
    query_splits = 1;
    queries_per_split = n;
  }
  // Where the backward's delta comes from (attention::dq_computes_delta): a query sees all M keys, one
  // tensor-core dq key tile up to 64 at head_dim <= 64.
  __host__ void set_delta_source(bool tensor_cores) {
    delta_in_dq = attention::dq_computes_delta<scalar_t>(tensor_cores, keys, head_dim);
  }
  // Splits each key block's loop over the queries into about `splits` parts, of a multiple of
  // `granularity` queries (the last may be shorter); dk, dv then go to grad_kv_partial.
  __host__ void split_queries(int64_t batch, int64_t splits, int granularity) {
    const int64_t per_split = (tokens + splits - 1) / splits;
    queries_per_split = (per_split + granularity - 1) / granularity * granularity;
    query_splits = static_cast<int>((tokens + queries_per_split - 1) / queries_per_split);
    partial_stride = batch * keys * 2 * chans;
  }
  __host__ int64_t query_blocks(int64_t batch) const { return batch * heads * query_tiles; }
  __host__ int64_t key_blocks(int64_t batch) const { return batch * heads * key_tiles * query_splits; }

  struct Block {
    int64_t b, start;       // start: the block's first query (query blocks) or key (key blocks)
    int64_t query_start;    // key blocks: the first query of their split
    int h, split;
  };

  __device__ Block tile_block(int64_t g, int64_t tiles) const {
    Block blk;
    blk.start = (g % tiles) * block_rows;
    const int64_t bh = g / tiles;
    blk.h = static_cast<int>(bh % heads);
    blk.b = bh / heads;
    blk.split = 0;
    blk.query_start = 0;
    return blk;
  }
  __device__ Block query_block(int64_t g) const { return tile_block(g, query_tiles); }
  __device__ Block key_block(int64_t g) const {
    Block blk = tile_block(g / query_splits, key_tiles);
    blk.split = static_cast<int>(g % query_splits);
    blk.query_start = blk.split * queries_per_split;
    return blk;
  }
  __device__ int num_keys(const Block&) const { return static_cast<int>(keys); }
  __device__ int num_queries(const Block& blk) const {
    return static_cast<int>(min(queries_per_split, tokens - blk.query_start));
  }

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
  __device__ bool query(const Block& blk, int i, Row<scalar_t>& row) const {
    return i < block_rows && query_at(blk, blk.start + i, row);
  }
  __device__ bool key(const Block& blk, int j, KeyRow<scalar_t>& key) const { return key_at(blk, j, key); }
  __device__ bool key_of(const Block& blk, int i, KeyRow<scalar_t>& key) const {
    return i < block_rows && key_at(blk, blk.start + i, key);
  }
  __device__ bool query_of(const Block& blk, int j, Row<scalar_t>& row) const {
    return query_at(blk, blk.query_start + j, row);
  }

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

  __device__ scalar_t* dq_row(const Block& blk, const Row<scalar_t>& row) const {
    return grad_q + token_offset(blk, row);
  }
  __device__ KeyGradRow<scalar_t> key_grad(const Block& blk, int, const KeyRow<scalar_t>& key) const {
    KeyGradRow<scalar_t> grad;
    const int64_t offset = (blk.b * keys + key.token) * 2 * chans + blk.h * head_dim;
    if (query_splits > 1) {
      grad.partial_dk = grad_kv_partial + blk.split * partial_stride + offset;
      grad.partial_dv = grad.partial_dk + chans;
    } else {
      grad.dk = grad_kv + offset;
      grad.dv = grad.dk + chans;
    }
    return grad;
  }
};

}  // namespace twins_kernels
