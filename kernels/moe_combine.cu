// moe_combine.cu - weighted combine / un-permute: out[t] = Σ_j weight[t, j] · y[row(t, j)],
// summed over a token's k experts in increasing expert id (the CPU twin's order), in f32,
// rounded once to T. row(t, j) = pair_row[t * k + j] (moe_align's pair_slot, for the rows of
// the grouped GEMM), or the pair itself when pair_row is null (the decode path's y).
// One block per token, threads over hidden. The grouped GEMM can instead fuse this into its
// down-projection epilogue (moe_gemm_down_* with `out`), which pays when rows are many.
// CPU twin: combine.rs.
#include "common.cuh"

namespace moe {

template <typename T>
__device__ void combine_token(const T* __restrict__ y, const int* __restrict__ pair_row,
                              const uint32_t* __restrict__ ids, const float* __restrict__ weights, int top_k,
                              int hidden, T* __restrict__ out) {
  const int t = blockIdx.x;
  const uint32_t* tid_ids = ids + (size_t)t * top_k;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.f;
    uint32_t last = 0;  // experts strictly above `last` remain (first round: all)
    for (int j = 0; j < top_k; ++j) {
      int pick = -1;
      for (int i = 0; i < top_k; ++i) {  // next expert id in increasing order (k is small)
        const uint32_t e = tid_ids[i];
        if ((j == 0 || e > last) && (pick < 0 || e < tid_ids[pick])) pick = i;
      }
      const int pair = t * top_k + pick;
      last = tid_ids[pick];
      const size_t row = pair_row ? (size_t)pair_row[pair] : (size_t)pair;
      acc += round_to<T>(weights[pair] * to_f32(y[row * hidden + h]));
    }
    out[(size_t)t * hidden + h] = from_f32<T>(acc);
  }
}

}  // namespace moe

#define MOE_COMBINE_KERNEL(T, TN)                                                                    \
  extern "C" __global__ void moe_combine_##TN(const T* y, const int* pair_row, const uint32_t* ids,  \
                                              const float* weights, int top_k, int hidden, T* out) { \
    moe::combine_token<T>(y, pair_row, ids, weights, top_k, hidden, out);                            \
  }
MOE_COMBINE_KERNEL(float, f32)
MOE_COMBINE_KERNEL(__half, f16)
MOE_COMBINE_KERNEL(__nv_bfloat16, bf16)
