// LayerNorm and RMSNorm CPU kernels, built once per SIMD level
// (cpu/dispatch.h). Each row is normalised by its own statistics; a row's
// moments come from cache-sized chunks, so a row of moderate length stays in
// cache for the normalising pass. Parameter gradients are summed per block
// of rows into private partials, then added in block order.
#include "cpu/dispatch.h"
#include "cpu/kernels/kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace bn_ext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// Fixed split of rows into blocks for parameter-gradient partials: at most
// kMaxRowBlocks blocks (memory is blocks x cols accumulators), at least
// kCacheChunk * 8 elements each. Depends on the shape only.
constexpr int64_t kMaxRowBlocks = 32;

// Runs row_fn(row, sums) for every row, where `sums` points at n_sums * cols
// zeroed op-math accumulators private to the row's block, and returns the
// per-column totals with the blocks added in order. `streamed`: the rows'
// outputs were written with streaming stores (see streams_output).
template <typename Acc, typename RowFn>
std::vector<double> rows_with_column_sums(const RowGeometry& g, int64_t n_sums, const RowFn& row_fn,
                                          bool streamed = false) {
  const int64_t width = n_sums * g.cols;
  const int64_t blocks =
      n_sums == 0 ? std::max<int64_t>(1, g.rows)
                  : part_count(g.rows, std::max<int64_t>(1, kCacheChunk * 8 / std::max<int64_t>(g.cols, 1)),
                               kMaxRowBlocks);
  std::vector<Acc> partial(blocks * width, Acc(0));
  at::parallel_for(0, blocks, n_sums == 0 ? grain_for(g.cols) : 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Acc* sums = width ? partial.data() + b * width : nullptr;
      for (int64_t r = part_begin(b, blocks, g.rows); r < part_begin(b + 1, blocks, g.rows); ++r) row_fn(r, sums);
    }
    finish_streaming(streamed);
  });
  std::vector<double> total(width, 0.0);
  at::parallel_for(0, width, kElementwiseGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = j0; j < j1; ++j) total[j] += static_cast<double>(partial[b * width + j]);
    }
  });
  return total;
}

// Sum over a row of n values of the products a * b (and of a when kWithSum)
// that terms(i, count, a, b) sets: run_sums within cache chunks, float64
// across chunks so long rows keep their precision. Lanes past `count` must
// get a = 0.
template <bool kWithSum, typename Vec, typename Terms>
inline std::pair<double, double> row_sums(int64_t n, const Terms& terms) {
  double sum = 0.0, product = 0.0;
  for (int64_t i = 0; i < n; i += kCacheChunk) {
    Vec chunk_sum(0), chunk_product(0);
    run_sums<kWithSum>(
        std::min(kCacheChunk, n - i), [&](int64_t j, int64_t count, Vec& a, Vec& b) { terms(i + j, count, a, b); },
        chunk_sum, chunk_product);
    sum += static_cast<double>(reduce_add(chunk_sum));
    product += static_cast<double>(reduce_add(chunk_product));
  }
  return {sum, product};
}

// weight[j, j + count) in op-math, or ones where there is no weight.
template <typename T, typename P>
inline OpVec<T> weight_vector(const P* weight, int64_t j, int64_t count) {
  return weight ? load_op_n(weight + j, count) : OpVec<T>(1);
}

// y = ((x - center) - remainder) * rstd * weight + bias over a row, the
// row's mean kept in two parts (center, remainder) so a large mean keeps
// its precision; RMSNorm passes center = remainder = 0 and no bias.
// `stream`: streaming stores (see streams_output).
template <typename T, typename P>
inline void normalize_row(const T* x, const P* weight, const P* bias, T* y, int64_t D, opmath_t<T> center,
                          opmath_t<T> remainder, opmath_t<T> rstd, bool stream) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vcenter(center), vremainder(remainder), vrstd(rstd);
  for (int64_t j = 0; j < D; j += W) {
    const int64_t count = std::min(W, D - j);
    Vec v = ((load_op_n(x + j, count) - vcenter) - vremainder) * vrstd;
    if (weight) v = v * weight_vector<T>(weight, j, count);
    if (bias) v = v + weight_vector<T>(bias, j, count);
    store_op_n(y + j, v, count, stream);
  }
}

template <typename T, typename P>
void layer_norm_forward_kernel(const T* x, const P* weight, const P* bias, T* y, opmath_t<T>* mean_out,
                               opmath_t<T>* rstd_out, const RowGeometry& g, double eps) {
  using Op = opmath_t<T>;
  const int64_t D = g.cols;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const bool stream = streams_output(y, g.rows * row_bytes, row_bytes);
  rows_with_column_sums<Op>(g, 0, [&](int64_t r, Op*) {
    const Moments m = long_run_moments(x + r * D, D);
    const double rstd = 1.0 / std::sqrt(m.m2 / static_cast<double>(D) + eps);
    mean_out[r] = static_cast<Op>(m.mean);
    rstd_out[r] = static_cast<Op>(rstd);
    const Op center = static_cast<Op>(m.mean);
    normalize_row(x + r * D, weight, bias, y + r * D, D, center, static_cast<Op>(m.mean - static_cast<double>(center)),
                  static_cast<Op>(rstd), stream);
  }, stream);
}

// dx of one row, and its contributions to the column sums (`sums` null when
// no parameter gradient is asked):
//   dx = rstd * (g - mean_g - x_hat * mean_gx),  g = dy * weight, x_hat = (x - mu) * rstd
//   dweight += dy * x_hat, dbias += dy (LayerNorm only: kWithBias)
template <bool kWithBias, typename T, typename P>
inline void row_backward(const T* dy, const T* x, const P* weight, T* dx, opmath_t<T>* sums, int64_t D,
                         opmath_t<T> mu, opmath_t<T> rstd, opmath_t<T> mean_g, opmath_t<T> mean_gx, bool stream) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vmu(mu), vrs(rstd), vmean_g(mean_g), vmean_gx(mean_gx);
  for (int64_t j = 0; j < D; j += W) {
    const int64_t count = std::min(W, D - j);
    const Vec dyv = load_op_n(dy + j, count);
    const Vec xhat = (load_op_n(x + j, count) - vmu) * vrs;
    if (dx) {
      const Vec v = (dyv * weight_vector<T>(weight, j, count) - vmean_g - xhat * vmean_gx) * vrs;
      store_op_n(dx + j, v, count, stream);
    }
    if (sums) {
      // Lanes past count hold dy = 0: they add nothing.
      at::vec::fmadd(dyv, xhat, Vec::loadu(sums + j, count)).store(sums + j, count);
      if constexpr (kWithBias) (Vec::loadu(sums + D + j, count) + dyv).store(sums + D + j, count);
    }
  }
}

template <typename T, typename P>
std::vector<double> layer_norm_backward_kernel(const T* dy, const T* x, const P* weight, const opmath_t<T>* mean,
                                               const opmath_t<T>* rstd, T* dx, const RowGeometry& g,
                                               bool param_grads) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t D = g.cols;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const bool stream = dx && streams_output(dx, g.rows * row_bytes, row_bytes);
  return rows_with_column_sums<Op>(g, param_grads ? 2 : 0, [&](int64_t r, Op* sums) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    const Op mu = mean[r], rs = rstd[r];
    Op mean_g = 0, mean_gx = 0;
    if (dx) {
      // sum(g) and sum(g * x_hat); lanes past a tail load dy = 0, so g = 0.
      const Vec vmu(mu), vrs(rs);
      const auto [sum_g, sum_gx] = row_sums<true, Vec>(D, [&](int64_t j, int64_t count, Vec& a, Vec& b) {
        a = load_op_n(dyr + j, count) * weight_vector<T>(weight, j, count);
        b = (load_op_n(xr + j, count) - vmu) * vrs;
      });
      mean_g = static_cast<Op>(sum_g / static_cast<double>(D));
      mean_gx = static_cast<Op>(sum_gx / static_cast<double>(D));
    }
    row_backward<true>(dyr, xr, weight, dx ? dx + r * D : nullptr, sums, D, mu, rs, mean_g, mean_gx, stream);
  }, stream);
}

template <typename T, typename P>
void rms_norm_forward_kernel(const T* x, const P* weight, T* y, opmath_t<T>* rstd_out, const RowGeometry& g,
                             double eps) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t D = g.cols;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const bool stream = streams_output(y, g.rows * row_bytes, row_bytes);
  rows_with_column_sums<Op>(g, 0, [&](int64_t r, Op*) {
    const T* xr = x + r * D;
    const double sum_sq =
        row_sums<false, Vec>(D, [&](int64_t j, int64_t count, Vec& a, Vec& b) { a = b = load_op_n(xr + j, count); })
            .second;
    const Op rs = static_cast<Op>(1.0 / std::sqrt(sum_sq / static_cast<double>(D) + eps));
    rstd_out[r] = rs;
    normalize_row(xr, weight, static_cast<const P*>(nullptr), y + r * D, D, Op(0), Op(0), rs, stream);
  }, stream);
}

// RMSNorm is row_backward with mu = 0, mean_g = 0 and
// mean_gx = mean(g * x_hat) = rstd * sum(dy * weight * x) / D.
template <typename T, typename P>
std::vector<double> rms_norm_backward_kernel(const T* dy, const T* x, const P* weight, const opmath_t<T>* rstd,
                                             T* dx, const RowGeometry& g, bool weight_grad) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  const int64_t D = g.cols;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const bool stream = dx && streams_output(dx, g.rows * row_bytes, row_bytes);
  return rows_with_column_sums<Op>(g, weight_grad ? 1 : 0, [&](int64_t r, Op* dweight) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    const Op rs = rstd[r];
    Op mean_gx = 0;
    if (dx) {
      const double sum = row_sums<false, Vec>(D, [&](int64_t j, int64_t count, Vec& a, Vec& b) {
                           a = load_op_n(dyr + j, count) * weight_vector<T>(weight, j, count);
                           b = load_op_n(xr + j, count);
                         }).second;
      mean_gx = static_cast<Op>(sum * static_cast<double>(rs) / static_cast<double>(D));
    }
    row_backward<false>(dyr, xr, weight, dx ? dx + r * D : nullptr, dweight, D, Op(0), rs, Op(0), mean_gx, stream);
  }, stream);
}

// ---------------------------------------------------------------------------
// Table entries.

void layer_norm_forward(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const Tensor& y, const Tensor& mean, const Tensor& rstd, const RowGeometry& g, double eps) {
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, bias), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    layer_norm_forward_kernel<T, P>(x.const_data_ptr<T>(), data_or_null<P>(weight), data_or_null<P>(bias),
                                    y.mutable_data_ptr<T>(), mean.mutable_data_ptr<opmath_t<T>>(),
                                    rstd.mutable_data_ptr<opmath_t<T>>(), g, eps);
  });
}

std::vector<double> layer_norm_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& mean, const Tensor& rstd, const Tensor& dx,
                                        const RowGeometry& g, bool param_grads) {
  std::vector<double> sums;
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, std::nullopt), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    sums = layer_norm_backward_kernel<T, P>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), data_or_null<P>(weight),
                                            mean.const_data_ptr<opmath_t<T>>(), rstd.const_data_ptr<opmath_t<T>>(),
                                            dx.defined() ? dx.mutable_data_ptr<T>() : nullptr, g, param_grads);
  });
  return sums;
}

void rms_norm_forward(const Tensor& x, const std::optional<Tensor>& weight, const Tensor& y, const Tensor& rstd,
                      const RowGeometry& g, double eps) {
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, std::nullopt), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    rms_norm_forward_kernel<T, P>(x.const_data_ptr<T>(), data_or_null<P>(weight), y.mutable_data_ptr<T>(),
                                  rstd.mutable_data_ptr<opmath_t<T>>(), g, eps);
  });
}

std::vector<double> rms_norm_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                      const Tensor& rstd, const Tensor& dx, const RowGeometry& g, bool weight_grad) {
  std::vector<double> sums;
  dispatch_input_and_param(x.scalar_type(), param_dtype_of(x, weight, std::nullopt), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    sums = rms_norm_backward_kernel<T, P>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), data_or_null<P>(weight),
                                          rstd.const_data_ptr<opmath_t<T>>(),
                                          dx.defined() ? dx.mutable_data_ptr<T>() : nullptr, g, weight_grad);
  });
  return sums;
}

}  // namespace

extern const RowNormKernels row_norm_kernels = {.layer_norm_forward = &layer_norm_forward,
                                                .layer_norm_backward = &layer_norm_backward,
                                                .rms_norm_forward = &rms_norm_forward,
                                                .rms_norm_backward = &rms_norm_backward};

}  // namespace bn_ext::cpu::CPU_CAPABILITY
