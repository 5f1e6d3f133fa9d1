// Building blocks shared by the CPU norm kernels: vector load/store in the
// op-math type, stable partial moments with Chan's merge, and run-level sums.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace bn_ext::cpu {

// float for float/half/bfloat16, double for double.
template <typename T>
using opmath_t = at::opmath_type<T>;
template <typename T>
using OpVec = at::vec::Vectorized<opmath_t<T>>;

// Elements per task whose data should still sit in L1/L2 when a kernel makes a
// second sweep over it. Chunk boundaries derive from this constant and the
// shape only, never from the thread count, so results are thread-count invariant.
constexpr int64_t kCacheChunk = 4096;

// Elements below which a parallel task is not worth its scheduling cost.
constexpr int64_t kElementwiseGrain = 32768;

// at::parallel_for grain (in items) for items of `elements_per_item` elements.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(elements_per_item, 1));
}

// Load OpVec<T>::size() elements of T as op-math.
template <typename T>
inline OpVec<T> load_op(const T* p) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    OpVec<T> v;
    at::vec::load_to_float(p, v);
    return v;
  } else {
    return OpVec<T>::loadu(p);
  }
}

// Store OpVec<T>::size() op-math elements as T (rounding once). Half types
// convert one float vector straight to a half-width store: the generic
// partial store of a Vectorized<BFloat16> goes through a buffer and memcpy.
template <typename T>
inline void store_op(T* p, const OpVec<T>& v) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i packed = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m512(v))
                                                            : at::vec::cvtfp32_fp16(__m512(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                            : at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#else
    at::vec::convert_from_float<T>(v, v).store(p, OpVec<T>::size());
#endif
  } else {
    v.store(p);
  }
}

// Sum of the lanes, by a fixed shuffle tree: depends on the data only.
template <typename Acc>
inline Acc reduce_add(const at::vec::Vectorized<Acc>& v) {
  using Vec = at::vec::Vectorized<Acc>;
  return at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Partial moments of a set of values: count, mean and M2 = sum((x - mean)^2).
struct Moments {
  int64_t count = 0;
  double mean = 0.0;
  double m2 = 0.0;
};

// Chan et al.'s parallel combination; exact for uneven counts.
inline void chan_merge(Moments& a, const Moments& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const double n = static_cast<double>(a.count + b.count);
  const double delta = b.mean - a.mean;
  const double b_share = static_cast<double>(b.count) / n;
  a.mean += delta * b_share;
  a.m2 += b.m2 + delta * delta * static_cast<double>(a.count) * b_share;
  a.count += b.count;
}

// Accumulates x - shift over a contiguous run into a vector accumulator and a
// scalar one for the tail; callers reduce once per chunk, not once per run.
// Subtracting a value of the data (the chunk's first element) keeps the sum
// small for inputs with a large mean.
template <typename T>
inline void accumulate_shifted(const T* p, int64_t n, opmath_t<T> shift, OpVec<T>& acc, opmath_t<T>& tail) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift);
  Vec acc1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc += load_op(p + i) - vshift;
    acc1 += load_op(p + i + W) - vshift;
  }
  for (; i + W <= n; i += W) acc += load_op(p + i) - vshift;
  acc += acc1;
  for (; i < n; ++i) tail += static_cast<opmath_t<T>>(p[i]) - shift;
}

// Accumulates ((x - shift) - offset)^2 over a contiguous run: the second pass
// of a two-pass variance, with mean = shift + offset kept in two parts.
template <typename T>
inline void accumulate_centered_squares(const T* p, int64_t n, opmath_t<T> shift, opmath_t<T> offset,
                                        OpVec<T>& acc, opmath_t<T>& tail) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift), voffset(offset);
  Vec acc1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec d0 = (load_op(p + i) - vshift) - voffset;
    const Vec d1 = (load_op(p + i + W) - vshift) - voffset;
    acc = at::vec::fmadd(d0, d0, acc);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  for (; i + W <= n; i += W) {
    const Vec d = (load_op(p + i) - vshift) - voffset;
    acc = at::vec::fmadd(d, d, acc);
  }
  acc += acc1;
  for (; i < n; ++i) {
    const opmath_t<T> d = (static_cast<opmath_t<T>>(p[i]) - shift) - offset;
    tail += d * d;
  }
}

// Two passes over the runs of one cache-sized chunk: `runs(visit)` calls
// visit(pointer, length) for each run. Returns the chunk's moments.
template <typename T, typename Runs>
inline Moments chunk_moments(const Runs& runs) {
  using Op = opmath_t<T>;
  OpVec<T> acc(0);
  Op tail = 0, shift = 0;
  int64_t n = 0;
  runs([&](const T* p, int64_t len) {
    if (n == 0) shift = static_cast<Op>(p[0]);
    accumulate_shifted(p, len, shift, acc, tail);
    n += len;
  });
  if (n == 0) return {};
  const Op offset = (reduce_add(acc) + tail) / static_cast<Op>(n);
  acc = OpVec<T>(0);
  tail = 0;
  runs([&](const T* p, int64_t len) { accumulate_centered_squares(p, len, shift, offset, acc, tail); });
  return {n, static_cast<double>(shift) + static_cast<double>(offset), static_cast<double>(reduce_add(acc) + tail)};
}

// Moments of a long contiguous run: cache-sized chunks merged in order.
template <typename T>
inline Moments long_run_moments(const T* p, int64_t n) {
  Moments total;
  for (int64_t i = 0; i < n; i += kCacheChunk) {
    const int64_t len = std::min(kCacheChunk, n - i);
    chan_merge(total, chunk_moments<T>([&](const auto& visit) { visit(p + i, len); }));
  }
  return total;
}

// Split `n` items into at most `max_parts` contiguous parts of at least
// `min_part` items each (except when n is smaller). Depends on its arguments only.
inline int64_t part_count(int64_t n, int64_t min_part, int64_t max_parts) {
  if (n <= 0) return 1;
  return std::clamp<int64_t>(n / std::max<int64_t>(min_part, 1), 1, std::max<int64_t>(max_parts, 1));
}

inline int64_t part_begin(int64_t part, int64_t parts, int64_t n) {
  return n / parts * part + std::min(part, n % parts);
}

}  // namespace bn_ext::cpu
