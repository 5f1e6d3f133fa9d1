// The BatchNorm operators, written once for every device: each checks its
// arguments, picks the layout, allocates the outputs and hands the rest to
// the device's part, `Device` (cpu/batch_norm.cpp, cuda/batch_norm.cu), whose
// static functions take the calls below. A device file registers
// BatchNormOps<its Device> for its dispatch key.
#pragma once

#include "batch_norm_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace bn_ext {

// A forward in the kernels' layout: x (and the residual, undefined for none)
// contiguous in it, `out` allocated like x.
struct BatchNormForwardCall {
  at::Tensor x, residual, out;
  BatchNormGeometry g;
  const std::optional<at::Tensor>&weight, &bias, &running_mean, &running_var;
  bool training;
  double eps;
  Activation act;
};

// A backward in the kernels' layout; grad_input is undefined when not asked for.
struct BatchNormBackwardCall {
  at::Tensor dy, x, residual, grad_input;
  BatchNormGeometry g;
  const std::optional<at::Tensor>&weight, &bias;
  const at::Tensor &save_mean, &save_invstd;
  bool training;
  Activation act;
  std::array<bool, 4> output_mask;
  at::ScalarType param_dtype;  // of the parameters' gradients
};

// Device provides:
//   Tensor empty_like(const Tensor& x)                        an output like x
//   tuple<Tensor, Tensor> forward(const BatchNormForwardCall&) -> save_mean, save_invstd (op-math dtype)
//   tuple<Tensor, Tensor, Tensor> backward(const BatchNormBackwardCall&)
//       -> grad_weight, grad_bias, grad_residual (empty where not asked for)
//   tuple<Tensor, Tensor> moments(const Tensor& x, const BatchNormGeometry&) -> float64 mean, M2 of a non-empty x
//   void update_running_stats(running_mean, running_var, save_mean, save_invstd, momentum,
//                             num_batches_tracked, eps, unbias)
template <typename Device>
struct BatchNormOps {
  using Tensor = at::Tensor;
  using Optional = const std::optional<Tensor>&;

  static std::tuple<Tensor, Tensor, Tensor> act_forward(const Tensor& input, Optional weight, Optional bias,
                                                        Optional running_mean, Optional running_var, bool training,
                                                        double eps, std::optional<std::string_view> activation,
                                                        Optional residual) {
    check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
    check_batch_norm_forward_args(input, training, eps);
    check_residual(residual, input);
    const Activation act = parse_activation(activation, "batch_norm_act");
    const auto fmt = batch_norm_memory_format(input);
    const Tensor x = input.contiguous(fmt);
    const BatchNormGeometry g = batch_norm_geometry(x);
    Tensor out = Device::empty_like(x);
    if (x.numel() == 0 && training) {
      const auto options = x.options().dtype(stat_dtype(x.scalar_type()));
      return {out, at::zeros({g.C}, options), at::zeros({g.C}, options)};
    }
    const Tensor res = has(residual) ? residual->contiguous(fmt) : Tensor();
    auto [mean, invstd] = Device::forward(
        BatchNormForwardCall{x, res, out, g, weight, bias, running_mean, running_var, training, eps, act});
    return {out, mean, invstd};
  }

  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, Optional weight, Optional bias,
                                                    Optional running_mean, Optional running_var, bool training,
                                                    double eps) {
    return act_forward(input, weight, bias, running_mean, running_var, training, eps, std::nullopt, std::nullopt);
  }

  // eps is read by this op's autograd formula, not by the kernels.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> act_backward(const Tensor& grad_out, const Tensor& input,
                                                                 Optional residual, Optional weight, Optional bias,
                                                                 const Tensor& save_mean, const Tensor& save_invstd,
                                                                 bool training, double /*eps*/,
                                                                 std::optional<std::string_view> activation,
                                                                 std::array<bool, 4> output_mask) {
    check_batch_norm_backward_args(grad_out, input, weight, save_mean, save_invstd);
    check_param(bias, "bias", input, input.size(1), "the input's channel count, input.size(1)");
    check_residual(residual, input);
    const Activation act = parse_activation(activation, "batch_norm_act_backward");
    const auto fmt = batch_norm_memory_format(input);
    const Tensor x = input.contiguous(fmt);
    Tensor grad_input = output_mask[0] ? Device::empty_like(x) : Tensor();
    auto [grad_weight, grad_bias, grad_residual] = Device::backward(
        BatchNormBackwardCall{grad_out.contiguous(fmt), x, has(residual) ? residual->contiguous(fmt) : Tensor(),
                              grad_input, batch_norm_geometry(x), weight, bias, save_mean, save_invstd, training, act,
                              output_mask, has(weight) ? weight->scalar_type() : input.scalar_type()});
    if (!grad_input.defined()) grad_input = at::empty({0}, x.options());
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& input, Optional weight,
                                                     const Tensor& save_mean, const Tensor& save_invstd, bool training,
                                                     double eps, std::array<bool, 3> output_mask) {
    auto [grad_input, grad_weight, grad_bias, unused] =
        act_backward(grad_out, input, std::nullopt, weight, std::nullopt, save_mean, save_invstd, training, eps,
                     std::nullopt, {output_mask[0], output_mask[1], output_mask[2], false});
    return {grad_input, grad_weight, grad_bias};
  }

  // Per-channel mean and M2 = sum((x - mean)^2), in float64 (SyncBatchNorm's partials).
  static std::tuple<Tensor, Tensor> stats(const Tensor& input) {
    check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
    const Tensor x = input.contiguous(batch_norm_memory_format(input));
    const BatchNormGeometry g = batch_norm_geometry(x);
    if (x.numel() == 0) {
      const auto options = x.options().dtype(at::kDouble);
      return {at::zeros({g.C}, options), at::zeros({g.C}, options)};
    }
    return Device::moments(x, g);
  }

  // running = (1 - factor) * running + factor * batch value, with the unbiased
  // variance as torch keeps it; factor is momentum, or 1 / num_batches_tracked
  // when momentum is None (a cumulative average).
  static void update_stats(Optional running_mean, Optional running_var, const Tensor& save_mean,
                           const Tensor& save_invstd, std::optional<double> momentum, Optional num_batches_tracked,
                           double eps, int64_t count) {
    TORCH_CHECK(momentum.has_value() || has(num_batches_tracked),
                "batch_norm_update_stats: num_batches_tracked is required when momentum is None");
    const int64_t C = save_mean.numel();
    for (const auto* t : {&running_mean, &running_var}) {
      TORCH_CHECK(!has(*t) || (*t)->numel() == C, "batch_norm_update_stats: running statistics should contain ", C,
                  " elements not ", (*t)->numel());
    }
    if (C == 0 || (!has(running_mean) && !has(running_var))) return;
    const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
    Device::update_running_stats(running_mean, running_var, save_mean, save_invstd, momentum, num_batches_tracked, eps,
                                 unbias);
  }

  // bind(name, function) for each operator: m.impl on a device's dispatch key.
  template <typename Bind>
  static void bind(const Bind& bind) {
    bind("batch_norm_forward", &forward);
    bind("batch_norm_backward", &backward);
    bind("batch_norm_act_forward", &act_forward);
    bind("batch_norm_act_backward", &act_backward);
    bind("batch_norm_update_stats", &update_stats);
    bind("batch_norm_stats", &stats);
  }
};

}  // namespace bn_ext
