// The LayerNorm and RMSNorm operators, written once for every device: each
// checks its arguments, allocates the outputs and hands the rest to the
// device's part, `Device` (cpu/row_norm.cpp, cuda/row_norm.cu), whose static
// functions take the calls below. RMSNorm is the call without a mean.
#pragma once

#include "row_norm_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <tuple>

namespace bn_ext {

// A forward of `g.rows` rows: x contiguous, out like it, mean (undefined for
// RMSNorm) and rstd one per row in the op-math dtype.
struct RowNormForwardCall {
  at::Tensor x, out, mean, rstd;
  const std::optional<at::Tensor>&weight, &bias;
  RowGeometry g;
  double eps;
};

// A backward of a non-empty x; dx is undefined when not asked for, mean for RMSNorm.
struct RowNormBackwardCall {
  at::Tensor dy, x, dx;
  const at::Tensor &mean, &rstd;
  const std::optional<at::Tensor>& weight;
  RowGeometry g;
  std::array<bool, 3> output_mask;
  at::IntArrayRef normalized_shape;  // the parameters' gradients' shape
  at::ScalarType weight_dtype, bias_dtype;
};

// Device provides:
//   Tensor empty_like(const Tensor& x)                              a contiguous output like x
//   void forward(const RowNormForwardCall&)
//   tuple<Tensor, Tensor> backward(const RowNormBackwardCall&) -> dweight, dbias (empty where not asked for)
template <typename Device>
struct RowNormOps {
  using Tensor = at::Tensor;
  using Optional = const std::optional<Tensor>&;

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape,
                                                               Optional weight, Optional bias, double eps) {
    return row_forward(false, input, normalized_shape, weight, bias, eps);
  }

  // eps is read by this op's autograd formula, not by the kernels.
  static std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                                at::IntArrayRef normalized_shape, const Tensor& mean,
                                                                const Tensor& rstd, Optional weight, Optional bias,
                                                                double /*eps*/, std::array<bool, 3> output_mask) {
    return row_backward(false, grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask);
  }

  static std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape,
                                                     Optional weight, std::optional<double> eps) {
    auto [out, unused, rstd] =
        row_forward(true, input, normalized_shape, weight, std::nullopt, rms_norm_eps(eps, input.scalar_type()));
    return {rms_norm_output_format(out, input), rstd};
  }

  static std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                      at::IntArrayRef normalized_shape, const Tensor& rstd,
                                                      Optional weight, std::optional<double> /*eps*/,
                                                      std::array<bool, 2> output_mask) {
    auto [dx, dweight, unused] = row_backward(true, grad_out, input, normalized_shape, rstd, rstd, weight, std::nullopt,
                                              {output_mask[0], output_mask[1], false});
    return {dx, dweight};
  }

  // bind(name, function) for each operator: m.impl on a device's dispatch key.
  template <typename Bind>
  static void bind(const Bind& bind) {
    bind("layer_norm_forward", &layer_norm_forward);
    bind("layer_norm_backward", &layer_norm_backward);
    bind("rms_norm_forward", &rms_norm_forward);
    bind("rms_norm_backward", &rms_norm_backward);
  }

 private:
  static std::tuple<Tensor, Tensor, Tensor> row_forward(bool rms, const Tensor& input, at::IntArrayRef normalized_shape,
                                                        Optional weight, Optional bias, double eps) {
    const RowGeometry g = check_row_norm_args(rms ? "rms_norm" : "layer_norm", input, normalized_shape, weight, bias);
    const Tensor x = input.contiguous();
    Tensor out = Device::empty_like(x);
    const auto options = x.options().dtype(stat_dtype(x.scalar_type()));
    const Tensor mean = rms ? Tensor() : at::empty(row_stat_shape(x, normalized_shape), options);
    const Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), options);
    if (g.rows > 0) Device::forward(RowNormForwardCall{x, out, mean, rstd, weight, bias, g, eps});
    return {out, mean, rstd};  // mean undefined for RMSNorm, whose operator drops it
  }

  // dx (output_mask[0]), dweight (mask[1]) and dbias (mask[2]); mean is unused by RMSNorm.
  static std::tuple<Tensor, Tensor, Tensor> row_backward(bool rms, const Tensor& grad_out, const Tensor& input,
                                                         at::IntArrayRef normalized_shape, const Tensor& mean,
                                                         const Tensor& rstd, Optional weight, Optional bias,
                                                         std::array<bool, 3> output_mask) {
    const char* op = rms ? "rms_norm_backward" : "layer_norm_backward";
    const RowGeometry g = check_row_norm_args(op, input, normalized_shape, weight, bias);
    check_row_norm_backward_args(op, grad_out, input, rms ? nullptr : &mean, rstd, g.rows);
    const Tensor x = input.contiguous();
    Tensor dx = output_mask[0] ? Device::empty_like(x) : at::empty({0}, x.options());
    const auto weight_dtype = has(weight) ? weight->scalar_type() : x.scalar_type();
    const auto bias_dtype = has(bias) ? bias->scalar_type() : x.scalar_type();
    Tensor dweight, dbias;
    if (g.rows * g.cols == 0) {
      auto zeros = [&](bool asked, at::ScalarType dtype) {
        return asked ? at::zeros(normalized_shape, x.options().dtype(dtype)) : at::empty({0}, x.options().dtype(dtype));
      };
      dweight = zeros(output_mask[1], weight_dtype);
      dbias = zeros(output_mask[2], bias_dtype);
    } else {
      std::tie(dweight, dbias) = Device::backward(
          RowNormBackwardCall{grad_out.contiguous(), x, output_mask[0] ? dx : Tensor(), rms ? Tensor() : mean, rstd,
                              weight, g, output_mask, normalized_shape, weight_dtype, bias_dtype});
    }
    if (!rms) zero_single_value_rows(dx, g.cols);
    return {dx, dweight, dbias};
  }
};

}  // namespace bn_ext
