// harness.cpp - runs moe-infer's CUDA kernels on the CPU through shim/cuda_cpu_shim.h.
//   g++ -std=c++20 -pthread -Ikernels -include kernels/shim/cuda_cpu_shim.h
//       kernels/shim_tests/harness.cpp -o harness
//   harness IN OUT
// IN and OUT are "tensor files": a sequence of (u32 name length, name, u32 dtype, u64 count,
// count elements) records, dtype 0 f32, 1 f16, 2 bf16, 3 u32, 4 i32 (all little endian). IN
// names the operation in a record "op" (u32 characters) and holds its inputs, "params" (i32)
// and "fparams" (f32); OUT receives the kernels' outputs. Every output buffer is poisoned before
// the launch, so an element a kernel fails to write shows up in the caller's comparison.
// The reference results live on the Rust side (crates/moe-kernels/tests/shim.rs): this file
// only launches kernels, exactly as the Rust launchers in src/cuda do on a GPU.
#include <atomic>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>

// ---- weight-read accounting (moe::load_weight calls this for every element it reads) ------
namespace harness {
struct Counted {
  const unsigned char* base = nullptr;
  size_t elem = 0, n = 0;
  std::vector<std::atomic<uint32_t>>* counts = nullptr;
};
inline Counted g_counted[3];
inline void count_read(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (Counted& c : g_counted)
    if (c.base && q >= c.base && q < c.base + c.elem * c.n) {
      (*c.counts)[(q - c.base) / c.elem].fetch_add(1, std::memory_order_relaxed);
      return;
    }
}
}  // namespace harness
#define MOE_ON_WEIGHT_READ(p) harness::count_read(p)

#include "moe_align.cu"
#include "moe_combine.cu"
#include "moe_decode.cu"
#include "moe_expert_gemm.cu"
#include "moe_topk.cu"

namespace harness {

enum DType : uint32_t { F32 = 0, F16 = 1, BF16 = 2, U32 = 3, I32 = 4 };
struct Buf {
  DType dtype;
  std::vector<unsigned char> bytes;  // exact size: ASan sees any overrun
  size_t n() const { return bytes.size() / (dtype == F16 || dtype == BF16 ? 2 : 4); }
  template <typename T>
  T* as() { return bytes.empty() ? nullptr : reinterpret_cast<T*>(bytes.data()); }
};
using Tensors = std::map<std::string, Buf>;

Tensors read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  Tensors t;
  uint32_t len;
  while (f.read(reinterpret_cast<char*>(&len), 4)) {
    std::string name(len, '\0');
    uint32_t dt;
    uint64_t n;
    f.read(name.data(), len);
    f.read(reinterpret_cast<char*>(&dt), 4);
    f.read(reinterpret_cast<char*>(&n), 8);
    Buf b{(DType)dt, {}};
    b.bytes.resize(n * (dt == F16 || dt == BF16 ? 2 : 4));
    f.read(reinterpret_cast<char*>(b.bytes.data()), (std::streamsize)b.bytes.size());
    if (!f) throw std::runtime_error("truncated input record " + name);
    t[name] = std::move(b);
  }
  return t;
}
void write_file(const char* path, Tensors& t) {
  std::ofstream f(path, std::ios::binary);
  for (auto& [name, b] : t) {
    const uint32_t len = (uint32_t)name.size(), dt = b.dtype;
    const uint64_t n = b.n();
    f.write(reinterpret_cast<const char*>(&len), 4);
    f.write(name.data(), len);
    f.write(reinterpret_cast<const char*>(&dt), 4);
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(reinterpret_cast<const char*>(b.bytes.data()), (std::streamsize)b.bytes.size());
  }
}
Buf& need(Tensors& t, const char* name) {
  auto it = t.find(name);
  if (it == t.end()) throw std::runtime_error(std::string("missing input ") + name);
  return it->second;
}
template <typename T>
T* opt(Tensors& t, const char* name) {
  auto it = t.find(name);
  return it == t.end() ? nullptr : it->second.as<T>();
}
// A buffer of n elements filled with a poison pattern (0xFF bytes: NaN for floats, -1/max for
// integers, which no kernel writes as a valid result except the documented -1 tile markers).
Buf poisoned(DType dt, size_t n) {
  Buf b{dt, {}};
  b.bytes.assign(n * (dt == F16 || dt == BF16 ? 2 : 4), 0xFF);
  return b;
}
Buf zeros(DType dt, size_t n) {
  Buf b{dt, {}};
  b.bytes.assign(n * (dt == F16 || dt == BF16 ? 2 : 4), 0);
  return b;
}

void run_topk(Tensors& in, Tensors& out) {
  const int* p = need(in, "params").as<int>();
  const int n_tokens = p[0], n_experts = p[1], k = p[2], scoring = p[3], renorm = p[4], n_group = p[5],
            topk_group = p[6], group_score = p[7];
  const float* fp = need(in, "fparams").as<float>();
  Buf& logits = need(in, "logits");
  const float* bias = opt<float>(in, "bias");
  Buf w = poisoned(F32, (size_t)n_tokens * k), ids = poisoned(U32, (size_t)n_tokens * k);
  const size_t smem = moe::moe_topk_smem_bytes(n_experts, n_group, k);
  const dim3 grid(n_tokens), block(32);
#define LAUNCH_TOPK(K, T)                                                                                  \
  cuda_shim::launch(K, grid, block, smem, (const T*)logits.as<T>(), bias, w.as<float>(), ids.as<uint32_t>(), \
                    n_experts, k, scoring, renorm, fp[0], fp[1], n_group, topk_group, group_score)
  if (logits.dtype == F32)
    LAUNCH_TOPK(moe_topk_f32, float);
  else if (logits.dtype == F16)
    LAUNCH_TOPK(moe_topk_f16, __half);
  else
    LAUNCH_TOPK(moe_topk_bf16, __nv_bfloat16);
  out["weights"] = std::move(w);
  out["ids"] = std::move(ids);
}

struct Aligned {
  Buf offsets, sorted, tile_expert, pair_slot;
};
Aligned align(const uint32_t* ids, int n_pairs, int n_experts, int tile) {
  const int cap = moe::moe_align_capacity(n_pairs, n_experts, tile);
  Aligned a{poisoned(I32, n_experts + 1), poisoned(U32, cap), poisoned(I32, cap / tile), poisoned(I32, n_pairs)};
  const size_t smem = (size_t)(2 * n_experts + 2) * 4;
  cuda_shim::launch(moe_align, dim3(1), dim3(128), smem, ids, n_pairs, n_experts, tile, a.offsets.as<int>(),
                    a.sorted.as<uint32_t>(), a.tile_expert.as<int>(), a.pair_slot.as<int>());
  return a;
}

void run_align(Tensors& in, Tensors& out) {
  const int* p = need(in, "params").as<int>();
  Aligned a = align(need(in, "ids").as<uint32_t>(), p[0], p[1], p[2]);
  out["offsets"] = std::move(a.offsets);
  out["sorted_pairs"] = std::move(a.sorted);
  out["tile_expert"] = std::move(a.tile_expert);
  out["pair_slot"] = std::move(a.pair_slot);
}

// The kernels of one tile configuration, found by its BM (the tile table has one row per BM).
template <typename T>
struct GemmKernels {
  void (*gate_up)(const T*, const T*, const T*, const T*, const T*, const int*, const uint32_t*, const int*, int,
                  int, int, int, int, float, float, T*);
  void (*down)(const T*, const T*, const T*, const int*, const uint32_t*, const int*, const float*, int, int, int,
               int, float*, T*);
  int threads;
};
template <typename T>
GemmKernels<T> gemm_kernels(int bm);
#define GEMM_ENTRY(TN, BM, BN, BK, WM, WN) \
  if (bm == BM) return {moe_gemm_gate_up_##TN##_m##BM##n##BN##k##BK, moe_gemm_down_##TN##_m##BM##n##BN##k##BK, WM * WN * 32};
#define GEMM_BF16(BM, BN, BK, WM, WN) GEMM_ENTRY(bf16, BM, BN, BK, WM, WN)
#define GEMM_F16(BM, BN, BK, WM, WN) GEMM_ENTRY(f16, BM, BN, BK, WM, WN)
template <>
GemmKernels<__nv_bfloat16> gemm_kernels(int bm) {
  MOE_GEMM_TILES(GEMM_BF16)
  throw std::runtime_error("no tile with that BM");
}
template <>
GemmKernels<__half> gemm_kernels(int bm) {
  MOE_GEMM_TILES(GEMM_F16)
  throw std::runtime_error("no tile with that BM");
}
int tile_bn(int bm) {
#define TILE_BN(BM, BN, BK, WM, WN) \
  if (bm == BM) return BN;
  MOE_GEMM_TILES(TILE_BN)
  throw std::runtime_error("no tile with that BM");
}

// The expert FFN + combine of a whole MoE layer, by one of three paths:
// 0: align -> grouped GEMM gate_up -> grouped GEMM down with the combine fused (f32 atomics)
// 1: align -> grouped GEMM gate_up -> grouped GEMM down -> moe_combine
// 2: decode gate_up -> decode down -> moe_combine (<= 8 tokens), counting weight reads
template <typename T>
void run_moe_t(Tensors& in, Tensors& out, DType dt) {
  const int* p = need(in, "params").as<int>();
  const int n_tokens = p[0], k = p[1], n_experts = p[2], hidden = p[3], inter_n = p[4], act = p[5], path = p[6],
            bm = p[7], rows_per_block = p[8];
  const float* fp = need(in, "fparams").as<float>();
  const int n_pairs = n_tokens * k;
  T* x = need(in, "x").as<T>();
  T* wg = need(in, "w_gate").as<T>();
  T* wu = need(in, "w_up").as<T>();
  T* wd = need(in, "w_down").as<T>();
  T *bg = opt<T>(in, "b_gate"), *bu = opt<T>(in, "b_up"), *bd = opt<T>(in, "b_down");
  const int* slot = opt<int>(in, "expert_slot");
  uint32_t* ids = need(in, "ids").as<uint32_t>();
  float* weights = need(in, "weights").as<float>();
  Buf y_out = poisoned(dt, (size_t)n_tokens * hidden);

  if (path == 2) {
    std::vector<std::atomic<uint32_t>> cg(need(in, "w_gate").n()), cu(need(in, "w_up").n()), cd(need(in, "w_down").n());
    g_counted[0] = {(const unsigned char*)wg, sizeof(T), cg.size(), &cg};
    g_counted[1] = {(const unsigned char*)wu, sizeof(T), cu.size(), &cu};
    g_counted[2] = {(const unsigned char*)wd, sizeof(T), cd.size(), &cd};
    Buf inter = poisoned(dt, (size_t)n_pairs * inter_n), y = poisoned(dt, (size_t)n_pairs * hidden);
    const dim3 block(128);
#define DECODE(TN)                                                                                                \
  cuda_shim::launch(moe_decode_gate_up_##TN, dim3(moe::ceil_div(inter_n, rows_per_block), n_pairs), block, 0,     \
                    (const T*)x, (const T*)wg, (const T*)wu, (const T*)bg, (const T*)bu, slot, (const uint32_t*)ids, \
                    n_pairs, k, inter_n, hidden, rows_per_block, act, fp[0], fp[1], inter.as<T>());               \
  cuda_shim::launch(moe_decode_down_##TN, dim3(moe::ceil_div(hidden, rows_per_block), n_pairs), block, 0,         \
                    (const T*)inter.as<T>(), (const T*)wd, (const T*)bd, slot, (const uint32_t*)ids, n_pairs,       \
                    hidden, inter_n, rows_per_block, y.as<T>());                                                  \
  cuda_shim::launch(moe_combine_##TN, dim3(n_tokens), dim3(64), 0, (const T*)y.as<T>(), (const int*)nullptr,      \
                    (const uint32_t*)ids, (const float*)weights, k, hidden, y_out.as<T>())
    if constexpr (std::is_same_v<T, float>) {
      DECODE(f32);
    } else if constexpr (std::is_same_v<T, __half>) {
      DECODE(f16);
    } else {
      DECODE(bf16);
    }
    for (auto [name, c] : {std::pair{"reads_gate", &cg}, {"reads_up", &cu}, {"reads_down", &cd}}) {
      Buf r = zeros(U32, c->size());
      for (size_t i = 0; i < c->size(); ++i) r.as<uint32_t>()[i] = (*c)[i].load();
      out[name] = std::move(r);
    }
    for (Counted& c : g_counted) c = Counted{};
    out["y"] = std::move(y_out);
    return;
  }

  if constexpr (std::is_same_v<T, float>) {
    throw std::runtime_error("the grouped GEMM is bf16/f16 only (tensor cores)");
  } else {
    const GemmKernels<T> kern = gemm_kernels<T>(bm);
    const int bn = tile_bn(bm);
    Aligned a = align(ids, n_pairs, n_experts, bm);
    const int cap = (int)a.sorted.n();
    Buf inter = poisoned(dt, (size_t)cap * inter_n);
    cuda_shim::launch(kern.gate_up, dim3(moe::ceil_div(inter_n, bn), cap / bm), dim3(kern.threads), 0, (const T*)x,
                      (const T*)wg, (const T*)wu, (const T*)bg, (const T*)bu, slot, (const uint32_t*)a.sorted.as<uint32_t>(),
                      (const int*)a.tile_expert.as<int>(), n_pairs, k, inter_n, hidden, act, fp[0], fp[1], inter.as<T>());
    const dim3 grid_down(moe::ceil_div(hidden, bn), cap / bm);
    if (path == 0) {
      Buf acc = zeros(F32, (size_t)n_tokens * hidden);
      cuda_shim::launch(kern.down, grid_down, dim3(kern.threads), 0, (const T*)inter.as<T>(), (const T*)wd, (const T*)bd,
                        slot, (const uint32_t*)a.sorted.as<uint32_t>(), (const int*)a.tile_expert.as<int>(),
                        (const float*)weights, n_pairs, k, hidden, inter_n, acc.as<float>(), (T*)nullptr);
      for (size_t i = 0; i < acc.n(); ++i) y_out.as<T>()[i] = moe::from_f32<T>(acc.as<float>()[i]);
    } else {
      Buf y = poisoned(dt, (size_t)cap * hidden);
      cuda_shim::launch(kern.down, grid_down, dim3(kern.threads), 0, (const T*)inter.as<T>(), (const T*)wd, (const T*)bd,
                        slot, (const uint32_t*)a.sorted.as<uint32_t>(), (const int*)a.tile_expert.as<int>(),
                        (const float*)weights, n_pairs, k, hidden, inter_n, (float*)nullptr, y.as<T>());
      if constexpr (std::is_same_v<T, __half>)
        cuda_shim::launch(moe_combine_f16, dim3(n_tokens), dim3(64), 0, (const T*)y.as<T>(),
                          (const int*)a.pair_slot.as<int>(), (const uint32_t*)ids, (const float*)weights, k, hidden,
                          y_out.as<T>());
      else
        cuda_shim::launch(moe_combine_bf16, dim3(n_tokens), dim3(64), 0, (const T*)y.as<T>(),
                          (const int*)a.pair_slot.as<int>(), (const uint32_t*)ids, (const float*)weights, k, hidden,
                          y_out.as<T>());
      // every row of y up to the capacity must have been written (padding rows included)
      size_t unwritten = 0;
      for (size_t i = 0; i < y.n(); ++i) {
        uint16_t bits;
        std::memcpy(&bits, y.bytes.data() + 2 * i, 2);
        unwritten += bits == 0xFFFF;
      }
      Buf u = zeros(U32, 1);
      u.as<uint32_t>()[0] = (uint32_t)unwritten;
      out["unwritten_y_rows"] = std::move(u);
    }
    size_t unwritten = 0;
    for (size_t i = 0; i < inter.n(); ++i) {
      uint16_t bits;
      std::memcpy(&bits, inter.bytes.data() + 2 * i, 2);
      unwritten += bits == 0xFFFF;
    }
    Buf u = zeros(U32, 1);
    u.as<uint32_t>()[0] = (uint32_t)unwritten;
    out["unwritten_inter"] = std::move(u);
  }
  out["y"] = std::move(y_out);
}

void run_moe(Tensors& in, Tensors& out) {
  switch (need(in, "x").dtype) {
    case F32: return run_moe_t<float>(in, out, F32);
    case F16: return run_moe_t<__half>(in, out, F16);
    case BF16: return run_moe_t<__nv_bfloat16>(in, out, BF16);
    default: throw std::runtime_error("x must be a float tensor");
  }
}

}  // namespace harness

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    harness::Tensors in = harness::read_file(argv[1]), out;
    std::string op;
    for (size_t i = 0; i < harness::need(in, "op").n(); ++i) op += (char)harness::need(in, "op").as<uint32_t>()[i];
    if (op == "topk")
      harness::run_topk(in, out);
    else if (op == "align")
      harness::run_align(in, out);
    else if (op == "moe")
      harness::run_moe(in, out);
    else
      throw std::runtime_error("unknown op " + op);
    harness::write_file(argv[2], out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
