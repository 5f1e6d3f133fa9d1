// The GroupNorm and LayerNorm-over-channels operators, written once for every
// device: each checks its arguments, picks the layout, allocates the outputs
// and hands the rest to the device's part, `Device` (cpu/group_norm.cpp,
// cuda/group_norm.cu), whose static functions take the calls below.
#pragma once

#include "group_norm_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace bn_ext {

// A forward of a non-empty x, contiguous in its layout; `out` allocated like x.
struct GroupNormForwardCall {
  at::Tensor x, out;
  GroupNormGeometry g;
  const std::optional<at::Tensor>&weight, &bias;
  double eps;
  Activation act;
};

// A backward of a non-empty x; dx is undefined when not asked for.
struct GroupNormBackwardCall {
  at::Tensor dy, x, dx;
  GroupNormGeometry g;
  const at::Tensor &mean, &rstd;
  const std::optional<at::Tensor>&weight, &bias;
  Activation act;
  std::array<bool, 3> output_mask;
  at::ScalarType weight_dtype, bias_dtype;  // of the parameters' gradients
};

// Device provides:
//   Tensor empty_like(const Tensor& x)                          an output like x
//   tuple<Tensor, Tensor> forward(const GroupNormForwardCall&)  -> mean, rstd: (N, G), op-math dtype
//   tuple<Tensor, Tensor> backward(const GroupNormBackwardCall&) -> dweight, dbias (empty where not asked for)
//   layer_norm_channels_forward(input, weight, bias, eps) and
//   layer_norm_channels_backward(grad_out, input, mean, rstd, weight, bias, output_mask): the operators
//       after their checks.
template <typename Device>
struct GroupNormOps {
  using Tensor = at::Tensor;
  using Optional = const std::optional<Tensor>&;

  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, int64_t num_groups, Optional weight,
                                                    Optional bias, double eps,
                                                    std::optional<std::string_view> activation) {
    check_group_norm_forward_args(input, num_groups, weight, bias);
    const Activation act = parse_activation(activation, "group_norm");
    const Tensor x = input.contiguous(group_norm_memory_format(input));
    const GroupNormGeometry g = group_norm_geometry(x, num_groups);
    Tensor out = Device::empty_like(x);
    if (x.numel() == 0) {
      const auto options = x.options().dtype(stat_dtype(x.scalar_type()));
      return {out, at::zeros({g.N, g.G}, options), at::zeros({g.N, g.G}, options)};
    }
    auto [mean, rstd] = Device::forward(GroupNormForwardCall{x, out, g, weight, bias, eps, act});
    return {out, mean, rstd};
  }

  // eps is read by this op's autograd formula, not by the kernels.
  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& input, int64_t num_groups,
                                                     const Tensor& mean, const Tensor& rstd, Optional weight,
                                                     Optional bias, double /*eps*/,
                                                     std::optional<std::string_view> activation,
                                                     std::array<bool, 3> output_mask) {
    check_group_norm_args(input, num_groups, weight, bias);
    const Activation act = parse_activation(activation, "group_norm");
    check_group_norm_backward_args("group_norm_backward", grad_out, input, mean, rstd, input.size(0) * num_groups);
    const auto fmt = group_norm_memory_format(input);
    const Tensor x = input.contiguous(fmt);
    const GroupNormGeometry g = group_norm_geometry(x, num_groups);
    Tensor dx = output_mask[0] ? Device::empty_like(x) : Tensor();
    const auto weight_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
    const auto bias_dtype = has(bias) ? bias->scalar_type() : input.scalar_type();
    Tensor dweight, dbias;
    if (x.numel() == 0) {
      dweight = at::zeros({output_mask[1] ? g.C : 0}, x.options().dtype(weight_dtype));
      dbias = at::zeros({output_mask[2] ? g.C : 0}, x.options().dtype(bias_dtype));
    } else {
      std::tie(dweight, dbias) = Device::backward(GroupNormBackwardCall{
          grad_out.contiguous(fmt), x, dx, g, mean, rstd, weight, bias, act, output_mask, weight_dtype, bias_dtype});
    }
    return {dx.defined() ? dx : at::empty({0}, x.options()), dweight, dbias};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward(const Tensor& input, Optional weight,
                                                                        Optional bias, double eps) {
    check_layer_norm_channels_args(input, weight, bias);
    return Device::layer_norm_channels_forward(input, weight, bias, eps);
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward(const Tensor& grad_out, const Tensor& input,
                                                                         const Tensor& mean, const Tensor& rstd,
                                                                         Optional weight, Optional bias, double /*eps*/,
                                                                         std::array<bool, 3> output_mask) {
    check_layer_norm_channels_args(input, weight, bias);
    check_group_norm_backward_args("layer_norm_channels_backward", grad_out, input, mean, rstd,
                                   layer_norm_channels_stat_count(input));
    return Device::layer_norm_channels_backward(grad_out, input, mean, rstd, weight, bias, output_mask);
  }

  // bind(name, function) for each operator: m.impl on a device's dispatch key.
  template <typename Bind>
  static void bind(const Bind& bind) {
    bind("group_norm_forward", &forward);
    bind("group_norm_backward", &backward);
    bind("layer_norm_channels_forward", &layer_norm_channels_forward);
    bind("layer_norm_channels_backward", &layer_norm_channels_backward);
  }
};

}  // namespace bn_ext
