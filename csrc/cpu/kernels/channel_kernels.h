// The walks, reductions and elementwise pass over per-channel data of an
// (N, C, S) channels-first or (M, C) channels-last input: BatchNorm's
// kernels, and GroupNorm's and InstanceNorm's, which view their input as
// such a geometry (cpu/kernels/group_norm_kernel.cpp).
//
// Kernel files only (see kernel_utils.h).
#pragma once

#include "batch_norm_common.h"
#include "cpu/kernels/kernel_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace bn_ext::cpu::CPU_CAPABILITY {

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

inline int64_t stripe_count(const BatchNormGeometry& g) {
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

inline int64_t channels_per_block(const BatchNormGeometry& g, int64_t element_bytes) {
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

// Channels-last moments of the first `width` columns of rows [r0, r1), rows
// `stride` elements apart, merged by merge(column, moments).
// One pass with a per-column shift (the mean of the chunk's first rows); a
// second when some column's shift proved too far from its mean.
template <typename T, typename Merge>
void add_rows_moments(const T* x, int64_t width, int64_t stride, int64_t r0, int64_t r1, const Merge& merge) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t n = r1 - r0, shift_rows = std::min(n, kShiftSamples);
  auto load = [&](int64_t s, int64_t j, int64_t count) { return load_op_n(x + (r0 + s) * stride + j, count); };
  auto shift = column_array<Op>(width), sum = column_array<Op>(width), squares = column_array<Op>(width);
  column_cascade_sums<true, Vec>(
      shift_rows, width, [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) { a = load(s, j, count), b = Vec(0); },
      shift.data(), squares.data());
  for (int64_t j = 0; j < width; j += W) {
    finite_or_zero(Vec::loadu(shift.data() + j) / Vec(static_cast<Op>(shift_rows))).store(shift.data() + j);
  }
  std::fill(squares.begin(), squares.end(), Op(0));
  with_moments_column_block<T>(stride, [&](auto block) {
    column_cascade_sums<true, Vec, block()>(
        n, width,
        [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
          a = b = load(s, j, count) - Vec::loadu(shift.data() + j);
        },
        sum.data(), squares.data());
  });
  bool single_pass = true;
  for (int64_t c = 0; c < width; ++c) single_pass &= shift_keeps_precision(n, sum[c], squares[c]);
  if (!single_pass) {
    auto offset = column_array<Op>(width);
    for (size_t c = 0; c < offset.size(); ++c) offset[c] = sum[c] / static_cast<Op>(n);
    std::fill(squares.begin(), squares.end(), Op(0));
    column_cascade_sums<false, Vec>(
        n, width,
        [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
          a = b = (load(s, j, count) - Vec::loadu(shift.data() + j)) - Vec::loadu(offset.data() + j);
        },
        nullptr, squares.data());
  }
  for (int64_t c = 0; c < width; ++c) {
    merge(c, shifted_moments(n, shift[c], sum[c] / static_cast<Op>(n), sum[c], squares[c], single_pass));
  }
}

// A per-channel reduction over the walk that suits g: short planes (tasks of
// planes across channels), channels-first stripes, or channels-last chunks of
// rows. Each task adds its values into its stripe's partials through
// add_block(c0, c1, lo, hi, partials from channel c0) for runs [lo, hi) of
// channels [c0, c1), or add_rows(r0, r1, partials from channel 0) for rows
// [r0, r1); merge(total, partial) then takes a channel's stripes in order.
template <typename T, typename Partial, typename AddBlock, typename AddRows, typename Merge>
std::vector<Partial> reduce_channels(const BatchNormGeometry& g, const AddBlock& add_block, const AddRows& add_rows,
                                     const Merge& merge) {
  const int64_t stripes = short_planes<T>(g) ? plane_split<T>(g).stripes : stripe_count(g);
  std::vector<Partial> partial(g.C * stripes);
  if (short_planes<T>(g)) {
    for_each_plane_task(g, plane_split<T>(g), [&](int64_t stripe, int64_t c0, int64_t c1, int64_t n0, int64_t n1) {
      add_block(c0, c1, n0 * g.S, n1 * g.S, &partial[stripe * g.C + c0]);
    });
  } else if (!g.channels_last) {
    for_each_channels_first_stripe(g, stripes, [&](int64_t c, int64_t stripe, int64_t lo, int64_t hi) {
      add_block(c, c + 1, lo, hi, &partial[stripe * g.C + c]);
    });
  } else {
    for_each_channels_last_chunk(
        g, stripes, [&](int64_t stripe, int64_t r0, int64_t r1) { add_rows(r0, r1, &partial[stripe * g.C]); });
  }
  std::vector<Partial> total(g.C);
  at::parallel_for(0, g.C, grain_for(8 * stripes), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t s = 0; s < stripes; ++s) merge(total[c], partial[s * g.C + c]);
    }
  });
  return total;
}

// Per-channel moments of x (count, mean, M2).
template <typename T>
std::vector<Moments> channel_moments(const T* x, const BatchNormGeometry& g) {
  return reduce_channels<T, Moments>(
      g,
      [&](int64_t c0, int64_t c1, int64_t lo, int64_t hi, Moments* out) {
        add_block_moments(x, g, c0, c1, lo, hi, out);
      },
      [&](int64_t r0, int64_t r1, Moments* out) {
        add_rows_moments(x, g.C, g.C, r0, r1, [&](int64_t c, const Moments& m) { chan_merge(out[c], m); });
      },
      [](Moments& total, const Moments& m) { chan_merge(total, m); });
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

// The gradient the sums below are taken of, at one vector of `count` lanes
// from element `offset` (given dy and x): dy itself, or dy through an activation of the
// forward value recomputed from x (GradientThrough and, storing it as the
// residual's gradient, GradientThroughResidual, below). `channel(c)` serves
// a channels-first run of channel c, `columns(j)` channels-last columns [j, j + W).
// A channels-last reduction calls prepare_rows(r0, r1, C) before it sums
// each tile of rows [r0, r1).
template <typename T>
struct PlainGradient {
  struct At {
    OpVec<T> operator()(const OpVec<T>& dy, const OpVec<T>&, int64_t, int64_t) const { return dy; }
  };
  At channel(int64_t) const { return {}; }
  At columns(int64_t) const { return {}; }
  void prepare_rows(int64_t, int64_t, int64_t) const {}
};

// Channels-first gradient sums of elements [lo, hi) of each channel of
// [c0, c1), added into sums[c - c0]: op-math within a cache chunk, float64
// across chunks, the same chunks as add_block_moments.
template <typename T, typename Gradient = PlainGradient<T>>
void add_block_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, const BatchNormGeometry& g, int64_t c0,
                         int64_t c1, int64_t lo, int64_t hi, GradSums* sums, const Gradient& gradient = {}) {
  using Vec = OpVec<T>;
  std::vector<Vec> acc_dy(c1 - c0), acc_dyx(c1 - c0);
  for (int64_t i = lo; i < hi; i += kCacheChunk) {
    for (int64_t c = c0; c < c1; ++c) acc_dy[c - c0] = acc_dyx[c - c0] = Vec(0);
    block_runs(g, c0, c1, i, std::min(hi, i + kCacheChunk), [&](int64_t c, int64_t off, int64_t len) {
      const Vec vcenter(center[c]);
      const auto grad = gradient.channel(c);
      // Lanes past a run's end load dy = 0: they add nothing to either sum.
      run_sums<true>(
          len,
          [&](int64_t e, int64_t count, Vec& a, Vec& b) {
            const Vec xv = load_op_n(x + off + e, count);
            b = xv - vcenter;
            a = grad(load_op_n(dy + off + e, count), xv, off + e, count);
          },
          acc_dy[c - c0], acc_dyx[c - c0]);
    });
    for (int64_t c = c0; c < c1; ++c) {
      add_grad_sums(sums[c - c0], reduce_add(acc_dy[c - c0]), reduce_add(acc_dyx[c - c0]));
    }
  }
}

// Whether plane_grad_sums serves runs of S elements: whole vectors of a
// run and at most one more run's lanes in the vector across its end, within
// one cache chunk of op-math.
template <typename T>
bool plane_sums_fit(int64_t S) {
  return S >= OpVec<T>::size() && S <= kCacheChunk;
}

// Gradient sums of the adjacent runs [c0, c1) of S elements each (one
// channels-first plane), into sums[c - c0]: the span walked in whole vectors,
// in registers, the vector across a run's end split between the two runs by
// a lane mask. (add_block_grad_sums' masked tail per run and vector
// accumulators in memory made N16 C2048 7x7 GroupNorm's sums cost 1.6x
// this.) S as plane_sums_fit.
template <typename T>
void plane_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, int64_t S, int64_t c0, int64_t c1,
                     GradSums* sums) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t end = c1 * S;
  int64_t i = c0 * S;
  Vec sum_dy(0), sum_dyx(0);  // of run c, from lanes an earlier split gave it
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t run_end = (c + 1) * S;
    const Vec vcenter(center[c]);
    Vec second_dy(0), second_dyx(0);
    for (; i + 2 * W <= run_end; i += 2 * W) {
      const Vec dy0 = load_op(dy + i), dy1 = load_op(dy + i + W);
      sum_dy += dy0;
      second_dy += dy1;
      sum_dyx = at::vec::fmadd(dy0, load_op(x + i) - vcenter, sum_dyx);
      second_dyx = at::vec::fmadd(dy1, load_op(x + i + W) - vcenter, second_dyx);
    }
    if (i + W <= run_end) {
      const Vec dyv = load_op(dy + i);
      sum_dy += dyv;
      sum_dyx = at::vec::fmadd(dyv, load_op(x + i) - vcenter, sum_dyx);
      i += W;
    }
    sum_dy += second_dy;
    sum_dyx += second_dyx;
    Vec next_dy(0), next_dyx(0);
    if (i < run_end && i + W <= end) {
      // Lanes [0, lanes) of run c, the rest of run c + 1.
      const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(run_end - i));
      const Vec dyv = load_op(dy + i);
      const Vec product = dyv * (load_op(x + i) - Vec::blendv(Vec(center[c + 1]), vcenter, first));
      const Vec own_dy = Vec::blendv(Vec(0), dyv, first), own_dyx = Vec::blendv(Vec(0), product, first);
      sum_dy += own_dy;
      sum_dyx += own_dyx;
      next_dy = dyv - own_dy;
      next_dyx = product - own_dyx;
      i += W;
    } else if (i < run_end) {
      // The span's last run: lanes past its end load dy = 0.
      const Vec dyv = load_op_n(dy + i, run_end - i);
      sum_dy += dyv;
      sum_dyx = at::vec::fmadd(dyv, load_op_n(x + i, run_end - i) - vcenter, sum_dyx);
      i = run_end;
    }
    sums[c - c0] = {static_cast<double>(reduce_add(sum_dy)), static_cast<double>(reduce_add(sum_dyx))};
    sum_dy = next_dy;
    sum_dyx = next_dyx;
  }
}

// Channels-last gradient sums of rows [r0, r1), added by
// add(column, sum_dy, sum_dy_xc). `center` is a column array.
template <typename T, typename Add, typename Gradient = PlainGradient<T>>
void add_rows_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, const BatchNormGeometry& g, int64_t r0,
                        int64_t r1, const Add& add, const Gradient& gradient = {}) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t C = g.C;
  auto sum_dy = column_array<Op>(C), sum_dyx = column_array<Op>(C);
  // Captured by value: the stores to the partial sums may alias anything
  // reached through a reference (no strict aliasing), so the pointers and the
  // gradient's coefficient pointers were loaded again for every vector.
  const Gradient through = gradient;
  column_cascade_sums<true, Vec>(
      r1 - r0, C,
      [dy, x, center, r0, C, through](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) {
        const int64_t offset = (r0 + s) * C + j;
        const Vec xv = load_op_n(x + offset, count);
        b = xv - Vec::loadu(center + j);
        a = through.columns(j)(load_op_n(dy + offset, count), xv, offset, count);
      },
      sum_dy.data(), sum_dyx.data(),
      [&](int64_t s0, int64_t s1) { gradient.prepare_rows(r0 + s0, r0 + s1, C); });
  for (int64_t c = 0; c < C; ++c) add(c, sum_dy[c], sum_dyx[c]);
}

template <typename T, typename Gradient = PlainGradient<T>>
std::vector<GradSums> channel_grad_sums(const T* dy, const T* x, const opmath_t<T>* center,
                                        const BatchNormGeometry& g, const Gradient& gradient = {}) {
  return reduce_channels<T, GradSums>(
      g,
      [&](int64_t c0, int64_t c1, int64_t lo, int64_t hi, GradSums* out) {
        add_block_grad_sums(dy, x, center, g, c0, c1, lo, hi, out, gradient);
      },
      [&](int64_t r0, int64_t r1, GradSums* out) {
        add_rows_grad_sums(
            dy, x, center, g, r0, r1,
            [&](int64_t c, double sum_dy, double sum_dyx) { add_grad_sums(out[c], sum_dy, sum_dyx); }, gradient);
      },
      [](GradSums& total, const GradSums& s) { add_grad_sums(total, s.dy, s.dy_xc); });
}

// ---------------------------------------------------------------------------
// Activations of a normalised value z, with their gradients dy * act'(z), in
// the forms torch's own kernels compute them.

struct NoActivation {
  template <typename Vec>
  static Vec value(const Vec& z) {
    return z;
  }
  template <typename Vec>
  static Vec grad(const Vec& dy, const Vec&) {
    return dy;
  }
};

struct Relu {
  // max(z, 0), NaN kept; the gradient is zero where z <= 0 and passes
  // elsewhere, NaN included (torch's threshold_backward on the output).
  template <typename Vec>
  static Vec value(const Vec& z) {
    return at::vec::maximum(z, Vec(0));
  }
  template <typename Vec>
  static Vec grad(const Vec& dy, const Vec& z) {
    return zero_where_at_most(dy, z, typename Vec::value_type(0));
  }
};

struct Silu {
  // z * sigmoid(z) = z / (1 + exp(-z)); gradient sigmoid(z) * (1 + z * (1 - sigmoid(z))).
  // exp_u20: ATen's exp within 2 ulp, about twice as fast as exp() at AVX2 (GroupNorm's
  // fused pass ran 0.76x torch's GroupNorm then SiLU with exp(), 1.12x with exp_u20).
  template <typename Vec>
  static Vec value(const Vec& z) {
    return z / (Vec(1) + z.neg().exp_u20());
  }
  template <typename Vec>
  static Vec grad(const Vec& dy, const Vec& z) {
    const Vec s = Vec(1) / (Vec(1) + z.neg().exp_u20());
    return dy * s * (Vec(1) + z * (Vec(1) - s));
  }
};

// with_activation (group_norm_common.h) over this backend's activations.
template <typename Fn>
void with_activation(Activation act, const Fn& fn) {
  bn_ext::with_activation<NoActivation, Relu, Silu>(act, fn);
}

// v rounded to T and back: the value a kernel that stored it as T would
// read again, so a fused pass rounds where the unfused ops round.
template <typename T>
inline OpVec<T> round_to_type(const OpVec<T>& v) {
  if constexpr (std::is_same_v<T, at::BFloat16> && !kBFloat16Instructions) {
    // On the float's bits, to nearest even as c10::BFloat16 rounds (NaN kept):
    // five integer operations, where packing to bfloat16 and back takes about
    // twenty without the AVX512_BF16 instructions (GroupNorm + SiLU 1.12-1.15x
    // faster at AVX2; with them, the packing was 5-10% faster).
    using Bits = at::vec::Vectorized<int32_t>;
    const Bits bits = at::vec::cast<int32_t>(v);
    const Bits rounded =
        (bits + Bits(0x7FFF) + ((bits >> Bits(16)) & Bits(1))) & Bits(static_cast<int32_t>(0xFFFF0000u));
    return OpVec<T>::blendv(at::vec::cast<float>(rounded), v, v.isnan());
  } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    return std::get<0>(at::vec::convert_to_float<T>(round_to_half_type<T>(v, v)));
  } else {
    return v;
  }
}

// The largest positive value that rounds to zero in T (ties go to the even 0).
template <typename T>
constexpr float largest_rounding_to_zero() {
  if constexpr (std::is_same_v<T, at::Half>) return 0x1p-25f;
  if constexpr (std::is_same_v<T, at::BFloat16>) return 0x1p-134f;
  return 0.0f;
}

// dy * act'(round(v)) rounded to T, as a kernel storing round(v) and then
// the gradient would compute it. ReLU's gradient is dy or 0, exact, and
// round(v) <= 0 exactly when v <= largest_rounding_to_zero<T>(): no rounding.
template <typename T, typename Act, typename Vec>
inline Vec gradient_of_rounded(const Vec& dy, const Vec& v) {
  if constexpr (std::is_same_v<Act, Relu>) {
    return zero_where_at_most(dy, v, static_cast<typename Vec::value_type>(largest_rounding_to_zero<T>()));
  } else {
    return round_to_type<T>(Act::grad(dy, round_to_type<T>(v)));
  }
}

// ---------------------------------------------------------------------------
// Elementwise pass: out = Form::apply(operands, coefficients of channel c)
// for every element of channel c. The operands are dy, x and aux (a third
// input: BatchNorm's residual); the coefficients dy_scale, x_scale, constant, center
// and shift. A form reads only the operands it declares (kUsesDy, kUsesX,
// kUsesAux). Forms:
//   Affine<kUseDy, kUseX>:  [dy * dy_scale] + [(x - center) * x_scale] + constant
//     (forward: the x term only; backward in eval mode: the dy term only)
//   ActivatedAffine<Act, kResidual>: act(Affine<false, true> [+ aux]), with the
//     roundings of the unfused ops (the sum rounded to T before act)
//   ActivationGradient<Act, kResidual>: dy * act'(z) for that forward value z
//   AffineThrough<Act, kTraining, kCentered>: Affine<true, kTraining> of the gradient through act, the
//     forward value z = (x - center) * dy_scale + shift (BatchNorm's weight * invstd
//     is both the forward scale and the backward dy_scale).
template <typename Vec>
struct FormOperands {
  Vec dy, x, aux;
};
template <typename Vec>
struct FormCoefficients {
  Vec dy_scale, x_scale, constant, center, shift;
};
template <typename T>
struct FormInputs {
  const T* dy = nullptr;
  const T* x = nullptr;
  const T* aux = nullptr;
  // The same inputs `offset` elements on.
  FormInputs at(int64_t offset) const {
    return {dy ? dy + offset : nullptr, x ? x + offset : nullptr, aux ? aux + offset : nullptr};
  }
};

// kCentered false: every center is zero (see set_forward_coefficients), so
// the pass neither loads nor subtracts it; the values are the same.
template <bool kUseDy, bool kUseX, bool kCentered = true>
struct Affine {
  static constexpr bool kUsesDy = kUseDy, kUsesX = kUseX, kUsesAux = false;
  template <typename Vec>
  static Vec apply(const FormOperands<Vec>& v, const FormCoefficients<Vec>& k) {
    Vec out = k.constant;
    if constexpr (kUseX) out = at::vec::fmadd(kCentered ? v.x - k.center : v.x, k.x_scale, out);
    if constexpr (kUseDy) out = at::vec::fmadd(v.dy, k.dy_scale, out);
    return out;
  }
};

// The pre-activation value z of the forward, as T would hold it.
template <typename T, bool kResidual, bool kCentered, typename Vec>
inline Vec activation_input(const FormOperands<Vec>& v, const FormCoefficients<Vec>& k) {
  const Vec y = round_to_type<T>(Affine<false, true, kCentered>::apply(v, k));
  if constexpr (kResidual) return round_to_type<T>(y + v.aux);
  return y;
}

template <typename T, typename Act, bool kResidual = false, bool kCentered = true>
struct ActivatedAffine {
  static constexpr bool kUsesDy = false, kUsesX = true, kUsesAux = kResidual;
  template <typename Vec>
  static Vec apply(const FormOperands<Vec>& v, const FormCoefficients<Vec>& k) {
    if constexpr (std::is_same_v<Act, NoActivation> || std::is_same_v<Act, Relu>) {
      // Rounding commutes with these: the store's rounding is the only one needed.
      const Vec y = Affine<false, true, kCentered>::apply(v, k);
      if constexpr (kResidual) return Act::value(round_to_type<T>(y) + v.aux);
      return Act::value(y);
    } else {
      return Act::value(activation_input<T, kResidual, kCentered>(v, k));
    }
  }
};

template <typename T, typename Act, bool kResidual = false>
struct ActivationGradient {
  static constexpr bool kUsesDy = true, kUsesX = true, kUsesAux = kResidual;
  template <typename Vec>
  static Vec apply(const FormOperands<Vec>& v, const FormCoefficients<Vec>& k) {
    const Vec y = round_to_type<T>(Affine<false, true>::apply(v, k));
    return gradient_of_rounded<T, Act>(v.dy, kResidual ? y + v.aux : y);
  }
};

// dy * act'(z) for z = round((x - center) * scale + shift), rounded to T as
// a stored gradient would be: the gradient BatchNorm + activation's backward
// takes its sums of and never stores.
template <typename T, typename Act, typename Vec>
inline Vec gradient_through(const Vec& dy, const Vec& x_centered, const Vec& scale, const Vec& shift) {
  return gradient_of_rounded<T, Act>(dy, at::vec::fmadd(x_centered, scale, shift));
}

// kTraining false: the eval-mode backward, dz * dy_scale (+ constant, zero).
// kCentered false: every center is zero, as Affine's.
template <typename T, typename Act, bool kTraining, bool kCentered = true>
struct AffineThrough {
  static constexpr bool kUsesDy = true, kUsesX = true, kUsesAux = false;
  template <typename Vec>
  static Vec apply(const FormOperands<Vec>& v, const FormCoefficients<Vec>& k) {
    const Vec xc = kCentered ? v.x - k.center : v.x;
    const Vec dz = gradient_through<T, Act>(v.dy, xc, k.dy_scale, k.shift);
    if constexpr (kTraining) return at::vec::fmadd(dz, k.dy_scale, at::vec::fmadd(xc, k.x_scale, k.constant));
    return at::vec::fmadd(dz, k.dy_scale, k.constant);
  }
};

// The per-channel coefficients of the elementwise pass, in column arrays (so
// the channels-last pass reads them in whole vectors). `sets` of them: a
// channels-last pass may give each block of rows its own set (GroupNorm's
// samples); set s holds entries [s * stride, s * stride + C).
template <typename T>
struct ChannelCoefficients {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  int64_t stride;
  std::vector<Op> dy_scale, x_scale, constant, center, shift;
  explicit ChannelCoefficients(int64_t C, int64_t sets = 1)
      : stride(static_cast<int64_t>(column_array<Op>(C).size())), dy_scale(sets * stride), x_scale(sets * stride),
        constant(sets * stride), center(sets * stride), shift(sets * stride) {}
  // Entry i in every lane.
  FormCoefficients<Vec> broadcast(int64_t i) const {
    return {Vec(dy_scale[i]), Vec(x_scale[i]), Vec(constant[i]), Vec(center[i]), Vec(shift[i])};
  }
  // Set entries from `first` on, through pointers a pass keeps in locals.
  struct Row {
    const Op *dy_scale, *x_scale, *constant, *center, *shift;
    // Entries [c, c + W), one a lane.
    FormCoefficients<Vec> load(int64_t c) const {
      return {Vec::loadu(dy_scale + c), Vec::loadu(x_scale + c), Vec::loadu(constant + c), Vec::loadu(center + c),
              Vec::loadu(shift + c)};
    }
  };
  Row row(int64_t first) const {
    return {dy_scale.data() + first, x_scale.data() + first, constant.data() + first, center.data() + first,
            shift.data() + first};
  }
  // Whether some center of entries [first, last) (all by default) is not
  // zero: the kCentered of a pass over them (see with_centering).
  bool centered(int64_t first = 0, int64_t last = -1) const {
    const auto end = last < 0 ? center.end() : center.begin() + last;
    return std::any_of(center.begin() + first, end, [](Op c) { return c != Op(0); });
  }
  // Entry i in lanes [0, lanes), entry j in the rest: blends by one lane
  // mask, inlined into form_span's loop. (As a call, once a run of short
  // planes, every vector register was saved across it: bfloat16 N32 C2048
  // 7x7 eval ran 0.7x torch at AVX2 that way.)
  C10_ALWAYS_INLINE FormCoefficients<Vec> split(int64_t i, int64_t j, int64_t lanes) const {
    const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(lanes));
    auto pick = [&](const std::vector<Op>& values) { return Vec::blendv(Vec(values[j]), Vec(values[i]), first); };
    return {pick(dy_scale), pick(x_scale), pick(constant), pick(center), pick(shift)};
  }
};

// out[i..i+count) = form(...) on one vector (count < W: a masked tail);
// `stream`: streaming stores (see streams_output).
template <typename T, typename Form>
inline void form_vector(T* out, const FormInputs<T>& in, int64_t i, const FormCoefficients<OpVec<T>>& k,
                        bool stream, int64_t count = OpVec<T>::size()) {
  FormOperands<OpVec<T>> v;
  if constexpr (Form::kUsesDy) v.dy = load_op_n(in.dy + i, count);
  if constexpr (Form::kUsesX) v.x = load_op_n(in.x + i, count);
  if constexpr (Form::kUsesAux) v.aux = load_op_n(in.aux + i, count);
  const OpVec<T> result = Form::apply(v, k);
  store_op_n(out + i, result, count, stream);
}

// Two float vectors per half-type vector at [i, i + 2W): converting them
// back together packs 32 values at once, cheaper than twice 16.
template <typename T, typename Form>
inline void form_half_pair(T* out, const FormInputs<T>& in, int64_t i, const FormCoefficients<OpVec<T>> (&k)[2],
                           bool stream) {
  using HalfVec = at::vec::Vectorized<T>;
  FormOperands<OpVec<T>> v[2];
  if constexpr (Form::kUsesDy) std::tie(v[0].dy, v[1].dy) = at::vec::convert_to_float<T>(HalfVec::loadu(in.dy + i));
  if constexpr (Form::kUsesX) std::tie(v[0].x, v[1].x) = at::vec::convert_to_float<T>(HalfVec::loadu(in.x + i));
  if constexpr (Form::kUsesAux) {
    std::tie(v[0].aux, v[1].aux) = at::vec::convert_to_float<T>(HalfVec::loadu(in.aux + i));
  }
  store_vector(out + i, round_to_half_type<T>(Form::apply(v[0], k[0]), Form::apply(v[1], k[1])), stream);
}

// Whole vectors [begin, end) of a single channel (end - begin a multiple of
// the vector width), with coefficients k in every lane.
template <typename T, typename Form>
inline void form_run(T* out, const FormInputs<T>& in, int64_t begin, int64_t end,
                     const FormCoefficients<OpVec<T>>& k, bool stream) {
  constexpr int64_t W = OpVec<T>::size();
  int64_t i = begin;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    const FormCoefficients<OpVec<T>> pair[2] = {k, k};
    for (; i + 2 * W <= end; i += 2 * W) form_half_pair<T, Form>(out, in, i, pair, stream);
  }
  for (; i < end; i += W) form_vector<T, Form>(out, in, i, k, stream);
}

// The elementwise pass over a contiguous span [begin, end) of channels-first
// memory, whose channel changes every S elements. Each run's whole vectors
// take its coefficients; the vector that crosses into the next run takes
// both runs' coefficients, lane by lane, so short runs (7x7 and 14x14
// planes) need a partial vector only at the span's end.
template <typename T, typename Form>
void form_span(T* out, const FormInputs<T>& in, int64_t begin, int64_t end, const ChannelCoefficients<T>& k,
               const BatchNormGeometry& g, bool stream = false) {
  constexpr int64_t W = OpVec<T>::size();
  int64_t plane = begin / g.S, c = plane % g.C;
  for (int64_t i = begin; i < end;) {
    const int64_t run_end = std::min(end, (plane + 1) * g.S);
    const int64_t whole = i + (run_end - i) / W * W;
    form_run<T, Form>(out, in, i, whole, k.broadcast(c), stream);
    i = whole;
    const int64_t next = c + 1 == g.C ? 0 : c + 1;
    if (i < run_end) {
      const int64_t lanes = run_end - i;
      if (std::min(end, run_end + g.S) - run_end >= W - lanes) {
        // Lanes [0, lanes) of channel c, the rest of the next channel.
        form_vector<T, Form>(out, in, i, k.split(c, next, lanes), stream);
        i += W;
      } else {
        form_vector<T, Form>(out, in, i, k.broadcast(c), stream, lanes);
        i = run_end;
      }
    }
    if (i >= (plane + 1) * g.S) {
      ++plane;
      c = next;
    }
  }
}

// The elementwise pass of the channels [c0, c1) of every plane; `stream`:
// streaming stores (see streams_output), finished before it returns.
template <typename T, typename Form>
void block_form_pass(T* out, const FormInputs<T>& in, const ChannelCoefficients<T>& k, const BatchNormGeometry& g,
                     int64_t c0, int64_t c1, bool stream = false) {
  for (int64_t n = 0; n < g.N; ++n) {
    form_span<T, Form>(out, in, (n * g.C + c0) * g.S, (n * g.C + c1) * g.S, k, g, stream);
  }
  finish_streaming(stream);
}

// The elementwise pass over one row of `width` values from out and in, its
// coefficients from L1, a vector (or a pair of half-type vectors) at a time.
template <typename T, typename Form>
inline void form_row(T* out, const FormInputs<T> in, const typename ChannelCoefficients<T>::Row coefficients,
                     int64_t width, bool stream) {
  constexpr int64_t W = OpVec<T>::size();
  int64_t c = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    for (; c + 2 * W <= width; c += 2 * W) {
      const FormCoefficients<OpVec<T>> pair[2] = {coefficients.load(c), coefficients.load(c + W)};
      form_half_pair<T, Form>(out, in, c, pair, stream);
    }
  }
  for (; c < width; c += W) form_vector<T, Form>(out, in, c, coefficients.load(c), stream, std::min(W, width - c));
}

// The elementwise pass over channels-last rows [row_begin, row_end) of C
// values; row r takes the coefficient set r / rows_per_set. Row by row in
// memory order; streamed when the output is large (see streams_output).
template <typename T, typename Form>
void rows_form_pass(T* out, const FormInputs<T>& in, const ChannelCoefficients<T>& k, int64_t C, int64_t row_begin,
                    int64_t row_end, int64_t rows_per_set) {
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
  const bool stream = streams_output(out + row_begin * C, (row_end - row_begin) * row_bytes, row_bytes);
  at::parallel_for(row_begin, row_end, grain_for(C), [&](int64_t r0, int64_t r1) {
    // Locals, not captures: the stores below may alias memory (no strict
    // aliasing in kernel files), which would reload them each step.
    const int64_t width = C;
    const bool streamed = stream;
    for (int64_t r = r0; r < r1; ++r) {
      form_row<T, Form>(out + r * width, in.at(r * width), k.row(r / rows_per_set * k.stride), width, streamed);
    }
    finish_streaming(streamed);
  });
}

// The elementwise pass over the whole input. Channels-last rows r take the
// coefficient set r / rows_per_set (one set for all rows by default).
template <typename T, typename Form>
void channel_form_pass(T* out, const FormInputs<T>& in, const ChannelCoefficients<T>& k, const BatchNormGeometry& g,
                       int64_t rows_per_set = 0) {
  if (!g.channels_last) {
    const int64_t total = g.N * g.C * g.S;
    const int64_t bytes = static_cast<int64_t>(sizeof(T));
    const bool stream = streams_output(out, total * bytes, g.S * bytes);
    at::parallel_for(0, total, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      form_span<T, Form>(out, in, begin, end, k, g, stream);
      finish_streaming(stream);
    });
    return;
  }
  const int64_t rows = g.reduce_size();
  rows_form_pass<T, Form>(out, in, k, g.C, 0, rows, rows_per_set > 0 ? rows_per_set : std::max<int64_t>(rows, 1));
}

// The Gradient of channel_grad_sums for gradient_through's gradient: scale,
// shift and center are the forward's per-channel (or column) arrays (its
// center, zero where it folded the mean, need not be the sums' center).
// kCentered false: every center is zero, neither loaded nor subtracted.
template <typename T, typename Act, bool kCentered = true>
struct GradientThrough {
  using Vec = OpVec<T>;
  const opmath_t<T>* scale;
  const opmath_t<T>* shift;
  const opmath_t<T>* center;
  struct At {
    Vec scale, shift, center;
    Vec operator()(const Vec& dy, const Vec& x, int64_t, int64_t) const {
      return gradient_through<T, Act>(dy, kCentered ? x - center : x, scale, shift);
    }
  };
  At channel(int64_t c) const { return {Vec(scale[c]), Vec(shift[c]), kCentered ? Vec(center[c]) : Vec(0)}; }
  At columns(int64_t j) const {
    return {Vec::loadu(scale + j), Vec::loadu(shift + j), kCentered ? Vec::loadu(center + j) : Vec(0)};
  }
  void prepare_rows(int64_t, int64_t, int64_t) const {}
};

// With a residual: dz = dy * act'(z), z = round(round((x - center) * scale
// + shift) + residual), also stored to `out` (the residual's gradient, which
// the pass after the sums reads as dy): one pass reads dy, x and the
// residual, where storing dz first and summing it after would read them
// again. Channels-first runs compute and store it as they sum; a
// channels-last tile of rows first stores it row by row (stores down the
// reduction's columns ran at half the speed; whole 512-row chunks of wide
// rows left L2 before the sums read them) and the sums read it back from
// L1. `forward` holds the forward's coefficients.
template <typename T, typename Act>
struct GradientThroughResidual {
  using Vec = OpVec<T>;
  const ChannelCoefficients<T>* forward;
  const T* dy;
  const T* x;
  const T* residual;
  T* out;
  struct At {
    Vec scale, shift, center;
    const T* residual;
    T* out;
    Vec operator()(const Vec& dy, const Vec& x, int64_t offset, int64_t count) const {
      const Vec y = round_to_type<T>(at::vec::fmadd(x - center, scale, shift));
      const Vec dz = gradient_of_rounded<T, Act>(dy, y + load_op_n(residual + offset, count));
      store_op_n(out + offset, dz, count);
      return dz;
    }
  };
  // The stored gradient of a prepared chunk of rows.
  struct Stored {
    const T* out;
    Vec operator()(const Vec&, const Vec&, int64_t offset, int64_t count) const {
      return load_op_n(out + offset, count);
    }
  };
  At channel(int64_t c) const {
    return {Vec(forward->x_scale[c]), Vec(forward->constant[c]), Vec(forward->center[c]), residual, out};
  }
  Stored columns(int64_t) const { return {out}; }
  void prepare_rows(int64_t r0, int64_t r1, int64_t C) const {
    rows_form_pass<T, ActivationGradient<T, Act, true>>(out, {dy, x, residual}, *forward, C, r0, r1,
                                                         std::max<int64_t>(r1, 1));
  }
};

// Forward coefficients of channel c: y = (x - center) * x_scale + constant.
// A mean within kFoldedMeanDeviations standard deviations of zero is folded
// into constant (center 0): y = fma(x, x_scale, b - mean * x_scale), whose one
// rounding of the folded term is at most 2^-21 of y's spread (torch folds
// every mean so, however large). A pass whose centers are all zero skips
// the center's load and subtraction: three coefficient arrays a row, where
// torch's pass reads two, no longer fit L1 beside wide channels-last rows
// (perf-notes: kFoldedMeanDeviations).
// A mean further out is the center, rounded to op-math, with constant folding
// the rounding remainder, so inputs with a large mean keep their precision.
constexpr double kFoldedMeanDeviations = 8.0;

// Channels [c, c + count), which share one mean and invstd (a group's), with
// weights w[0, count) and biases b[0, count).
template <typename T>
inline void set_forward_coefficients(ChannelCoefficients<T>& k, int64_t c, int64_t count, double mean, double invstd,
                                     const double* w, const double* b) {
  using Op = opmath_t<T>;
  const Op center = std::abs(mean) * invstd <= kFoldedMeanDeviations ? Op(0) : static_cast<Op>(mean);
  const double folded = mean - static_cast<double>(center);
  // Pointers in locals: the stores may alias the vectors' fields.
  Op *centers = k.center.data() + c, *x_scale = k.x_scale.data() + c, *constant = k.constant.data() + c;
  for (int64_t j = 0; j < count; ++j) {
    const double a = w[j] * invstd;
    centers[j] = center;
    x_scale[j] = static_cast<Op>(a);
    constant[j] = static_cast<Op>(b[j] - folded * a);
  }
}

template <typename T>
inline void set_forward_coefficients(ChannelCoefficients<T>& k, int64_t c, double mean, double invstd, double w,
                                     double b) {
  set_forward_coefficients(k, c, 1, mean, invstd, &w, &b);
}

// fn(std::bool_constant<centered>): the kCentered of a pass over entries
// [first, last) of k (all by default).
template <typename T, typename Fn>
void with_centering(const ChannelCoefficients<T>& k, const Fn& fn, int64_t first = 0, int64_t last = -1) {
  if (k.centered(first, last)) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

inline double invstd_of(const Moments& m, double eps) {
  return 1.0 / std::sqrt(m.m2 / static_cast<double>(m.count) + eps);
}

}  // namespace bn_ext::cpu::CPU_CAPABILITY
