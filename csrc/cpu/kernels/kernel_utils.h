// Building blocks shared by the CPU norm kernels: vector load/store in the
// op-math type, one accumulator of partial sums for every reduction, stable
// partial moments with Chan's merge.
//
// Kernel files only: this header holds SIMD code, compiled once per CPU level
// (cpu/dispatch.h) with that level's flags and inside that level's namespace,
// so inline functions built with different flags are never merged.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernel files are compiled with CPU_CAPABILITY set to their level (setup.py, CMakeLists.txt)"
#endif

#include "norm_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace bn_ext::cpu {
// The size of the last-level cache a core shares (cpu/dispatch.cpp).
int64_t last_level_cache_bytes();
}  // namespace bn_ext::cpu

namespace bn_ext::cpu::CPU_CAPABILITY {

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

// Whether this level has the AVX512_BF16 conversion instructions.
#if defined(CPU_CAPABILITY_AVX512_BF16)
constexpr bool kBFloat16Instructions = true;
#else
constexpr bool kBFloat16Instructions = false;
#endif

#if defined(CPU_CAPABILITY_AVX512)
// float to bfloat16, rounding to nearest even as torch does. At the
// AVX512_BF16 level one instruction does it instead of about eight; that
// instruction reads denormal inputs as zero, so a vector holding one (never
// seen in normalised data, but possible) takes the exact integer path.
constexpr int kDenormalClass = 0x20;

inline __m256i round_to_bf16(__m512 v) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if (_mm512_fpclass_ps_mask(v, kDenormalClass) == 0) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  return at::vec::cvtfp32_bf16(v);
}
#endif

// Two op-math vectors rounded into one vector of a half type T.
template <typename T>
inline at::vec::Vectorized<T> round_to_half_type(const OpVec<T>& lo, const OpVec<T>& hi) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if ((_mm512_fpclass_ps_mask(lo, kDenormalClass) | _mm512_fpclass_ps_mask(hi, kDenormalClass)) == 0) {
      return at::vec::Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

// Streaming (non-temporal) stores, for outputs too large to stay in the
// caches: a plain store first reads the line it writes, a third of an
// elementwise pass's traffic; a streaming store does not, but leaves the line
// out of the caches, a loss for outputs read again while still cached
// (docs/perf-notes.md, streams_output). So a pass streams outputs
// of at least the last-level cache's size (cpu/dispatch.cpp), and only where
// its runs of output (rows, planes) are whole 64-byte lines from an aligned
// start: a line written partly by streaming and partly by plain stores is
// flushed and read again (7x7 bfloat16 planes ran 12x slower). A pass that
// streamed ends with finish_streaming() before its data is read.
constexpr int64_t kLineBytes = 64;

// Whether a pass writing `bytes` from `out`, in runs of `run_bytes`, streams them.
inline bool streams_output(const void* out, int64_t bytes, int64_t run_bytes) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return bytes >= last_level_cache_bytes() && run_bytes % kLineBytes == 0 &&
         reinterpret_cast<uintptr_t>(out) % kLineBytes == 0;
#else
  (void)out, (void)bytes, (void)run_bytes;
  return false;
#endif
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
inline bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}
// Streams v to p when p is aligned to v's width; false (nothing stored) otherwise.
inline bool stream_store(void* p, __m128i v) {
  return aligned_to(p, 16) && (_mm_stream_si128(static_cast<__m128i*>(p), v), true);
}
inline bool stream_store(void* p, __m256i v) {
  return aligned_to(p, 32) && (_mm256_stream_si256(static_cast<__m256i*>(p), v), true);
}
inline bool stream_store(void* p, __m256 v) {
  return aligned_to(p, 32) && (_mm256_stream_ps(static_cast<float*>(p), v), true);
}
inline bool stream_store(void* p, __m256d v) {
  return aligned_to(p, 32) && (_mm256_stream_pd(static_cast<double*>(p), v), true);
}
#endif
#if defined(CPU_CAPABILITY_AVX512)
inline bool stream_store(void* p, __m512i v) {
  return aligned_to(p, 64) && (_mm512_stream_si512(static_cast<__m512i*>(p), v), true);
}
inline bool stream_store(void* p, __m512 v) {
  return aligned_to(p, 64) && (_mm512_stream_ps(static_cast<float*>(p), v), true);
}
inline bool stream_store(void* p, __m512d v) {
  return aligned_to(p, 64) && (_mm512_stream_pd(static_cast<double*>(p), v), true);
}
#endif

// Zero where v <= threshold, dy elsewhere: NaN v passes dy, as torch's
// threshold_backward (ReLU's gradient) does. At AVX512 one compare into a
// mask register and a zeroing move: Vectorized's compare then blendv go
// through a vector of lane masks (two instructions more), which made the
// fused BatchNorm + ReLU backward's sums 25% slower than plain BatchNorm's
// on bfloat16 channels-last inputs.
template <typename V>
inline at::vec::Vectorized<V> zero_where_at_most(const at::vec::Vectorized<V>& dy, const at::vec::Vectorized<V>& v,
                                                 V threshold) {
#if defined(CPU_CAPABILITY_AVX512)
  // Not (v <= threshold), unordered: true where v > threshold or v is NaN.
  if constexpr (std::is_same_v<V, float>) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(threshold), _CMP_NLE_UQ), dy);
  } else if constexpr (std::is_same_v<V, double>) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(v, _mm512_set1_pd(threshold), _CMP_NLE_UQ), dy);
  }
#endif
  using Vec = at::vec::Vectorized<V>;
  return Vec::blendv(dy, Vec(0), v <= Vec(threshold));
}

// Makes a pass's streaming stores visible before its output is read.
inline void finish_streaming(bool streamed) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// A whole Vectorized<V> stored at p, streamed when `stream` and p is aligned.
template <typename V>
inline void store_vector(V* p, const at::vec::Vectorized<V>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  using Native = std::conditional_t<std::is_same_v<V, float>, __m512,
                                    std::conditional_t<std::is_same_v<V, double>, __m512d, __m512i>>;
  if (stream && stream_store(p, Native(v))) return;
#elif defined(CPU_CAPABILITY_AVX2)
  using Native = std::conditional_t<std::is_same_v<V, float>, __m256,
                                    std::conditional_t<std::is_same_v<V, double>, __m256d, __m256i>>;
  if (stream && stream_store(p, Native(v))) return;
#else
  (void)stream;
#endif
  v.store(p);
}

// Store OpVec<T>::size() op-math elements as T (rounding once), streamed
// when `stream` and p is aligned. Half types convert one float vector
// straight to a half-width store: the generic partial store of a
// Vectorized<BFloat16> goes through a buffer and memcpy.
template <typename T>
inline void store_op(T* p, const OpVec<T>& v, bool stream = false) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i packed =
        std::is_same_v<T, at::BFloat16> ? round_to_bf16(__m512(v)) : at::vec::cvtfp32_fp16(__m512(v));
    if (!(stream && stream_store(p, packed))) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                            : at::vec::cvtfp32_fp16(__m256(v));
    if (!(stream && stream_store(p, packed))) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#else
    (void)stream;
    at::vec::convert_from_float<T>(v, v).store(p, OpVec<T>::size());
#endif
  } else {
    store_vector(p, v, stream);
  }
}

// The first `count` (< OpVec<T>::size()) elements at p as op-math, the other
// lanes zero, for the tail of a run: one masked vector instead of a scalar
// loop; nothing past p + count is touched (a half type at AVX2 is built in
// registers, below).
#if defined(CPU_CAPABILITY_AVX2)
// The first `count` (< 8) 16-bit values at p in a vector's low lanes (the
// rest zero), and their store back, built in registers: ATen's partial load
// and store of a half-type vector at this level call memcpy through a
// buffer, and even pieces through a stack buffer stall the vector load that
// reads them back (a store-forwarding miss), which cost more than the rest of
// a short run (a 7x7 plane's tail, a 49-wide LayerNorm2d row's).
inline __m128i load_16bit_lanes(const void* p, int64_t count) {
  const char* s = static_cast<const char*>(p);
  auto half = [s](int k) {
    uint16_t v;
    std::memcpy(&v, s + 2 * k, 2);
    return static_cast<int>(v);
  };
  auto pair = [s](int k) {
    int32_t v;
    std::memcpy(&v, s + 2 * k, 4);
    return v;
  };
  auto quad = [s] { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)); };
  switch (count) {
    case 1: return _mm_cvtsi32_si128(half(0));
    case 2: return _mm_cvtsi32_si128(pair(0));
    case 3: return _mm_insert_epi16(_mm_cvtsi32_si128(pair(0)), half(2), 2);
    case 4: return quad();
    case 5: return _mm_insert_epi16(quad(), half(4), 4);
    case 6: return _mm_insert_epi32(quad(), pair(4), 2);
    case 7: return _mm_insert_epi16(_mm_insert_epi32(quad(), pair(4), 2), half(6), 6);
    default: return _mm_setzero_si128();
  }
}

inline void store_16bit_lanes(void* p, __m128i v, int64_t count) {
  char* d = static_cast<char*>(p);
  auto half = [d](int k, int value) {
    const auto h = static_cast<uint16_t>(value);
    std::memcpy(d + 2 * k, &h, 2);
  };
  auto pair = [d](int k, int32_t value) { std::memcpy(d + 2 * k, &value, 4); };
  auto quad = [d](__m128i x) { _mm_storel_epi64(reinterpret_cast<__m128i*>(d), x); };
  switch (count) {
    case 1: half(0, _mm_extract_epi16(v, 0)); break;
    case 2: pair(0, _mm_cvtsi128_si32(v)); break;
    case 3: pair(0, _mm_cvtsi128_si32(v)), half(2, _mm_extract_epi16(v, 2)); break;
    case 4: quad(v); break;
    case 5: quad(v), half(4, _mm_extract_epi16(v, 4)); break;
    case 6: quad(v), pair(4, _mm_extract_epi32(v, 2)); break;
    case 7: quad(v), pair(4, _mm_extract_epi32(v, 2)), half(6, _mm_extract_epi16(v, 6)); break;
    default: break;
  }
}
#endif

template <typename T>
inline OpVec<T> load_op_partial(const T* p, int64_t count) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = load_16bit_lanes(p, count);
    __m256 v;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      at::vec::cvtbf16_fp32(packed, v);
    } else {
      at::vec::cvtfp16_fp32(packed, v);
    }
    return v;
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count)));
#endif
  } else {
    return OpVec<T>::loadu(p, count);
  }
}

// Stores the first `count` lanes of v as T.
template <typename T>
inline void store_op_partial(T* p, const OpVec<T>& v, int64_t count) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                            : at::vec::cvtfp32_fp16(__m256(v));
    store_16bit_lanes(p, packed, count);
#else
    round_to_half_type<T>(v, v).store(p, count);
#endif
  } else {
    v.store(p, count);
  }
}

// Stores v at p as T: whole (streamed when `stream`, see store_op), or its
// first `count` lanes for the tail of a run; load_op_n's counterpart.
template <typename T>
inline void store_op_n(T* p, const OpVec<T>& v, int64_t count, bool stream = false) {
  if (count == OpVec<T>::size()) {
    store_op(p, v, stream);
  } else {
    store_op_partial(p, v, count);
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
  // An infinite mean stays that infinity, as a sum's would (delta is
  // Inf - Inf there); opposite infinities give NaN.
  a.mean = std::isfinite(delta) ? a.mean + delta * b_share : a.mean + b.mean;
  a.m2 += b.m2 + delta * delta * static_cast<double>(a.count) * b_share;
  a.count += b.count;
}

// Values averaged into a chunk's shift. Their mean lies well within one
// standard deviation of the chunk's mean for all but contrived data, which is
// what lets the single-pass sums below keep the precision of two passes.
constexpr int64_t kShiftSamples = 16;

// A shift must be finite: an infinite one gives x - shift = Inf - Inf = NaN
// at the infinite value itself, and a NaN mean where the sum's is +-Inf.
// Zero instead: the moments then carry the Inf (or NaN) as torch's do.
template <typename Op>
inline Op finite_or_zero(Op shift) {
  return std::isfinite(shift) ? shift : Op(0);
}
template <typename V>
inline at::vec::Vectorized<V> finite_or_zero(const at::vec::Vectorized<V>& shift) {
  using Vec = at::vec::Vectorized<V>;
  return Vec::blendv(Vec(0), shift, (shift - shift) == Vec(0));
}

// The shift of a chunk whose first run is p[0, n): the mean of its first values.
template <typename T>
inline opmath_t<T> chunk_shift(const T* p, int64_t n) {
  using Vec = OpVec<T>;
  const int64_t m = std::min(n, kShiftSamples);
  Vec acc(0);
  int64_t i = 0;
  for (; i + Vec::size() <= m; i += Vec::size()) acc += load_op(p + i);
  opmath_t<T> sum = reduce_add(acc);
  for (; i < m; ++i) sum += static_cast<opmath_t<T>>(p[i]);
  return m > 0 ? finite_or_zero(sum / static_cast<opmath_t<T>>(m)) : opmath_t<T>(0);
}

// Vector steps a partial sum takes before it is added into its total. The
// cascade bounds float rounding: a lane's error grows with kCascadeSteps +
// steps / kCascadeSteps rather than with its step count, so one large value
// early in a lane no longer absorbs the rounding of every small one after it,
// and a reduction is as precise at every vector width.
constexpr int64_t kCascadeSteps = 16;

// The accumulator of every reduction. Over steps s < `steps` and vectors
// k < NV per step, terms(s, k, a, b) sets vectors a and b, and
//   sum[k] += a (when kWithSum),   product[k] += a * b,
// through partial sums of at most kCascadeSteps steps. Its uses:
//   moments:        a = b = x - shift              -> sum(d), sum(d^2)
//   second pass:    a = b = (x - shift) - offset   -> squares about the mean
//   gradient sums:  a = dy, b = x - center         -> sum(dy), sum(dy (x - center))
template <int NV, bool kWithSum, typename Vec, typename Terms>
inline void cascade_sums(int64_t steps, const Terms& terms, Vec (&sum)[NV], Vec (&product)[NV]) {
  for (int64_t s0 = 0; s0 < steps; s0 += kCascadeSteps) {
    const int64_t s1 = std::min(steps, s0 + kCascadeSteps);
    Vec part_sum[NV], part_product[NV];
    for (int k = 0; k < NV; ++k) part_sum[k] = part_product[k] = Vec(0);
    for (int64_t s = s0; s < s1; ++s) {
      for (int k = 0; k < NV; ++k) {
        Vec a, b;
        terms(s, k, a, b);
        if constexpr (kWithSum) part_sum[k] += a;
        part_product[k] = at::vec::fmadd(a, b, part_product[k]);
      }
    }
    for (int k = 0; k < NV; ++k) {
      if constexpr (kWithSum) sum[k] += part_sum[k];
      product[k] += part_product[k];
    }
  }
}

// OpVec<T>::size() elements at p, or the first `count` of them (the other
// lanes zero) for the tail of a run or the last columns of a row.
template <typename T>
inline OpVec<T> load_op_n(const T* p, int64_t count) {
  return count == OpVec<T>::size() ? load_op(p) : load_op_partial(p, count);
}

// v with the lanes from `count` on set to zero.
template <typename Vec>
inline Vec keep_lanes(const Vec& v, int64_t count) {
  return count == Vec::size() ? v : Vec::set(Vec(0), v, count);
}

// cascade_sums over a contiguous run of n elements whose lanes all belong to
// one sum: two vectors a step, then the rest (at most one full vector and a
// partial one) added directly. terms(i, count, a, b) sets the vectors of
// elements [i, i + count); lanes past `count` must get a = 0.
template <bool kWithSum, typename Vec, typename Terms>
inline void run_sums(int64_t n, const Terms& terms, Vec& sum, Vec& product) {
  constexpr int64_t W = Vec::size();
  Vec sums[2] = {sum, Vec(0)}, products[2] = {product, Vec(0)};
  const int64_t steps = n / (2 * W);
  cascade_sums<2, kWithSum>(
      steps, [&](int64_t s, int k, Vec& a, Vec& b) { terms((2 * s + k) * W, W, a, b); }, sums, products);
  Vec total_sum = sums[0] + sums[1], total_product = products[0] + products[1];
  for (int64_t i = steps * 2 * W; i < n; i += W) {
    Vec a, b;
    terms(i, std::min(W, n - i), a, b);
    if constexpr (kWithSum) total_sum += a;
    total_product = at::vec::fmadd(a, b, total_product);
  }
  sum = total_sum;
  product = total_product;
}

// Adds ((x - shift) - offset)^2 over a contiguous run into acc: the second
// pass of a two-pass variance, with mean = shift + offset kept in two parts.
template <typename T>
inline void accumulate_centered_squares(const T* p, int64_t n, opmath_t<T> shift, opmath_t<T> offset,
                                        OpVec<T>& acc) {
  using Vec = OpVec<T>;
  const Vec vshift(shift), voffset(offset);
  Vec unused(0);
  run_sums<false>(
      n,
      [&](int64_t i, int64_t count, Vec& a, Vec& b) {
        a = b = keep_lanes((load_op_n(p + i, count) - vshift) - voffset, count);
      },
      unused, acc);
}

// Whether the single-pass M2 = sum(d^2) - sum(d)^2 / n of n values
// d = x - shift keeps the precision of a two-pass one: it does while the
// shift lies within a standard deviation of the mean (sum(d)^2 / n <= M2).
inline bool shift_keeps_precision(int64_t n, double sum, double squares) {
  return sum * sum <= 0.5 * static_cast<double>(n) * squares;
}

// Moments of n values from their shift, offset = sum(d) / n and either the
// single-pass sums (sum(d), sum(d^2)) or, when !single_pass, `squares` already
// taken about the mean.
template <typename Op>
inline Moments shifted_moments(int64_t n, Op shift, Op offset, double sum, double squares, bool single_pass) {
  const double mean = static_cast<double>(shift) + static_cast<double>(offset);
  return {n, mean, single_pass ? squares - sum * sum / static_cast<double>(n) : squares};
}

// Moments of one cache-sized chunk of one set of values in a single pass:
// sums of d = x - shift and of d^2, so M2 = sum(d^2) - sum(d)^2 / n. That
// difference loses precision only when the shift is far from the mean; then
// (sum(d)^2 / n > M2, i.e. the shift is over a standard deviation away) the
// chunk, still in L1, is walked a second time for the squares about its
// mean, as a two-pass variance would.
template <typename T>
struct ShiftedSums {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  Op shift = 0;
  Vec sum = Vec(0), squares = Vec(0);
  int64_t count = 0;

  void start(Op chunk_shift_value) {
    *this = ShiftedSums();
    shift = chunk_shift_value;
  }

  void add_run(const T* p, int64_t n) {
    const Vec vshift(shift);
    run_sums<true>(
        n,
        [&](int64_t i, int64_t lanes, Vec& a, Vec& b) { a = b = keep_lanes(load_op_n(p + i, lanes) - vshift, lanes); },
        sum, squares);
    count += n;
  }

  // `runs(visit)` calls visit(pointer, length) for the chunk's runs again,
  // for the second pass when one is needed.
  template <typename Runs>
  Moments finish(const Runs& runs) const {
    if (count == 0) return {};
    const Op s1 = reduce_add(sum), s2 = reduce_add(squares);
    const Op offset = s1 / static_cast<Op>(count);
    if (shift_keeps_precision(count, s1, s2)) return shifted_moments(count, shift, offset, s1, s2, true);
    Vec acc(0);
    runs([&](const T* p, int64_t len) { accumulate_centered_squares(p, len, shift, offset, acc); });
    return shifted_moments(count, shift, offset, s1, reduce_add(acc), false);
  }
};

// Moments of a long contiguous run: cache-sized chunks merged in order.
template <typename T>
inline Moments long_run_moments(const T* p, int64_t n) {
  Moments total;
  ShiftedSums<T> sums;
  for (int64_t i = 0; i < n; i += kCacheChunk) {
    const int64_t len = std::min(kCacheChunk, n - i);
    sums.start(chunk_shift(p + i, len));
    sums.add_run(p + i, len);
    chan_merge(total, sums.finish([&](const auto& visit) { visit(p + i, len); }));
  }
  return total;
}

// Op-math arrays of channels-last accumulations: a whole number of vectors
// of every level (64 values), so they are read and written in whole vectors;
// lanes past the last column hold values nobody reads.
template <typename Op>
inline std::vector<Op> column_array(int64_t columns) {
  return std::vector<Op>((columns + 63) / 64 * 64, Op(0));
}

// cascade_sums for channels-last memory: over rows s < `rows` and the vectors
// [j, j + count) of `width` columns, terms(s, j, count, a, b) sets vectors a
// and b, and
//   sum[j..] += a (when kWithSum),   product[j..] += a * b
// into column arrays. The rows go in tiles of kCascadeSteps, each tile a
// contiguous block of memory: a column vector's partial sums over a tile
// start at zero, take the tile's rows in order, and are folded into the
// arrays once per tile (the cascade), while the tile, read once from
// memory, sits in L1. Two orders give the same sums, bit for bit:
//   - rows of up to kRowOrderColumns: the tile row by row, in memory order,
//     its partial sums in small arrays. Walked down the columns, such a tile
//     is many short streams (16 rows of 1 KB at C256 fp32), which the
//     hardware prefetchers hardly follow (perf-notes: kRowOrderColumns).
//   - wider rows: down the columns, kBlockVectors adjacent column vectors
//     at a time (see with_moments_column_block), their partial sums in
//     registers (array partials updated row by row stalled on their stores
//     at C1024 and above, where each row is a long stream of its own).
// tile(s0, s1), when given, runs before the tile of rows [s0, s1) is summed.
struct NoTilePrologue {
  void operator()(int64_t, int64_t) const {}
};
constexpr int64_t kRowOrderColumns = 512;

// fn(std::integral_constant<int64_t, vectors>): how many adjacent column
// vectors the column walk of a moments pass over rows of `row_stride` T
// takes at a time. At AVX2, rows a multiple of 4 KB apart (C2048 bfloat16,
// C1024 and C2048 float32) take a cache line of a row at a time: there a
// tile's 16 lines of a column share one L1 set, too many to stay, and one
// vector at a time read each line from L2 two or four times. Other row
// lengths, the AVX512 level and the gradient sums measured slower so and
// walk one vector at a time (perf-notes: with_moments_column_block).
// Addresses this many bytes apart share an L1 set (64 sets of 64-byte lines).
constexpr int64_t kL1SetSpanBytes = 4096;

template <typename T, typename Fn>
void with_moments_column_block(int64_t row_stride, const Fn& fn) {
#if defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t kLine = kLineBytes / (OpVec<T>::size() * static_cast<int64_t>(sizeof(T)));
  if constexpr (kLine > 1) {
    if (row_stride * static_cast<int64_t>(sizeof(T)) % kL1SetSpanBytes == 0) {
      return fn(std::integral_constant<int64_t, kLine>{});
    }
  }
#endif
  (void)row_stride;
  fn(std::integral_constant<int64_t, 1>{});
}

// Rows [s0, s1) of the whole column vectors V... from column j on, each
// vector's partial sums in registers (the vectors unrolled as a pack: as a
// loop they were kept on the stack), folded into sum / product
// (column_cascade_sums).
template <bool kWithSum, typename Vec, typename Terms, size_t... V>
inline void column_block_sums(int64_t s0, int64_t s1, int64_t j, const Terms& terms,
                              typename Vec::value_type* sum, typename Vec::value_type* product,
                              std::index_sequence<V...>) {
  constexpr int64_t W = Vec::size();
  Vec part_sum[] = {(static_cast<void>(V), Vec(0))...};
  Vec part_product[] = {(static_cast<void>(V), Vec(0))...};
  auto step = [&](int64_t s, auto v) {
    const int64_t c = j + static_cast<int64_t>(v()) * W;
    Vec a, b;
    terms(s, c, W, a, b);
    if constexpr (kWithSum) part_sum[v()] += a;
    part_product[v()] = at::vec::fmadd(a, b, part_product[v()]);
  };
  for (int64_t s = s0; s < s1; ++s) (step(s, std::integral_constant<size_t, V>{}), ...);
  auto fold = [&](auto v) {
    const int64_t c = j + static_cast<int64_t>(v()) * W;
    if constexpr (kWithSum) (Vec::loadu(sum + c) + part_sum[v()]).store(sum + c);
    (Vec::loadu(product + c) + part_product[v()]).store(product + c);
  };
  (fold(std::integral_constant<size_t, V>{}), ...);
}

template <bool kWithSum, typename Vec, int64_t kBlockVectors = 1, typename Terms,
          typename TilePrologue = NoTilePrologue>
inline void column_cascade_sums(int64_t rows, int64_t width, const Terms& terms, typename Vec::value_type* sum,
                                typename Vec::value_type* product, const TilePrologue& tile = {}) {
  using Acc = typename Vec::value_type;
  constexpr int64_t W = Vec::size();
  if (width <= kRowOrderColumns) {
    alignas(64) Acc part_sum[kRowOrderColumns], part_product[kRowOrderColumns];
    const int64_t padded = (width + W - 1) / W * W;
    for (int64_t s0 = 0; s0 < rows; s0 += kCascadeSteps) {
      const int64_t s1 = std::min(rows, s0 + kCascadeSteps);
      tile(s0, s1);
      std::fill_n(part_sum, padded, Acc(0));
      std::fill_n(part_product, padded, Acc(0));
      // Rows [s, s + pair) added to each column vector in turn: a pair of
      // rows loads and stores the partial sums (and the terms their
      // coefficients) once for two rows, in the same order of additions.
      // (Row by row, the fused BatchNorm + ReLU backward's sums of bfloat16
      // N32 C256 28x28 took 1.22x plain BatchNorm's, AVX512_BF16.)
      auto add_rows = [&](int64_t s, auto pair) {
        for (int64_t j = 0; j < width; j += W) {
          const int64_t count = std::min(W, width - j);
          Vec row_sum = kWithSum ? Vec::loadu(part_sum + j) : Vec(0);
          Vec row_product = Vec::loadu(part_product + j);
          for (int64_t r = 0; r < pair(); ++r) {
            Vec a, b;
            terms(s + r, j, count, a, b);
            if constexpr (kWithSum) row_sum += a;
            row_product = at::vec::fmadd(a, b, row_product);
          }
          if constexpr (kWithSum) row_sum.store(part_sum + j);
          row_product.store(part_product + j);
        }
      };
      int64_t s = s0;
      for (; s + 2 <= s1; s += 2) add_rows(s, std::integral_constant<int64_t, 2>{});
      if (s < s1) add_rows(s, std::integral_constant<int64_t, 1>{});
      for (int64_t j = 0; j < width; j += W) {
        if constexpr (kWithSum) (Vec::loadu(sum + j) + Vec::loadu(part_sum + j)).store(sum + j);
        (Vec::loadu(product + j) + Vec::loadu(part_product + j)).store(product + j);
      }
    }
    return;
  }
  for (int64_t s0 = 0; s0 < rows; s0 += kCascadeSteps) {
    const int64_t s1 = std::min(rows, s0 + kCascadeSteps);
    tile(s0, s1);
    int64_t j = 0;
    if constexpr (kBlockVectors > 1) {
      for (; j + kBlockVectors * W <= width; j += kBlockVectors * W) {
        column_block_sums<kWithSum, Vec>(s0, s1, j, terms, sum, product, std::make_index_sequence<kBlockVectors>{});
      }
    }
    // One vector at a time, and the partial last one. (column_block_sums of
    // one vector compiled to code 1.25-1.5x slower in the AVX512 gradient
    // sums, so this loop stays.)
    for (; j < width; j += W) {
      const int64_t count = std::min(W, width - j);
      Vec part_sum(0), part_product(0);
      for (int64_t s = s0; s < s1; ++s) {
        Vec a, b;
        terms(s, j, count, a, b);
        if constexpr (kWithSum) part_sum += a;
        part_product = at::vec::fmadd(a, b, part_product);
      }
      if constexpr (kWithSum) (Vec::loadu(sum + j) + part_sum).store(sum + j);
      (Vec::loadu(product + j) + part_product).store(product + j);
    }
  }
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

// Input and parameter dtypes of the row-norm and group-norm kernels.
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<input type>, TypeTag<parameter type>): parameters have the
// input's type, or float32 beside a half-precision input.
template <typename Fn>
void dispatch_input_and_param(at::ScalarType input_type, at::ScalarType param_type, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_type, "norm_kernel", [&] {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      if (param_type == at::kFloat) return fn(TypeTag<scalar_t>{}, TypeTag<float>{});
    }
    fn(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
  });
}

// The parameters' dtype: the weight's, else the bias's, else the input's.
inline at::ScalarType param_dtype_of(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias) {
  if (has(weight)) return weight->scalar_type();
  if (has(bias)) return bias->scalar_type();
  return input.scalar_type();
}

template <typename P>
const P* data_or_null(const std::optional<at::Tensor>& t) {
  return has(t) ? t->const_data_ptr<P>() : nullptr;
}

}  // namespace bn_ext::cpu::CPU_CAPABILITY
