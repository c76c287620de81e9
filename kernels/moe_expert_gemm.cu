// moe_expert_gemm.cu - the grouped expert GEMM over the rows moe_align sorted by expert:
//   gate_up: inter[row] = act(x[token(row)] · W_gate[e]ᵀ + b_gate, x[token(row)] · W_up[e]ᵀ + b_up)
//   down:    y[row] = inter[row] · W_down[e]ᵀ + b_down, or, with the combine fused into the
//            epilogue, out[token(row)] += weight(row) · y[row] (f32 atomics).
// bf16/f16 inputs, f32 accumulation on tensor cores (WMMA 16x16x16, sm_80+); the tile sizes
// come from MOE_GEMM_TILES in common.cuh and are part of each kernel's name.
// Weights are [slots, out, in] row-major (HF layout, experts stacked); expert_slot (optional,
// [n_experts] i32) maps an expert to its slot of the device expert pool (identity if null).
// Rows of a tile whose pair is n_pairs (padding) compute with zero inputs and are never
// combined; tiles past the padded total (tile_expert = -1) write zeros.
// CPU twin: grouping.rs + expert_ffn.rs + combine.rs (the CPU MoE pipeline), same contract.
#include "common.cuh"

namespace moe {

namespace wmma = nvcuda::wmma;

// Shared-memory layout of one tile configuration with NB weight matrices (gate_up: 2).
template <int BM, int BN, int BK, int NB>
struct GemmSmem {
  static constexpr int kLdA = BK + 8;  // padding against bank conflicts; multiple of 8
  static constexpr int kLdB = BK + 8;
  static constexpr int kLdC = BN + 4;  // multiple of 4 (f32 WMMA store)
  static constexpr int kBytesAB = (BM * kLdA + NB * BN * kLdB) * 2;
  static constexpr int kBytesC = NB * BM * kLdC * 4;
  static constexpr int kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;
};

// Accumulates the [BM, BN] output tile of NB products: rows from `a_row(r)` (a pointer to a
// K-long row, or null for a zero row), weights W[j] rows n0.. (already offset to the expert's
// slot). Leaves the f32 results in shared memory C[j][BM][kLdC]; returns that pointer.
template <typename T, int BM, int BN, int BK, int WM, int WN, int NB, typename ARow>
__device__ float* mma_tile(ARow a_row, const T* const* w, int n0, int N, int K, unsigned char* smem) {
  using S = GemmSmem<BM, BN, BK, NB>;
  constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0 && BK % 16 == 0, "tile not a multiple of 16");
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * S::kLdA;
  const int tid = threadIdx.x, n_threads = blockDim.x;
  const int warp = tid / kWarp, wm = warp / WN, wn = warp % WN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NB][kFragM][kFragN];
  for (int j = 0; j < NB; ++j)
    for (int fm = 0; fm < kFragM; ++fm)
      for (int fn = 0; fn < kFragN; ++fn) wmma::fill_fragment(acc[j][fm][fn], 0.0f);

  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int i = tid; i < BM * BK; i += n_threads) {
      const int r = i / BK, c = i % BK;
      const T* src = a_row(r);
      As[r * S::kLdA + c] = (src && k0 + c < K) ? src[k0 + c] : from_f32<T>(0.f);
    }
    for (int i = tid; i < NB * BN * BK; i += n_threads) {
      const int j = i / (BN * BK), r = (i / BK) % BN, c = i % BK;
      const bool in = n0 + r < N && k0 + c < K;
      Bs[(j * BN + r) * S::kLdB + c] = from_f32<T>(in ? load_weight(w[j] + (size_t)(n0 + r) * K + k0 + c) : 0.f);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[kFragM];
      for (int fm = 0; fm < kFragM; ++fm)
        wmma::load_matrix_sync(a[fm], As + (wm * kWarpM + fm * 16) * S::kLdA + kk, S::kLdA);
      for (int j = 0; j < NB; ++j)
        for (int fn = 0; fn < kFragN; ++fn) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, Bs + (j * BN + wn * kWarpN + fn * 16) * S::kLdB + kk, S::kLdB);
          for (int fm = 0; fm < kFragM; ++fm) wmma::mma_sync(acc[j][fm][fn], a[fm], b, acc[j][fm][fn]);
        }
    }
    __syncthreads();
  }
  float* Cs = reinterpret_cast<float*>(smem);  // reuses the A/B tiles (synchronised above)
  for (int j = 0; j < NB; ++j)
    for (int fm = 0; fm < kFragM; ++fm)
      for (int fn = 0; fn < kFragN; ++fn)
        wmma::store_matrix_sync(Cs + (j * BM + wm * kWarpM + fm * 16) * S::kLdC + wn * kWarpN + fn * 16,
                                acc[j][fm][fn], S::kLdC, wmma::mem_row_major);
  __syncthreads();
  return Cs;
}

template <typename T, int BM, int BN>
__device__ void zero_tile(T* out, int m0, int n0, int N) {
  for (int i = threadIdx.x; i < BM * BN; i += blockDim.x) {
    const int r = i / BN, n = n0 + i % BN;
    if (n < N) out[(size_t)(m0 + r) * N + n] = from_f32<T>(0.f);
  }
}

__device__ __forceinline__ int expert_slot_of(const int* expert_slot, int e) {
  return expert_slot ? expert_slot[e] : e;
}

template <typename T, int BM, int BN, int BK, int WM, int WN>
__device__ void gemm_gate_up(const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up,
                             const T* __restrict__ b_gate, const T* __restrict__ b_up,
                             const int* __restrict__ expert_slot, const uint32_t* __restrict__ sorted_pairs,
                             const int* __restrict__ tile_expert, int n_pairs, int top_k, int N, int K, int act,
                             float alpha, float limit, T* __restrict__ inter) {
  using S = GemmSmem<BM, BN, BK, 2>;
  __shared__ __align__(32) unsigned char smem[S::kBytes];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int e = tile_expert[blockIdx.y];
  if (e < 0) return zero_tile<T, BM, BN>(inter, m0, n0, N);
  const size_t slot = (size_t)expert_slot_of(expert_slot, e);
  const T* w[2] = {w_gate + slot * N * K, w_up + slot * N * K};
  auto a_row = [&](int r) -> const T* {
    const uint32_t pair = sorted_pairs[m0 + r];
    return pair < (uint32_t)n_pairs ? x + (size_t)(pair / top_k) * K : nullptr;
  };
  const float* C = mma_tile<T, BM, BN, BK, WM, WN, 2>(a_row, w, n0, N, K, smem);
  for (int i = threadIdx.x; i < BM * BN; i += blockDim.x) {
    const int r = i / BN, c = i % BN, n = n0 + c;
    if (n >= N) continue;
    const float g = round_to<T>(C[r * S::kLdC + c] + (b_gate ? to_f32(b_gate[slot * N + n]) : 0.f));
    const float u = round_to<T>(C[(BM + r) * S::kLdC + c] + (b_up ? to_f32(b_up[slot * N + n]) : 0.f));
    inter[(size_t)(m0 + r) * N + n] = from_f32<T>(activation<T>(act, g, u, alpha, limit));
  }
}

template <typename T, int BM, int BN, int BK, int WM, int WN>
__device__ void gemm_down(const T* __restrict__ inter, const T* __restrict__ w_down, const T* __restrict__ b_down,
                          const int* __restrict__ expert_slot, const uint32_t* __restrict__ sorted_pairs,
                          const int* __restrict__ tile_expert, const float* __restrict__ pair_weight, int n_pairs,
                          int top_k, int N, int K, float* __restrict__ out, T* __restrict__ y) {
  using S = GemmSmem<BM, BN, BK, 1>;
  __shared__ __align__(32) unsigned char smem[S::kBytes];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int e = tile_expert[blockIdx.y];
  if (e < 0) {
    if (y) zero_tile<T, BM, BN>(y, m0, n0, N);
    return;
  }
  const size_t slot = (size_t)expert_slot_of(expert_slot, e);
  const T* w[1] = {w_down + slot * N * K};
  auto a_row = [&](int r) -> const T* { return inter + (size_t)(m0 + r) * K; };
  const float* C = mma_tile<T, BM, BN, BK, WM, WN, 1>(a_row, w, n0, N, K, smem);
  for (int i = threadIdx.x; i < BM * BN; i += blockDim.x) {
    const int r = i / BN, c = i % BN, n = n0 + c;
    if (n >= N) continue;
    const float v = round_to<T>(C[r * S::kLdC + c] + (b_down ? to_f32(b_down[slot * N + n]) : 0.f));
    if (y) y[(size_t)(m0 + r) * N + n] = from_f32<T>(v);
    const uint32_t pair = sorted_pairs[m0 + r];
    if (out && pair < (uint32_t)n_pairs)  // combine fused into the epilogue
      atomicAdd(out + (size_t)(pair / top_k) * N + n, round_to<T>(v * pair_weight[pair]));
  }
}

}  // namespace moe

#define MOE_GEMM_KERNELS(T, TN, BM, BN, BK, WM, WN)                                                      \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                           \
      moe_gemm_gate_up_##TN##_m##BM##n##BN##k##BK(                                                      \
          const T* x, const T* w_gate, const T* w_up, const T* b_gate, const T* b_up,                   \
          const int* expert_slot, const uint32_t* sorted_pairs, const int* tile_expert, int n_pairs,    \
          int top_k, int n, int k, int act, float alpha, float limit, T* inter) {                       \
    moe::gemm_gate_up<T, BM, BN, BK, WM, WN>(x, w_gate, w_up, b_gate, b_up, expert_slot, sorted_pairs, \
                                             tile_expert, n_pairs, top_k, n, k, act, alpha, limit,      \
                                             inter);                                                    \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32) moe_gemm_down_##TN##_m##BM##n##BN##k##BK(  \
      const T* inter, const T* w_down, const T* b_down, const int* expert_slot,                         \
      const uint32_t* sorted_pairs, const int* tile_expert, const float* pair_weight, int n_pairs,      \
      int top_k, int n, int k, float* out, T* y) {                                                      \
    moe::gemm_down<T, BM, BN, BK, WM, WN>(inter, w_down, b_down, expert_slot, sorted_pairs,             \
                                          tile_expert, pair_weight, n_pairs, top_k, n, k, out, y);      \
  }
#define MOE_GEMM_BF16(BM, BN, BK, WM, WN) MOE_GEMM_KERNELS(__nv_bfloat16, bf16, BM, BN, BK, WM, WN)
#define MOE_GEMM_F16(BM, BN, BK, WM, WN) MOE_GEMM_KERNELS(__half, f16, BM, BN, BK, WM, WN)
MOE_GEMM_TILES(MOE_GEMM_BF16)
MOE_GEMM_TILES(MOE_GEMM_F16)
