// Attention kernels shared by LSA (windows) and GSA (global, sub-sampled keys): forward with an
// online softmax, and a backward that recomputes the probabilities from the saved log-sum-exp.
// These are the scalar kernels (fp32 math on the FMA units), which the fp32 path runs: its dots must be
// exact fp32, not tf32. fp16 and bf16 on code compiled for compute capability 8.0+ run attention_mma.cuh's
// tensor-core kernels on the same geometries.
//
// A Geometry says which queries and keys a thread block works on and where they live in memory;
// the kernels do the math. Two block kinds, each of up to block_rows rows:
//   query blocks (forward, dq): one thread per query of the block, looping over the block's keys;
//   key blocks (dk, dv):       one thread per key of the block, looping over the block's queries.
// Keys and queries are staged through shared memory in fp32 tiles; each thread keeps its own
// query (or key) row and accumulator in registers. Every sum has a fixed order: deterministic.
//
// A Geometry provides, for block index g:
//   QueryBlock query_block(g) / KeyBlock key_block(g)       what the block covers
//   int num_keys(QueryBlock) / int num_queries(KeyBlock)    how many keys (queries) it loops over
//   bool query(QueryBlock, i, Row&) / bool key(QueryBlock, j, KeyRow&)  the block's i-th query, its j-th
//                                                                       key (false: none, or excluded)
//   bool key_of(KeyBlock, i, KeyRow&) / bool query_of(KeyBlock, j, Row&) the same for key blocks
//   out_row / grad_out_row / dq_row(block, query), lse_index(block, query)  where a query's results go
//   KeyGradRow<scalar_t> key_grad(KeyBlock, i, key)                        where a key's dk, dv go
// and the fields head_dim, lse (written by the forward), delta (read by the backward) and delta_in_dq
// (true: the dq kernel computes delta and writes it for dk/dv; see attention_mma.cuh's dq_computes_delta).
#pragma once

#ifdef __CUDACC__
#include <cuda.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <type_traits>

#include "warp_mma.cuh"

namespace twins_kernels {
namespace attention {

constexpr int kTile = 32;  // keys (or queries) staged in shared memory per step

template <typename scalar_t>
struct Row {
  const scalar_t* ptr = nullptr;  // element d at ptr[d * stride]
  int64_t stride = 1;
  int64_t token = -1;  // the query's token (for out, lse, dO), or the key's token (-1: padding)
};

template <typename scalar_t>
struct KeyRow {
  const scalar_t* k = nullptr;
  const scalar_t* v = nullptr;
  int64_t stride = 1;
  int64_t token = -1;  // -1: a padded key standing in with the bias
};

// Where a key's gradients go: rows of the gradient tensor, or fp32 rows of a share the host sums (a
// padded key's share of the qkv bias in LSA's zero mode; a query split's share in GSA).
template <typename scalar_t>
struct KeyGradRow {
  scalar_t* dk = nullptr;  // element d at dk[d], dv[d]; null: the partial rows instead
  scalar_t* dv = nullptr;
  float* partial_dk = nullptr;
  float* partial_dv = nullptr;

  __device__ __forceinline__ void store(int d, float dk_value, float dv_value) const {
    if (dk != nullptr) {
      dk[d] = static_cast<scalar_t>(dk_value);
      dv[d] = static_cast<scalar_t>(dv_value);
    } else {
      partial_dk[d] = dk_value;
      partial_dv[d] = dv_value;
    }
  }
};

template <typename scalar_t>
__device__ __forceinline__ float load(const scalar_t* p) {
  return static_cast<float>(p[0]);
}

// Stage a tile of kTile rows x kMaxHeadDim columns into shared memory: fill(row, d) for every element,
// zero past head_dim. The dot products run over all kMaxHeadDim columns, and a column left unwritten
// holds what an earlier block left in shared memory: 0 * Inf or 0 * NaN there is NaN.
template <int kMaxHeadDim, typename Fill>
__device__ __forceinline__ void stage_tile(Fill fill) {
  for (int idx = threadIdx.x; idx < kTile * kMaxHeadDim; idx += blockDim.x) fill(idx / kMaxHeadDim, idx % kMaxHeadDim);
}

// Keys j0 .. j0 + kTile of a query block into shared memory (zeros and k_valid = false past the end
// or where the geometry excludes a key); a barrier on each side.
template <typename scalar_t, int kMaxHeadDim, typename Geometry, typename Block>
__device__ __forceinline__ void stage_keys(const Geometry& geo, const Block& block, int j0, int keys,
                                           float (&k_tile)[kTile][kMaxHeadDim], float (&v_tile)[kTile][kMaxHeadDim],
                                           bool (&k_valid)[kTile]) {
  __syncthreads();
  stage_tile<kMaxHeadDim>([&](int j, int d) {
    KeyRow<scalar_t> key;
    const bool valid = j0 + j < keys && geo.key(block, j0 + j, key);
    const bool column = valid && d < geo.head_dim;
    k_tile[j][d] = column ? load(key.k + d * key.stride) : 0.f;
    v_tile[j][d] = column ? load(key.v + d * key.stride) : 0.f;
    if (d == 0) k_valid[j] = valid;
  });
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// the backward's delta: D_i = dO_i . O_i per token and head, in fp32, which dq and dk/dv read
// ---------------------------------------------------------------------------------------------
constexpr int kDeltaWarps = 4;  // tokens of a block, a warp each

// grad_out and out (rows = B * N tokens of heads * head_dim values, contiguous) to delta (B, heads, N):
// a warp per token, its lanes over a head's columns (a head's values read together), the lanes' sums
// added in a fixed order (deterministic). Both families' backward reads it.
template <typename scalar_t>
__global__ void __launch_bounds__(kDeltaWarps * warp::kSize)
    attention_delta_kernel(const scalar_t* grad_out, const scalar_t* out, float* delta, int64_t rows,
                           int64_t tokens, int heads, int head_dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / warp::kSize;
  if (row >= rows) return;  // the warp as a whole: its shuffles below have every lane
  const int lane = threadIdx.x % warp::kSize;
  const int64_t chans = static_cast<int64_t>(heads) * head_dim, batch = row / tokens, token = row % tokens;
  for (int h = 0; h < heads; ++h) {
    float sum = 0.f;
    for (int d = h * head_dim + lane; d < (h + 1) * head_dim; d += warp::kSize) {
      sum += load(grad_out + row * chans + d) * load(out + row * chans + d);
    }
    sum = warp::sum(sum);
    if (lane == 0) delta[(batch * heads + h) * tokens + token] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// forward: out = softmax(q k^T * scale) v, lse = log-sum-exp of the scaled logits (natural log)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kMaxHeadDim, typename Geometry>
__global__ void attention_forward_kernel(Geometry geo, float scale) {
  __shared__ float k_tile[kTile][kMaxHeadDim];
  __shared__ float v_tile[kTile][kMaxHeadDim];
  __shared__ bool k_valid[kTile];
  const int head_dim = geo.head_dim;
  const auto block = geo.query_block(blockIdx.x);
  Row<scalar_t> query;
  const bool active = geo.query(block, threadIdx.x, query);

  float q[kMaxHeadDim];
  float acc[kMaxHeadDim];
#pragma unroll
  for (int d = 0; d < kMaxHeadDim; ++d) {
    q[d] = (active && d < head_dim) ? load(query.ptr + d * query.stride) * scale : 0.f;
    acc[d] = 0.f;
  }
  float running_max = -INFINITY, denom = 0.f;

  const int keys = geo.num_keys(block);
  for (int j0 = 0; j0 < keys; j0 += kTile) {
    stage_keys<scalar_t>(geo, block, j0, keys, k_tile, v_tile, k_valid);
    if (!active) continue;
    for (int j = 0; j < kTile; ++j) {
      if (!k_valid[j]) continue;
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < kMaxHeadDim; ++d) s += q[d] * k_tile[j][d];
      const float new_max = fmaxf(running_max, s);
      const float correction = expf(running_max - new_max);
      const float p = expf(s - new_max);
      denom = denom * correction + p;
#pragma unroll
      for (int d = 0; d < kMaxHeadDim; ++d) acc[d] = acc[d] * correction + p * v_tile[j][d];
      running_max = new_max;
    }
  }
  if (!active) return;
  const float inv = 1.f / denom;
  scalar_t* out = geo.out_row(block, query);
#pragma unroll
  for (int d = 0; d < kMaxHeadDim; ++d) {
    if (d < head_dim) out[d] = static_cast<scalar_t>(acc[d] * inv);
  }
  geo.lse[geo.lse_index(block, query)] = running_max + logf(denom);
}

// sum += value, with the rounding error carried in `error` (Kahan): a sum of many near-equal terms in fp32
// without the error growing with their count. Kept exact under nvcc's default flags (no fast-math).
__device__ __forceinline__ void kahan_add(float& sum, float& error, float value) {
  const float corrected = value - error;
  const float next = sum + corrected;
  error = (next - sum) - corrected;
  sum = next;
}

// ---------------------------------------------------------------------------------------------
// dq = scale * sum_j P_ij (dP_ij - D_i) k_j, with P_ij = exp(s_ij - lse_i), dP_ij = dO_i . v_j and
// D_i = sum_j P_ij dP_ij / sum_j P_ij, computed here in a first pass over the keys and written for
// dk/dv (this kernel always computes it: dq_computes_delta is true for every geometry the scalar kernels
// serve)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kMaxHeadDim, typename Geometry>
__global__ void attention_dq_kernel(Geometry geo, float scale) {
  __shared__ float k_tile[kTile][kMaxHeadDim];
  __shared__ float v_tile[kTile][kMaxHeadDim];
  __shared__ bool k_valid[kTile];
  const int head_dim = geo.head_dim;
  const auto block = geo.query_block(blockIdx.x);
  Row<scalar_t> query;
  const bool active = geo.query(block, threadIdx.x, query);

  float q[kMaxHeadDim], grad_o[kMaxHeadDim], dq[kMaxHeadDim];
  float lse = 0.f, delta = 0.f;
  if (active) {
    const scalar_t* g = geo.grad_out_row(block, query);
    lse = geo.lse[geo.lse_index(block, query)];
#pragma unroll
    for (int d = 0; d < kMaxHeadDim; ++d) {
      q[d] = d < head_dim ? load(query.ptr + d * query.stride) * scale : 0.f;
      grad_o[d] = d < head_dim ? load(g + d) : 0.f;
      dq[d] = 0.f;
    }
  }

  // visit(j, P_ij, dP_ij) for each of the query's keys, staged a tile at a time (every thread stages)
  const int keys = geo.num_keys(block);
  auto for_each_key = [&](auto visit) {
    for (int j0 = 0; j0 < keys; j0 += kTile) {
      stage_keys<scalar_t>(geo, block, j0, keys, k_tile, v_tile, k_valid);
      if (!active) continue;
      for (int j = 0; j < kTile; ++j) {
        if (!k_valid[j]) continue;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int d = 0; d < kMaxHeadDim; ++d) {
          s += q[d] * k_tile[j][d];
          dp += grad_o[d] * v_tile[j][d];
        }
        visit(j, expf(s - lse), dp);
      }
    }
  };
  // D_i = sum_j P_ij dP_ij / sum_j P_ij from the very P_ij and dP_ij that dS_ij uses, in compensated sums:
  // where dP_ij - D_i cancels (keys nearly alike, such as timm's padded keys, all the qkv bias) the error
  // of D_i is amplified (by about 1 / the other keys' probability), and that of dO . O, or of a plain
  // sum over 64 near-equal terms, put fp32 dq up to 1.6e-4 off on a 2 x 1 map in an 8 x 8 window (NOTES 36)
  float weighted = 0.f, weighted_error = 0.f, total = 0.f, total_error = 0.f;
  for_each_key([&](int, float p, float dp) {
    kahan_add(weighted, weighted_error, p * dp);
    kahan_add(total, total_error, p);
  });
  if (active) {
    // the sums less their last compensation; total is 0 only for a query with no key (NaN goes through)
    total -= total_error;
    delta = total == 0.f ? 0.f : (weighted - weighted_error) / total;
    geo.delta[geo.lse_index(block, query)] = delta;
  }
  for_each_key([&](int j, float p, float dp) {
    const float ds = p * (dp - delta);
#pragma unroll
    for (int d = 0; d < kMaxHeadDim; ++d) dq[d] += ds * k_tile[j][d];
  });
  if (!active) return;
  scalar_t* dst = geo.dq_row(block, query);
#pragma unroll
  for (int d = 0; d < kMaxHeadDim; ++d) {
    if (d < head_dim) dst[d] = static_cast<scalar_t>(dq[d] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// dk_j = sum_i dS_ij * scale * q_i, dv_j = sum_i P_ij dO_i  (one thread per key)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kMaxHeadDim, typename Geometry>
__global__ void attention_dkdv_kernel(Geometry geo, float scale) {
  __shared__ float q_tile[kTile][kMaxHeadDim];  // scaled queries
  __shared__ float o_tile[kTile][kMaxHeadDim];  // their output gradients
  __shared__ float lse_tile[kTile];
  __shared__ float delta_tile[kTile];
  __shared__ bool q_valid[kTile];
  const int head_dim = geo.head_dim;
  const auto block = geo.key_block(blockIdx.x);
  KeyRow<scalar_t> key;
  const bool active = geo.key_of(block, threadIdx.x, key);

  float k[kMaxHeadDim], v[kMaxHeadDim], dk[kMaxHeadDim], dv[kMaxHeadDim];
#pragma unroll
  for (int d = 0; d < kMaxHeadDim; ++d) {
    k[d] = (active && d < head_dim) ? load(key.k + d * key.stride) : 0.f;
    v[d] = (active && d < head_dim) ? load(key.v + d * key.stride) : 0.f;
    dk[d] = 0.f;
    dv[d] = 0.f;
  }

  const int queries = geo.num_queries(block);
  for (int i0 = 0; i0 < queries; i0 += kTile) {
    __syncthreads();
    stage_tile<kMaxHeadDim>([&](int i, int d) {
      Row<scalar_t> query;
      const bool valid = i0 + i < queries && geo.query_of(block, i0 + i, query);
      const bool column = valid && d < head_dim;
      q_tile[i][d] = column ? load(query.ptr + d * query.stride) * scale : 0.f;
      o_tile[i][d] = column ? load(geo.grad_out_row(block, query) + d) : 0.f;
      if (d == 0) {
        q_valid[i] = valid;
        lse_tile[i] = valid ? geo.lse[geo.lse_index(block, query)] : 0.f;
        delta_tile[i] = valid ? geo.delta[geo.lse_index(block, query)] : 0.f;
      }
    });
    __syncthreads();
    if (!active) continue;
    for (int i = 0; i < kTile; ++i) {
      if (!q_valid[i]) continue;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < kMaxHeadDim; ++d) {
        s += q_tile[i][d] * k[d];
        dp += o_tile[i][d] * v[d];
      }
      const float p = expf(s - lse_tile[i]);
      const float ds = p * (dp - delta_tile[i]);
#pragma unroll
      for (int d = 0; d < kMaxHeadDim; ++d) {
        dv[d] += p * o_tile[i][d];
        dk[d] += ds * q_tile[i][d];  // q_tile holds scale * q: dk = scale * sum ds q
      }
    }
  }
  if (!active) return;
  const auto grad = geo.key_grad(block, threadIdx.x, key);
#pragma unroll
  for (int d = 0; d < kMaxHeadDim; ++d) {
    if (d < head_dim) grad.store(d, dk[d], dv[d]);
  }
}

// The head dimension's register tile: 16..128 -> 32, 64 or 128 (masked past head_dim).
template <typename Launch>
void dispatch_head_dim(int head_dim, Launch launch) {
  if (head_dim <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else if (head_dim <= 64) {
    launch(std::integral_constant<int, 64>{});
  } else {
    launch(std::integral_constant<int, 128>{});
  }
}

}  // namespace attention
}  // namespace twins_kernels
