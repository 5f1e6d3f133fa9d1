// RMSNorm on the CPU: y = x * rsqrt(mean(x^2) + eps) * weight, per row.
#include "cpu/output_memory.h"
#include "cpu/row_norm.h"

#include <torch/library.h>

#include <cmath>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

// sum(x * y) over [i0, i1), in op-math.
template <typename T>
inline opmath_t<T> dot(const T* x, const T* y, int64_t i0, int64_t i1) {
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  Vec acc0(0), acc1(0);
  int64_t j = i0;
  for (; j + 2 * W <= i1; j += 2 * W) {
    acc0 = at::vec::fmadd(load_op(x + j), load_op(y + j), acc0);
    acc1 = at::vec::fmadd(load_op(x + j + W), load_op(y + j + W), acc1);
  }
  for (; j + W <= i1; j += W) acc0 = at::vec::fmadd(load_op(x + j), load_op(y + j), acc0);
  opmath_t<T> s = reduce_add(acc0 + acc1);
  for (; j < i1; ++j) s += static_cast<opmath_t<T>>(x[j]) * static_cast<opmath_t<T>>(y[j]);
  return s;
}

template <typename T, typename P>
void rms_norm_forward_kernel(const T* x, const P* weight, T* y, opmath_t<T>* rstd_out, const RowGeometry& g,
                             double eps) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t D = g.cols;
  rows_with_column_sums<Op>(g, 0, [&](int64_t r, Op*) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    const double sum_sq = chunked_sum(D, [&](int64_t i0, int64_t i1) { return dot(xr, xr, i0, i1); });
    const Op rs = static_cast<Op>(1.0 / std::sqrt(sum_sq / static_cast<double>(D) + eps));
    rstd_out[r] = rs;
    const Vec vrs(rs);
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      const Vec v = load_op(xr + j) * vrs;
      store_op(yr + j, weight ? v * load_op(weight + j) : v);
    }
    for (; j < D; ++j) {
      const Op v = static_cast<Op>(xr[j]) * rs;
      yr[j] = static_cast<T>(weight ? v * static_cast<Op>(weight[j]) : v);
    }
  });
}

// Per row, with g = dy * weight and x_hat = x * rstd:
//   dx = rstd * (g - x_hat * mean(g * x_hat)),  dweight += dy * x_hat
template <typename T, typename P>
std::vector<double> rms_norm_backward_kernel(const T* dy, const T* x, const P* weight, const opmath_t<T>* rstd,
                                             T* dx, const RowGeometry& g, bool weight_grad) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t D = g.cols;
  return rows_with_column_sums<Op>(g, weight_grad ? 1 : 0, [&](int64_t r, Op* dweight) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    const Op rs = rstd[r];
    const Vec vrs(rs);
    Op mean_gx = 0;
    if (dx) {
      // sum(g * x_hat) = rstd * sum(dy * weight * x)
      const double sum = chunked_sum(D, [&](int64_t i0, int64_t i1) {
        if (!weight) return dot(dyr, xr, i0, i1);
        Vec acc(0);
        Op s = 0;
        int64_t j = i0;
        for (; j + W <= i1; j += W) acc = at::vec::fmadd(load_op(dyr + j) * load_op(weight + j), load_op(xr + j), acc);
        for (; j < i1; ++j) s += static_cast<Op>(dyr[j]) * static_cast<Op>(weight[j]) * static_cast<Op>(xr[j]);
        return reduce_add(acc) + s;
      });
      mean_gx = static_cast<Op>(sum * static_cast<double>(rs) / static_cast<double>(D));
    }
    const Vec vmean_gx(mean_gx);
    T* dxr = dx ? dx + r * D : nullptr;
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      const Vec dyv = load_op(dyr + j);
      const Vec xhat = load_op(xr + j) * vrs;
      if (dxr) store_op(dxr + j, ((weight ? dyv * load_op(weight + j) : dyv) - xhat * vmean_gx) * vrs);
      if (dweight) at::vec::fmadd(dyv, xhat, Vec::loadu(dweight + j)).store(dweight + j);
    }
    for (; j < D; ++j) {
      const Op dyj = static_cast<Op>(dyr[j]);
      const Op xhat = static_cast<Op>(xr[j]) * rs;
      if (dxr) dxr[j] = static_cast<T>(((weight ? dyj * static_cast<Op>(weight[j]) : dyj) - xhat * mean_gx) * rs);
      if (dweight) dweight[j] += dyj * xhat;
    }
  });
}

std::tuple<Tensor, Tensor> rms_norm_forward_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                                                const std::optional<Tensor>& weight, std::optional<double> eps) {
  const RowGeometry g = check_row_norm_args("rms_norm", input, normalized_shape, weight, std::nullopt);
  const Tensor x = input.contiguous();
  const std::optional<Tensor> w = has(weight) ? std::optional(weight->contiguous()) : std::nullopt;
  Tensor out = empty_output_like(x, at::MemoryFormat::Contiguous);
  Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), x.options().dtype(stat_dtype(x.scalar_type())));
  dispatch_input_and_param(x.scalar_type(), param_dtype(x, w, std::nullopt),
                           [&](auto t, auto p) {
                             using T = typename decltype(t)::type;
                             using P = typename decltype(p)::type;
                             rms_norm_forward_kernel<T, P>(x.const_data_ptr<T>(), data_or_null<P>(w),
                                                           out.mutable_data_ptr<T>(),
                                                           rstd.mutable_data_ptr<opmath_t<T>>(), g,
                                                           rms_norm_eps(eps, x.scalar_type()));
                           });
  // torch's RMSNorm keeps a channels-last input's memory format.
  const auto fmt = input.suggest_memory_format();
  return {fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt), rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                 at::IntArrayRef normalized_shape, const Tensor& rstd,
                                                 const std::optional<Tensor>& weight, std::optional<double> eps,
                                                 std::array<bool, 2> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  const RowGeometry g = check_row_norm_args("rms_norm_backward", input, normalized_shape, weight, std::nullopt);
  check_row_norm_backward_args("rms_norm_backward", grad_out, input, nullptr, rstd, g.rows);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const Tensor rstd_c = rstd.to(stat_dtype(x.scalar_type())).contiguous();
  const std::optional<Tensor> w = has(weight) ? std::optional(weight->contiguous()) : std::nullopt;
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  std::vector<double> sums;
  if (g.rows * g.cols > 0) {
    dispatch_input_and_param(x.scalar_type(), param_dtype(x, w, std::nullopt),
                             [&](auto t, auto p) {
                               using T = typename decltype(t)::type;
                               using P = typename decltype(p)::type;
                               sums = rms_norm_backward_kernel<T, P>(
                                   dy.const_data_ptr<T>(), x.const_data_ptr<T>(), data_or_null<P>(w),
                                   rstd_c.const_data_ptr<opmath_t<T>>(),
                                   output_mask[0] ? dx.mutable_data_ptr<T>() : nullptr, g, output_mask[1]);
                             });
  }
  if (sums.empty()) sums.assign(g.cols, 0.0);
  const auto wdtype = has(weight) ? weight->scalar_type() : x.scalar_type();
  Tensor dweight = output_mask[1] ? tensor_from(sums, 0, normalized_shape, wdtype)
                                  : at::empty({0}, x.options().dtype(wdtype));
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace bn_ext::cpu
