// moe_align.cu - groups the (token, slot) pairs of a routing table by expert and pads every
// expert's group to the GEMM tile (vLLM's moe_align_block_size), in one block.
//
// In:  ids [n_pairs] u32 (the routing table [n_tokens, k] flattened; pair = token * k + slot).
// Out: offsets     [n_experts + 1] i32  padded start of each expert's rows; offsets[n_experts]
//                                       is the padded total;
//      sorted_pairs [capacity] u32      pairs grouped by expert, increasing pair order inside an
//                                       expert, each group padded with n_pairs (no pair);
//      tile_expert  [capacity / tile] i32 expert of each row tile, -1 past the padded total;
//      pair_slot    [n_pairs] i32       the row of sorted_pairs that holds each pair.
// capacity = moe_align_capacity(n_pairs, n_experts, tile): every element up to it is written.
// An id >= n_experts is a caller bug: the pair is dropped and offsets[n_experts] is set to -1.
// CPU twin: moe_kernels::align::AlignedGroups (built on grouping.rs's ExpertGroups).
//
// Deterministic on purpose (the CPU twin and the combine order depend on it): counts use
// shared-memory atomics, the padded prefix sum is one thread, and each thread then scans the
// pairs for its experts in order: O(n_pairs * n_experts / blockDim), fine for the routing
// tables of one step (<= 64k pairs).
#include "common.cuh"

namespace moe {

__host__ __device__ inline int moe_align_capacity(int n_pairs, int n_experts, int tile) {
  const int groups = n_pairs < n_experts ? n_pairs : n_experts;
  return ceil_div(n_pairs + groups * (tile - 1), tile) * tile;
}

__device__ void align_block(const uint32_t* __restrict__ ids, int n_pairs, int n_experts, int tile,
                            int* __restrict__ offsets, uint32_t* __restrict__ sorted_pairs,
                            int* __restrict__ tile_expert, int* __restrict__ pair_slot) {
  MOE_DYN_SMEM(int, smem);
  int* counts = smem;                 // [n_experts]
  int* start = counts + n_experts;    // [n_experts + 1]
  int* bad = start + n_experts + 1;   // [1]
  const int tid = threadIdx.x, n_threads = blockDim.x;
  const int capacity = moe_align_capacity(n_pairs, n_experts, tile);

  for (int e = tid; e < n_experts; e += n_threads) counts[e] = 0;
  if (tid == 0) *bad = 0;
  __syncthreads();
  for (int i = tid; i < n_pairs; i += n_threads) {
    const uint32_t e = ids[i];
    if (e < (uint32_t)n_experts)
      atomicAdd(&counts[e], 1);
    else
      atomicAdd(bad, 1);
  }
  __syncthreads();
  if (tid == 0) {
    start[0] = 0;
    for (int e = 0; e < n_experts; ++e) start[e + 1] = start[e] + ceil_div(counts[e], tile) * tile;
  }
  __syncthreads();

  for (int e = tid; e < n_experts; e += n_threads) {
    int row = start[e];
    for (int i = 0; i < n_pairs; ++i)
      if (ids[i] == (uint32_t)e) {
        sorted_pairs[row] = (uint32_t)i;
        pair_slot[i] = row;
        ++row;
      }
    for (; row < start[e + 1]; ++row) sorted_pairs[row] = (uint32_t)n_pairs;
    for (int t = start[e] / tile; t < start[e + 1] / tile; ++t) tile_expert[t] = e;
    offsets[e] = start[e];
  }
  const int total = start[n_experts];
  for (int row = total + tid; row < capacity; row += n_threads) sorted_pairs[row] = (uint32_t)n_pairs;
  for (int t = total / tile + tid; t < capacity / tile; t += n_threads) tile_expert[t] = -1;
  for (int i = tid; i < n_pairs; i += n_threads)
    if (ids[i] >= (uint32_t)n_experts) pair_slot[i] = -1;
  if (tid == 0) offsets[n_experts] = *bad ? -1 : total;
}

}  // namespace moe

extern "C" __global__ void moe_align(const uint32_t* ids, int n_pairs, int n_experts, int tile,
                                     int* offsets, uint32_t* sorted_pairs, int* tile_expert,
                                     int* pair_slot) {
  moe::align_block(ids, n_pairs, n_experts, tile, offsets, sorted_pairs, tile_expert, pair_slot);
}
