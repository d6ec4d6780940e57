// Tensor-core attention kernels for fp16 and bf16 (code compiled for compute capability 8.0+), on the same
// geometries as attention.cuh's scalar kernels (see there for the Geometry contract): forward with an online softmax,
// dq, and dk/dv, split as in FlashAttention-2. A query block is 4 warps of 16 queries each, looping
// over its keys in staged tiles (64 keys; fewer at head_dim 128); a key block is 4 warps of 16 keys
// each, looping over its queries. Tiles are staged with cp.async, a block's own rows together with its
// first tile, so that a block with one tile (an LSA window; GSA at every stage of a 224² image) waits
// for memory once, not twice; the forward and dk/dv load the next tile's parts while they compute on
// this one's, each part as soon as the last product reading it is taken (FlashAttention-2's order, in
// the same shared memory), and query blocks' results leave through shared memory in 16-byte chunks
// (store_block_rows). Scores, probabilities and their gradients never leave registers (warp_mma.cuh's
// fragment layouts) and nothing of size queries x keys is stored. Softmax and accumulation in fp32;
// the probabilities and dS are rounded to the input dtype to be the next mma's operand, as in
// FlashAttention. Every sum has a fixed order: deterministic.
#pragma once

#include "attention.cuh"
#include "vector_access.cuh"
#include "warp_mma.cuh"

namespace twins_kernels {
namespace attention {

template <typename scalar_t>
constexpr bool kTensorCoreDtype = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

constexpr int kMmaRows = 64;  // queries of a query block, keys of a key block: 4 warps of 16

template <int kHeadDim>
struct MmaTiles {
  static constexpr int kThreads = kMmaRows / 16 * warp::kSize;
  // Keys staged per step of the forward and of dq, beside the block's queries (and, for dq, their output
  // gradients) staged for the whole loop: at head_dim 128 fewer keep the static shared memory under
  // 48 KiB (forward 34 KiB, dq 43 KiB).
  static constexpr int kKeyTile = kHeadDim <= 64 ? 64 : 32;
  static constexpr int kDqKeyTile = kHeadDim <= 64 ? 64 : 16;
  // Queries staged per step of dk/dv, beside the block's keys and values (staged once): at head_dim 128,
  // 16 keep shared memory under the 48 KiB of a static allocation (43 KiB) and registers (K, V
  // fragments and dk, dv accumulators: 192) under 255.
  static constexpr int kQueryTile = kHeadDim <= 64 ? 64 : 16;
  static constexpr int kStride = kHeadDim + 8;  // a staged row, padded: fragment loads hit distinct banks
  static constexpr int kSteps = kHeadDim / 16;     // mma k-steps over the head dimension
  static constexpr int kDimTiles = kHeadDim / 8;   // 8-column accumulator tiles over the head dimension
};

// The keys the dq kernel stages a step, for the instantiation that serves head_dim.
inline int mma_dq_key_tile(int head_dim) {
  int keys = 0;
  dispatch_head_dim(head_dim, [&](auto max_head_dim) { keys = MmaTiles<decltype(max_head_dim)::value>::kDqKeyTile; });
  return keys;
}

// A geometry's delta_in_dq: whether the dq kernel computes the backward's delta from the probabilities: the
// scalar one always (a thread holds a query and loops over all its keys: a first pass for delta), the
// tensor-core one (16-bit inputs only) where the `keys` each query sees are one of its key tiles (every Twins
// window, and GSA's M = 49 sub-sampled keys at 224 x 224, at head_dim <= 64); else attention_delta_kernel
// takes it from out (see mma_attention_dq_kernel).
template <typename scalar_t>
bool dq_computes_delta(bool tensor_cores, int64_t keys, int head_dim) {
  const bool mma_kernels = tensor_cores && kTensorCoreDtype<scalar_t>;  // as with_attention_kernels picks them
  return !mma_kernels || keys <= mma_dq_key_tile(head_dim);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Warp w covers rows 16 w .. 16 w + 15 of its block; a lane, two of them: lane_row() and 8 below.
__device__ __forceinline__ int warp_row() { return threadIdx.x / warp::kSize * 16; }
__device__ __forceinline__ int lane_row() { return warp_row() + warp::lane_group(); }

// Staging copies rows of 16-bit values into shared tiles (rows padded to kStride) in chunks of 8
// elements: the block's threads take consecutive chunks, so a row's chunks are read together
// (coalesced), and a chunk of a contiguous, 16-byte aligned row is one cp.async of 16 bytes, all of a
// thread's in flight together until it waits for them (staging_barrier(), or for a cp.async group).
// Other chunks are copied element by element (zeros where a row is missing, null, or past head_dim).

// Elements d0 .. d0 + 7 of a row (element d at row[d * stride]) into dst.
template <typename scalar_t>
__device__ __forceinline__ void stage_chunk(uint16_t* dst, const scalar_t* row, int64_t stride, int d0,
                                            int head_dim) {
  if (row != nullptr && stride == 1 && d0 + 8 <= head_dim && aligned_16(row + d0)) {
    async_copy_16_bytes(dst, row + d0);
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int d = d0 + e;
    dst[e] = row != nullptr && d < head_dim ? warp::bits(row[d * stride]) : uint16_t{0};
  }
}

// The end of a staging round: this thread's copies have landed, then every thread's (a barrier).
__device__ __forceinline__ void staging_barrier() {
  async_copy_wait_all();
  __syncthreads();
}

// stage(i, d0) for the chunk at element d0 of each row i of a kRows-row tile.
template <int kRows, int kHeadDim, typename StageChunk>
__device__ __forceinline__ void for_each_chunk(StageChunk stage) {
  constexpr int kRowChunks = kHeadDim / 8, kThreads = MmaTiles<kHeadDim>::kThreads;
  static_assert(kRows * kRowChunks % kThreads == 0, "every thread stages as many chunks");
#pragma unroll
  for (int n = 0; n < kRows * kRowChunks / kThreads; ++n) {
    const int chunk = n * kThreads + static_cast<int>(threadIdx.x);
    stage(chunk / kRowChunks, chunk % kRowChunks * 8);
  }
}

// This warp's 16 rows of a staged tile (from row r0) as A fragments over the head dimension.
template <int kHeadDim>
__device__ __forceinline__ void row_fragments(uint32_t (&a)[kHeadDim / 16][4], const uint16_t* tile, int r0) {
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) warp::load_a<MmaTiles<kHeadDim>::kStride>(a[kk], tile, r0, 16 * kk);
}

// A block's own rows, staged once for the warps' A fragments: kParts sets of kMmaRows rows (a query
// block's queries, and for dq their output gradients; a key block's keys and values). The stage
// functions issue the copies; they land when the thread waits for them.
template <int kHeadDim, int kParts>
struct BlockRows {
  static constexpr int kStride = MmaTiles<kHeadDim>::kStride;
  alignas(16) uint16_t rows[kParts * kMmaRows * kStride];

  __device__ __forceinline__ uint16_t* row(int part, int i) { return rows + (part * kMmaRows + i) * kStride; }

  template <typename scalar_t, typename Geometry, typename Block>
  __device__ __forceinline__ void stage_queries(const Geometry& geo, const Block& block) {
    for_each_chunk<kMmaRows, kHeadDim>([&](int i, int d0) {
      Row<scalar_t> query;
      const bool is_query = geo.query(block, i, query);
      stage_chunk(row(0, i) + d0, is_query ? query.ptr : nullptr, query.stride, d0, geo.head_dim);
      if constexpr (kParts == 2) {
        stage_chunk(row(1, i) + d0, is_query ? geo.grad_out_row(block, query) : nullptr, 1, d0, geo.head_dim);
      }
    });
  }

  template <typename scalar_t, typename Geometry, typename Block>
  __device__ __forceinline__ void stage_keys(const Geometry& geo, const Block& block) {
    static_assert(kParts == 2, "keys and values");
    for_each_chunk<kMmaRows, kHeadDim>([&](int i, int d0) {
      KeyRow<scalar_t> key;
      const bool is_key = geo.key_of(block, i, key);
      stage_chunk(row(0, i) + d0, is_key ? key.k : nullptr, key.stride, d0, geo.head_dim);
      stage_chunk(row(1, i) + d0, is_key ? key.v : nullptr, key.stride, d0, geo.head_dim);
    });
  }

  // This warp's 16 rows of a part as A fragments over the head dimension.
  __device__ __forceinline__ void fragments(uint32_t (&a)[kHeadDim / 16][4], int part) const {
    row_fragments<kHeadDim>(a, rows, part * kMmaRows + warp_row());
  }
};

// A staged tile of kKeys keys and values of a query block, and which of them count.
template <int kHeadDim, int kKeys>
struct KeyTile {
  static constexpr int kStride = MmaTiles<kHeadDim>::kStride;
  static_assert(kKeys % 16 == 0, "whole 16-key steps of the P V product");
  alignas(16) uint16_t k[kKeys * kStride];
  alignas(16) uint16_t v[kKeys * kStride];
  bool valid[kKeys];

  // Issue the copies of the keys (kWithKeys, and their valid flags) and values (kWithValues) j0 ..
  // j0 + kKeys; they land when this thread waits for them, and are the block's after a barrier. What
  // they overwrite must be free: no thread still reading the previous tile's (a barrier between).
  template <typename scalar_t, bool kWithKeys, bool kWithValues, typename Geometry, typename Block>
  __device__ __forceinline__ void stage_parts(const Geometry& geo, const Block& block, int j0, int keys) {
    for_each_chunk<kKeys, kHeadDim>([&](int j, int d0) {
      KeyRow<scalar_t> key;
      const bool is_key = j0 + j < keys && geo.key(block, j0 + j, key);
      if constexpr (kWithKeys) {
        stage_chunk(k + j * kStride + d0, is_key ? key.k : nullptr, key.stride, d0, geo.head_dim);
        if (d0 == 0) valid[j] = is_key;
      }
      if constexpr (kWithValues) {
        stage_chunk(v + j * kStride + d0, is_key ? key.v : nullptr, key.stride, d0, geo.head_dim);
      }
    });
  }
  template <typename scalar_t, typename Geometry, typename Block>
  __device__ __forceinline__ void stage(const Geometry& geo, const Block& block, int j0, int keys) {
    stage_parts<scalar_t, true, true>(geo, block, j0, keys);
  }

  // The loop's tile from key j0: staged with the queries at j0 = 0; later ones once no thread still
  // reads the previous one.
  template <typename scalar_t, typename Geometry, typename Block>
  __device__ __forceinline__ void stage_step(const Geometry& geo, const Block& block, int j0, int keys) {
    if (j0 == 0) return;  // staged with the queries
    __syncthreads();
    stage<scalar_t>(geo, block, j0, keys);
    staging_barrier();
  }
};

// A staged tile of kQueries queries of a key block, their output gradients, and per query whether it
// counts, its log-sum-exp (log2 units) and delta.
template <int kHeadDim, int kQueries>
struct QueryTile {
  static constexpr int kStride = MmaTiles<kHeadDim>::kStride;
  static_assert(kQueries % 16 == 0, "whole 16-query steps of the dS^T Q and P^T dO products");
  alignas(16) uint16_t q[kQueries * kStride];  // unscaled
  alignas(16) uint16_t grad[kQueries * kStride];
  float lse[kQueries];
  float delta[kQueries];
  bool valid[kQueries];

  // Issue the copies of the queries i0 .. i0 + kQueries (kWithQueries, with their valid flags, lse and
  // delta, which are plain loads and stores) and of their output gradients (kWithGrads); as KeyTile's.
  template <typename scalar_t, bool kWithQueries, bool kWithGrads, typename Geometry, typename Block>
  __device__ __forceinline__ void stage_parts(const Geometry& geo, const Block& block, int i0, int queries) {
    for_each_chunk<kQueries, kHeadDim>([&](int i, int d0) {
      Row<scalar_t> query;
      const bool is_query = i0 + i < queries && geo.query_of(block, i0 + i, query);
      if constexpr (kWithQueries) {
        stage_chunk(q + i * kStride + d0, is_query ? query.ptr : nullptr, query.stride, d0, geo.head_dim);
        if (d0 == 0) {
          const int64_t index = is_query ? geo.lse_index(block, query) : 0;
          valid[i] = is_query;
          lse[i] = is_query ? geo.lse[index] * kLog2e : 0.f;
          delta[i] = is_query ? geo.delta[index] : 0.f;
        }
      }
      if constexpr (kWithGrads) {
        stage_chunk(grad + i * kStride + d0, is_query ? geo.grad_out_row(block, query) : nullptr, 1, d0,
                    geo.head_dim);
      }
    });
  }
};

// fn(d, n, e) for each column d < head_dim that this lane holds of its rows: accumulator tiles of 8
// columns hold column d = 8 n + 2 t + e of the lane's row r at [n][2 r + e].
template <int kDimTiles, typename Fn>
__device__ __forceinline__ void for_each_lane_column(int head_dim, Fn fn) {
  const int col = 2 * warp::lane_in_group();
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (8 * n + col + e < head_dim) fn(8 * n + col + e, n, e);
    }
  }
}

// A query block's results to memory through its staged queries (part 0 of `rows`): value(r, n, e), the
// lane's accumulator value of its row r (0, 1) and column 8 n + 2 t + e, rounded to scalar_t, two columns
// a 4-byte store into the tile; then row i's chunks of 8 columns to dst_row(i) (null: no query there) by
// the block's threads in turn, a row's chunks together, one 16-byte store a chunk where the row is
// 16-byte aligned, else element by element. A lane's own stores would be 2 bytes each, 16 a lane at
// head_dim 32, the four lanes of a row writing every other column: 8 times the store instructions.
// No barrier before the first stores: the 4-byte words a lane writes are those it alone read, as its A
// fragments of the queries (row_fragments, warp_mma.cuh's load_a), and no thread reads the tile otherwise.
template <typename scalar_t, int kHeadDim, int kParts, typename Value, typename DstRow>
__device__ __forceinline__ void store_block_rows(BlockRows<kHeadDim, kParts>& rows, int head_dim, Value value,
                                                 DstRow dst_row) {
  using Tiles = MmaTiles<kHeadDim>;
  const int col = 2 * warp::lane_in_group();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    uint16_t* row = rows.row(0, lane_row() + 8 * r) + col;
#pragma unroll
    for (int n = 0; n < Tiles::kDimTiles; ++n) {
      warp::store_pair(row + 8 * n, warp::pack(warp::round_to_bits<scalar_t>(value(r, n, 0)),
                                               warp::round_to_bits<scalar_t>(value(r, n, 1))));
    }
  }
  __syncthreads();
  for_each_chunk<kMmaRows, kHeadDim>([&](int i, int d0) {
    scalar_t* dst = dst_row(i);
    const uint16_t* src = rows.row(0, i) + d0;
    if (dst == nullptr || d0 >= head_dim) return;
    if (d0 + 8 <= head_dim && aligned_16(dst + d0)) {
      copy_16_bytes(dst + d0, src);
      return;
    }
    for (int e = 0; e < 8 && d0 + e < head_dim; ++e) dst[d0 + e] = scalar_t(src[e], scalar_t::from_bits());
  });
}

// This lane's two queries of a query block; false where the block has none there.
template <typename scalar_t, typename Geometry, typename Block>
__device__ __forceinline__ void lane_queries(const Geometry& geo, const Block& block, Row<scalar_t> (&query)[2],
                                             bool (&valid)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) valid[r] = geo.query(block, lane_row() + 8 * r, query[r]);
}

// ---------------------------------------------------------------------------------------------
// forward: out = softmax(q k^T * scale) v, lse = log-sum-exp of the scaled logits (natural log)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kHeadDim, typename Geometry>
__global__ void __launch_bounds__(MmaTiles<kHeadDim>::kThreads)
    mma_attention_forward_kernel(Geometry geo, float scale) {
  using Tiles = MmaTiles<kHeadDim>;
  constexpr int kStride = Tiles::kStride, kKeyTiles = Tiles::kKeyTile / 8;
  __shared__ BlockRows<kHeadDim, 1> queries;
  __shared__ KeyTile<kHeadDim, Tiles::kKeyTile> tile;
  const int head_dim = geo.head_dim, col = 2 * warp::lane_in_group();
  const auto block = geo.query_block(blockIdx.x);
  const int keys = geo.num_keys(block);

  // Keys and values are in flight one step ahead of their use, as in FlashAttention-2, in two cp.async
  // groups a tile: the next tile's keys load during this tile's softmax and P V, its values during the
  // next Q K^T; every block issues its queries, first keys and first values before it first waits.
  queries.template stage_queries<scalar_t>(geo, block);
  tile.template stage_parts<scalar_t, true, false>(geo, block, 0, keys);
  async_copy_commit();
  tile.template stage_parts<scalar_t, false, true>(geo, block, 0, keys);
  async_copy_commit();
  async_copy_wait<1>();  // queries and keys; the values may still be in flight
  __syncthreads();
  uint32_t q_frag[Tiles::kSteps][4];
  queries.fragments(q_frag, 0);
  Row<scalar_t> query[2];
  bool active[2];
  lane_queries(geo, block, query, active);

  float acc[Tiles::kDimTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this lane's share
  const float scale_log2 = scale * kLog2e;
  for (int j0 = 0; j0 < keys; j0 += Tiles::kKeyTile) {
    const bool more = j0 + Tiles::kKeyTile < keys;  // the same for the whole block
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
    if (more) {  // the next keys, once no thread reads these (or their valid flags)
      __syncthreads();
      tile.template stage_parts<scalar_t, true, false>(geo, block, j0 + Tiles::kKeyTile, keys);
    }
    async_copy_commit();
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
    async_copy_wait<1>();  // this tile's values; the next keys may still be in flight
    __syncthreads();
    warp::mma_accumulators_tile<scalar_t, kStride>(acc, s, tile.v);
    if (more) {  // the next values, once no thread reads these; then the next keys must have landed
      __syncthreads();
      tile.template stage_parts<scalar_t, false, true>(geo, block, j0 + Tiles::kKeyTile, keys);
      async_copy_commit();
      async_copy_wait<1>();
      __syncthreads();
    }
  }
  async_copy_wait<0>();  // the last tile's empty group (with no keys at all, the first values)
  float sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] = warp::group_sum(row_sum[r]);
    if (active[r] && col == 0) geo.lse[geo.lse_index(block, query[r])] = (row_max[r] + log2f(sum[r])) * kLn2;
  }
  store_block_rows<scalar_t>(
      queries, head_dim, [&](int r, int n, int e) { return acc[n][2 * r + e] / sum[r]; },
      [&](int i) -> scalar_t* {
        Row<scalar_t> row;
        return geo.query(block, i, row) ? geo.out_row(block, row) : nullptr;
      });
}

// ---------------------------------------------------------------------------------------------
// dq = scale * sum_j dS_ij k_j with dS_ij = P_ij (dP_ij - D_i), P_ij = exp(s_ij - lse_i),
// dP_ij = dO_i . v_j, D_i = dO_i . O_i (precomputed, fp32). With geo.delta_in_dq the block's keys are
// one tile (an LSA window, GSA's sub-sampled keys) and D_i = sum_j P_ij dP_ij of that tile instead, in
// fp32, written for dk/dv: the same value, without the rounding of O to 16 bits, which is the backward's
// largest error wherever dP_ij - D_i cancels: P spread over near-identical keys (the padded keys of timm's
// zero mode all hold the qkv bias), or over few keys whose dP nearly agree (with two,
// dS_i1 = P_i1 P_i2 (dP_i1 - dP_i2)) (benchmarks/NOTES.md, 33 and 34).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kHeadDim, typename Geometry>
__global__ void __launch_bounds__(MmaTiles<kHeadDim>::kThreads)
    mma_attention_dq_kernel(Geometry geo, float scale) {
  using Tiles = MmaTiles<kHeadDim>;
  constexpr int kStride = Tiles::kStride, kKeyTiles = Tiles::kDqKeyTile / 8;
  __shared__ BlockRows<kHeadDim, 2> queries;  // and their output gradients
  __shared__ KeyTile<kHeadDim, Tiles::kDqKeyTile> tile;
  const int head_dim = geo.head_dim, col = 2 * warp::lane_in_group();
  const auto block = geo.query_block(blockIdx.x);
  const int keys = geo.num_keys(block);

  queries.template stage_queries<scalar_t>(geo, block);
  tile.template stage<scalar_t>(geo, block, 0, keys);
  staging_barrier();
  uint32_t q_frag[Tiles::kSteps][4], grad_frag[Tiles::kSteps][4];
  queries.fragments(q_frag, 0);
  queries.fragments(grad_frag, 1);
  Row<scalar_t> query[2];
  bool active[2];
  lane_queries(geo, block, query, active);
  float lse_log2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  int64_t index[2] = {0, 0};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!active[r]) continue;
    index[r] = geo.lse_index(block, query[r]);
    lse_log2[r] = geo.lse[index[r]] * kLog2e;
    if (!geo.delta_in_dq) delta[r] = geo.delta[index[r]];
  }

  float dq[Tiles::kDimTiles][4] = {};
  const float scale_log2 = scale * kLog2e;
  for (int j0 = 0; j0 < keys; j0 += Tiles::kDqKeyTile) {
    tile.template stage_step<scalar_t>(geo, block, j0, keys);
    float s[kKeyTiles][4] = {}, dp[kKeyTiles][4] = {};
    warp::mma_rows_tile_transposed<scalar_t, kStride>(s, q_frag, tile.k);
    warp::mma_rows_tile_transposed<scalar_t, kStride>(dp, grad_frag, tile.v);
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = tile.valid[8 * n + col + (e & 1)] ? exp2f(s[n][e] * scale_log2 - lse_log2[e >> 1]) : 0.f;  // P
      }
    }
    if (geo.delta_in_dq) {  // this is the only tile: a row's sum over it is over all its keys
      float share[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) share[e >> 1] += s[n][e] * dp[n][e];
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        delta[r] = warp::group_sum(share[r]);
        if (active[r] && col == 0) geo.delta[index[r]] = delta[r];
      }
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - delta[e >> 1];  // dS
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(dq, s, tile.k);
  }
  store_block_rows<scalar_t>(
      queries, head_dim, [&](int r, int n, int e) { return dq[n][2 * r + e] * scale; },
      [&](int i) -> scalar_t* {
        Row<scalar_t> row;
        return geo.query(block, i, row) ? geo.dq_row(block, row) : nullptr;
      });
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
  __shared__ BlockRows<kHeadDim, 2> own;  // the block's keys and values
  __shared__ QueryTile<kHeadDim, kQueryTile> tile;
  const int head_dim = geo.head_dim, row = lane_row(), col = 2 * warp::lane_in_group();
  const auto block = geo.key_block(blockIdx.x);
  const int queries = geo.num_queries(block);

  // Each tile's output gradients and queries are read at both ends of a step (dP^T = V dO^T ... dv,
  // S^T = K Q^T ... dk), so with one buffer each the next ones can load only once the last product
  // reading them is taken: the output gradients after dv, during dk; the queries after dk, during the
  // next step's dP^T, which comes first for that. Two cp.async groups a tile. The block's keys and
  // values and the first tile are issued before the first wait.
  own.template stage_keys<scalar_t>(geo, block);
  tile.template stage_parts<scalar_t, false, true>(geo, block, 0, queries);
  async_copy_commit();
  tile.template stage_parts<scalar_t, true, false>(geo, block, 0, queries);
  async_copy_commit();
  async_copy_wait<1>();  // keys, values and output gradients; the queries may still be in flight
  __syncthreads();
  uint32_t k_frag[Tiles::kSteps][4], v_frag[Tiles::kSteps][4];
  own.fragments(k_frag, 0);
  own.fragments(v_frag, 1);
  KeyRow<scalar_t> key[2];
  bool active[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) active[r] = geo.key_of(block, row + 8 * r, key[r]);

  float dk[Tiles::kDimTiles][4] = {}, dv[Tiles::kDimTiles][4] = {};
  const float scale_log2 = scale * kLog2e;
  for (int i0 = 0; i0 < queries; i0 += kQueryTile) {
    const bool more = i0 + kQueryTile < queries;  // the same for the whole block
    float st[kQueryTiles][4] = {}, dpt[kQueryTiles][4] = {};
    warp::mma_rows_tile_transposed<scalar_t, kStride>(dpt, v_frag, tile.grad);
    async_copy_wait<0>();  // this tile's queries
    __syncthreads();
    warp::mma_rows_tile_transposed<scalar_t, kStride>(st, k_frag, tile.q);
#pragma unroll
    for (int n = 0; n < kQueryTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 8 * n + col + (e & 1);
        const float p = tile.valid[i] ? exp2f(st[n][e] * scale_log2 - tile.lse[i]) : 0.f;
        st[n][e] = p;                                 // P^T
        dpt[n][e] = p * (dpt[n][e] - tile.delta[i]);  // dS^T
      }
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(dv, st, tile.grad);
    if (more) {  // the next output gradients, once no thread reads these
      __syncthreads();
      tile.template stage_parts<scalar_t, false, true>(geo, block, i0 + kQueryTile, queries);
      async_copy_commit();
    }
    warp::mma_accumulators_tile<scalar_t, kStride>(dk, dpt, tile.q);
    if (more) {  // the next queries, once no thread reads these (or their lse, delta, flags); then the
                 // next output gradients must have landed
      __syncthreads();
      tile.template stage_parts<scalar_t, true, false>(geo, block, i0 + kQueryTile, queries);
      async_copy_commit();
      async_copy_wait<1>();
      __syncthreads();
    }
  }
  async_copy_wait<0>();  // with no queries at all, the first queries
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!active[r]) continue;
    const auto grad = geo.key_grad(block, row + 8 * r, key[r]);
    for_each_lane_column<Tiles::kDimTiles>(head_dim, [&](int d, int n, int e) {
      grad.store(d, dk[n][2 * r + e] * scale, dv[n][2 * r + e]);
    });
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
