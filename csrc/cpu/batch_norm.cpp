// BatchNorm on the CPU: training/eval forward, running-statistics update and
// backward. Two memory layouts: channels-first (N, C, S), reduced over runs
// of S elements per channel, and channels-last (M, C), reduced down columns
// with vectors across channels.
#include "batch_norm_common.h"
#include "cpu/kernel_utils.h"
#include "cpu/output_memory.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

// Work split: at most this many tasks per reduction, and elements per stripe
// below which splitting a channel's reduction is not worth it.
constexpr int64_t kMaxReductionTasks = 256;
constexpr int64_t kMinStripe = 65536;
// Channels one channels-last reduction task handles.
constexpr int64_t kChannelBlock = 256;
// Rows per chunk of a channels-last reduction: each column's float sums stay
// short, one float64 merge per channel amortises over many rows (128 rows
// made the merges cost as much as the reading), and a chunk of 256 channels
// (512 KB of float) stays in L2 for a second pass.
constexpr int64_t kChunkRows = 512;
// Rows per tile of the channels-last elementwise pass (a tile stays in L2).
constexpr int64_t kRowTile = 32;

// A per-channel tensor (optional) read as doubles.
std::vector<double> channel_values(const std::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!has(t)) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->dim() == 0 ? 0 : t->stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(p[c * stride]);
  });
  return v;
}

// Tensor of `dtype` holding `values`.
Tensor channel_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channel_tensor", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) p[c] = static_cast<scalar_t>(values[c]);
  });
  return t;
}

// ---------------------------------------------------------------------------
// Reduction drivers. Each channel's reduction domain is split into stripes
// whose boundaries depend on the shape only; a stripe is walked in
// cache-sized chunks, in order, by one task; stripes are merged in order.

// Calls visit(offset, length) for the contiguous runs holding elements
// [i, j) of channel c's reduction domain (n, s) of a channels-first input.
template <typename Visit>
inline void channel_runs(const BatchNormGeometry& g, int64_t c, int64_t i, int64_t j, const Visit& visit) {
  if (i >= j) return;
  // One division for the first run; later runs start at s = 0 of the next plane.
  const int64_t n = i / g.S;
  int64_t s = i % g.S;
  const int64_t plane_stride = g.C * g.S;
  int64_t offset = (n * g.C + c) * g.S + s;
  for (int64_t k = i; k < j;) {
    const int64_t len = std::min(g.S - s, j - k);
    visit(offset, len);
    k += len;
    offset += plane_stride - s;
    s = 0;
  }
}

// Channels-first: fn(c, stripe, runs) once per chunk, where runs(visit) calls
// visit(offset, length) for every contiguous run of the chunk.
template <typename ChunkFn>
void for_each_channels_first_chunk(const BatchNormGeometry& g, int64_t stripes, const ChunkFn& fn) {
  const int64_t R = g.reduce_size();
  const int64_t stripe_len = (R + stripes - 1) / stripes;
  at::parallel_for(0, g.C * stripes, grain_for(stripe_len), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / stripes, stripe = task % stripes;
      const int64_t lo = part_begin(stripe, stripes, R), hi = part_begin(stripe + 1, stripes, R);
      for (int64_t i = lo; i < hi; i += kCacheChunk) {
        const int64_t j = std::min(hi, i + kCacheChunk);
        fn(c, stripe, [&](const auto& visit) { channel_runs(g, c, i, j, visit); });
      }
    }
  });
}

// Channels-last: fn(stripe, c0, c1, r0, r1) once per chunk of rows [r0, r1)
// and channel block [c0, c1).
template <typename ChunkFn>
void for_each_channels_last_chunk(const BatchNormGeometry& g, int64_t stripes, const ChunkFn& fn) {
  const int64_t M = g.reduce_size();
  const int64_t blocks = (g.C + kChannelBlock - 1) / kChannelBlock;
  const int64_t block_width = std::min(g.C, kChannelBlock);
  at::parallel_for(0, stripes * blocks, grain_for(M / stripes * block_width), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t stripe = task / blocks, block = task % blocks;
      const int64_t c0 = block * kChannelBlock, c1 = std::min(g.C, c0 + kChannelBlock);
      const int64_t lo = part_begin(stripe, stripes, M), hi = part_begin(stripe + 1, stripes, M);
      for (int64_t r = lo; r < hi; r += kChunkRows) fn(stripe, c0, c1, r, std::min(hi, r + kChunkRows));
    }
  });
}

int64_t stripe_count(const BatchNormGeometry& g) {
  const int64_t tasks_per_stripe = g.channels_last ? (g.C + kChannelBlock - 1) / kChannelBlock : g.C;
  // A channels-last task reads a stripe of rows across a block of channels.
  const int64_t min_rows =
      g.channels_last ? std::max<int64_t>(1, kMinStripe / std::clamp<int64_t>(g.C, 1, kChannelBlock)) : kMinStripe;
  return part_count(g.reduce_size(), min_rows, kMaxReductionTasks / std::max<int64_t>(tasks_per_stripe, 1));
}

// Visits the columns [c0, c1) of a channels-last block in strips of four
// vectors, then single vectors, then single channels, so that a strip's
// accumulators and coefficients stay in registers while it walks down the rows.
template <typename T, typename StripFn, typename ScalarFn>
inline void for_each_column_strip(int64_t c0, int64_t c1, const StripFn& strip, const ScalarFn& scalar) {
  constexpr int64_t W = OpVec<T>::size();
  int64_t c = c0;
  for (; c + 4 * W <= c1; c += 4 * W) strip(c, std::integral_constant<int, 4>{});
  for (; c + W <= c1; c += W) strip(c, std::integral_constant<int, 1>{});
  for (; c < c1; ++c) scalar(c);
}

// Per-channel moments of x (count, mean, M2).
template <typename T>
std::vector<Moments> channel_moments(const T* x, const BatchNormGeometry& g) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t stripes = stripe_count(g);
  std::vector<Moments> partial(g.C * stripes);
  if (!g.channels_last) {
    for_each_channels_first_chunk(g, stripes, [&](int64_t c, int64_t stripe, const auto& runs) {
      chan_merge(partial[c * stripes + stripe], chunk_moments<T>([&](const auto& visit) {
                   runs([&](int64_t off, int64_t len) { visit(x + off, len); });
                 }));
    });
  } else {
    for_each_channels_last_chunk(g, stripes, [&](int64_t stripe, int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
      // ShiftedSums down each column: one pass with a per-column shift (the
      // mean of the chunk's first rows), a second, in cache, for a strip in
      // which some column's shift proved too far from its mean.
      const int64_t n = r1 - r0, shift_rows = std::min(n, kShiftSamples);
      const Op inv_n = Op(1) / static_cast<Op>(n);
      auto merge = [&](int64_t c, const Moments& m) { chan_merge(partial[stripe * g.C + c], m); };
      for_each_column_strip<T>(
          c0, c1,
          [&](int64_t c, auto vectors) {
            constexpr int NV = decltype(vectors)::value;
            constexpr int64_t W = Vec::size();
            Vec shift[NV], sum[NV], squares[NV];
            for (int i = 0; i < NV; ++i) shift[i] = sum[i] = squares[i] = Vec(0);
            for (int64_t r = r0; r < r0 + shift_rows; ++r) {
              for (int i = 0; i < NV; ++i) shift[i] += load_op(x + r * g.C + c + i * W);
            }
            for (int i = 0; i < NV; ++i) shift[i] = shift[i] / Vec(static_cast<Op>(shift_rows));
            for (int64_t r = r0; r < r1; ++r) {
              for (int i = 0; i < NV; ++i) {
                const Vec d = load_op(x + r * g.C + c + i * W) - shift[i];
                sum[i] += d;
                squares[i] = at::vec::fmadd(d, d, squares[i]);
              }
            }
            alignas(64) Op lanes[3][NV * W];
            bool single_pass = true;
            for (int i = 0; i < NV; ++i) {
              shift[i].store(lanes[0] + i * W);
              sum[i].store(lanes[1] + i * W);
              squares[i].store(lanes[2] + i * W);
            }
            for (int64_t l = 0; l < NV * W; ++l) single_pass &= shift_keeps_precision(n, lanes[1][l], lanes[2][l]);
            if (!single_pass) {
              Vec offset[NV];
              for (int i = 0; i < NV; ++i) {
                offset[i] = sum[i] * Vec(inv_n);
                squares[i] = Vec(0);
              }
              for (int64_t r = r0; r < r1; ++r) {
                for (int i = 0; i < NV; ++i) {
                  const Vec d = (load_op(x + r * g.C + c + i * W) - shift[i]) - offset[i];
                  squares[i] = at::vec::fmadd(d, d, squares[i]);
                }
              }
              for (int i = 0; i < NV; ++i) squares[i].store(lanes[2] + i * W);
            }
            for (int64_t l = 0; l < NV * W; ++l) {
              merge(c + l, shifted_moments(n, lanes[0][l], lanes[1][l] * inv_n, lanes[1][l], lanes[2][l], single_pass));
            }
          },
          [&](int64_t c) {
            Op shift = 0, sum = 0, squares = 0;
            for (int64_t r = r0; r < r0 + shift_rows; ++r) shift += static_cast<Op>(x[r * g.C + c]);
            shift /= static_cast<Op>(shift_rows);
            for (int64_t r = r0; r < r1; ++r) {
              const Op d = static_cast<Op>(x[r * g.C + c]) - shift;
              sum += d;
              squares += d * d;
            }
            const bool single_pass = shift_keeps_precision(n, sum, squares);
            if (!single_pass) {
              squares = 0;
              for (int64_t r = r0; r < r1; ++r) {
                const Op d = (static_cast<Op>(x[r * g.C + c]) - shift) - sum * inv_n;
                squares += d * d;
              }
            }
            merge(c, shifted_moments(n, shift, sum * inv_n, sum, squares, single_pass));
          });
    });
  }
  std::vector<Moments> total(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t s = 0; s < stripes; ++s) {
      chan_merge(total[c], g.channels_last ? partial[s * g.C + c] : partial[c * stripes + s]);
    }
  }
  return total;
}

// Per-channel sum(dy) and sum(dy * (x - center)).
struct GradSums {
  double dy = 0.0;
  double dy_xc = 0.0;
};

// Adds sum(dy) and sum(dy * (x - center)) over one contiguous run into vector
// accumulators (the tail as a masked vector); callers reduce once per chunk.
template <typename T>
inline void accumulate_grad_run(const T* pdy, const T* px, int64_t len, opmath_t<T> center, OpVec<T>& acc_dy,
                                OpVec<T>& acc_dyx) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vcenter(center);
  Vec sum_dy = acc_dy, sum_dyx = acc_dyx;  // in registers, not through the references
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    const Vec vdy = load_op(pdy + i);
    sum_dy += vdy;
    sum_dyx = at::vec::fmadd(vdy, load_op(px + i) - vcenter, sum_dyx);
  }
  if (i < len) {
    // The masked lanes load dy = 0: they add nothing to either sum.
    const Vec vdy = load_op_partial(pdy + i, len - i);
    sum_dy += vdy;
    sum_dyx = at::vec::fmadd(vdy, load_op_partial(px + i, len - i) - vcenter, sum_dyx);
  }
  acc_dy = sum_dy;
  acc_dyx = sum_dyx;
}

// sum(dy) and sum(dy * (x - center)) over the runs of one chunk of a channel:
// op-math within the chunk, float64 out.
template <typename T, typename Runs>
inline GradSums chunk_grad_sums(const T* dy, const T* x, opmath_t<T> center, const Runs& runs) {
  OpVec<T> acc_dy(0), acc_dyx(0);
  runs([&](int64_t off, int64_t len) { accumulate_grad_run(dy + off, x + off, len, center, acc_dy, acc_dyx); });
  return {static_cast<double>(reduce_add(acc_dy)), static_cast<double>(reduce_add(acc_dyx))};
}

template <typename T>
std::vector<GradSums> channel_grad_sums(const T* dy, const T* x, const std::vector<opmath_t<T>>& center,
                                        const BatchNormGeometry& g) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t stripes = stripe_count(g);
  std::vector<GradSums> partial(g.C * stripes);
  if (!g.channels_last) {
    for_each_channels_first_chunk(g, stripes, [&](int64_t c, int64_t stripe, const auto& runs) {
      const GradSums sums = chunk_grad_sums(dy, x, center[c], runs);
      auto& p = partial[c * stripes + stripe];
      p.dy += sums.dy;
      p.dy_xc += sums.dy_xc;
    });
  } else {
    for_each_channels_last_chunk(g, stripes, [&](int64_t stripe, int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
      auto add = [&](int64_t c, Op sum_dy, Op sum_dyx) {
        partial[stripe * g.C + c].dy += static_cast<double>(sum_dy);
        partial[stripe * g.C + c].dy_xc += static_cast<double>(sum_dyx);
      };
      for_each_column_strip<T>(
          c0, c1,
          [&](int64_t c, auto vectors) {
            constexpr int NV = decltype(vectors)::value;
            Vec acc_dy[NV], acc_dyx[NV], vcenter[NV];
            for (int i = 0; i < NV; ++i) {
              acc_dy[i] = acc_dyx[i] = Vec(0);
              vcenter[i] = Vec::loadu(center.data() + c + i * W);
            }
            for (int64_t r = r0; r < r1; ++r) {
              for (int i = 0; i < NV; ++i) {
                const Vec vdy = load_op(dy + r * g.C + c + i * W);
                acc_dy[i] += vdy;
                acc_dyx[i] = at::vec::fmadd(vdy, load_op(x + r * g.C + c + i * W) - vcenter[i], acc_dyx[i]);
              }
            }
            alignas(64) Op lanes[2][NV * W];
            for (int i = 0; i < NV; ++i) {
              acc_dy[i].store(lanes[0] + i * W);
              acc_dyx[i].store(lanes[1] + i * W);
            }
            for (int64_t l = 0; l < NV * W; ++l) add(c + l, lanes[0][l], lanes[1][l]);
          },
          [&](int64_t c) {
            Op sum_dy = 0, sum_dyx = 0;
            for (int64_t r = r0; r < r1; ++r) {
              const Op d = static_cast<Op>(dy[r * g.C + c]);
              sum_dy += d;
              sum_dyx += d * (static_cast<Op>(x[r * g.C + c]) - center[c]);
            }
            add(c, sum_dy, sum_dyx);
          });
    });
  }
  std::vector<GradSums> total(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t s = 0; s < stripes; ++s) {
      const auto& p = g.channels_last ? partial[s * g.C + c] : partial[c * stripes + s];
      total[c].dy += p.dy;
      total[c].dy_xc += p.dy_xc;
    }
  }
  return total;
}

// ---------------------------------------------------------------------------
// Elementwise pass: out = [dy * alpha[c]] + [(x - center[c]) * beta[c]] + gamma[c].
// Forward uses the x term only; backward in eval mode the dy term only.
template <typename T>
struct ChannelCoefficients {
  std::vector<opmath_t<T>> alpha, beta, gamma, center;
  explicit ChannelCoefficients(int64_t C) : alpha(C), beta(C), gamma(C), center(C) {}
};

// [dy * alpha] + [(x - center) * beta] + gamma on op-math vectors (a term
// left out is not read).
template <bool kUseDy, bool kUseX, typename Vec>
inline Vec affine_value(const Vec& dy, const Vec& x, const Vec& alpha, const Vec& beta, const Vec& gamma,
                        const Vec& center) {
  Vec v = gamma;
  if constexpr (kUseX) v = at::vec::fmadd(x - center, beta, v);
  if constexpr (kUseDy) v = at::vec::fmadd(dy, alpha, v);
  return v;
}

// out[i..i+count) = [dy * alpha] + [(x - center) * beta] + gamma, one vector
// (count < W: a masked tail).
template <typename T, bool kUseDy, bool kUseX>
inline void affine_vector(T* out, const T* dy, const T* x, int64_t i, const OpVec<T>& alpha, const OpVec<T>& beta,
                          const OpVec<T>& gamma, const OpVec<T>& center, int64_t count = OpVec<T>::size()) {
  const bool full = count == OpVec<T>::size();
  auto load = [&](const T* p) { return full ? load_op(p + i) : load_op_partial(p + i, count); };
  OpVec<T> vdy, vx;
  if constexpr (kUseDy) vdy = load(dy);
  if constexpr (kUseX) vx = load(x);
  const OpVec<T> v = affine_value<kUseDy, kUseX>(vdy, vx, alpha, beta, gamma, center);
  if (full) {
    store_op(out + i, v);
  } else {
    store_op_partial(out + i, v, count);
  }
}

// The same for the single element out[i].
template <typename T, bool kUseDy, bool kUseX>
inline void affine_scalar(T* out, const T* dy, const T* x, int64_t i, opmath_t<T> alpha, opmath_t<T> beta,
                          opmath_t<T> gamma, opmath_t<T> center) {
  opmath_t<T> v = gamma;
  if constexpr (kUseX) v += (static_cast<opmath_t<T>>(x[i]) - center) * beta;
  if constexpr (kUseDy) v += static_cast<opmath_t<T>>(dy[i]) * alpha;
  out[i] = static_cast<T>(v);
}

// One contiguous run [begin, end) of a single channel.
template <typename T, bool kUseDy, bool kUseX>
inline void affine_run(T* out, const T* dy, const T* x, int64_t begin, int64_t end, opmath_t<T> alpha,
                       opmath_t<T> beta, opmath_t<T> gamma, opmath_t<T> center) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec valpha(alpha), vbeta(beta), vgamma(gamma), vcenter(center);
  int64_t i = begin;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    // Two float vectors per half-type vector: converting them back together
    // packs 32 values at once, cheaper than twice 16.
    using HalfVec = at::vec::Vectorized<T>;
    for (; i + 2 * W <= end; i += 2 * W) {
      Vec dy0, dy1, x0, x1;
      if constexpr (kUseDy) std::tie(dy0, dy1) = at::vec::convert_to_float<T>(HalfVec::loadu(dy + i));
      if constexpr (kUseX) std::tie(x0, x1) = at::vec::convert_to_float<T>(HalfVec::loadu(x + i));
      round_to_half_type<T>(affine_value<kUseDy, kUseX>(dy0, x0, valpha, vbeta, vgamma, vcenter),
                            affine_value<kUseDy, kUseX>(dy1, x1, valpha, vbeta, vgamma, vcenter))
          .store(out + i);
    }
  }
  for (; i + W <= end; i += W) affine_vector<T, kUseDy, kUseX>(out, dy, x, i, valpha, vbeta, vgamma, vcenter);
  if (i < end) affine_vector<T, kUseDy, kUseX>(out, dy, x, i, valpha, vbeta, vgamma, vcenter, end - i);
}

template <typename T, bool kUseDy, bool kUseX>
void channel_affine_pass(T* out, const T* dy, const T* x, const ChannelCoefficients<T>& k,
                         const BatchNormGeometry& g) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  if (!g.channels_last) {
    const int64_t total = g.N * g.C * g.S;
    at::parallel_for(0, total, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      // Divisions for the first run only: each later run is the next plane.
      int64_t plane = begin / g.S, c = plane % g.C;
      for (int64_t i = begin; i < end;) {
        const int64_t run_end = std::min(end, (plane + 1) * g.S);
        affine_run<T, kUseDy, kUseX>(out, dy, x, i, run_end, k.alpha[c], k.beta[c], k.gamma[c], k.center[c]);
        i = run_end;
        ++plane;
        if (++c == g.C) c = 0;
      }
    });
  } else {
    // Tiles of rows x column strips: a strip's coefficients load once per tile.
    const int64_t M = g.reduce_size();
    const int64_t tiles = (M + kRowTile - 1) / kRowTile;
    at::parallel_for(0, tiles, grain_for(kRowTile * g.C), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kRowTile, r1 = std::min(M, r0 + kRowTile);
        for_each_column_strip<T>(
            0, g.C,
            [&](int64_t c, auto vectors) {
              constexpr int NV = decltype(vectors)::value;
              Vec alpha[NV], beta[NV], gamma[NV], center[NV];
              for (int i = 0; i < NV; ++i) {
                alpha[i] = Vec::loadu(k.alpha.data() + c + i * W);
                beta[i] = Vec::loadu(k.beta.data() + c + i * W);
                gamma[i] = Vec::loadu(k.gamma.data() + c + i * W);
                center[i] = Vec::loadu(k.center.data() + c + i * W);
              }
              for (int64_t r = r0; r < r1; ++r) {
                for (int i = 0; i < NV; ++i) {
                  affine_vector<T, kUseDy, kUseX>(out, dy, x, r * g.C + c + i * W, alpha[i], beta[i], gamma[i],
                                                  center[i]);
                }
              }
            },
            [&](int64_t c) {
              for (int64_t r = r0; r < r1; ++r) {
                affine_scalar<T, kUseDy, kUseX>(out, dy, x, r * g.C + c, k.alpha[c], k.beta[c], k.gamma[c],
                                                k.center[c]);
              }
            });
      }
    });
  }
}

// Forward coefficients of channel c: y = (x - center) * beta + gamma, where
// center is the mean rounded to op-math and gamma folds the rounding
// remainder, so inputs with a large mean keep their precision.
template <typename T>
inline void set_forward_coefficients(ChannelCoefficients<T>& k, int64_t c, double mean, double invstd, double w,
                                     double b) {
  using Op = opmath_t<T>;
  const double a = w * invstd;
  k.center[c] = static_cast<Op>(mean);
  k.beta[c] = static_cast<Op>(a);
  k.gamma[c] = static_cast<Op>(b - (mean - static_cast<double>(k.center[c])) * a);
}

// The fused channels-first passes handle blocks of adjacent channels: for
// each plane n they walk the block's runs, which lie next to each other in
// memory, so short runs (7x7 planes) stream instead of each being a scattered
// miss. Per channel the arithmetic is exactly the unblocked one (the same
// chunks, runs and order), so blocking changes no result. A block's data
// stays within this many bytes, so the last pass finds it in L2.
// Blocks are also small enough for every thread to get several: with a few
// large blocks the threads' shares differ by a whole block (N32 C98 16x16
// bfloat16 made four blocks, 64 channels for one thread, 34 for the other).
// Results do not depend on the block size, so it may depend on the threads.
constexpr int64_t kBlockBytes = 512 * 1024;
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kBlocksPerThread = 4;

int64_t channels_per_block(const BatchNormGeometry& g, int64_t element_bytes) {
  const int64_t channel_bytes = std::max<int64_t>(1, g.reduce_size() * element_bytes);
  const int64_t blocks = kBlocksPerThread * at::get_num_threads();
  return std::clamp<int64_t>(std::min(kBlockBytes / channel_bytes, (g.C + blocks - 1) / blocks), 1,
                             kMaxBlockChannels);
}

// fn(c0, c1) for blocks of channels [c0, c1), in parallel.
template <typename BlockFn>
void for_each_channel_block(const BatchNormGeometry& g, int64_t block, int64_t element_reads, const BlockFn& fn) {
  const int64_t blocks = (g.C + block - 1) / block;
  at::parallel_for(0, blocks, grain_for(element_reads * block * g.reduce_size()), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * block, std::min(g.C, (b + 1) * block));
  });
}

// Calls visit(c, offset, length) for the runs of elements [i, j) of every
// channel of [c0, c1), plane by plane.
template <typename Visit>
inline void block_runs(const BatchNormGeometry& g, int64_t c0, int64_t c1, int64_t i, int64_t j, const Visit& visit) {
  channel_runs(g, c0, i, j, [&](int64_t off, int64_t len) {
    for (int64_t c = c0; c < c1; ++c) visit(c, off + (c - c0) * g.S, len);
  });
}

// Training forward of a channels-first input whose channels reduce in one
// stripe each: statistics and normalisation of a block of channels in one
// task (the same chunks, shifts, sums and merge order as channel_moments).
template <typename T>
void fused_channels_first_forward(const T* x, T* y, const BatchNormGeometry& g, const std::vector<double>& w,
                                  const std::vector<double>& b, double eps, std::vector<double>& mean,
                                  std::vector<double>& invstd) {
  const int64_t R = g.reduce_size();
  ChannelCoefficients<T> k(g.C);
  for_each_channel_block(g, channels_per_block(g, sizeof(T)), 2, [&](int64_t c0, int64_t c1) {
    Moments m[kMaxBlockChannels];
    ShiftedSums<T> sums[kMaxBlockChannels];
    for (int64_t i = 0; i < R; i += kCacheChunk) {
      // chunk_moments for every channel of the block at once.
      const int64_t j = std::min(R, i + kCacheChunk);
      const int64_t first_run = std::min(g.S - i % g.S, j - i);
      for (int64_t c = c0; c < c1; ++c) {
        sums[c - c0].start(chunk_shift(x + (i / g.S * g.C + c) * g.S + i % g.S, first_run));
      }
      block_runs(g, c0, c1, i, j, [&](int64_t c, int64_t off, int64_t len) { sums[c - c0].add_run(x + off, len); });
      for (int64_t c = c0; c < c1; ++c) {
        chan_merge(m[c - c0], sums[c - c0].finish([&](const auto& visit) {
          channel_runs(g, c, i, j, [&](int64_t off, int64_t len) { visit(x + off, len); });
        }));
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      mean[c] = m[c - c0].mean;
      invstd[c] = 1.0 / std::sqrt(m[c - c0].m2 / static_cast<double>(m[c - c0].count) + eps);
      set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    }
    block_runs(g, c0, c1, 0, R, [&](int64_t c, int64_t off, int64_t len) {
      affine_run<T, false, true>(y, nullptr, x, off, off + len, 0, k.beta[c], k.gamma[c], k.center[c]);
    });
  });
}

// Backward coefficients of channel c: dx = dy * alpha + (x - center) * beta + gamma,
// from sum(dy) and sum(dy * (x - mean)) over the channel's M values.
//   training: dx = alpha * (dy - sum(dy)/M - (x - mean) * invstd^2 * sum(dy (x - mean))/M)
//   eval:     dx = alpha * dy
template <typename T>
inline void set_backward_coefficients(ChannelCoefficients<T>& k, int64_t c, double mean, double invstd, double w,
                                      double sum_dy, double sum_dy_xmu, double M, bool training) {
  using Op = opmath_t<T>;
  const double alpha = w * invstd;
  k.alpha[c] = static_cast<Op>(alpha);
  if (training) {
    const double proj = invstd * invstd * sum_dy_xmu / M;
    k.beta[c] = static_cast<Op>(-alpha * proj);
    k.gamma[c] = static_cast<Op>(alpha * (proj * (mean - static_cast<double>(k.center[c])) - sum_dy / M));
  }
}

// Training backward of a channels-first input whose channels reduce in one
// stripe each: a block of channels' sums and their dx in one task, dy and x
// still in cache for the second read (the same chunks and order as
// channel_grad_sums).
template <typename T>
void fused_channels_first_backward(const T* dy, const T* x, T* dx, const BatchNormGeometry& g,
                                   const std::vector<double>& mean, const std::vector<double>& invstd,
                                   const std::vector<double>& w, ChannelCoefficients<T>& k,
                                   std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t R = g.reduce_size();
  const int64_t block = channels_per_block(g, 2 * sizeof(T));
  for_each_channel_block(g, block, 3, [&](int64_t c0, int64_t c1) {
    GradSums total[kMaxBlockChannels];
    Vec acc_dy[kMaxBlockChannels], acc_dyx[kMaxBlockChannels];
    for (int64_t i = 0; i < R; i += kCacheChunk) {
      // chunk_grad_sums for every channel of the block at once.
      for (int64_t c = c0; c < c1; ++c) {
        acc_dy[c - c0] = acc_dyx[c - c0] = Vec(0);
      }
      block_runs(g, c0, c1, i, std::min(R, i + kCacheChunk), [&](int64_t c, int64_t off, int64_t len) {
        accumulate_grad_run(dy + off, x + off, len, k.center[c], acc_dy[c - c0], acc_dyx[c - c0]);
      });
      for (int64_t c = c0; c < c1; ++c) {
        total[c - c0].dy += static_cast<double>(reduce_add(acc_dy[c - c0]));
        total[c - c0].dy_xc += static_cast<double>(reduce_add(acc_dyx[c - c0]));
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      sum_dy[c] = total[c - c0].dy;
      sum_dy_xmu[c] = total[c - c0].dy_xc - (mean[c] - static_cast<double>(k.center[c])) * total[c - c0].dy;
      set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c],
                                static_cast<double>(R), true);
    }
    block_runs(g, c0, c1, 0, R, [&](int64_t c, int64_t off, int64_t len) {
      affine_run<T, true, true>(dx, dy, x, off, off + len, k.alpha[c], k.beta[c], k.gamma[c], k.center[c]);
    });
  });
}

// ---------------------------------------------------------------------------
// Operators.

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& running_mean,
                                                          const std::optional<Tensor>& running_var, bool training,
                                                          double eps) {
  check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
  check_batch_norm_forward_args(input, training, eps);
  const Tensor x = input.contiguous(batch_norm_memory_format(input));
  const BatchNormGeometry g = batch_norm_geometry(x);
  Tensor out = empty_output_like(x, at::MemoryFormat::Preserve);
  const auto sdtype = stat_dtype(input.scalar_type());
  if (x.numel() == 0 && training) {
    return {out, at::zeros({g.C}, x.options().dtype(sdtype)), at::zeros({g.C}, x.options().dtype(sdtype))};
  }
  std::vector<double> mean(g.C), invstd(g.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_cpu", [&] {
    const auto w = channel_values(weight, g.C, 1.0);
    const auto b = channel_values(bias, g.C, 0.0);
    if (training && !g.channels_last && stripe_count(g) == 1) {
      fused_channels_first_forward(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, w, b, eps, mean,
                                   invstd);
      return;
    }
    if (training) {
      const auto moments = channel_moments(x.const_data_ptr<scalar_t>(), g);
      for (int64_t c = 0; c < g.C; ++c) {
        mean[c] = moments[c].mean;
        invstd[c] = 1.0 / std::sqrt(moments[c].m2 / static_cast<double>(moments[c].count) + eps);
      }
    } else {
      mean = channel_values(running_mean, g.C, 0.0);
      const auto var = channel_values(running_var, g.C, 1.0);
      for (int64_t c = 0; c < g.C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    }
    ChannelCoefficients<scalar_t> k(g.C);
    for (int64_t c = 0; c < g.C; ++c) set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    channel_affine_pass<scalar_t, false, true>(out.mutable_data_ptr<scalar_t>(), nullptr,
                                               x.const_data_ptr<scalar_t>(), k, g);
  });
  return {out, channel_tensor(mean, sdtype), channel_tensor(invstd, sdtype)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           const std::optional<Tensor>& weight,
                                                           const Tensor& save_mean, const Tensor& save_invstd,
                                                           bool training, double eps,
                                                           std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  check_batch_norm_backward_args(grad_out, input, weight, save_mean, save_invstd);
  const int64_t C = input.size(1);
  const auto fmt = batch_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_out.contiguous(fmt);
  const BatchNormGeometry g = batch_norm_geometry(x);
  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  Tensor grad_input = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Preserve) : at::empty({0}, x.options());
  Tensor grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cpu", [&] {
    using Op = opmath_t<scalar_t>;
    const auto mean = channel_values(save_mean, C, 0.0);
    const auto invstd = channel_values(save_invstd, C, 1.0);
    const auto w = channel_values(weight, C, 1.0);
    ChannelCoefficients<scalar_t> k(C);
    for (int64_t c = 0; c < C; ++c) k.center[c] = static_cast<Op>(mean[c]);

    const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
    std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
    const bool fused = training && output_mask[0] && !g.channels_last && stripe_count(g) == 1 && x.numel() > 0;
    if (fused) {
      fused_channels_first_backward(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    grad_input.mutable_data_ptr<scalar_t>(), g, mean, invstd, w, k, sum_dy,
                                    sum_dy_xmu);
    } else if (need_sums && x.numel() > 0) {
      const auto sums = channel_grad_sums(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), k.center, g);
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = sums[c].dy;
        // sum(dy * (x - mean)) from the sum about the rounded center.
        sum_dy_xmu[c] = sums[c].dy_xc - (mean[c] - static_cast<double>(k.center[c])) * sums[c].dy;
      }
    }
    if (output_mask[0] && x.numel() > 0 && !fused) {
      const double M = static_cast<double>(g.reduce_size());
      for (int64_t c = 0; c < C; ++c) {
        set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, training);
      }
      if (training) {
        channel_affine_pass<scalar_t, true, true>(grad_input.mutable_data_ptr<scalar_t>(),
                                                  dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), k, g);
      } else {
        channel_affine_pass<scalar_t, true, false>(grad_input.mutable_data_ptr<scalar_t>(),
                                                   dy.const_data_ptr<scalar_t>(), nullptr, k, g);
      }
    }
    if (output_mask[1]) {
      std::vector<double> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * invstd[c];
      grad_weight = channel_tensor(gw, param_dtype);
    }
    if (output_mask[2]) grad_bias = channel_tensor(sum_dy, param_dtype);
  });
  auto empty = [&] { return at::empty({0}, x.options().dtype(param_dtype)); };
  return {grad_input, grad_weight.defined() ? grad_weight : empty(), grad_bias.defined() ? grad_bias : empty()};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  const Tensor x = input.contiguous(batch_norm_memory_format(input));
  const BatchNormGeometry g = batch_norm_geometry(x);
  std::vector<double> mean(g.C, 0.0), m2(g.C, 0.0);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
      const auto moments = channel_moments(x.const_data_ptr<scalar_t>(), g);
      for (int64_t c = 0; c < g.C; ++c) {
        mean[c] = moments[c].mean;
        m2[c] = moments[c].m2;
      }
    });
  }
  return {channel_tensor(mean, at::kDouble), channel_tensor(m2, at::kDouble)};
}

void batch_norm_update_stats_cpu(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                 const Tensor& save_mean, const Tensor& save_invstd, std::optional<double> momentum,
                                 const std::optional<Tensor>& num_batches_tracked, double eps, int64_t count) {
  TORCH_CHECK(momentum.has_value() || has(num_batches_tracked),
              "batch_norm_update_stats: num_batches_tracked is required when momentum is None");
  const double factor = momentum.has_value() ? *momentum : 1.0 / num_batches_tracked->item<double>();
  const int64_t C = save_mean.numel();
  const auto mean = channel_values(save_mean, C, 0.0);
  const auto invstd = channel_values(save_invstd, C, 1.0);
  // Unbiased variance, as torch keeps in running_var.
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  auto update = [&](const Tensor& t, auto&& batch_value) {
    TORCH_CHECK(t.numel() == C, "batch_norm_update_stats: running statistics should contain ", C,
                " elements not ", t.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm_update_stats", [&] {
      scalar_t* p = t.mutable_data_ptr<scalar_t>();
      const int64_t stride = t.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        const double old = static_cast<double>(p[c * stride]);
        p[c * stride] = static_cast<scalar_t>((1.0 - factor) * old + factor * batch_value(c));
      }
    });
  };
  if (has(running_mean)) update(*running_mean, [&](int64_t c) { return mean[c]; });
  if (has(running_var)) {
    update(*running_var, [&](int64_t c) { return (1.0 / (invstd[c] * invstd[c]) - eps) * unbias; });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
}

}  // namespace bn_ext::cpu
