// Which queries and keys an LSA thread block covers, and where they live: the geometry that
// attention.cuh's and attention_mma.cuh's kernels run on (see attention.cuh). Device code and plain
// host set-up only, so the CPU emulation test builds it with g++.
#pragma once

#include "attention_mma.cuh"

namespace twins_kernels {

using attention::KeyGradRow;
using attention::KeyRow;
using attention::Row;

// The scalar kernels' block: a window and head, a thread a window slot (in whole warps).
inline int lsa_scalar_threads(int64_t ws) { return static_cast<int>((ws * ws + 31) / 32 * 32); }

// One block per (batch, window, head, tile of block_rows window slots): the block's queries (or, for a
// key block, its keys) are those slots; the keys a query sees (the queries a key is seen by) are all
// ws * ws slots of its window.
template <typename scalar_t>
struct LsaGeometry {
  const scalar_t* qkv;
  const scalar_t* bias;  // (3C,) contiguous
  int64_t stride_b, stride_n, stride_c;
  scalar_t* out;              // (B, N, C)
  float* lse;                 // (B, heads, N)
  float* delta;               // (B, heads, N)
  const scalar_t* grad_out;   // (B, N, C) contiguous
  scalar_t* grad_qkv;         // (B, N, 3C)
  float* pad_grad;            // (B * padded windows * heads, ws*ws, 2, head_dim): padded keys' dk, dv (zero mode)
  int height, width, chans, heads, head_dim, ws, windows_h, windows_w;
  int block_rows, slot_tiles;  // window slots a block covers; blocks a window and head
  bool mask_padding;
  bool delta_in_dq;  // the dq kernel computes delta (set_delta_source)

  // Sets the shape and the block size; the pointers are the caller's to fill.
  __host__ void set_shape(int64_t h, int64_t w, int64_t c, int64_t num_heads, int64_t window, int rows) {
    height = static_cast<int>(h);
    width = static_cast<int>(w);
    chans = static_cast<int>(c);
    heads = static_cast<int>(num_heads);
    head_dim = static_cast<int>(c / num_heads);
    ws = static_cast<int>(window);
    windows_h = static_cast<int>((h + window - 1) / window);
    windows_w = static_cast<int>((w + window - 1) / window);
    block_rows = rows;
    slot_tiles = (ws * ws + rows - 1) / rows;
  }
  // Where the backward's delta comes from (attention::dq_computes_delta): a query's keys are its window's
  // ws * ws slots, one tensor-core dq key tile for ws <= 8 at head_dim <= 64.
  __host__ void set_delta_source(bool tensor_cores) {
    delta_in_dq = attention::dq_computes_delta<scalar_t>(tensor_cores, ws * ws, head_dim);
  }
  // (window, head) pairs of a batch of `batch` images, and thread blocks for them
  __host__ int64_t window_heads(int64_t batch) const {
    return batch * windows_h * windows_w * heads;
  }
  __host__ int64_t blocks(int64_t batch) const { return window_heads(batch) * slot_tiles; }
  // The windows of an image that have padded slots: the last row of windows where ws does not divide
  // the height, the last column where it does not divide the width. Only their padded keys have a share
  // of the bias gradient to keep (pad_grad), a small part of the map's windows.
  __host__ __device__ int padded_windows() const {
    const bool rows = height % ws != 0, cols = width % ws != 0;
    return (rows ? windows_w : 0) + (cols ? windows_h - rows : 0);
  }
  __host__ int64_t padded_window_heads(int64_t batch) const { return batch * padded_windows() * heads; }

  struct Block {
    int64_t window_head, b;
    int h, y0, x0, start;  // start: the block's first slot
  };

  __device__ Block query_block(int64_t g) const {
    Block blk;
    blk.start = static_cast<int>(g % slot_tiles) * block_rows;
    blk.window_head = g / slot_tiles;
    blk.h = static_cast<int>(blk.window_head % heads);
    int64_t rest = blk.window_head / heads;
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
  __device__ bool query_at(const Block& blk, int slot, Row<scalar_t>& row) const {
    int64_t token;
    if (!inside(blk, slot, token)) return false;
    row.ptr = qkv + blk.b * stride_b + token * stride_n + static_cast<int64_t>(blk.h) * head_dim * stride_c;
    row.stride = stride_c;
    row.token = token;
    return true;
  }
  __device__ bool key_at(const Block& blk, int slot, KeyRow<scalar_t>& key) const {
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
  __device__ bool query(const Block& blk, int i, Row<scalar_t>& row) const {
    return i < block_rows && query_at(blk, blk.start + i, row);
  }
  __device__ bool key(const Block& blk, int slot, KeyRow<scalar_t>& key) const { return key_at(blk, slot, key); }
  __device__ bool key_of(const Block& blk, int i, KeyRow<scalar_t>& key) const {
    return i < block_rows && key_at(blk, blk.start + i, key);
  }
  __device__ bool query_of(const Block& blk, int slot, Row<scalar_t>& row) const { return query_at(blk, slot, row); }

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
  __device__ scalar_t* dq_row(const Block& blk, const Row<scalar_t>& row) const {
    return grad_qkv + (blk.b * tokens() + row.token) * 3 * chans + blk.h * head_dim;
  }
  __device__ KeyGradRow<scalar_t> key_grad(const Block& blk, int i, const KeyRow<scalar_t>& key) const {
    KeyGradRow<scalar_t> grad;
    if (key.token >= 0) {
      grad.dk = grad_qkv + (blk.b * tokens() + key.token) * 3 * chans + chans + blk.h * head_dim;
      grad.dv = grad.dk + chans;
    } else {
      const int64_t window_head = (blk.b * padded_windows() + padded_window(blk)) * heads + blk.h;
      grad.partial_dk = pad_grad + (window_head * ws * ws + blk.start + i) * 2 * head_dim;
      grad.partial_dv = grad.partial_dk + head_dim;
    }
    return grad;
  }
  // A window's index among its image's padded windows (the last row's first, then the rest of the last
  // column's); only for a window with padded slots.
  __device__ int padded_window(const Block& blk) const {
    const int wy = blk.y0 / ws, wx = blk.x0 / ws;
    const bool rows = height % ws != 0;
    if (rows && wy == windows_h - 1) return wx;
    return (rows ? windows_w : 0) + wy;
  }
};

}  // namespace twins_kernels
