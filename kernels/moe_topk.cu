// moe_topk.cu - top-k gating fused with the router's output: logits [n_tokens, n_experts] ->
// ids [n_tokens, k] (u32, by decreasing choice score, ties to the lower id) and weights
// [n_tokens, k] (f32, renormalised and scaled). One block of one warp per token row; the
// experts are spread over the lanes and every selection is a warp arg-max.
// CPU twin: moe_kernels::route_with_bias (routing.rs), same contract.
//
// scoring: 0 softmax, 1 top-k then softmax over the chosen (GPT-OSS), 2 sigmoid (DeepSeek-V3).
// bias (optional, [n_experts] f32) shifts the choice only. n_group > 1 enables the group limit:
// keep the topk_group groups with the best group score (0: max, 1: sum of top 2; ties to the
// lower group) and choose only inside them.
// Dynamic shared memory: moe_topk_smem_bytes(n_experts, n_group, k) below.
#include "common.cuh"

namespace moe {

enum Scoring : int { kSoftmax = 0, kTopKThenSoftmax = 1, kSigmoid = 2 };

__host__ __device__ inline int moe_topk_smem_bytes(int n_experts, int n_group, int k) {
  return (2 * n_experts + n_group + k) * 4 + k * 4 + n_experts + n_group;
}

template <typename T>
__device__ void topk_row(const T* __restrict__ logits, const float* __restrict__ bias,
                         float* __restrict__ weights, uint32_t* __restrict__ ids, int n_experts, int k,
                         int scoring, int renormalize, float renorm_eps, float scale, int n_group,
                         int topk_group, int group_score) {
  const int lane = threadIdx.x;
  const int row = blockIdx.x;
  MOE_DYN_SMEM(float, smem);
  float* scores = smem;                   // [n_experts]
  float* choice = scores + n_experts;     // [n_experts]
  float* gscore = choice + n_experts;     // [n_group]
  float* sel_w = gscore + n_group;        // [k]
  int* sel_id = reinterpret_cast<int*>(sel_w + k);  // [k]
  unsigned char* taken = reinterpret_cast<unsigned char*>(sel_id + k);  // [n_experts]
  unsigned char* gkeep = taken + n_experts;                            // [n_group]

  const T* x = logits + (size_t)row * n_experts;
  float mx = -INFINITY;
  for (int e = lane; e < n_experts; e += kWarp) {
    const float v = to_f32(x[e]);
    scores[e] = v;
    mx = fmaxf(mx, v);
    taken[e] = 0;
  }
  if (scoring == kSoftmax) {
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < n_experts; e += kWarp) {
      const float p = __expf(scores[e] - mx);
      scores[e] = p;
      sum += p;
    }
    const float inv = 1.0f / warp_sum(sum);
    for (int e = lane; e < n_experts; e += kWarp) scores[e] *= inv;
  } else if (scoring == kSigmoid) {
    for (int e = lane; e < n_experts; e += kWarp) scores[e] = 1.0f / (1.0f + __expf(-scores[e]));
  }
  for (int e = lane; e < n_experts; e += kWarp) choice[e] = scores[e] + (bias ? bias[e] : 0.f);
  __syncwarp();

  if (n_group > 1) {
    const int group_size = n_experts / n_group;
    for (int g = 0; g < n_group; ++g) {
      float first = -INFINITY, second = -INFINITY;
      for (int i = lane; i < group_size; i += kWarp) {
        const float v = choice[g * group_size + i];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      warp_top2(first, second);
      if (lane == 0) gscore[g] = group_score == 0 ? first : first + second;
      if (lane == 0) gkeep[g] = 0;
    }
    __syncwarp();
    for (int i = 0; i < topk_group; ++i) {
      Best b = no_best();
      for (int g = lane; g < n_group; g += kWarp)
        if (!gkeep[g] && better(Best{gscore[g], g}, b)) b = Best{gscore[g], g};
      b = warp_argmax(b);
      if (lane == 0) gkeep[b.index] = 1;
      __syncwarp();
    }
    for (int e = lane; e < n_experts; e += kWarp)
      if (!gkeep[e / group_size]) choice[e] = -INFINITY;
    __syncwarp();
  }

  for (int i = 0; i < k; ++i) {
    Best b = no_best();
    for (int e = lane; e < n_experts; e += kWarp)
      if (!taken[e] && better(Best{choice[e], e}, b)) b = Best{choice[e], e};
    b = warp_argmax(b);
    if (lane == 0) {
      taken[b.index] = 1;
      sel_id[i] = b.index;
      sel_w[i] = scores[b.index];
    }
    __syncwarp();
  }

  if (lane == 0) {
    if (scoring == kTopKThenSoftmax) {  // softmax over the chosen logits; the first is the max
      const float top = sel_w[0];
      float sum = 0.f;
      for (int i = 0; i < k; ++i) sum += (sel_w[i] = __expf(sel_w[i] - top));
      for (int i = 0; i < k; ++i) sel_w[i] /= sum;
    }
    float denom = 0.f;
    for (int i = 0; i < k; ++i) denom += sel_w[i];
    denom += renorm_eps;
    for (int i = 0; i < k; ++i) {
      float w = renormalize ? sel_w[i] / denom : sel_w[i];
      weights[(size_t)row * k + i] = w * scale;
      ids[(size_t)row * k + i] = (uint32_t)sel_id[i];
    }
  }
}

}  // namespace moe

#define MOE_TOPK_KERNEL(NAME, T)                                                                  \
  extern "C" __global__ void NAME(const T* logits, const float* bias, float* weights, uint32_t* ids, \
                                  int n_experts, int k, int scoring, int renormalize,              \
                                  float renorm_eps, float scale, int n_group, int topk_group,      \
                                  int group_score) {                                               \
    moe::topk_row<T>(logits, bias, weights, ids, n_experts, k, scoring, renormalize, renorm_eps,   \
                     scale, n_group, topk_group, group_score);                                     \
  }
MOE_TOPK_KERNEL(moe_topk_f32, float)
MOE_TOPK_KERNEL(moe_topk_f16, __half)
MOE_TOPK_KERNEL(moe_topk_bf16, __nv_bfloat16)
