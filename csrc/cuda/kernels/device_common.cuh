// Device building blocks shared by the BatchNorm and row-norm kernels: the
// accumulation type per input type, 16-byte packs, Welford/Chan moments and
// warp/block reductions with a fixed merge order (so results are bitwise
// repeatable run to run). ATen-free: compiled by nvcc for the GPU and, with
// BN_EXT_CUDA_EMULATOR defined, by a host compiler against the test emulator.
#pragma once

#ifdef BN_EXT_CUDA_EMULATOR
#include "cuda_emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define BN_EXT_DYNAMIC_SHARED(type, name) \
  extern __shared__ __align__(16) unsigned char bn_ext_dynamic_shared_bytes[]; \
  type* name = reinterpret_cast<type*>(bn_ext_dynamic_shared_bytes)
#define BN_EXT_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#endif

#include <cstdint>
#include <cstring>

namespace bn_ext::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Accumulation ("op-math") type: float for every input but double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float inverse_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inverse_sqrt(double v) { return rsqrt(v); }

// Elements of T in one 16-byte load.
template <typename T>
constexpr int kPackSize = 16 / sizeof(T);

// A compile-time element count handed to generic lambdas.
template <int N>
struct Width {
  static constexpr int value = N;
};

// V elements loaded or stored as one access (V * sizeof(T) bytes, aligned to it).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_acc(const T* p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_acc(pack.v[i]);
}

template <int V, typename T>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = from_acc<T>(in[i]);
  if constexpr (sizeof(pack) == 16) {
    // An explicit 16-byte store: left to itself the compiler splits some
    // stores of the pack (those after a row's scalar head) into 32-bit ones.
    uint4 bits;
    std::memcpy(&bits, &pack, 16);
    __stwb(reinterpret_cast<uint4*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  }
}

// Count, mean and M2 = sum((x - mean)^2) of a set of values.
template <typename A>
struct Moments {
  using Field = A;
  A mean, m2, count;

  __device__ __forceinline__ static Moments identity() { return {A(0), A(0), A(0)}; }
  // Welford's update with one value.
  __device__ __forceinline__ void add(A x) {
    count += A(1);
    const A delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  // Chan's merge of two disjoint sets.
  __device__ __forceinline__ static Moments merge(const Moments& a, const Moments& b) {
    const A count = a.count + b.count;
    if (count == A(0)) return a;
    const A delta = b.mean - a.mean;
    const A wb = b.count / count;
    return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb, count};
  }
};

// The sum of squares of a set of values (RMSNorm).
template <typename A>
struct SquareSum {
  using Field = A;
  A sum;

  __device__ __forceinline__ static SquareSum identity() { return {A(0)}; }
  __device__ __forceinline__ void add(A x) { sum += x * x; }
  __device__ __forceinline__ static SquareSum merge(const SquareSum& a, const SquareSum& b) {
    return {a.sum + b.sum};
  }
};

// Plain sums of two quantities (gradient reductions).
template <typename A>
struct Sums {
  using Field = A;
  A first, second;

  __device__ __forceinline__ static Sums identity() { return {A(0), A(0)}; }
  __device__ __forceinline__ static Sums merge(const Sums& a, const Sums& b) {
    return {a.first + b.first, a.second + b.second};
  }
};

// A state (a struct of Fields) with `exchange` applied to each field.
template <typename State, typename Exchange>
__device__ __forceinline__ State exchange_fields(const State& s, const Exchange& exchange) {
  using Field = typename State::Field;
  constexpr int kFields = sizeof(State) / sizeof(Field);
  Field f[kFields];
  std::memcpy(f, &s, sizeof(State));
#pragma unroll
  for (int i = 0; i < kFields; ++i) f[i] = exchange(f[i]);
  State out;
  std::memcpy(&out, f, sizeof(State));
  return out;
}

// The state of the lane `delta` lanes up, and of lane `lane`.
template <typename State>
__device__ __forceinline__ State shuffle_down(const State& s, int delta) {
  return exchange_fields(s, [delta](auto v) { return __shfl_down_sync(kFullMask, v, delta); });
}
template <typename State>
__device__ __forceinline__ State shuffle_from(const State& s, int lane) {
  return exchange_fields(s, [lane](auto v) { return __shfl_sync(kFullMask, v, lane); });
}

// Tree merge over the 32 lanes of a warp; lane 0 holds the total.
template <typename State>
__device__ __forceinline__ State warp_merge(State s) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) s = State::merge(s, shuffle_down(s, delta));
  return s;
}

// Merge over all threads of a block (a multiple of 32 threads, at most 1024),
// returned to every thread. `scratch` is shared memory for 32 states; the
// trailing barrier lets the caller reuse it at once.
template <typename State>
__device__ __forceinline__ State block_merge(State s, State* scratch) {
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int warps = blockDim.x * blockDim.y * blockDim.z / kWarp;
  const int lane = thread % kWarp, warp = thread / kWarp;
  s = warp_merge(s);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = warp_merge(lane < warps ? scratch[lane] : State::identity());
    if (lane == 0) scratch[0] = s;
  }
  __syncthreads();
  s = scratch[0];
  __syncthreads();
  return s;
}

}  // namespace bn_ext::cuda
