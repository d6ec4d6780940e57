// Tensor-core attention kernels for fp16 and bf16 (compute capability 8.0+), on the same geometries as
// attention.cuh's scalar kernels (see there for the Geometry contract): forward with an online softmax,
// dq, and dk/dv, split as in FlashAttention-2. A query block is 4 warps of 16 queries each, looping
// over its keys in staged tiles of 64; a key block is 4 warps of 16 keys each, looping over its
// queries. Scores, probabilities and their gradients never leave registers (warp_mma.cuh's fragment
// layouts) and nothing of size queries x keys is stored. Softmax and accumulation in fp32; the
// probabilities and dS are rounded to the input dtype to be the next mma's operand, as in
// FlashAttention. Every sum has a fixed order: deterministic.
#pragma once

#include "attention.cuh"
#include "warp_mma.cuh"

namespace twins_kernels {
namespace attention {

template <typename scalar_t>
constexpr bool kTensorCoreDtype = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

constexpr int kMmaRows = 64;  // queries of a query block, keys of a key block: 4 warps of 16

template <int kHeadDim>
struct MmaTiles {
  static constexpr int kThreads = kMmaRows / 16 * warp::kSize;
  static constexpr int kWarps = kThreads / warp::kSize;
  static constexpr int kKeyTile = 64;  // keys staged per step of the forward and dq
  // Queries staged per step of dk/dv: at head_dim 128, 16 keep shared memory under the 48 KiB of a
  // static allocation and registers (K, V fragments and dk, dv accumulators: 192) under 255.
  static constexpr int kQueryTile = kHeadDim <= 64 ? 64 : 16;
  static constexpr int kStride = kHeadDim + 8;  // a staged row, padded: fragment loads hit distinct banks
  static constexpr int kSteps = kHeadDim / 16;     // mma k-steps over the head dimension
  static constexpr int kDimTiles = kHeadDim / 8;   // 8-column accumulator tiles over the head dimension
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A lane's two rows of its warp's 16 (rows g and g + 8 of the mma layouts); element d of row r at
// ptr[r][d * stride[r]], zero where the row is missing or d is past head_dim.
template <typename scalar_t>
struct LaneRows {
  const scalar_t* ptr[2] = {nullptr, nullptr};
  int64_t stride[2] = {1, 1};
  bool valid[2] = {false, false};

  __device__ __forceinline__ uint16_t bits(int r, int d, int head_dim) const {
    return valid[r] && d < head_dim ? warp::bits(ptr[r][d * stride[r]]) : uint16_t{0};
  }

  // the rows as A fragments over the head dimension, one per k-step of 16
  template <int kSteps>
  __device__ __forceinline__ void fragments(uint32_t (&a)[kSteps][4], int head_dim) const {
    const int c = 2 * warp::lane_in_group();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const int d = 16 * kk + c;
      a[kk][0] = warp::pack(bits(0, d, head_dim), bits(0, d + 1, head_dim));
      a[kk][1] = warp::pack(bits(1, d, head_dim), bits(1, d + 1, head_dim));
      a[kk][2] = warp::pack(bits(0, d + 8, head_dim), bits(0, d + 9, head_dim));
      a[kk][3] = warp::pack(bits(1, d + 8, head_dim), bits(1, d + 9, head_dim));
    }
  }
};

// The first of this lane's two rows in its block: warp w covers rows 16 w .. 16 w + 15.
__device__ __forceinline__ int lane_row() { return threadIdx.x / warp::kSize * 16 + warp::lane_group(); }

// Stages kRows rows of head_dim elements into a padded shared tile: stage_row(i, lane) for each row,
// a warp a row, its lanes along the row (coalesced reads).
template <int kRows, int kWarps, typename StageRow>
__device__ __forceinline__ void stage_rows(StageRow stage_row) {
  const int lane = threadIdx.x % warp::kSize;
  for (int i = threadIdx.x / warp::kSize; i < kRows; i += kWarps) stage_row(i, lane);
}

// A staged tile of keys and values (bits, zeros past the end or where excluded) and which keys count.
template <int kHeadDim>
struct KeyTile {
  static constexpr int kKeys = MmaTiles<kHeadDim>::kKeyTile, kStride = MmaTiles<kHeadDim>::kStride;
  alignas(16) uint16_t k[kKeys * kStride];
  alignas(16) uint16_t v[kKeys * kStride];
  bool valid[kKeys];

  // keys j0 .. j0 + kKeys of a query block; a barrier on each side
  template <typename scalar_t, typename Geometry, typename Block>
  __device__ __forceinline__ void stage(const Geometry& geo, const Block& block, int j0, int keys) {
    __syncthreads();
    stage_rows<kKeys, MmaTiles<kHeadDim>::kWarps>([&](int j, int lane) {
      KeyRow<scalar_t> key;
      const bool is_key = j0 + j < keys && geo.key(block, j0 + j, key);
      for (int d = lane; d < kHeadDim; d += warp::kSize) {
        const bool load = is_key && d < geo.head_dim;
        k[j * kStride + d] = load ? warp::bits(key.k[d * key.stride]) : uint16_t{0};
        v[j * kStride + d] = load ? warp::bits(key.v[d * key.stride]) : uint16_t{0};
      }
      if (lane == 0) valid[j] = is_key;
    });
    __syncthreads();
  }
};

// This lane's two queries of a query block (query[r]: false where the block has none there).
template <typename scalar_t, typename Geometry, typename Block>
__device__ __forceinline__ LaneRows<scalar_t> lane_queries(const Geometry& geo, const Block& block,
                                                           Row<scalar_t> (&query)[2]) {
  LaneRows<scalar_t> rows;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows.valid[r] = geo.query(block, lane_row() + 8 * r, query[r]);
    rows.ptr[r] = query[r].ptr;
    rows.stride[r] = query[r].stride;
  }
  return rows;
}

// ---------------------------------------------------------------------------------------------
// forward: out = softmax(q k^T * scale) v, lse = log-sum-exp of the scaled logits (natural log)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kHeadDim, typename Geometry>
__global__ void __launch_bounds__(MmaTiles<kHeadDim>::kThreads)
    mma_attention_forward_kernel(Geometry geo, float scale) {
  using Tiles = MmaTiles<kHeadDim>;
  constexpr int kStride = Tiles::kStride, kKeyTiles = Tiles::kKeyTile / 8;
  __shared__ KeyTile<kHeadDim> tile;
  const int head_dim = geo.head_dim, col = 2 * warp::lane_in_group();
  const auto block = geo.query_block(blockIdx.x);

  Row<scalar_t> query[2];
  const auto rows = lane_queries(geo, block, query);
  uint32_t q_frag[Tiles::kSteps][4];
  rows.fragments(q_frag, head_dim);

  float acc[Tiles::kDimTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this lane's share
  const float scale_log2 = scale * kLog2e;
  const int keys = geo.num_keys(block);
  for (int j0 = 0; j0 < keys; j0 += Tiles::kKeyTile) {
    tile.template stage<scalar_t>(geo, block, j0, keys);
    float s[kKeyTiles][4] = {};
    warp::mma_rows_tile_transposed<scalar_t, kStride>(s, q_frag, tile.k);
    // logits in log2 units; keys past the end or excluded get no weight
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = tile.valid[8 * n + col + (e & 1)] ? s[n][e] * scale_log2 : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
      }
    }
    float shift[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], warp::group_max(tile_max[r]));
      shift[r] = new_max == -INFINITY ? 0.f : new_max;  // no key yet: keep exp2 away from inf - inf
      const float correction = exp2f(row_max[r] - shift[r]);
      row_max[r] = new_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int n = 0; n < Tiles::kDimTiles; ++n) {
        acc[n][2 * r] *= correction;
        acc[n][2 * r + 1] *= correction;
      }
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - shift[e >> 1]);
        row_sum[e >> 1] += s[n][e];
      }
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(acc, s, tile.v);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = warp::group_sum(row_sum[r]);
    if (!rows.valid[r]) continue;
    scalar_t* out = geo.out_row(block, query[r]);
#pragma unroll
    for (int n = 0; n < Tiles::kDimTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = 8 * n + col + e;
        if (d < head_dim) out[d] = static_cast<scalar_t>(acc[n][2 * r + e] / sum);
      }
    }
    if (col == 0) geo.lse[geo.lse_index(block, query[r])] = (row_max[r] + log2f(sum)) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------
// dq = scale * sum_j dS_ij k_j with dS_ij = P_ij (dP_ij - D_i), P_ij = exp(s_ij - lse_i),
// dP_ij = dO_i . v_j, D_i = dO_i . O_i (precomputed, fp32)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kHeadDim, typename Geometry>
__global__ void __launch_bounds__(MmaTiles<kHeadDim>::kThreads)
    mma_attention_dq_kernel(Geometry geo, float scale) {
  using Tiles = MmaTiles<kHeadDim>;
  constexpr int kStride = Tiles::kStride, kKeyTiles = Tiles::kKeyTile / 8;
  __shared__ KeyTile<kHeadDim> tile;
  const int head_dim = geo.head_dim, col = 2 * warp::lane_in_group();
  const auto block = geo.query_block(blockIdx.x);

  Row<scalar_t> query[2];
  const auto rows = lane_queries(geo, block, query);
  LaneRows<scalar_t> grad_rows;  // their output gradients
  float lse_log2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    grad_rows.valid[r] = rows.valid[r];
    if (!rows.valid[r]) continue;
    grad_rows.ptr[r] = geo.grad_out_row(block, query[r]);
    lse_log2[r] = geo.lse[geo.lse_index(block, query[r])] * kLog2e;
    delta[r] = geo.delta[geo.lse_index(block, query[r])];
  }
  uint32_t q_frag[Tiles::kSteps][4], grad_frag[Tiles::kSteps][4];
  rows.fragments(q_frag, head_dim);
  grad_rows.fragments(grad_frag, head_dim);

  float dq[Tiles::kDimTiles][4] = {};
  const float scale_log2 = scale * kLog2e;
  const int keys = geo.num_keys(block);
  for (int j0 = 0; j0 < keys; j0 += Tiles::kKeyTile) {
    tile.template stage<scalar_t>(geo, block, j0, keys);
    float s[kKeyTiles][4] = {}, dp[kKeyTiles][4] = {};
    warp::mma_rows_tile_transposed<scalar_t, kStride>(s, q_frag, tile.k);
    warp::mma_rows_tile_transposed<scalar_t, kStride>(dp, grad_frag, tile.v);
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = tile.valid[8 * n + col + (e & 1)] ? exp2f(s[n][e] * scale_log2 - lse_log2[e >> 1]) : 0.f;
        s[n][e] = p * (dp[n][e] - delta[e >> 1]);  // dS
      }
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(dq, s, tile.k);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!rows.valid[r]) continue;
    scalar_t* dst = geo.dq_row(block, query[r]);
#pragma unroll
    for (int n = 0; n < Tiles::kDimTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = 8 * n + col + e;
        if (d < head_dim) dst[d] = static_cast<scalar_t>(dq[n][2 * r + e] * scale);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dO_i, a key block's keys as the rows: the
// transposed products S^T = K Q^T and dP^T = V dO^T keep each key's terms in its lanes' registers
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kHeadDim, typename Geometry>
__global__ void __launch_bounds__(MmaTiles<kHeadDim>::kThreads)
    mma_attention_dkdv_kernel(Geometry geo, float scale) {
  using Tiles = MmaTiles<kHeadDim>;
  constexpr int kStride = Tiles::kStride, kQueryTile = Tiles::kQueryTile, kQueryTiles = kQueryTile / 8;
  alignas(16) __shared__ uint16_t q_tile[kQueryTile * kStride];  // queries (unscaled)
  alignas(16) __shared__ uint16_t grad_tile[kQueryTile * kStride];  // their output gradients
  __shared__ float lse_tile[kQueryTile];  // log2 units
  __shared__ float delta_tile[kQueryTile];
  __shared__ bool q_valid[kQueryTile];
  const int head_dim = geo.head_dim, row = lane_row(), col = 2 * warp::lane_in_group();
  const auto block = geo.key_block(blockIdx.x);

  KeyRow<scalar_t> key[2];
  LaneRows<scalar_t> k_rows, v_rows;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    k_rows.valid[r] = v_rows.valid[r] = geo.key_of(block, row + 8 * r, key[r]);
    k_rows.ptr[r] = key[r].k;
    v_rows.ptr[r] = key[r].v;
    k_rows.stride[r] = v_rows.stride[r] = key[r].stride;
  }
  uint32_t k_frag[Tiles::kSteps][4], v_frag[Tiles::kSteps][4];
  k_rows.fragments(k_frag, head_dim);
  v_rows.fragments(v_frag, head_dim);

  float dk[Tiles::kDimTiles][4] = {}, dv[Tiles::kDimTiles][4] = {};
  const float scale_log2 = scale * kLog2e;
  const int queries = geo.num_queries(block);
  for (int i0 = 0; i0 < queries; i0 += kQueryTile) {
    __syncthreads();
    stage_rows<kQueryTile, Tiles::kWarps>([&](int i, int lane) {
      Row<scalar_t> query;
      const bool valid = i0 + i < queries && geo.query_of(block, i0 + i, query);
      const scalar_t* grad = valid ? geo.grad_out_row(block, query) : nullptr;
      for (int d = lane; d < kHeadDim; d += warp::kSize) {
        const bool load = valid && d < head_dim;
        q_tile[i * kStride + d] = load ? warp::bits(query.ptr[d * query.stride]) : uint16_t{0};
        grad_tile[i * kStride + d] = load ? warp::bits(grad[d]) : uint16_t{0};
      }
      if (lane == 0) {
        q_valid[i] = valid;
        lse_tile[i] = valid ? geo.lse[geo.lse_index(block, query)] * kLog2e : 0.f;
        delta_tile[i] = valid ? geo.delta[geo.lse_index(block, query)] : 0.f;
      }
    });
    __syncthreads();
    float st[kQueryTiles][4] = {}, dpt[kQueryTiles][4] = {};
    warp::mma_rows_tile_transposed<scalar_t, kStride>(st, k_frag, q_tile);
    warp::mma_rows_tile_transposed<scalar_t, kStride>(dpt, v_frag, grad_tile);
#pragma unroll
    for (int n = 0; n < kQueryTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 8 * n + col + (e & 1);
        const float p = q_valid[i] ? exp2f(st[n][e] * scale_log2 - lse_tile[i]) : 0.f;
        st[n][e] = p;                              // P^T
        dpt[n][e] = p * (dpt[n][e] - delta_tile[i]);  // dS^T
      }
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(dv, st, grad_tile);
    warp::mma_accumulators_tile<scalar_t, kStride>(dk, dpt, q_tile);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!k_rows.valid[r]) continue;
    const auto grad = geo.key_grad(block, row + 8 * r, key[r]);
#pragma unroll
    for (int n = 0; n < Tiles::kDimTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = 8 * n + col + e;
        if (d < head_dim) grad.store(d, dk[n][2 * r + e] * scale, dv[n][2 * r + e]);
      }
    }
  }
}

// Calls launch(forward, dq, dkdv, threads) with the kernels of a family (tensor cores, or scalar with
// scalar_threads a block) for geo's head dimension, dispatched to its register tile.
template <typename scalar_t, typename Geometry, typename Launch>
void with_attention_kernels(const Geometry& geo, bool tensor_cores, int scalar_threads, Launch launch) {
  dispatch_head_dim(geo.head_dim, [&](auto max_head_dim) {
    constexpr int kMax = decltype(max_head_dim)::value;
    if constexpr (kTensorCoreDtype<scalar_t>) {
      if (tensor_cores) {
        launch(mma_attention_forward_kernel<scalar_t, kMax, Geometry>,
               mma_attention_dq_kernel<scalar_t, kMax, Geometry>,
               mma_attention_dkdv_kernel<scalar_t, kMax, Geometry>, MmaTiles<kMax>::kThreads);
        return;
      }
    }
    launch(attention_forward_kernel<scalar_t, kMax, Geometry>, attention_dq_kernel<scalar_t, kMax, Geometry>,
           attention_dkdv_kernel<scalar_t, kMax, Geometry>, scalar_threads);
  });
}

}  // namespace attention
}  // namespace twins_kernels
