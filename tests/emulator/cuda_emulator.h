// A CUDA execution emulator for the CPU, for testing device code without a GPU.
//
// Each CUDA thread of a block runs as a fiber (ucontext) on one OS thread.
// Fibers run until they reach a barrier (__syncthreads), a warp collective
// (__shfl*_sync, __ballot_sync, __syncwarp) or their end; the scheduler then
// completes whatever every participant has reached and resumes them, in a
// forward, reverse or random order chosen per run, so a missing barrier shows
// up as a wrong result. Warps have 32 lanes. A __syncthreads that the live
// threads of a block reach at different source lines aborts, naming both.
// Blocks run one after another; static __shared__ variables are plain statics.
//
// Device code includes this header instead of the CUDA runtime when
// BN_EXT_CUDA_EMULATOR is defined (see kernels' common header).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

namespace bn_emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class Order { Forward, Reverse, Random };

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// What a fiber is waiting for when it yields to the scheduler.
enum class Wait { Running, Barrier, Warp, Done };

// A lane's part in a warp collective.
struct WarpCall {
  enum Kind { Shuffle, ShuffleUp, ShuffleDown, ShuffleXor, Ballot, Sync } kind = Sync;
  unsigned mask = 0;
  int param = 0;  // source lane, delta or lane mask
  int width = kWarpSize;
  unsigned char value[16] = {};
  unsigned char result[16] = {};
  int line = 0;
};

struct Fiber {
  ucontext_t context{};
  Wait wait = Wait::Running;
  const char* file = "";
  int line = 0;
  WarpCall warp;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler{};
  int current = 0;
  std::vector<unsigned char> dynamic_shared;
  const std::function<void()>* body = nullptr;
};

inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Order& order() {
  static Order o = Order::Forward;
  return o;
}

inline std::mt19937& rng() {
  static std::mt19937 generator(12345);
  return generator;
}

// Runs kernels with threads resumed in `o` order between synchronisation points.
inline void set_order(Order o, unsigned seed = 12345) {
  order() = o;
  rng().seed(seed);
}

inline Fiber& self() { return current_block()->fibers[current_block()->current]; }

inline dim3 thread_index() {
  const Block& b = *current_block();
  const unsigned t = static_cast<unsigned>(b.current);
  return dim3(t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y));
}

inline void yield_to_scheduler() {
  Block& b = *current_block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void syncthreads(const char* file, int line) {
  Fiber& f = self();
  f.wait = Wait::Barrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

inline void fiber_entry() {
  Block& b = *current_block();
  (*b.body)();
  b.fibers[b.current].wait = Wait::Done;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Completes the collectives of warps whose participating live lanes have all arrived.
inline bool resolve_warps(Block& b) {
  bool progress = false;
  const int n = static_cast<int>(b.fibers.size());
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int lanes = std::min(kWarpSize, n - w0);
    int first = -1;
    for (int l = 0; l < lanes; ++l) {
      if (b.fibers[w0 + l].wait == Wait::Warp) {
        first = l;
        break;
      }
    }
    if (first < 0) continue;
    const unsigned mask = b.fibers[w0 + first].warp.mask;
    bool ready = true;
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = b.fibers[w0 + l];
      if (!(mask >> l & 1u) || f.wait == Wait::Done) continue;
      if (f.wait != Wait::Warp) {
        ready = false;
        break;
      }
      if (f.warp.mask != mask || f.warp.kind != b.fibers[w0 + first].warp.kind) {
        std::fprintf(stderr, "cuda emulator: lanes %d and %d of a warp meet at different warp collectives "
                     "(lines %d and %d) or with different masks\n", first, l, b.fibers[w0 + first].warp.line,
                     f.warp.line);
        std::abort();
      }
    }
    if (!ready) continue;
    unsigned ballot = 0;
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = b.fibers[w0 + l];
      if ((mask >> l & 1u) && f.wait == Wait::Warp && f.warp.value[0] != 0) ballot |= 1u << l;
    }
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = b.fibers[w0 + l];
      if (!(mask >> l & 1u) || f.wait != Wait::Warp) continue;
      WarpCall& c = f.warp;
      const int segment = l - l % c.width;
      int src = l;
      switch (c.kind) {
        case WarpCall::Shuffle: src = segment + ((c.param % c.width) + c.width) % c.width; break;
        case WarpCall::ShuffleUp: src = (l - segment >= c.param) ? l - c.param : l; break;
        case WarpCall::ShuffleDown: src = (l - segment + c.param < c.width) ? l + c.param : l; break;
        case WarpCall::ShuffleXor: {
          const int x = l ^ c.param;
          src = (x >= segment && x < segment + c.width) ? x : l;
          break;
        }
        case WarpCall::Ballot: std::memcpy(c.result, &ballot, sizeof ballot); break;
        case WarpCall::Sync: break;
      }
      if (c.kind != WarpCall::Ballot && c.kind != WarpCall::Sync) {
        if (src >= lanes || !(mask >> src & 1u)) fail("shuffle reads a lane outside the mask");
        std::memcpy(c.result, b.fibers[w0 + src].warp.value, sizeof c.result);
      }
    }
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = b.fibers[w0 + l];
      if ((mask >> l & 1u) && f.wait == Wait::Warp) f.wait = Wait::Running;
    }
    progress = true;
  }
  return progress;
}

// Releases a barrier that every live thread has reached at the same line.
inline bool resolve_barrier(Block& b) {
  const Fiber* first = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::Done) continue;
    if (f.wait != Wait::Barrier) return false;
    if (first == nullptr) {
      first = &f;
    } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      std::fprintf(stderr, "cuda emulator: divergent __syncthreads: threads of one block wait at %s:%d and at %s:%d\n",
                   first->file, first->line, f.file, f.line);
      std::abort();
    }
  }
  if (first == nullptr) return false;
  for (Fiber& f : b.fibers) {
    if (f.wait == Wait::Barrier) f.wait = Wait::Running;
  }
  return true;
}

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  std::vector<int> sequence(n);
  std::iota(sequence.begin(), sequence.end(), 0);
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f = Fiber{};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = b.stacks.get() + static_cast<size_t>(t) * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    if (order() == Order::Reverse) {
      std::reverse(sequence.begin(), sequence.end());
    } else if (order() == Order::Random) {
      std::shuffle(sequence.begin(), sequence.end(), rng());
    }
    bool ran = false;
    for (int t : sequence) {
      if (b.fibers[t].wait != Wait::Running) continue;
      b.current = t;
      swapcontext(&b.scheduler, &b.fibers[t].context);
      ran = true;
    }
    if (order() == Order::Reverse) std::reverse(sequence.begin(), sequence.end());
    if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.wait == Wait::Done; })) return;
    if (!ran && !resolve_warps(b) && !resolve_barrier(b)) {
      for (const Fiber& f : b.fibers) {
        if (f.wait == Wait::Barrier) {
          std::fprintf(stderr, "cuda emulator: deadlock: a thread waits at __syncthreads %s:%d while others "
                       "wait in warp collectives or have exited\n", f.file, f.line);
          std::abort();
        }
      }
      fail("deadlock: warp collectives that cannot complete");
    }
  }
}

template <typename T>
T warp_collective(WarpCall::Kind kind, unsigned mask, T value, int param, int width, int line) {
  static_assert(sizeof(T) <= 16, "warp collectives exchange at most 16 bytes");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) fail("warp width must be a power of 2 <= 32");
  Fiber& f = self();
  f.warp = WarpCall{};
  f.warp.kind = kind;
  f.warp.mask = mask;
  f.warp.param = param;
  f.warp.width = width;
  f.warp.line = line;
  std::memcpy(f.warp.value, &value, sizeof(T));
  f.wait = Wait::Warp;
  yield_to_scheduler();
  T result;
  std::memcpy(&result, self().warp.result, sizeof(T));
  return result;
}

// Launches `kernel(args...)` on a grid of blocks, each block's threads as fibers.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes, Args&&... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("block size must be 1 to 1024 threads");
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.fibers.resize(threads);
  b.stacks.reset(new char[static_cast<size_t>(threads) * kStackBytes]);
  b.dynamic_shared.assign(dynamic_shared_bytes + 16, 0);
  const std::function<void()> body = [&] { kernel(args...); };
  b.body = &body;
  Block* outer = current_block();
  current_block() = &b;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block(b);
      }
    }
  }
  current_block() = outer;
}

template <typename T>
T* dynamic_shared() {
  // 16-byte aligned, as CUDA's dynamic shared memory.
  auto p = reinterpret_cast<std::uintptr_t>(current_block()->dynamic_shared.data());
  return reinterpret_cast<T*>((p + 15) & ~std::uintptr_t(15));
}

}  // namespace bn_emu

// --- the CUDA vocabulary device code uses ------------------------------------

using bn_emu::dim3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __syncthreads() ::bn_emu::syncthreads(__FILE__, __LINE__)

#define threadIdx (::bn_emu::thread_index())
#define blockIdx (::bn_emu::current_block()->block_idx)
#define blockDim (::bn_emu::current_block()->block_dim)
#define gridDim (::bn_emu::current_block()->grid_dim)
#define warpSize 32

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return bn_emu::warp_collective(bn_emu::WarpCall::Shuffle, mask, value, src_lane, width, __LINE__);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return bn_emu::warp_collective(bn_emu::WarpCall::ShuffleUp, mask, value, static_cast<int>(delta), width, __LINE__);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return bn_emu::warp_collective(bn_emu::WarpCall::ShuffleDown, mask, value, static_cast<int>(delta), width,
                                 __LINE__);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return bn_emu::warp_collective(bn_emu::WarpCall::ShuffleXor, mask, value, lane_mask, width, __LINE__);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return bn_emu::warp_collective<unsigned>(bn_emu::WarpCall::Ballot, mask, predicate != 0, 0, 32, __LINE__);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  bn_emu::warp_collective<int>(bn_emu::WarpCall::Sync, mask, 0, 0, 32, __LINE__);
}

// Fibers never interleave inside a call, so plain read-modify-writes are atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = std::max(old, value);
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
// Store with a cache hint (write-back): a plain store here.
template <typename T>
void __stwb(T* address, T value) {
  *address = value;
}

// Half-precision storage types with CUDA's conversion functions (round to
// nearest even, as the device's __float2half_rn / __float2bfloat16_rn).
struct alignas(2) __half {
  unsigned short bits;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<unsigned short>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    b.bits = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}

// Exact where the device's are approximate: tests compare with tolerances.
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

using cudaStream_t = struct bn_emu_stream*;

// The two spellings device code and launchers use for what g++ cannot parse.
#define BN_EXT_DYNAMIC_SHARED(type, name) type* name = ::bn_emu::dynamic_shared<type>()
#define BN_EXT_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ((void)(stream), ::bn_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__))
