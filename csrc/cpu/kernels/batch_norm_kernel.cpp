// BatchNorm CPU kernels, built once per SIMD level (cpu/dispatch.h). Two
// memory layouts: channels-first (N, C, S), reduced over runs of S elements
// per channel, and channels-last (M, C), reduced down columns with vectors
// across channels.
#include "cpu/dispatch.h"
#include "cpu/kernels/kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace bn_ext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// Work split: at most this many tasks per reduction, and elements per stripe
// below which splitting a channel's reduction is not worth it.
constexpr int64_t kMaxReductionTasks = 256;
constexpr int64_t kMinStripe = 65536;
// A channels-first channel stays in one task (see stripe_count) when there
// are at least this many channels and its input and gradient, in float32,
// stay within this many bytes.
constexpr int64_t kMinFusedChannels = 16;
constexpr int64_t kFusedChannelBytes = int64_t(8) << 20;
// Channels-first planes whose run is shorter than this are reduced plane by
// plane across groups of channels (see short_planes).
constexpr int64_t kShortRunBytes = 4096;
// Rows per chunk of a channels-last reduction: one float64 merge per channel
// amortises over many rows (128 rows made the merges cost as much as the
// reading). A task reads whole rows, in memory order: blocks of 256 channels
// of a wider row read 1 KB of every row and left the prefetchers idle
// (N32 C1024 14x14 statistics ran at 12 GB/s from L3).
constexpr int64_t kChunkRows = 512;

// The fused channels-first passes (planes of kShortRunBytes and more) handle
// blocks of adjacent channels: for each plane n they walk the block's runs,
// which lie next to each other in memory. Per channel the arithmetic is
// exactly the unblocked one (the same chunks, runs and order), so blocking
// changes no result. A block's data stays within this many bytes, so the
// last pass finds it in L2.
// Blocks are also small enough for every thread to get several: with a few
// large blocks the threads' shares differ by a whole block (N32 C98 16x16
// bfloat16 made four blocks, 64 channels for one thread, 34 for the other).
// Results do not depend on the block size, so it may depend on the threads.
constexpr int64_t kBlockBytes = 512 * 1024;
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kBlocksPerThread = 4;

// ---------------------------------------------------------------------------
// Walks. Each channel's reduction domain is split into stripes whose
// boundaries depend on the shape only; a stripe is walked in cache-sized
// chunks, in order, by one task; stripes are merged in order.

int64_t stripe_count(const BatchNormGeometry& g) {
  if (g.channels_last) {
    // A channels-last task reads a stripe of whole rows, at least a chunk of
    // them: each stripe costs a float64 merge per channel at the end, in
    // sequence (98 stripes of 64 rows made N32 C1024 14x14's merges cost
    // as much as its reading).
    return part_count(g.reduce_size(), std::max(kChunkRows, kMinStripe / std::max<int64_t>(g.C, 1)),
                      kMaxReductionTasks);
  }
  // Channels-first: a channel in one task (its data still in cache for the
  // fused second pass) wherever there are channels enough to share out and a
  // channel's data is small enough; otherwise channels split into stripes. (N32 C64 112x112's backward in four stripes
  // read its 200 MB twice from memory: 0.8x torch, which reads a channel's
  // 3 MB the second time from L3.)
  if (g.C >= kMinFusedChannels && g.reduce_size() <= kFusedChannelBytes / 8) return 1;
  return part_count(g.reduce_size(), kMinStripe, kMaxReductionTasks / std::max<int64_t>(g.C, 1));
}

// Whether a channels-first input's planes are short: its reductions then
// walk plane by plane across all channels, in stripes of planes, reading
// memory in order, and the elementwise pass follows on its own. A task per
// channel (or block of channels) reads one short run per plane and jumps a
// plane ahead, which leaves the prefetchers idle (N256 C256 14x14 bfloat16
// training forward: 0.65x torch that way).
template <typename T>
bool short_planes(const BatchNormGeometry& g) {
  return !g.channels_last && g.S * static_cast<int64_t>(sizeof(T)) < kShortRunBytes;
}

// The split of a short-plane reduction: groups of adjacent channels, whose
// runs in a plane form one contiguous piece of at least kPlaneGroupBytes, by
// stripes of planes long enough for whole cache chunks of every channel.
struct PlaneSplit {
  int64_t groups, stripes;
};
constexpr int64_t kPlaneGroupBytes = 16 * 1024;

template <typename T>
PlaneSplit plane_split(const BatchNormGeometry& g) {
  const int64_t run_bytes = std::max<int64_t>(1, g.S * static_cast<int64_t>(sizeof(T)));
  const int64_t groups = part_count(g.C, std::max<int64_t>(1, kPlaneGroupBytes / run_bytes), kMaxReductionTasks);
  const int64_t chunk_planes = (kCacheChunk + g.S - 1) / std::max<int64_t>(g.S, 1);
  return {groups, part_count(g.N, chunk_planes, kMaxReductionTasks / groups)};
}

// fn(stripe, c0, c1, n0, n1) for channel groups [c0, c1) by stripes of planes
// [n0, n1), in parallel.
template <typename TaskFn>
void for_each_plane_task(const BatchNormGeometry& g, const PlaneSplit& split, const TaskFn& fn) {
  at::parallel_for(0, split.groups * split.stripes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t stripe = task / split.groups, group = task % split.groups;
      fn(stripe, part_begin(group, split.groups, g.C), part_begin(group + 1, split.groups, g.C),
         part_begin(stripe, split.stripes, g.N), part_begin(stripe + 1, split.stripes, g.N));
    }
  });
}

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

// Calls visit(c, offset, length) for the runs of elements [i, j) of every
// channel of [c0, c1), plane by plane.
template <typename Visit>
inline void block_runs(const BatchNormGeometry& g, int64_t c0, int64_t c1, int64_t i, int64_t j, const Visit& visit) {
  channel_runs(g, c0, i, j, [&](int64_t off, int64_t len) {
    for (int64_t c = c0; c < c1; ++c) visit(c, off + (c - c0) * g.S, len);
  });
}

// Channels-first: fn(c, stripe, lo, hi) for every channel's stripes, where
// [lo, hi) are the stripe's elements of the channel's reduction domain.
template <typename StripeFn>
void for_each_channels_first_stripe(const BatchNormGeometry& g, int64_t stripes, const StripeFn& fn) {
  const int64_t R = g.reduce_size();
  const int64_t stripe_len = (R + stripes - 1) / stripes;
  at::parallel_for(0, g.C * stripes, grain_for(stripe_len), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / stripes, stripe = task % stripes;
      fn(c, stripe, part_begin(stripe, stripes, R), part_begin(stripe + 1, stripes, R));
    }
  });
}

// Channels-last: fn(stripe, r0, r1) once per chunk of rows [r0, r1).
template <typename ChunkFn>
void for_each_channels_last_chunk(const BatchNormGeometry& g, int64_t stripes, const ChunkFn& fn) {
  const int64_t M = g.reduce_size();
  at::parallel_for(0, stripes, grain_for(M / stripes * g.C), [&](int64_t begin, int64_t end) {
    for (int64_t stripe = begin; stripe < end; ++stripe) {
      const int64_t lo = part_begin(stripe, stripes, M), hi = part_begin(stripe + 1, stripes, M);
      for (int64_t r = lo; r < hi; r += kChunkRows) fn(stripe, r, std::min(hi, r + kChunkRows));
    }
  });
}

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

// ---------------------------------------------------------------------------
// Reductions.

// Channels-first moments of elements [lo, hi) of each channel of [c0, c1),
// merged into m[c - c0]: cache-sized chunks from lo, in order, each walked
// plane by plane for the whole block.
template <typename T>
void add_block_moments(const T* x, const BatchNormGeometry& g, int64_t c0, int64_t c1, int64_t lo, int64_t hi,
                       Moments* m) {
  std::vector<ShiftedSums<T>> sums(c1 - c0);
  for (int64_t i = lo; i < hi; i += kCacheChunk) {
    const int64_t j = std::min(hi, i + kCacheChunk);
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
}

// Channels-last moments of rows [r0, r1), merged by merge(column, moments).
// One pass with a per-column shift (the mean of the chunk's first rows); a
// second when some column's shift proved too far from its mean.
template <typename T, typename Merge>
void add_rows_moments(const T* x, const BatchNormGeometry& g, int64_t r0, int64_t r1, const Merge& merge) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t n = r1 - r0, shift_rows = std::min(n, kShiftSamples);
  auto load = [&](int64_t s, int64_t j, int64_t count) { return load_op_n(x + (r0 + s) * g.C + j, count); };
  auto shift = column_array<Op>(g.C), sum = column_array<Op>(g.C), squares = column_array<Op>(g.C);
  column_cascade_sums<true, Vec>(
      shift_rows, g.C, [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) { a = load(s, j, count), b = Vec(0); },
      shift.data(), squares.data());
  for (int64_t j = 0; j < g.C; j += W) {
    (Vec::loadu(shift.data() + j) / Vec(static_cast<Op>(shift_rows))).store(shift.data() + j);
  }
  std::fill(squares.begin(), squares.end(), Op(0));
  column_cascade_sums<true, Vec>(
      n, g.C,
      [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
        a = b = load(s, j, count) - Vec::loadu(shift.data() + j);
      },
      sum.data(), squares.data());
  bool single_pass = true;
  for (int64_t c = 0; c < g.C; ++c) single_pass &= shift_keeps_precision(n, sum[c], squares[c]);
  if (!single_pass) {
    auto offset = column_array<Op>(g.C);
    for (size_t c = 0; c < offset.size(); ++c) offset[c] = sum[c] / static_cast<Op>(n);
    std::fill(squares.begin(), squares.end(), Op(0));
    column_cascade_sums<false, Vec>(
        n, g.C,
        [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
          a = b = (load(s, j, count) - Vec::loadu(shift.data() + j)) - Vec::loadu(offset.data() + j);
        },
        nullptr, squares.data());
  }
  for (int64_t c = 0; c < g.C; ++c) {
    merge(c, shifted_moments(n, shift[c], sum[c] / static_cast<Op>(n), sum[c], squares[c], single_pass));
  }
}

// Per-channel moments of x (count, mean, M2).
template <typename T>
std::vector<Moments> channel_moments(const T* x, const BatchNormGeometry& g) {
  const int64_t stripes = short_planes<T>(g) ? plane_split<T>(g).stripes : stripe_count(g);
  // Per stripe and channel, merged in stripe order below.
  std::vector<Moments> partial(g.C * stripes);
  if (short_planes<T>(g)) {
    for_each_plane_task(g, plane_split<T>(g), [&](int64_t stripe, int64_t c0, int64_t c1, int64_t n0, int64_t n1) {
      add_block_moments(x, g, c0, c1, n0 * g.S, n1 * g.S, &partial[stripe * g.C + c0]);
    });
  } else if (!g.channels_last) {
    for_each_channels_first_stripe(g, stripes, [&](int64_t c, int64_t stripe, int64_t lo, int64_t hi) {
      add_block_moments(x, g, c, c + 1, lo, hi, &partial[stripe * g.C + c]);
    });
  } else {
    for_each_channels_last_chunk(g, stripes, [&](int64_t stripe, int64_t r0, int64_t r1) {
      add_rows_moments(x, g, r0, r1, [&](int64_t c, const Moments& m) { chan_merge(partial[stripe * g.C + c], m); });
    });
  }
  std::vector<Moments> total(g.C);
  at::parallel_for(0, g.C, grain_for(8 * stripes), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t s = 0; s < stripes; ++s) {
        chan_merge(total[c], partial[s * g.C + c]);
      }
    }
  });
  return total;
}

// Per-channel sum(dy) and sum(dy * (x - center)).
struct GradSums {
  double dy = 0.0;
  double dy_xc = 0.0;
};

inline void add_grad_sums(GradSums& total, double dy, double dy_xc) {
  total.dy += dy;
  total.dy_xc += dy_xc;
}

// Channels-first gradient sums of elements [lo, hi) of each channel of
// [c0, c1), added into sums[c - c0]: op-math within a cache chunk, float64
// across chunks, the same chunks as add_block_moments.
template <typename T>
void add_block_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, const BatchNormGeometry& g, int64_t c0,
                         int64_t c1, int64_t lo, int64_t hi, GradSums* sums) {
  using Vec = OpVec<T>;
  std::vector<Vec> acc_dy(c1 - c0), acc_dyx(c1 - c0);
  for (int64_t i = lo; i < hi; i += kCacheChunk) {
    for (int64_t c = c0; c < c1; ++c) acc_dy[c - c0] = acc_dyx[c - c0] = Vec(0);
    block_runs(g, c0, c1, i, std::min(hi, i + kCacheChunk), [&](int64_t c, int64_t off, int64_t len) {
      const Vec vcenter(center[c]);
      // Lanes past a run's end load dy = 0: they add nothing to either sum.
      run_sums<true>(
          len,
          [&](int64_t e, int64_t count, Vec& a, Vec& b) {
            a = load_op_n(dy + off + e, count);
            b = load_op_n(x + off + e, count) - vcenter;
          },
          acc_dy[c - c0], acc_dyx[c - c0]);
    });
    for (int64_t c = c0; c < c1; ++c) {
      add_grad_sums(sums[c - c0], reduce_add(acc_dy[c - c0]), reduce_add(acc_dyx[c - c0]));
    }
  }
}

// Channels-last gradient sums of rows [r0, r1), added by
// add(column, sum_dy, sum_dy_xc). `center` is a column array.
template <typename T, typename Add>
void add_rows_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, const BatchNormGeometry& g, int64_t r0,
                        int64_t r1, const Add& add) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  auto sum_dy = column_array<Op>(g.C), sum_dyx = column_array<Op>(g.C);
  column_cascade_sums<true, Vec>(
      r1 - r0, g.C,
      [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
        const int64_t offset = (r0 + s) * g.C + j;
        a = load_op_n(dy + offset, count);
        b = load_op_n(x + offset, count) - Vec::loadu(center + j);
      },
      sum_dy.data(), sum_dyx.data());
  for (int64_t c = 0; c < g.C; ++c) add(c, sum_dy[c], sum_dyx[c]);
}

template <typename T>
std::vector<GradSums> channel_grad_sums(const T* dy, const T* x, const opmath_t<T>* center,
                                        const BatchNormGeometry& g) {
  const int64_t stripes = short_planes<T>(g) ? plane_split<T>(g).stripes : stripe_count(g);
  // Per stripe and channel, added in stripe order below.
  std::vector<GradSums> partial(g.C * stripes);
  if (short_planes<T>(g)) {
    for_each_plane_task(g, plane_split<T>(g), [&](int64_t stripe, int64_t c0, int64_t c1, int64_t n0, int64_t n1) {
      add_block_grad_sums(dy, x, center, g, c0, c1, n0 * g.S, n1 * g.S, &partial[stripe * g.C + c0]);
    });
  } else if (!g.channels_last) {
    for_each_channels_first_stripe(g, stripes, [&](int64_t c, int64_t stripe, int64_t lo, int64_t hi) {
      add_block_grad_sums(dy, x, center, g, c, c + 1, lo, hi, &partial[stripe * g.C + c]);
    });
  } else {
    for_each_channels_last_chunk(g, stripes, [&](int64_t stripe, int64_t r0, int64_t r1) {
      auto add = [&](int64_t c, double sum_dy, double sum_dyx) {
        add_grad_sums(partial[stripe * g.C + c], sum_dy, sum_dyx);
      };
      add_rows_grad_sums(dy, x, center, g, r0, r1, add);
    });
  }
  std::vector<GradSums> total(g.C);
  for (int64_t s = 0; s < stripes; ++s) {
    for (int64_t c = 0; c < g.C; ++c) add_grad_sums(total[c], partial[s * g.C + c].dy, partial[s * g.C + c].dy_xc);
  }
  return total;
}

// ---------------------------------------------------------------------------
// Elementwise pass: out = [dy * alpha[c]] + [(x - center[c]) * beta[c]] + gamma[c].
// Forward uses the x term only; backward in eval mode the dy term only.
// Column arrays, so the channels-last pass reads them in whole vectors.
template <typename T>
struct ChannelCoefficients {
  std::vector<opmath_t<T>> alpha, beta, gamma, center;
  explicit ChannelCoefficients(int64_t C)
      : alpha(column_array<opmath_t<T>>(C)), beta(column_array<opmath_t<T>>(C)),
        gamma(column_array<opmath_t<T>>(C)), center(column_array<opmath_t<T>>(C)) {}
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
  OpVec<T> vdy, vx;
  if constexpr (kUseDy) vdy = load_op_n(dy + i, count);
  if constexpr (kUseX) vx = load_op_n(x + i, count);
  const OpVec<T> v = affine_value<kUseDy, kUseX>(vdy, vx, alpha, beta, gamma, center);
  if (count == OpVec<T>::size()) {
    store_op(out + i, v);
  } else {
    store_op_partial(out + i, v, count);
  }
}

// Whole vectors [begin, end) of a single channel (end - begin a multiple of
// the vector width).
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
  for (; i < end; i += W) affine_vector<T, kUseDy, kUseX>(out, dy, x, i, valpha, vbeta, vgamma, vcenter);
}

// The elementwise pass over a contiguous span [begin, end) of channels-first
// memory, whose channel changes every S elements. Each run's whole vectors
// take its coefficients; the vector that crosses into the next run takes
// both runs' coefficients, lane by lane, so short runs (7x7 and 14x14
// planes) need a partial vector only at the span's end.
template <typename T, bool kUseDy, bool kUseX>
void affine_span(T* out, const T* dy, const T* x, int64_t begin, int64_t end, const ChannelCoefficients<T>& k,
                 const BatchNormGeometry& g) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  int64_t plane = begin / g.S, c = plane % g.C;
  for (int64_t i = begin; i < end;) {
    const int64_t run_end = std::min(end, (plane + 1) * g.S);
    const int64_t whole = i + (run_end - i) / W * W;
    affine_run<T, kUseDy, kUseX>(out, dy, x, i, whole, k.alpha[c], k.beta[c], k.gamma[c], k.center[c]);
    i = whole;
    const int64_t next = c + 1 == g.C ? 0 : c + 1;
    if (i < run_end) {
      const int64_t lanes = run_end - i;
      if (std::min(end, run_end + g.S) - run_end >= W - lanes) {
        // Lanes [0, lanes) of channel c, the rest of the next channel.
        auto both = [&](const std::vector<opmath_t<T>>& v) { return Vec::set(Vec(v[next]), Vec(v[c]), lanes); };
        affine_vector<T, kUseDy, kUseX>(out, dy, x, i, both(k.alpha), both(k.beta), both(k.gamma), both(k.center));
        i += W;
      } else {
        affine_vector<T, kUseDy, kUseX>(out, dy, x, i, Vec(k.alpha[c]), Vec(k.beta[c]), Vec(k.gamma[c]),
                                        Vec(k.center[c]), lanes);
        i = run_end;
      }
    }
    if (i >= (plane + 1) * g.S) {
      ++plane;
      c = next;
    }
  }
}

// The elementwise pass of the channels [c0, c1) of every plane.
template <typename T, bool kUseDy, bool kUseX>
void block_affine_pass(T* out, const T* dy, const T* x, const ChannelCoefficients<T>& k, const BatchNormGeometry& g,
                       int64_t c0, int64_t c1) {
  for (int64_t n = 0; n < g.N; ++n) {
    affine_span<T, kUseDy, kUseX>(out, dy, x, (n * g.C + c0) * g.S, (n * g.C + c1) * g.S, k, g);
  }
}

template <typename T, bool kUseDy, bool kUseX>
void channel_affine_pass(T* out, const T* dy, const T* x, const ChannelCoefficients<T>& k,
                         const BatchNormGeometry& g) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  if (!g.channels_last) {
    const int64_t total = g.N * g.C * g.S;
    at::parallel_for(0, total, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      affine_span<T, kUseDy, kUseX>(out, dy, x, begin, end, k, g);
    });
  } else {
    // Row by row in memory order, the coefficients read from L1.
    at::parallel_for(0, g.reduce_size(), grain_for(g.C), [&](int64_t r0, int64_t r1) {
      auto coefficients = [&](const std::vector<opmath_t<T>>& v, int64_t c) { return Vec::loadu(v.data() + c); };
      for (int64_t r = r0; r < r1; ++r) {
        T* out_row = out + r * g.C;
        const T* dy_row = kUseDy ? dy + r * g.C : nullptr;
        const T* x_row = kUseX ? x + r * g.C : nullptr;
        int64_t c = 0;
        if constexpr (at::vec::is_reduced_floating_point_v<T>) {
          // Two float vectors per half-type vector, as in affine_run.
          using HalfVec = at::vec::Vectorized<T>;
          for (; c + 2 * W <= g.C; c += 2 * W) {
            Vec dy0, dy1, x0, x1;
            if constexpr (kUseDy) std::tie(dy0, dy1) = at::vec::convert_to_float<T>(HalfVec::loadu(dy_row + c));
            if constexpr (kUseX) std::tie(x0, x1) = at::vec::convert_to_float<T>(HalfVec::loadu(x_row + c));
            round_to_half_type<T>(
                affine_value<kUseDy, kUseX>(dy0, x0, coefficients(k.alpha, c), coefficients(k.beta, c),
                                            coefficients(k.gamma, c), coefficients(k.center, c)),
                affine_value<kUseDy, kUseX>(dy1, x1, coefficients(k.alpha, c + W), coefficients(k.beta, c + W),
                                            coefficients(k.gamma, c + W), coefficients(k.center, c + W)))
                .store(out_row + c);
          }
        }
        for (; c < g.C; c += W) {
          affine_vector<T, kUseDy, kUseX>(out_row, dy_row, x_row, c, coefficients(k.alpha, c), coefficients(k.beta, c),
                                          coefficients(k.gamma, c), coefficients(k.center, c), std::min(W, g.C - c));
        }
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

inline double invstd_of(const Moments& m, double eps) {
  return 1.0 / std::sqrt(m.m2 / static_cast<double>(m.count) + eps);
}

// ---------------------------------------------------------------------------
// Table entries.

void train_forward(const Tensor& x, const Tensor& y, const BatchNormGeometry& g, const double* w, const double* b,
                   double eps, double* mean, double* invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train_forward", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    ChannelCoefficients<scalar_t> k(g.C);
    if (!g.channels_last && !short_planes<scalar_t>(g) && stripe_count(g) == 1) {
      // Each channel reduces in one stripe: statistics and normalisation of
      // a block of channels in one task, its data still in cache.
      for_each_channel_block(g, channels_per_block(g, sizeof(scalar_t)), 2, [&](int64_t c0, int64_t c1) {
        Moments m[kMaxBlockChannels];
        add_block_moments(px, g, c0, c1, 0, g.reduce_size(), m);
        for (int64_t c = c0; c < c1; ++c) {
          mean[c] = m[c - c0].mean;
          invstd[c] = invstd_of(m[c - c0], eps);
          set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
        }
        block_affine_pass<scalar_t, false, true>(py, nullptr, px, k, g, c0, c1);
      });
      return;
    }
    const auto moments = channel_moments(px, g);
    for (int64_t c = 0; c < g.C; ++c) {
      mean[c] = moments[c].mean;
      invstd[c] = invstd_of(moments[c], eps);
      set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    }
    channel_affine_pass<scalar_t, false, true>(py, nullptr, px, k, g);
  });
}

void affine_forward(const Tensor& x, const Tensor& y, const BatchNormGeometry& g, const double* mean,
                    const double* invstd, const double* w, const double* b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_affine_forward", [&] {
    ChannelCoefficients<scalar_t> k(g.C);
    for (int64_t c = 0; c < g.C; ++c) set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    channel_affine_pass<scalar_t, false, true>(y.mutable_data_ptr<scalar_t>(), nullptr, x.const_data_ptr<scalar_t>(),
                                               k, g);
  });
}

void moments(const Tensor& x, const BatchNormGeometry& g, double* mean, double* m2) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_moments", [&] {
    const auto m = channel_moments(x.const_data_ptr<scalar_t>(), g);
    for (int64_t c = 0; c < g.C; ++c) {
      mean[c] = m[c].mean;
      m2[c] = m[c].m2;
    }
  });
}

void backward(const Tensor& dy, const Tensor& x, const Tensor& dx, const BatchNormGeometry& g, const double* mean,
              const double* invstd, const double* w, bool training, bool need_sums, double* sum_dy,
              double* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    using Op = opmath_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const double M = static_cast<double>(g.reduce_size());
    ChannelCoefficients<scalar_t> k(g.C);
    for (int64_t c = 0; c < g.C; ++c) k.center[c] = static_cast<Op>(mean[c]);
    // sum(dy * (x - mean)) from the sum about the rounded center.
    auto set_sums = [&](int64_t c, const GradSums& s) {
      sum_dy[c] = s.dy;
      sum_dy_xmu[c] = s.dy_xc - (mean[c] - static_cast<double>(k.center[c])) * s.dy;
    };
    if (training && dx.defined() && !g.channels_last && !short_planes<scalar_t>(g) && stripe_count(g) == 1) {
      // A block of channels' sums and their dx in one task, dy and x still
      // in cache for the second read.
      scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
      for_each_channel_block(g, channels_per_block(g, 2 * sizeof(scalar_t)), 3, [&](int64_t c0, int64_t c1) {
        GradSums sums[kMaxBlockChannels];
        add_block_grad_sums(pdy, px, k.center.data(), g, c0, c1, 0, g.reduce_size(), sums);
        for (int64_t c = c0; c < c1; ++c) {
          set_sums(c, sums[c - c0]);
          set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, true);
        }
        block_affine_pass<scalar_t, true, true>(pdx, pdy, px, k, g, c0, c1);
      });
      return;
    }
    if (need_sums || (training && dx.defined())) {
      const auto sums = channel_grad_sums(pdy, px, k.center.data(), g);
      for (int64_t c = 0; c < g.C; ++c) set_sums(c, sums[c]);
    }
    if (!dx.defined()) return;
    for (int64_t c = 0; c < g.C; ++c) {
      set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, training);
    }
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    if (training) {
      channel_affine_pass<scalar_t, true, true>(pdx, pdy, px, k, g);
    } else {
      channel_affine_pass<scalar_t, true, false>(pdx, pdy, nullptr, k, g);
    }
  });
}

}  // namespace

extern const BatchNormKernels batch_norm_kernels = {&train_forward, &affine_forward, &moments, &backward};

}  // namespace bn_ext::cpu::CPU_CAPABILITY
