// moe_decode.cu - the decode path (<= MOE_DECODE_MAX_TOKENS tokens): memory-bound, so every
// selected expert's weights are streamed from memory exactly once per step and multiplied with
// all the tokens that chose that expert while they are in registers.
//
// Grid (row_chunks, n_pairs): the block column of pair p owns expert ids[p] if p is the first
// pair that chose it (the others exit at once), gathers the <= n_tokens pairs routed to that
// expert, and its row chunk covers rows [chunk * rows_per_block, ...) of the weight matrix;
// each warp takes one row at a time, the lanes stride over the row (coalesced), and one warp
// sum per (row, pair) finishes the dot products.
//   gate_up: inter[pair] = act(x[token(pair)] · W_gate[e]ᵀ + b_gate, ... W_up ...)  [n_pairs, N]
//   down:    y[pair] = inter[pair] · W_down[e]ᵀ + b_down                             [n_pairs, N]
// then moe_combine sums y into the tokens. Weights are [slots, out, in], expert_slot as in
// moe_expert_gemm.cu. CPU twin: expert_ffn.rs + combine.rs; the CPU harness also counts every
// weight element read through moe::load_weight and requires exactly one read per element of
// each selected expert and none of the others.
#include "common.cuh"

#define MOE_DECODE_MAX_TOKENS 8

namespace moe {

// Pairs routed to the expert of pair `p`, or 0 if an earlier pair owns that expert.
__device__ __forceinline__ int decode_pairs_of(const uint32_t* ids, int p, int n_pairs, int* pairs) {
  const uint32_t e = ids[p];
  for (int q = 0; q < p; ++q)
    if (ids[q] == e) return 0;
  int n = 0;
  for (int q = p; q < n_pairs && n < MOE_DECODE_MAX_TOKENS; ++q)
    if (ids[q] == e) pairs[n++] = q;
  return n;
}

// One block: for each of its rows, dot that row of NB weight matrices with the inputs of the
// block's pairs; `finish(row, j_pair, sums)` gets the NB sums of pair j_pair (lane 0 only).
template <typename T, int NB, typename Input, typename Finish>
__device__ void decode_rows(const T* const* w, int N, int K, int rows_per_block, int n_sel, Input input,
                            Finish finish) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int row_end = min(N, (int)(blockIdx.x + 1) * rows_per_block);
  for (int row = blockIdx.x * rows_per_block + warp; row < row_end; row += n_warps) {
    float acc[NB][MOE_DECODE_MAX_TOKENS];
    for (int j = 0; j < NB; ++j)
      for (int t = 0; t < MOE_DECODE_MAX_TOKENS; ++t) acc[j][t] = 0.f;
    for (int k = lane; k < K; k += kWarp) {
      float wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = load_weight(w[j] + (size_t)row * K + k);  // once
      for (int t = 0; t < n_sel; ++t) {
        const float xv = input(t, k);
        for (int j = 0; j < NB; ++j) acc[j][t] += wv[j] * xv;
      }
    }
    for (int t = 0; t < n_sel; ++t) {
      float sums[NB];
      for (int j = 0; j < NB; ++j) sums[j] = warp_sum(acc[j][t]);
      if (lane == 0) finish(row, t, sums);
    }
  }
}

template <typename T>
__device__ void decode_gate_up(const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up,
                               const T* __restrict__ b_gate, const T* __restrict__ b_up,
                               const int* __restrict__ expert_slot, const uint32_t* __restrict__ ids, int n_pairs,
                               int top_k, int N, int K, int rows_per_block, int act, float alpha, float limit,
                               T* __restrict__ inter) {
  int pairs[MOE_DECODE_MAX_TOKENS];
  const int n_sel = decode_pairs_of(ids, blockIdx.y, n_pairs, pairs);
  if (n_sel == 0) return;
  const size_t slot = expert_slot ? (size_t)expert_slot[ids[blockIdx.y]] : (size_t)ids[blockIdx.y];
  const T* w[2] = {w_gate + slot * N * K, w_up + slot * N * K};
  decode_rows<T, 2>(
      w, N, K, rows_per_block, n_sel,
      [&](int t, int k) { return to_f32(x[(size_t)(pairs[t] / top_k) * K + k]); },
      [&](int row, int t, const float* s) {
        const float g = round_to<T>(s[0] + (b_gate ? to_f32(b_gate[slot * N + row]) : 0.f));
        const float u = round_to<T>(s[1] + (b_up ? to_f32(b_up[slot * N + row]) : 0.f));
        inter[(size_t)pairs[t] * N + row] = from_f32<T>(activation<T>(act, g, u, alpha, limit));
      });
}

template <typename T>
__device__ void decode_down(const T* __restrict__ inter, const T* __restrict__ w_down, const T* __restrict__ b_down,
                            const int* __restrict__ expert_slot, const uint32_t* __restrict__ ids, int n_pairs, int N,
                            int K, int rows_per_block, T* __restrict__ y) {
  int pairs[MOE_DECODE_MAX_TOKENS];
  const int n_sel = decode_pairs_of(ids, blockIdx.y, n_pairs, pairs);
  if (n_sel == 0) return;
  const size_t slot = expert_slot ? (size_t)expert_slot[ids[blockIdx.y]] : (size_t)ids[blockIdx.y];
  const T* w[1] = {w_down + slot * N * K};
  decode_rows<T, 1>(
      w, N, K, rows_per_block, n_sel, [&](int t, int k) { return to_f32(inter[(size_t)pairs[t] * K + k]); },
      [&](int row, int t, const float* s) {
        y[(size_t)pairs[t] * N + row] = from_f32<T>(s[0] + (b_down ? to_f32(b_down[slot * N + row]) : 0.f));
      });
}

}  // namespace moe

#define MOE_DECODE_KERNELS(T, TN)                                                                         \
  extern "C" __global__ void moe_decode_gate_up_##TN(                                                    \
      const T* x, const T* w_gate, const T* w_up, const T* b_gate, const T* b_up, const int* expert_slot, \
      const uint32_t* ids, int n_pairs, int top_k, int n, int k, int rows_per_block, int act, float alpha, \
      float limit, T* inter) {                                                                            \
    moe::decode_gate_up<T>(x, w_gate, w_up, b_gate, b_up, expert_slot, ids, n_pairs, top_k, n, k,       \
                           rows_per_block, act, alpha, limit, inter);                                     \
  }                                                                                                       \
  extern "C" __global__ void moe_decode_down_##TN(const T* inter, const T* w_down, const T* b_down,      \
                                                  const int* expert_slot, const uint32_t* ids,            \
                                                  int n_pairs, int n, int k, int rows_per_block, T* y) {  \
    moe::decode_down<T>(inter, w_down, b_down, expert_slot, ids, n_pairs, n, k, rows_per_block, y);      \
  }
MOE_DECODE_KERNELS(float, f32)
MOE_DECODE_KERNELS(__half, f16)
MOE_DECODE_KERNELS(__nv_bfloat16, bf16)
