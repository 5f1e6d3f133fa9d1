// GroupNorm (and InstanceNorm, G = C) and LayerNorm over the channels of an
// (N, C, *) input: CPU kernels, built once per SIMD level (cpu/dispatch.h).
//
// GroupNorm reuses BatchNorm's walks (channel_kernels.h) through two views
// of the same memory. Channels-first, the values of group g of sample n
// are one contiguous run, so the statistics are BatchNorm's per-channel
// moments of a (1, N*G, C/G * S) input, and the elementwise passes are
// BatchNorm's over a (1, N*C, S) input with one coefficient per (n, c).
// Channels-last, each sample is an (S, C) block of rows, reduced down its
// rows with vectors across channels; a group's moments are its channels'
// merged by Chan's formula (never E[x^2] - E[x]^2).
#include "cpu/dispatch.h"
#include "cpu/kernels/channel_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

namespace bn_ext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// Views and coefficient layout.

// Channels-first: one "channel" per (n, group), and one per (n, c).
BatchNormGeometry group_rows(const GroupNormGeometry& g) {
  return {false, 1, g.N * g.G, g.group_channels() * g.S};
}
BatchNormGeometry channel_planes(const GroupNormGeometry& g) { return {false, 1, g.N * g.C, g.S}; }
// Channels-last: one sample's (S, C) rows, and all N * S rows.
BatchNormGeometry sample_rows(const GroupNormGeometry& g) { return {true, 1, g.C, g.S}; }
BatchNormGeometry all_rows(const GroupNormGeometry& g) { return {true, g.N, g.C, g.S}; }

// Coefficients per (n, c): channels-first one set of N * C entries,
// channels-last a set of C per sample (rows r of sample r / S).
template <typename T>
ChannelCoefficients<T> sample_coefficients(const GroupNormGeometry& g) {
  return g.channels_last ? ChannelCoefficients<T>(g.C, g.N) : ChannelCoefficients<T>(g.N * g.C);
}

template <typename T>
int64_t coefficient_index(const ChannelCoefficients<T>& k, const GroupNormGeometry& g, int64_t n, int64_t c) {
  return g.channels_last ? n * k.stride + c : n * g.C + c;
}

// The elementwise pass of Form over the whole input.
template <typename T, typename Form>
void sample_form_pass(T* out, const FormInputs<T>& in, const ChannelCoefficients<T>& k, const GroupNormGeometry& g) {
  if (g.channels_last) {
    channel_form_pass<T, Form>(out, in, k, all_rows(g), g.S);
  } else {
    channel_form_pass<T, Form>(out, in, k, channel_planes(g));
  }
}

// The entry of group r's first channel in k: k's entries for all samples,
// or (`first_group` given) for a block of groups from that one, C/G a group.
template <typename T>
int64_t group_entry(const ChannelCoefficients<T>& k, const GroupNormGeometry& g, int64_t r, int64_t first_group = -1) {
  const int64_t Cg = g.group_channels();
  return first_group >= 0 ? (r - first_group) * Cg : coefficient_index(k, g, r / g.G, r % g.G * Cg);
}

// Forward coefficients of every channel of group r = n * G + group, from
// entry `at` of k on.
template <typename T>
void set_group_forward_coefficients(ChannelCoefficients<T>& k, int64_t at, const GroupNormGeometry& g, int64_t r,
                                    double mean, double rstd, const double* w, const double* b) {
  const int64_t c0 = r % g.G * g.group_channels();
  set_forward_coefficients(k, at, g.group_channels(), mean, rstd, w + c0, b + c0);
}

// ---------------------------------------------------------------------------
// Channels-last reductions: tasks of (sample, stripe of rows), each walking
// its stripe in chunks of rows; per-channel partials merged in stripe order.

// Channels-last moments. Each (sample, group) takes one shift, the mean of
// its values in the sample's first rows, broadcast over its channels; every
// (sample, stripe) task sums d = x - shift and d^2 down its rows with vectors
// across channels (column sums within a chunk of rows, float64 per group
// across chunks), and a group's sums are the sum of its channels'. Then, as
// ShiftedSums: M2 = sum(d^2) - sum(d)^2 / n, unless the shift proved over a
// standard deviation from the mean; those samples take a second pass for
// the squares about the mean. No per-channel moments, no per-channel division.

// Column sums over rows [r0, r1) of a sample's rows, in chunks, added per
// group into s1 and s2: terms(row, j, count) gives the vector of d at row
// `row`, columns [j, j + count).
template <typename T, bool kWithSum, typename Terms>
void add_group_column_sums(const GroupNormGeometry& g, int64_t r0, int64_t r1, const Terms& terms, double* s1,
                           double* s2) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t Cg = g.group_channels();
  auto sum = column_array<Op>(g.C), squares = column_array<Op>(g.C);
  for (int64_t r = r0; r < r1; r += kChunkRows) {
    std::fill(sum.begin(), sum.end(), Op(0));
    std::fill(squares.begin(), squares.end(), Op(0));
    with_moments_column_block<T>(g.C, [&](auto block) {
      column_cascade_sums<kWithSum, Vec, block()>(
          std::min(r1, r + kChunkRows) - r, g.C,
          [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) { a = b = terms(r + s, j, count); }, sum.data(),
          squares.data());
    });
    for (int64_t group = 0, c = 0; group < g.G; ++group) {
      double group_sum = 0.0, group_squares = 0.0;
      for (int64_t end = c + Cg; c < end; ++c) group_sum += sum[c], group_squares += squares[c];
      if constexpr (kWithSum) s1[group] += group_sum;
      s2[group] += group_squares;
    }
  }
}

// A sample's rows are read by load(row, j, count): columns [j, j + count).

// Each group's shift, the mean of its values in the sample's first rows
// (enough for kShiftSamples values: one row of a wide group; 16 rows were a
// third of N16 C2048 7x7's reading), broadcast over its channels into the
// column array `shift`.
template <typename T, typename Load>
void set_group_shifts(const GroupNormGeometry& g, const Load& load, opmath_t<T>* shift) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t Cg = g.group_channels(), rows = std::min(g.S, (kShiftSamples + Cg - 1) / Cg);
  auto first = column_array<Op>(g.C), unused = column_array<Op>(g.C);
  column_cascade_sums<true, Vec>(
      rows, g.C, [&](int64_t s, int64_t j, int64_t count, Vec& a, Vec& b) { a = load(s, j, count), b = Vec(0); },
      first.data(), unused.data());
  for (int64_t c0 = 0; c0 < g.C; c0 += Cg) {
    double total = 0.0;
    for (int64_t c = c0; c < c0 + Cg; ++c) total += first[c];
    std::fill_n(shift + c0, Cg, finite_or_zero(static_cast<Op>(total / static_cast<double>(rows * Cg))));
  }
}

// The moments of a sample's groups, into groups[0, G), from the sums (s1,
// s2 per group) of d = x - shift over all its rows. As ShiftedSums: M2 =
// sum(d^2) - sum(d)^2 / n, unless some shift proved over a standard
// deviation from its group's mean; then the sample takes a second pass for
// the squares about the means (each kept in two parts, shift + offset). No
// per-channel moments, no per-channel division.
template <typename T, typename Load>
void finish_group_moments(const GroupNormGeometry& g, const Load& load, const opmath_t<T>* shift, const double* s1,
                          const double* s2, Moments* groups) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t Cg = g.group_channels(), count = g.S * Cg;
  bool single = true;
  for (int64_t group = 0; group < g.G; ++group) {
    single = single && shift_keeps_precision(count, s1[group], s2[group]);
    groups[group] = shifted_moments(count, shift[group * Cg], static_cast<Op>(s1[group] / static_cast<double>(count)),
                                    s1[group], s2[group], true);
  }
  if (single) return;
  auto offset = column_array<Op>(g.C);
  for (int64_t c = 0; c < g.C; ++c) offset[c] = static_cast<Op>(groups[c / Cg].mean - static_cast<double>(shift[c]));
  std::vector<double> unused(g.G, 0.0), squares(g.G, 0.0);
  add_group_column_sums<T, false>(
      g, 0, g.S,
      [&](int64_t row, int64_t j, int64_t cnt) {
        return keep_lanes((load(row, j, cnt) - Vec::loadu(shift + j)) - Vec::loadu(offset.data() + j), cnt);
      },
      unused.data(), squares.data());
  for (int64_t group = 0; group < g.G; ++group) groups[group].m2 = squares[group];
}

// Moments of the groups of samples [n0, n1) into groups[n * G + group]:
// tasks of (sample, stripe of rows) sum d and d^2 down their rows with
// vectors across channels.
template <typename T>
void channels_last_group_moments(const T* x, const GroupNormGeometry& g, int64_t n0, int64_t n1, Moments* groups) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t stripes = stripe_count(sample_rows(g)), samples = n1 - n0;
  const int64_t stride = static_cast<int64_t>(column_array<Op>(g.C).size());
  auto sample = [&](int64_t n) {
    return [x, &g, n](int64_t row, int64_t j, int64_t count) {
      return load_op_n(x + (n * g.S + row) * g.C + j, count);
    };
  };
  std::vector<Op> shift(samples * stride, Op(0));
  at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) set_group_shifts<T>(g, sample(n), shift.data() + (n - n0) * stride);
  });
  // Per task (sample, stripe) and group: sum(d), sum(d^2).
  std::vector<double> s1(samples * stripes * g.G, 0.0), s2(samples * stripes * g.G, 0.0);
  at::parallel_for(n0 * stripes, n1 * stripes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / stripes, stripe = task % stripes, slot = (task - n0 * stripes) * g.G;
      const Op* sn = shift.data() + (n - n0) * stride;
      const auto load = sample(n);
      add_group_column_sums<T, true>(
          g, part_begin(stripe, stripes, g.S), part_begin(stripe + 1, stripes, g.S),
          [&](int64_t row, int64_t j, int64_t count) { return load(row, j, count) - Vec::loadu(sn + j); }, &s1[slot],
          &s2[slot]);
    }
  });
  at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t b) {
    std::vector<double> sum(g.G), squares(g.G);
    for (int64_t n = a; n < b; ++n) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(squares.begin(), squares.end(), 0.0);
      for (int64_t stripe = 0; stripe < stripes; ++stripe) {
        for (int64_t group = 0; group < g.G; ++group) {
          sum[group] += s1[((n - n0) * stripes + stripe) * g.G + group];
          squares[group] += s2[((n - n0) * stripes + stripe) * g.G + group];
        }
      }
      finish_group_moments<T>(g, sample(n), shift.data() + (n - n0) * stride, sum.data(), squares.data(),
                              groups + n * g.G);
    }
  });
}

// Rows of gradient sums a row-order walk takes in op-math before it adds
// them into float64.
constexpr int64_t kRowOrderSumRows = 64;

// Gradient sums about `center` (a column array) of rows [r0, r1) of C
// values, added into the float64 column arrays sum_dy and sum_dyx: row by
// row in memory order, op-math partials per column (in L1) over
// kRowOrderSumRows rows at a time. (Walked down the columns, as BatchNorm's
// column_cascade_sums does, rows 4 KB apart share L1 sets; perf-notes:
// add_row_order_grad_sums.)
template <typename T>
void add_row_order_grad_sums(const T* dy, const T* x, const opmath_t<T>* center, int64_t C, int64_t r0, int64_t r1,
                             double* sum_dy, double* sum_dyx) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  auto part_dy = column_array<Op>(C), part_dyx = column_array<Op>(C);
  for (int64_t s0 = r0; s0 < r1; s0 += kRowOrderSumRows) {
    std::fill(part_dy.begin(), part_dy.end(), Op(0));
    std::fill(part_dyx.begin(), part_dyx.end(), Op(0));
    for (int64_t s = s0; s < std::min(r1, s0 + kRowOrderSumRows); ++s) {
      // Lanes past the last column load dy = 0: they add nothing.
      for (int64_t j = 0; j < C; j += W) {
        const int64_t count = std::min(W, C - j);
        const Vec dyv = load_op_n(dy + s * C + j, count);
        const Vec xc = load_op_n(x + s * C + j, count) - Vec::loadu(center + j);
        (Vec::loadu(part_dy.data() + j) + dyv).store(part_dy.data() + j);
        at::vec::fmadd(dyv, xc, Vec::loadu(part_dyx.data() + j)).store(part_dyx.data() + j);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += static_cast<double>(part_dy[c]);
      sum_dyx[c] += static_cast<double>(part_dyx[c]);
    }
  }
}

// Per (n, c) gradient sums about k's centers of samples [n0, n1) of a
// channels-last input, into sums[n * C + c].
template <typename T>
void channels_last_sample_grad_sums(const T* dy, const T* x, const ChannelCoefficients<T>& k,
                                    const GroupNormGeometry& g, int64_t n0, int64_t n1, GradSums* sums) {
  const int64_t stripes = stripe_count(sample_rows(g));
  // Per task: sum(dy) of each channel, then sum(dy * (x - center)).
  std::vector<double> partial((n1 - n0) * stripes * 2 * g.C, 0.0);
  at::parallel_for(n0 * stripes, n1 * stripes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / stripes, stripe = task % stripes, offset = n * g.S * g.C;
      double* p = &partial[(task - n0 * stripes) * 2 * g.C];
      add_row_order_grad_sums(dy + offset, x + offset, k.center.data() + n * k.stride, g.C,
                              part_begin(stripe, stripes, g.S), part_begin(stripe + 1, stripes, g.S), p, p + g.C);
    }
  });
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      GradSums total;
      for (int64_t s = 0; s < stripes; ++s) {
        const double* p = &partial[((n - n0) * stripes + s) * 2 * g.C];
        add_grad_sums(total, p[c], p[g.C + c]);
      }
      sums[n * g.C + c] = total;
    }
  }
}

// Samples a channels-last pass takes at once: a batch's statistics pass and
// its elementwise pass run back to back, so the elementwise pass finds the
// batch's `tensors` inputs still in cache. Batches depend on the shape only.
constexpr int64_t kSampleBatchBytes = 4 << 20;

template <typename T>
int64_t samples_per_batch(const GroupNormGeometry& g, int64_t tensors) {
  const int64_t sample_bytes = std::max<int64_t>(1, g.S * g.C * tensors * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(kSampleBatchBytes / sample_bytes, 1, std::max<int64_t>(g.N, 1));
}

// fn(n0, n1) for the channels-last batches of samples [n0, n1), one after
// another, each parallel within; or, where the samples share out evenly
// over the threads, a sample a task: its statistics and its elementwise
// pass then run on one core, the sample's inputs still in that core's
// cache, with no wait between them. (Batches of five N16 C2048 7x7
// samples left a thread idle a sixth of the time, and the elementwise pass
// read rows the other core had summed.)
template <typename T, typename BatchFn>
void for_each_sample_batch(const GroupNormGeometry& g, int64_t tensors, const BatchFn& fn) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && (g.N % threads == 0 || g.N >= 4 * threads)) {
    at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) fn(n, n + 1);
    });
    return;
  }
  const int64_t batch = samples_per_batch<T>(g, tensors);
  for (int64_t n0 = 0; n0 < g.N; n0 += batch) fn(n0, std::min(g.N, n0 + batch));
}

// ---------------------------------------------------------------------------
// GroupNorm forward.

// Whether each channels-first group reduces in one task, so its statistics
// and its normalisation can share one visit of its data (still in cache).
template <typename T>
bool fused_groups(const GroupNormGeometry& g) {
  return !g.channels_last && !short_planes<T>(group_rows(g)) && stripe_count(group_rows(g)) == 1;
}

// Whether a fused channels-first pass, writing whole groups a task, streams
// its output (see streams_output).
template <typename T>
bool streams_output_of_groups(const T* out, const GroupNormGeometry& g) {
  const int64_t group_bytes = g.group_channels() * g.S * static_cast<int64_t>(sizeof(T));
  return streams_output(out, g.N * g.G * group_bytes, group_bytes);
}

template <typename T, typename Act>
void group_norm_forward_kernel(const T* x, T* y, const GroupNormGeometry& g, const double* w, const double* b,
                               double eps, double* mean, double* rstd) {
  const int64_t Cg = g.group_channels();
  if (fused_groups<T>(g)) {
    // A block of groups' statistics and their normalisation in one task, x
    // still in cache; the block's coefficients its own (a few KB, not N * C).
    const BatchNormGeometry rows = group_rows(g);
    const bool stream = streams_output_of_groups(y, g);
    for_each_channel_block(rows, channels_per_block(rows, sizeof(T)), 2, [&](int64_t r0, int64_t r1) {
      Moments m[kMaxBlockChannels];
      add_block_moments(x, rows, r0, r1, 0, rows.S, m);
      const int64_t channels = (r1 - r0) * Cg, offset = r0 * Cg * g.S;
      ChannelCoefficients<T> block(channels);
      for (int64_t r = r0; r < r1; ++r) {
        mean[r] = m[r - r0].mean;
        rstd[r] = invstd_of(m[r - r0], eps);
        set_group_forward_coefficients(block, group_entry(block, g, r, r0), g, r, mean[r], rstd[r], w, b);
      }
      with_centering(block, [&](auto centered) {
        block_form_pass<T, ActivatedAffine<T, Act, false, centered()>>(
            y + offset, {nullptr, x + offset}, block, {false, 1, channels, g.S}, 0, channels, stream);
      });
    });
    return;
  }
  ChannelCoefficients<T> k = sample_coefficients<T>(g);
  auto set_group = [&](int64_t r, const Moments& m) {
    mean[r] = m.mean;
    rstd[r] = invstd_of(m, eps);
    set_group_forward_coefficients(k, group_entry(k, g, r), g, r, mean[r], rstd[r], w, b);
  };
  if (g.channels_last) {
    std::vector<Moments> groups(g.N * g.G);
    for_each_sample_batch<T>(g, 1, [&](int64_t n0, int64_t n1) {
      channels_last_group_moments(x, g, n0, n1, groups.data());
      for (int64_t r = n0 * g.G; r < n1 * g.G; ++r) set_group(r, groups[r]);
      with_centering(
          k,
          [&](auto centered) {
            rows_form_pass<T, ActivatedAffine<T, Act, false, centered()>>(y, {nullptr, x}, k, g.C, n0 * g.S,
                                                                          n1 * g.S, g.S);
          },
          n0 * k.stride, n1 * k.stride);
    });
    return;
  }
  const auto moments = channel_moments(x, group_rows(g));
  for (int64_t r = 0; r < g.N * g.G; ++r) set_group(r, moments[r]);
  with_centering(k, [&](auto centered) {
    sample_form_pass<T, ActivatedAffine<T, Act, false, centered()>>(y, {nullptr, x}, k, g);
  });
}

// ---------------------------------------------------------------------------
// GroupNorm backward. With x_hat = (x - mean) * rstd over a group of
// D = C/G * S values and A = sum(w * dy), B = sum(w * dy * (x - mean)) over it:
//   dx = rstd * w * dy - rstd * A / D - (x - mean) * rstd^3 * B / D
//   dweight[c] = sum_n rstd * sum(dy * (x - mean)),  dbias[c] = sum(dy)

// Backward coefficients of every channel of group r, from entry `at` of k
// on, whose centers hold the group's mean.
template <typename T>
void set_group_backward_coefficients(ChannelCoefficients<T>& k, int64_t at, const GroupNormGeometry& g, int64_t r,
                                     double mean, double rstd, const double* w, const std::vector<GradSums>& sums) {
  using Op = opmath_t<T>;
  const int64_t n = r / g.G, Cg = g.group_channels();
  const int64_t c0 = r % g.G * Cg, c1 = c0 + Cg;
  double A = 0.0, B = 0.0;
  for (int64_t c = c0; c < c1; ++c) {
    A += w[c] * sums[n * g.C + c].dy;
    B += w[c] * sums[n * g.C + c].dy_xc;
  }
  const double D = static_cast<double>(Cg * g.S);
  const double x_scale = -rstd * rstd * rstd * B / D, shift = -rstd * A / D;
  // Pointers in locals: the stores may alias the vectors' fields.
  Op *dy_scale = k.dy_scale.data() + at, *x_scales = k.x_scale.data() + at, *constant = k.constant.data() + at;
  Op* center = k.center.data() + at;
  // The sums are taken; the dx pass folds a mean near zero as the forward
  // does (set_forward_coefficients), one coefficient array fewer to read.
  if (std::abs(mean) * rstd <= kFoldedMeanDeviations) std::fill_n(center, Cg, Op(0));
  for (int64_t j = 0; j < Cg; ++j) {
    dy_scale[j] = static_cast<Op>(rstd * w[c0 + j]);
    x_scales[j] = static_cast<Op>(x_scale);
    constant[j] = static_cast<Op>(shift - x_scale * (mean - static_cast<double>(center[j])));
  }
}

// dweight and dbias (when param_grads) from the per (n, c) sums.
void group_norm_param_grads(const GroupNormGeometry& g, const double* rstd, const std::vector<GradSums>& sums,
                            bool param_grads, double* dweight, double* dbias) {
  if (!param_grads) return;
  at::parallel_for(0, g.C, grain_for(8 * g.N), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double dw = 0.0, db = 0.0;
      for (int64_t n = 0, r = c / g.group_channels(); n < g.N; ++n, r += g.G) {
        dw += rstd[r] * sums[n * g.C + c].dy_xc;
        db += sums[n * g.C + c].dy;
      }
      dweight[c] = dw;
      dbias[c] = db;
    }
  });
}

template <typename T>
void group_norm_backward_kernel(const T* dy, const T* x, T* dx, const GroupNormGeometry& g, const double* mean,
                                const double* rstd, const double* w, bool param_grads, double* dweight,
                                double* dbias) {
  using Op = opmath_t<T>;
  const int64_t Cg = g.group_channels();
  // Entries [at, at + C/G) of k (from group `first_group` on, as
  // group_entry) centered on group r's mean, rounded to op-math.
  auto set_centers = [&](ChannelCoefficients<T>& k, int64_t r, int64_t first_group = -1) {
    std::fill_n(k.center.begin() + group_entry(k, g, r, first_group), Cg, static_cast<Op>(mean[r]));
  };
  // Per (n, c), entry r * C/G + j for channel j of group r: sum(dy) and
  // sum(dy * (x - mean)), from the raw sums about the rounded center.
  std::vector<GradSums> sums(g.N * g.C);
  auto set_group_sums = [&](int64_t r, const GradSums* raw) {
    const double off = mean[r] - static_cast<double>(static_cast<Op>(mean[r]));
    for (int64_t j = 0; j < Cg; ++j) sums[r * Cg + j] = {raw[j].dy, raw[j].dy_xc - off * raw[j].dy};
  };
  if (dx != nullptr && fused_groups<T>(g)) {
    // A block of groups' sums and their dx in one task, dy and x still in
    // cache; the block's coefficients its own.
    const BatchNormGeometry rows = group_rows(g);
    const bool stream = streams_output_of_groups(dx, g);
    for_each_channel_block(rows, channels_per_block(rows, 2 * sizeof(T)), 3, [&](int64_t r0, int64_t r1) {
      const int64_t channels = (r1 - r0) * Cg, first = r0 * Cg, offset = first * g.S;
      const BatchNormGeometry planes{false, 1, channels, g.S};
      ChannelCoefficients<T> block(channels);
      for (int64_t r = r0; r < r1; ++r) set_centers(block, r, r0);
      if (plane_sums_fit<T>(g.S)) {
        plane_grad_sums(dy + offset, x + offset, block.center.data(), g.S, 0, channels, &sums[first]);
      } else {
        add_block_grad_sums(dy + offset, x + offset, block.center.data(), planes, 0, channels, 0, g.S, &sums[first]);
      }
      for (int64_t r = r0; r < r1; ++r) {
        set_group_sums(r, &sums[r * Cg]);
        set_group_backward_coefficients(block, group_entry(block, g, r, r0), g, r, mean[r], rstd[r], w, sums);
      }
      with_centering(block, [&](auto centered) {
        block_form_pass<T, Affine<true, true, centered()>>(dx + offset, {dy + offset, x + offset}, block, planes, 0,
                                                          channels, stream);
      });
    });
    group_norm_param_grads(g, rstd, sums, param_grads, dweight, dbias);
    return;
  }
  ChannelCoefficients<T> k = sample_coefficients<T>(g);
  for (int64_t r = 0; r < g.N * g.G; ++r) set_centers(k, r);
  if (g.channels_last) {
    // Batches of samples: their sums, then their dx, dy and x still in cache.
    std::vector<GradSums> raw(g.N * g.C);
    for_each_sample_batch<T>(g, 2, [&](int64_t n0, int64_t n1) {
      channels_last_sample_grad_sums(dy, x, k, g, n0, n1, raw.data());
      for (int64_t r = n0 * g.G; r < n1 * g.G; ++r) set_group_sums(r, &raw[r * Cg]);
      if (dx == nullptr) return;
      for (int64_t r = n0 * g.G; r < n1 * g.G; ++r) {
        set_group_backward_coefficients(k, group_entry(k, g, r), g, r, mean[r], rstd[r], w, sums);
      }
      with_centering(
          k,
          [&](auto centered) {
            rows_form_pass<T, Affine<true, true, centered()>>(dx, {dy, x}, k, g.C, n0 * g.S, n1 * g.S, g.S);
          },
          n0 * k.stride, n1 * k.stride);
    });
  } else {
    const auto raw = channel_grad_sums(dy, x, k.center.data(), channel_planes(g));
    for (int64_t r = 0; r < g.N * g.G; ++r) set_group_sums(r, &raw[r * Cg]);
    if (dx != nullptr) {
      for (int64_t r = 0; r < g.N * g.G; ++r) {
        set_group_backward_coefficients(k, group_entry(k, g, r), g, r, mean[r], rstd[r], w, sums);
      }
      with_centering(k, [&](auto centered) { sample_form_pass<T, Affine<true, true, centered()>>(dx, {dy, x}, k, g); });
    }
  }
  group_norm_param_grads(g, rstd, sums, param_grads, dweight, dbias);
}

// ---------------------------------------------------------------------------
// LayerNorm over the channels of a channels-first (N, C, S) input: per
// sample, C rows of S values, reduced down the rows with vectors across
// positions, a tile of positions at a time so the tile's C rows stay in
// cache for the normalising sweep. Tiles depend on the shape only.

constexpr int64_t kTileBytes = 128 * 1024;

template <typename T>
int64_t tile_width(int64_t C, int64_t S) {
  const int64_t width = kTileBytes / std::max<int64_t>(C * static_cast<int64_t>(sizeof(T)), 1) / 64 * 64;
  return std::clamp<int64_t>(width, 64, std::max<int64_t>(S, 1));
}

// fn(n, tile, s0, s1) for every tile [s0, s1) of every sample, in parallel.
template <typename TileFn>
void for_each_tile(int64_t N, int64_t C, int64_t S, int64_t width, const TileFn& fn) {
  const int64_t tiles = (S + width - 1) / width;
  at::parallel_for(0, N * tiles, grain_for(C * width), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s0 = task % tiles * width;
      fn(task / tiles, task, s0, std::min(S, s0 + width));
    }
  });
}

template <typename T, typename P>
void layer_norm_channels_forward_kernel(const T* x, T* y, int64_t N, int64_t C, int64_t S, const P* w, const P* b,
                                        double eps, opmath_t<T>* mean_out, opmath_t<T>* rstd_out) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  for_each_tile(N, C, S, tile_width<T>(C, S), [&](int64_t n, int64_t, int64_t s0, int64_t s1) {
    const T* xt = x + n * C * S + s0;
    T* yt = y + n * C * S + s0;
    const int64_t width = s1 - s0;
    auto center = column_array<Op>(width), remainder = column_array<Op>(width), rstd = column_array<Op>(width);
    add_rows_moments(xt, width, S, 0, C, [&](int64_t j, const Moments& m) {
      const double rs = 1.0 / std::sqrt(m.m2 / static_cast<double>(C) + eps);
      center[j] = static_cast<Op>(m.mean);
      remainder[j] = static_cast<Op>(m.mean - static_cast<double>(center[j]));
      rstd[j] = static_cast<Op>(rs);
      mean_out[n * S + s0 + j] = static_cast<Op>(m.mean);
      rstd_out[n * S + s0 + j] = static_cast<Op>(rs);
    });
    // Locals, not captures: the compiler keeps them in registers across the
    // stores (a vector store may alias anything).
    const Op *pc = center.data(), *pr = remainder.data(), *ps = rstd.data();
    const int64_t stride = S;
    for (int64_t c = 0; c < C; ++c) {
      const Vec vw(w ? static_cast<Op>(w[c]) : Op(1)), vb(b ? static_cast<Op>(b[c]) : Op(0));
      const T* xr = xt + c * stride;
      T* yr = yt + c * stride;
      for (int64_t j = 0; j < width; j += W) {
        const int64_t count = std::min(W, width - j);
        const Vec xhat = ((load_op_n(xr + j, count) - Vec::loadu(pc + j)) - Vec::loadu(pr + j)) * Vec::loadu(ps + j);
        store_op_n(yr + j, at::vec::fmadd(xhat, vw, vb), count);
      }
    }
  });
}

// Per position: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) over
// the channels, g = dy * w; per channel dweight = sum(dy * x_hat), dbias =
// sum(dy), from per-tile partials added in tile order (returned as dweight
// then dbias).
template <typename T, typename P>
std::vector<double> layer_norm_channels_backward_kernel(const T* dy, const T* x, T* dx, int64_t N, int64_t C,
                                                        int64_t S, const P* w, const opmath_t<T>* mean,
                                                        const opmath_t<T>* rstd, bool param_grads) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t width = tile_width<T>(C, S), tiles = (S + width - 1) / width;
  std::vector<double> partial(param_grads ? N * tiles * 2 * C : 0, 0.0);
  for_each_tile(N, C, S, width, [&](int64_t n, int64_t task, int64_t s0, int64_t s1) {
    const int64_t offset = n * C * S + s0, tw = s1 - s0, stride = S;
    auto mu = column_array<Op>(tw), rs = column_array<Op>(tw);
    for (int64_t j = 0; j < tw; ++j) mu[j] = mean[n * S + s0 + j], rs[j] = rstd[n * S + s0 + j];
    auto mean_g = column_array<Op>(tw), mean_gx = column_array<Op>(tw);
    // Pointers and stride as locals, captured by value: a vector store may
    // alias a captured reference, which the loops would then reload.
    const T *xt = x + offset, *dyt = dy + offset;
    const Op *pmu = mu.data(), *prs = rs.data(), *pmean_g = mean_g.data(), *pmean_gx = mean_gx.data();
    auto xhat_of = [=](const T* row, int64_t j, int64_t count) {
      return (load_op_n(row + j, count) - Vec::loadu(pmu + j)) * Vec::loadu(prs + j);
    };
    auto weight = [w](int64_t c) { return Vec(w ? static_cast<Op>(w[c]) : Op(1)); };
    if (dx != nullptr) {
      // Lanes past a tile's end load dy = 0, so g = 0 there.
      column_cascade_sums<true, Vec>(
          C, tw,
          [=](int64_t c, int64_t j, int64_t count, Vec& a, Vec& b) {
            a = load_op_n(dyt + c * stride + j, count) * weight(c);
            b = xhat_of(xt + c * stride, j, count);
          },
          mean_g.data(), mean_gx.data());
      for (int64_t j = 0; j < tw; j += W) {
        (Vec::loadu(mean_g.data() + j) / Vec(static_cast<Op>(C))).store(mean_g.data() + j);
        (Vec::loadu(mean_gx.data() + j) / Vec(static_cast<Op>(C))).store(mean_gx.data() + j);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      Vec sum_dyx(0), sum_dy(0);
      const Vec vw = weight(c);
      const T *dyr = dyt + c * stride, *xr = xt + c * stride;
      T* dxr = dx != nullptr ? dx + offset + c * stride : nullptr;
      for (int64_t j = 0; j < tw; j += W) {
        const int64_t count = std::min(W, tw - j);
        const Vec dyv = load_op_n(dyr + j, count);
        const Vec xhat = xhat_of(xr, j, count);
        if (dxr != nullptr) {
          const Vec v = (dyv * vw - Vec::loadu(pmean_g + j) - xhat * Vec::loadu(pmean_gx + j)) * Vec::loadu(prs + j);
          store_op_n(dxr + j, v, count);
        }
        if (param_grads) {
          // Lanes past count hold dy = 0: they add nothing.
          sum_dyx = at::vec::fmadd(dyv, xhat, sum_dyx);
          sum_dy += dyv;
        }
      }
      if (param_grads) {
        partial[task * 2 * C + c] = reduce_add(sum_dyx);
        partial[task * 2 * C + C + c] = reduce_add(sum_dy);
      }
    }
  });
  std::vector<double> total(2 * C, 0.0);
  for (int64_t task = 0; task < N * tiles && param_grads; ++task) {
    for (int64_t i = 0; i < 2 * C; ++i) total[i] += partial[task * 2 * C + i];
  }
  return total;
}

// ---------------------------------------------------------------------------
// Table entries.

void forward(const Tensor& x, const Tensor& y, const GroupNormGeometry& g, const double* w, const double* b,
             double eps, Activation act, double* mean, double* rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_forward", [&] {
    with_activation(act, [&](auto activation) {
      group_norm_forward_kernel<scalar_t, decltype(activation)>(x.const_data_ptr<scalar_t>(),
                                                                y.mutable_data_ptr<scalar_t>(), g, w, b, eps, mean,
                                                                rstd);
    });
  });
}

void backward(const Tensor& dy, const Tensor& x, const Tensor& dx, const GroupNormGeometry& g, const double* mean,
              const double* rstd, const double* w, const double* b, Activation act, bool param_grads,
              double* dweight, double* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    // The gradient through the activation, dy * act'(z) with z recomputed
    // from the statistics, in a buffer of its own (one more elementwise pass).
    Tensor through;
    if (act != Activation::kNone) {
      through = at::empty_like(x);
      ChannelCoefficients<scalar_t> k = sample_coefficients<scalar_t>(g);
      for (int64_t r = 0; r < g.N * g.G; ++r) {
        set_group_forward_coefficients(k, group_entry(k, g, r), g, r, mean[r], rstd[r], w, b);
      }
      with_activation(act, [&](auto activation) {
        sample_form_pass<scalar_t, ActivationGradient<scalar_t, decltype(activation)>>(
            through.mutable_data_ptr<scalar_t>(), {pdy, px}, k, g);
      });
      pdy = through.const_data_ptr<scalar_t>();
    }
    group_norm_backward_kernel<scalar_t>(pdy, px, dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr, g, mean,
                                         rstd, w, param_grads, dweight, dbias);
  });
}

void layer_norm_channels_forward(const Tensor& x, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const Tensor& y, const Tensor& mean,
                                 const Tensor& rstd, double eps) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, bias), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    layer_norm_channels_forward_kernel<T, P>(x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), N, C, S,
                                             data_or_null<P>(weight), data_or_null<P>(bias), eps,
                                             mean.mutable_data_ptr<opmath_t<T>>(),
                                             rstd.mutable_data_ptr<opmath_t<T>>());
  });
}

std::vector<double> layer_norm_channels_backward(const Tensor& dy, const Tensor& x,
                                                 const std::optional<Tensor>& weight, const Tensor& mean,
                                                 const Tensor& rstd, const Tensor& dx, bool param_grads) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  std::vector<double> sums;
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, std::nullopt), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    sums = layer_norm_channels_backward_kernel<T, P>(
        dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dx.defined() ? dx.mutable_data_ptr<T>() : nullptr, N, C, S,
        data_or_null<P>(weight), mean.const_data_ptr<opmath_t<T>>(), rstd.const_data_ptr<opmath_t<T>>(),
        param_grads);
  });
  return sums;
}

}  // namespace

extern const GroupNormKernels group_norm_kernels = {.forward = &forward,
                                                    .backward = &backward,
                                                    .layer_norm_channels_forward = &layer_norm_channels_forward,
                                                    .layer_norm_channels_backward = &layer_norm_channels_backward};

}  // namespace bn_ext::cpu::CPU_CAPABILITY
