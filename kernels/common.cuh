// common.cuh - helpers shared by every moe-infer kernel: dtype conversion, warp reductions,
// the warp arg-max used by the top-k selections, the instrumented weight load, dynamic shared
// memory, and the GEMM tile table. Compiles with nvcc, and with g++ under
// shim/cuda_cpu_shim.h (the CPU harness), so nothing here may use cub, cooperative groups or
// inline PTX.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>
#include <float.h>
#include <limits.h>
#else
#ifndef MOE_CPU_SHIM
#error "host builds of the kernels need shim/cuda_cpu_shim.h (-include)"
#endif
#endif

// Called with the address of every expert-weight element a kernel reads through
// moe::load_weight; the CPU harness defines it to count reads (the decode kernel's
// "each weight once" check). Free on the GPU.
#ifndef MOE_ON_WEIGHT_READ
#define MOE_ON_WEIGHT_READ(ptr) ((void)0)
#endif

// Dynamic shared memory as a typed pointer.
#ifdef __CUDACC__
#define MOE_DYN_SMEM(T, name)                              \
  extern __shared__ __align__(16) unsigned char moe_smem_[]; \
  T* name = reinterpret_cast<T*>(moe_smem_)
#else
#define MOE_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(MOE_SHIM_DYN_SMEM())
#endif

namespace moe {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Rounds an f32 value through T and back (what storing an intermediate in T does).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f32(from_f32<T>(x)); }

// Reads one expert-weight element (counted by the CPU harness).
template <typename T>
__device__ __forceinline__ float load_weight(const T* p) {
  MOE_ON_WEIGHT_READ(p);
  return to_f32(*p);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// (value, index) candidate of an arg-max: larger value wins, ties go to the lower index.
struct Best {
  float value;
  int index;
};
__device__ __forceinline__ Best no_best() { return Best{-INFINITY, INT_MAX}; }
__device__ __forceinline__ bool better(Best a, Best b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}
// Arg-max over the warp; every lane gets the winner.
__device__ __forceinline__ Best warp_argmax(Best b) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(kFullMask, b.value, o), __shfl_xor_sync(kFullMask, b.index, o)};
    if (better(other, b)) b = other;
  }
  return b;
}

// Top two values of a warp (sum-of-top-2 group score); every lane gets both.
__device__ __forceinline__ void warp_top2(float& first, float& second) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float f = __shfl_xor_sync(kFullMask, first, o);
    const float s = __shfl_xor_sync(kFullMask, second, o);
    const float hi = fmaxf(first, f);
    const float lo = fmaxf(fminf(first, f), fmaxf(second, s));
    first = hi;
    second = lo;
  }
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- the grouped-GEMM tile table --------------------------------------------------------
// Tile sizes are data: each row instantiates the grouped GEMM kernels under a name that
// carries it (moe_gemm_*_<dtype>_m<BM>n<BN>k<BK>), and crates/moe-kernels/src/cuda/tiles.rs
// mirrors the table. BM is also the alignment tile of moe_align (rows per expert padded to it).
// X(BM, BN, BK, WARPS_M, WARPS_N): each warp owns (BM/WARPS_M) x (BN/WARPS_N) of the output in
// 16x16x16 WMMA fragments.
#define MOE_GEMM_TILES(X) \
  X(16, 64, 32, 1, 4)     \
  X(32, 64, 32, 2, 2)     \
  X(64, 64, 32, 2, 2)

// Activation between gate/up and down (ExpertActivation in Rust).
enum Activation : int { kSiluGlu = 0, kClampedSwiGlu = 1 };

// act(gate, up) with the rounding points of the CPU twin (expert_ffn.rs): gate and up arrive
// rounded to T; SiLU-GLU rounds silu(gate) then the product; GPT-OSS's clamped variant rounds
// after each elementary step.
template <typename T>
__device__ __forceinline__ float activation(int act, float gate, float up, float alpha, float limit) {
  if (act == kClampedSwiGlu) {
    const float g = fminf(gate, limit);
    const float u = fmaxf(fminf(up, limit), -limit);
    const float scaled = round_to<T>(g * alpha);
    const float sig = round_to<T>(1.0f / (1.0f + __expf(-scaled)));
    const float glu = round_to<T>(g * sig);
    const float up1 = round_to<T>(u + 1.0f);
    return round_to<T>(up1 * glu);
  }
  const float silu = round_to<T>(gate / (1.0f + __expf(-gate)));
  return round_to<T>(silu * up);
}

}  // namespace moe
