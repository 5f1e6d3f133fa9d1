// LayerNorm on the CPU. Each row is normalised by its own mean and variance;
// the row's moments come from cache-sized chunks (two passes each, Chan merge),
// so a row of moderate length stays in cache for the normalising pass.
#include "cpu/output_memory.h"
#include "cpu/row_norm.h"

#include <torch/library.h>

#include <cmath>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

template <typename T, typename P>
void layer_norm_forward_kernel(const T* x, const P* weight, const P* bias, T* y, opmath_t<T>* mean_out,
                               opmath_t<T>* rstd_out, const RowGeometry& g, double eps) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t D = g.cols;
  rows_with_column_sums<Op>(g, 0, [&](int64_t r, Op*) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    const Moments m = long_run_moments(xr, D);
    const double rstd = 1.0 / std::sqrt(m.m2 / static_cast<double>(D) + eps);
    mean_out[r] = static_cast<Op>(m.mean);
    rstd_out[r] = static_cast<Op>(rstd);
    // x_hat = ((x - center) - remainder) * rstd, the mean kept in two parts.
    const Op center = static_cast<Op>(m.mean), remainder = static_cast<Op>(m.mean - static_cast<double>(center));
    const Op r_op = static_cast<Op>(rstd);
    const Vec vcenter(center), vremainder(remainder), vrstd(r_op);
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      Vec v = ((load_op(xr + j) - vcenter) - vremainder) * vrstd;
      if (weight) v = v * load_op(weight + j);
      if (bias) v = v + load_op(bias + j);
      store_op(yr + j, v);
    }
    for (; j < D; ++j) {
      Op v = ((static_cast<Op>(xr[j]) - center) - remainder) * r_op;
      if (weight) v *= static_cast<Op>(weight[j]);
      if (bias) v += static_cast<Op>(bias[j]);
      yr[j] = static_cast<T>(v);
    }
  });
}

// Per row, with g = dy * weight and x_hat = (x - mean) * rstd:
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
//   dweight += dy * x_hat, dbias += dy   (block partials, see rows_with_column_sums)
template <typename T, typename P>
std::vector<double> layer_norm_backward_kernel(const T* dy, const T* x, const P* weight, const opmath_t<T>* mean,
                                               const opmath_t<T>* rstd, T* dx, const RowGeometry& g,
                                               bool param_grads) {
  using Op = opmath_t<T>;
  using Vec = OpVec<T>;
  constexpr int64_t W = Vec::size();
  const int64_t D = g.cols;
  return rows_with_column_sums<Op>(g, param_grads ? 2 : 0, [&](int64_t r, Op* sums) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    const Op mu = mean[r], rs = rstd[r];
    const Vec vmu(mu), vrs(rs);
    double sum_g = 0.0, sum_g_xhat = 0.0;
    if (dx) {
      for (int64_t i = 0; i < D; i += kCacheChunk) {
        const int64_t end = std::min(D, i + kCacheChunk);
        Vec acc_g(0), acc_gx(0);
        Op s_g = 0, s_gx = 0;
        int64_t j = i;
        for (; j + W <= end; j += W) {
          Vec gv = load_op(dyr + j);
          if (weight) gv = gv * load_op(weight + j);
          acc_g += gv;
          acc_gx = at::vec::fmadd(gv, (load_op(xr + j) - vmu) * vrs, acc_gx);
        }
        for (; j < end; ++j) {
          const Op gj = static_cast<Op>(dyr[j]) * (weight ? static_cast<Op>(weight[j]) : Op(1));
          s_g += gj;
          s_gx += gj * (static_cast<Op>(xr[j]) - mu) * rs;
        }
        sum_g += static_cast<double>(reduce_add(acc_g) + s_g);
        sum_g_xhat += static_cast<double>(reduce_add(acc_gx) + s_gx);
      }
    }
    const Op mean_g = static_cast<Op>(sum_g / static_cast<double>(D));
    const Op mean_gx = static_cast<Op>(sum_g_xhat / static_cast<double>(D));
    const Vec vmean_g(mean_g), vmean_gx(mean_gx);
    T* dxr = dx ? dx + r * D : nullptr;
    Op* dweight = sums;
    Op* dbias = sums ? sums + D : nullptr;
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      const Vec dyv = load_op(dyr + j);
      const Vec xhat = (load_op(xr + j) - vmu) * vrs;
      if (dxr) {
        const Vec gv = weight ? dyv * load_op(weight + j) : dyv;
        store_op(dxr + j, (gv - vmean_g - xhat * vmean_gx) * vrs);
      }
      if (sums) {
        at::vec::fmadd(dyv, xhat, Vec::loadu(dweight + j)).store(dweight + j);
        (Vec::loadu(dbias + j) + dyv).store(dbias + j);
      }
    }
    for (; j < D; ++j) {
      const Op dyj = static_cast<Op>(dyr[j]);
      const Op xhat = (static_cast<Op>(xr[j]) - mu) * rs;
      if (dxr) {
        const Op gj = dyj * (weight ? static_cast<Op>(weight[j]) : Op(1));
        dxr[j] = static_cast<T>((gj - mean_g - xhat * mean_gx) * rs);
      }
      if (sums) {
        dweight[j] += dyj * xhat;
        dbias[j] += dyj;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps) {
  const RowGeometry g = check_row_norm_args("layer_norm", input, normalized_shape, weight, bias);
  const Tensor x = input.contiguous();
  const std::optional<Tensor> w = has(weight) ? std::optional(weight->contiguous()) : std::nullopt;
  const std::optional<Tensor> b = has(bias) ? std::optional(bias->contiguous()) : std::nullopt;
  Tensor out = empty_output_like(x, at::MemoryFormat::Contiguous);
  const auto stats_options = x.options().dtype(stat_dtype(x.scalar_type()));
  Tensor mean = at::empty(row_stat_shape(x, normalized_shape), stats_options);
  Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), stats_options);
  dispatch_input_and_param(x.scalar_type(), param_dtype(x, w, b), [&](auto t, auto p) {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    layer_norm_forward_kernel<T, P>(x.const_data_ptr<T>(), data_or_null<P>(w), data_or_null<P>(b),
                                    out.mutable_data_ptr<T>(), mean.mutable_data_ptr<opmath_t<T>>(),
                                    rstd.mutable_data_ptr<opmath_t<T>>(), g, eps);
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           at::IntArrayRef normalized_shape, const Tensor& mean,
                                                           const Tensor& rstd, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, double eps,
                                                           std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  const RowGeometry g = check_row_norm_args("layer_norm_backward", input, normalized_shape, weight, bias);
  check_row_norm_backward_args("layer_norm_backward", grad_out, input, &mean, rstd, g.rows);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const auto sdtype = stat_dtype(x.scalar_type());
  const Tensor mean_c = mean.to(sdtype).contiguous(), rstd_c = rstd.to(sdtype).contiguous();
  const std::optional<Tensor> w = has(weight) ? std::optional(weight->contiguous()) : std::nullopt;
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const bool param_grads = output_mask[1] || output_mask[2];
  std::vector<double> sums;
  if (g.rows * g.cols > 0) {
    dispatch_input_and_param(x.scalar_type(), param_dtype(x, weight, bias),
                             [&](auto t, auto p) {
                               using T = typename decltype(t)::type;
                               using P = typename decltype(p)::type;
                               sums = layer_norm_backward_kernel<T, P>(
                                   dy.const_data_ptr<T>(), x.const_data_ptr<T>(), data_or_null<P>(w),
                                   mean_c.const_data_ptr<opmath_t<T>>(), rstd_c.const_data_ptr<opmath_t<T>>(),
                                   output_mask[0] ? dx.mutable_data_ptr<T>() : nullptr, g, param_grads);
                             });
  }
  if (sums.empty()) sums.assign(2 * g.cols, 0.0);
  auto param_grad = [&](bool asked, const std::optional<Tensor>& param, int64_t offset) {
    const auto dtype = has(param) ? param->scalar_type() : x.scalar_type();
    return asked ? tensor_from(sums, offset, normalized_shape, dtype)
                 : at::empty({0}, x.options().dtype(dtype));
  };
  return {dx, param_grad(output_mask[1], weight, 0), param_grad(output_mask[2], bias, g.cols)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace bn_ext::cpu
