// cuda_cpu_shim.h - executes moe-infer's .cu kernels on the CPU, for index and race checks.
//
// Self-contained: needs no CUDA header, so plain g++ (C++20) builds it:
//   g++ -std=c++20 -pthread -Ikernels -include kernels/shim/cuda_cpu_shim.h harness.cpp
// Model: the blocks of a grid run one after another; every CUDA thread of a block is a fiber
// (default: deterministic, fast under load, reports divergent barriers as deadlocks) or, with
// -DMOE_SHIM_THREADS, a std::thread (for ThreadSanitizer: real concurrency between barriers);
// __syncthreads is a barrier of the block; warp intrinsics exchange values through a per-warp
// buffer between two warp barriers, so a lane that left early is detected instead of silently
// reading garbage. __shared__ becomes `static` (one block runs at a time).
// Tensor cores: nvcuda::wmma fragments are emulated warp-collectively (lane 0 owns the tile
// store, every lane computes the product), so the tiling/index logic of WMMA kernels runs too.
// Not modelled: performance, coalescing, occupancy, launch limits, fast-math differences.
#pragma once
#if defined(__CUDACC__)
#error "cuda_cpu_shim.h is for host-only builds of the kernels"
#endif
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#ifndef MOE_SHIM_THREADS
#include <ucontext.h>
#endif

#define MOE_CPU_SHIM 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict

// ---- vector types -------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- host half / bfloat16 (round to nearest even, like __float2half_rn / __float2bfloat16) -
struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) {
    _Float16 h = (_Float16)f;
    std::memcpy(&bits, &h, 2);
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
  }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = (uint16_t)((u >> 16) | 0x40);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = (uint16_t)(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }

namespace cuda_shim {
#ifdef MOE_SHIM_THREADS
// One OS thread per CUDA thread, real barriers: what ThreadSanitizer needs to see races.
struct Barrier {
  std::barrier<> b;
  explicit Barrier(int n) : b(n) {}
  void arrive_and_wait() { b.arrive_and_wait(); }
  void arrive_and_drop() { b.arrive_and_drop(); }
};
#else
// One fiber (ucontext) per CUDA thread, all on the calling thread: deterministic, and as fast
// on a loaded 2-core machine as on an idle one. A barrier that can never complete (a
// divergent __syncthreads or shuffle) is reported instead of hanging.
inline void yield();
struct Barrier {
  int expected, arrived = 0;
  unsigned generation = 0;
  explicit Barrier(int n) : expected(n) {}
  void arrive_and_wait() {
    const unsigned g = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == g) yield();
  }
  void arrive_and_drop() {
    if (--expected == arrived && arrived > 0) {
      arrived = 0;
      ++generation;
    }
  }
};
#endif

struct Warp {
  std::unique_ptr<Barrier> bar;
  alignas(16) unsigned char buf[32][16];
  std::atomic<unsigned> alive{0};  // one bit per lane that has not returned yet
  int size = 32;
};
struct Block {
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* dyn_smem = nullptr;
};
struct Ctx {
  uint3 tid{}, bid{};
  dim3 bdim, gdim;
  Block* block = nullptr;
  unsigned linear() const { return tid.x + bdim.x * (tid.y + bdim.y * tid.z); }
  unsigned lane() const { return linear() % 32; }
  Warp& warp() const { return *block->warps[linear() / 32]; }
};
inline thread_local Ctx* g_ctx = nullptr;
inline Ctx& ctx() { return *g_ctx; }

[[noreturn]] inline void fail(const char* what) {
  const Ctx& c = *g_ctx;
  std::fprintf(stderr, "cuda_cpu_shim: %s (block %u,%u,%u thread %u,%u,%u)\n", what, c.bid.x, c.bid.y, c.bid.z,
               c.tid.x, c.tid.y, c.tid.z);
  std::abort();
}
inline unsigned full_mask(const Warp& w) { return w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1u); }
inline void check_mask(unsigned mask) {
  Warp& w = ctx().warp();
  const unsigned full = full_mask(w);
  if ((mask & full) != full) fail("the shim supports full-warp masks only");
  if ((w.alive.load() & full) != full) fail("warp intrinsic after a lane of the warp returned (UB on a GPU)");
}
// Every lane publishes `v`; returns what lane `src` published.
template <typename T>
T exchange(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  check_mask(mask);
  Warp& w = ctx().warp();
  const unsigned lane = ctx().lane();
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.bar->arrive_and_wait();
  T r;
  std::memcpy(&r, w.buf[(src >= 0 && src < w.size) ? src : (int)lane], sizeof(T));
  w.bar->arrive_and_wait();
  return r;
}
inline void warp_barrier() {
  check_mask(0xffffffffu);
  ctx().warp().bar->arrive_and_wait();
}

// What one CUDA thread runs: the kernel, then it leaves its warp and block barriers.
inline void finish_thread(Ctx& c) {
  Warp& w = c.warp();
  w.alive.fetch_and(~(1u << c.lane()));
  w.bar->arrive_and_drop();
  c.block->bar->arrive_and_drop();
}

#ifndef MOE_SHIM_THREADS
struct Fiber {
  ucontext_t uc;
  Ctx ctx;
  bool done = false;
  std::function<void()> body;
};
inline thread_local ucontext_t g_scheduler;
inline thread_local Fiber* g_fiber = nullptr;
inline void yield() {
  Fiber* f = g_fiber;
  swapcontext(&f->uc, &g_scheduler);
  g_ctx = &g_fiber->ctx;
}
inline void fiber_entry() {
  g_fiber->body();
  g_fiber->done = true;
  swapcontext(&g_fiber->uc, &g_scheduler);
}
// Out of line: getcontext returns twice, which must not happen inside launch's loops.
[[gnu::noinline]] inline void prepare_fiber(Fiber& f, unsigned char* stack, size_t size) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_entry, 0);
}
// Runs the fibers round-robin until all have finished.
inline void run_fibers(std::vector<std::unique_ptr<Fiber>>& fibers) {
  size_t n_done = 0;
  int idle_rounds = 0;
  while (n_done < fibers.size()) {
    n_done = 0;
    bool any_progress = false;
    for (auto& f : fibers) {
      if (f->done) {
        ++n_done;
        continue;
      }
      g_fiber = f.get();
      g_ctx = &f->ctx;
      // progress = a barrier generation moved or a fiber finished since the last round
      const unsigned before = f->ctx.block->bar->generation + f->ctx.warp().bar->generation;
      swapcontext(&g_scheduler, &f->uc);
      const unsigned after = f->ctx.block->bar->generation + f->ctx.warp().bar->generation;
      any_progress |= f->done || before != after;
    }
    idle_rounds = any_progress ? 0 : idle_rounds + 1;
    if (idle_rounds > 2 && n_done < fibers.size()) {
      for (auto& f : fibers)
        if (!f->done) {
          g_ctx = &f->ctx;
          fail("deadlock: a barrier or warp intrinsic that not every thread reaches");
        }
    }
  }
}
#endif

// Runs `kernel<<<grid, block, dyn_smem>>>(args...)` to completion.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dyn_smem_bytes, Args... args) {
  const unsigned n_threads = block.x * block.y * block.z;
  if (n_threads == 0 || n_threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    std::fprintf(stderr, "cuda_cpu_shim: invalid launch configuration\n");
    std::abort();
  }
  if (dyn_smem_bytes > 227 * 1024) {
    std::fprintf(stderr, "cuda_cpu_shim: %zu bytes of dynamic shared memory\n", dyn_smem_bytes);
    std::abort();
  }
  // exact size, so ASan reports a shared-memory overrun
  std::vector<unsigned char> smem(dyn_smem_bytes);
  Ctx* const caller_ctx = g_ctx;
#ifndef MOE_SHIM_THREADS
  constexpr size_t kStack = 256 * 1024;  // allocated once per launch, reused by every block
  std::vector<std::unique_ptr<unsigned char[]>> stacks(n_threads);
  for (auto& st : stacks) st.reset(new unsigned char[kStack]);
#endif
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk;
        blk.bar = std::make_unique<Barrier>(n_threads);
        blk.dyn_smem = smem.data();
        for (unsigned w0 = 0; w0 < n_threads; w0 += 32) {
          auto w = std::make_unique<Warp>();
          w->size = (int)std::min(32u, n_threads - w0);
          w->bar = std::make_unique<Barrier>(w->size);
          w->alive = full_mask(*w);
          blk.warps.push_back(std::move(w));
        }
        auto thread_ctx = [&](unsigned t) {
          Ctx c;
          c.bdim = block;
          c.gdim = grid;
          c.block = &blk;
          c.bid = uint3{bx, by, bz};
          c.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          return c;
        };
#ifdef MOE_SHIM_THREADS
        std::vector<std::thread> threads;
        threads.reserve(n_threads);
        for (unsigned t = 0; t < n_threads; ++t)
          threads.emplace_back([&, t] {
            Ctx c = thread_ctx(t);
            g_ctx = &c;
            kernel(args...);
            finish_thread(c);
          });
        for (auto& th : threads) th.join();
#else
        std::vector<std::unique_ptr<Fiber>> fibers;
        for (unsigned t = 0; t < n_threads; ++t) {
          auto f = std::make_unique<Fiber>();
          f->ctx = thread_ctx(t);
          Fiber* raw = f.get();
          f->body = [&, raw] {
            kernel(args...);
            finish_thread(raw->ctx);
          };
          prepare_fiber(*f, stacks[t].get(), kStack);
          fibers.push_back(std::move(f));
        }
        run_fibers(fibers);
#endif
      }
  g_ctx = caller_ctx;
}
}  // namespace cuda_shim

#define threadIdx (cuda_shim::ctx().tid)
#define blockIdx (cuda_shim::ctx().bid)
#define blockDim (cuda_shim::ctx().bdim)
#define gridDim (cuda_shim::ctx().gdim)
#define MOE_SHIM_DYN_SMEM() (cuda_shim::ctx().block->dyn_smem)
static constexpr int warpSize = 32;

inline void __syncthreads() { cuda_shim::ctx().block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  cuda_shim::warp_barrier();
}
template <typename T>
T __shfl_sync(unsigned m, T v, int src, int width = 32) {
  const int lane = (int)cuda_shim::ctx().lane();
  return cuda_shim::exchange(m, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned m, T v, int lane_mask, int width = 32) {
  const int lane = (int)cuda_shim::ctx().lane();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return cuda_shim::exchange(m, v, src);
}
template <typename T>
T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) {
  const int lane = (int)cuda_shim::ctx().lane();
  int src = lane + (int)d;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return cuda_shim::exchange(m, v, src);
}

template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
inline float __expf(float x) { return std::exp(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
using std::max;
using std::min;

// ---- WMMA emulation -----------------------------------------------------------------------
// A fragment holds the whole 16x16 tile in every lane; loads and mma run in every lane (same
// result), stores are done by lane 0 between warp barriers, so races and out-of-bounds tile
// addresses surface exactly as they would for the warp-collective operation.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the shim emulates 16x16x16 fragments only");
  float x[16 * 16];  // [row][col] of the tile, whatever the use
  static constexpr int num_elements = 16 * 16;
};
template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  cuda_shim::warp_barrier();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = (float)p[r * ldm + c];
  cuda_shim::warp_barrier();
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  cuda_shim::warp_barrier();
  for (int r = 0; r < 16; ++r)  // element (k = r, n = c) lives at p[c * ldm + r]
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = (float)p[c * ldm + r];
  cuda_shim::warp_barrier();
}
template <typename TA, typename TB>
void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d,
              const fragment<matrix_a, 16, 16, 16, TA, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, TB, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float, void>& c) {
  cuda_shim::warp_barrier();
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f,
                              unsigned ldm, layout_t layout) {
  cuda_shim::warp_barrier();
  if (cuda_shim::ctx().lane() == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        float v = f.x[r * 16 + c];
        if (layout == mem_row_major)
          p[r * ldm + c] = v;
        else
          p[c * ldm + r] = v;
      }
  cuda_shim::warp_barrier();
}
}  // namespace wmma
}  // namespace nvcuda
