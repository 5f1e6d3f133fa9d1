// BatchNorm operators on the CPU: argument checks, allocation and the
// running-statistics update; the kernels are in kernels/batch_norm_forward_kernel.cpp and
// kernels/batch_norm_backward_kernel.cpp.
#include "batch_norm_common.h"
#include "cpu/dispatch.h"
#include "cpu/host_values.h"
#include "cpu/output_memory.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <vector>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    std::optional<std::string_view> activation, const std::optional<Tensor>& residual) {
  check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
  check_batch_norm_forward_args(input, training, eps);
  check_residual(residual, input);
  const Activation act = parse_activation(activation, "batch_norm_act");
  const auto fmt = batch_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor res = has(residual) ? residual->contiguous(fmt) : Tensor();
  const BatchNormGeometry g = batch_norm_geometry(x);
  Tensor out = empty_output_like(x, at::MemoryFormat::Preserve);
  const auto sdtype = stat_dtype(input.scalar_type());
  if (x.numel() == 0 && training) {
    return {out, at::zeros({g.C}, x.options().dtype(sdtype)), at::zeros({g.C}, x.options().dtype(sdtype))};
  }
  const auto w = channel_values(weight, g.C, 1.0);
  const auto b = channel_values(bias, g.C, 0.0);
  std::vector<double> mean(g.C), invstd(g.C);
  const auto& kernels = *cpu_kernels().batch_norm;
  if (training) {
    kernels.train_forward(x, res, out, g, w.data(), b.data(), eps, act, mean.data(), invstd.data());
  } else {
    mean = channel_values(running_mean, g.C, 0.0);
    const auto var = channel_values(running_var, g.C, 1.0);
    for (int64_t c = 0; c < g.C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    if (x.numel() > 0) kernels.affine_forward(x, res, out, g, mean.data(), invstd.data(), w.data(), b.data(), act);
  }
  return {out, channel_tensor(mean, sdtype), channel_tensor(invstd, sdtype)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const std::optional<Tensor>& running_mean,
                                                          const std::optional<Tensor>& running_var, bool training,
                                                          double eps) {
  return batch_norm_act_forward_cpu(input, weight, bias, running_mean, running_var, training, eps, std::nullopt,
                                    std::nullopt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& save_mean,
    const Tensor& save_invstd, bool training, double eps, std::optional<std::string_view> activation,
    std::array<bool, 4> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  check_batch_norm_backward_args(grad_out, input, weight, save_mean, save_invstd);
  check_param(bias, "bias", input, input.size(1), "the input's channel count, input.size(1)");
  check_residual(residual, input);
  const Activation act = parse_activation(activation, "batch_norm_act_backward");
  const int64_t C = input.size(1);
  const auto fmt = batch_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_out.contiguous(fmt);
  const BatchNormGeometry g = batch_norm_geometry(x);
  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  const auto mean = channel_values(save_mean, C, 0.0);
  const auto invstd = channel_values(save_invstd, C, 1.0);
  const auto w = channel_values(weight, C, 1.0);
  const auto b = channel_values(bias, C, 0.0);
  const auto& kernels = *cpu_kernels().batch_norm;
  // With a residual, the gradient of the sum is also the residual's: the
  // kernel stores it (needed for dx and the parameters' gradients too).
  const bool upstream = output_mask[0] || output_mask[1] || output_mask[2];
  Tensor grad_residual = has(residual) && (output_mask[3] || upstream)
                             ? empty_output_like(x, at::MemoryFormat::Preserve)
                             : at::empty({0}, x.options());
  Tensor grad_input = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Preserve) : at::empty({0}, x.options());
  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  if (x.numel() > 0 && (upstream || grad_residual.numel() > 0)) {
    kernels.backward(dy, x, has(residual) ? residual->contiguous(fmt) : Tensor(),
                     has(residual) ? grad_residual : Tensor(), output_mask[0] ? grad_input : Tensor(), g, mean.data(),
                     invstd.data(), w.data(), b.data(), act, training, output_mask[1] || output_mask[2],
                     sum_dy.data(), sum_dy_xmu.data());
  }
  auto param_grad = [&](bool asked, const std::vector<double>& values) {
    return asked ? channel_tensor(values, param_dtype) : at::empty({0}, x.options().dtype(param_dtype));
  };
  std::vector<double> gw(C);
  for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * invstd[c];
  if (!output_mask[3]) grad_residual = at::empty({0}, x.options());
  return {grad_input, param_grad(output_mask[1], gw), param_grad(output_mask[2], sum_dy), grad_residual};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           const std::optional<Tensor>& weight,
                                                           const Tensor& save_mean, const Tensor& save_invstd,
                                                           bool training, double eps,
                                                           std::array<bool, 3> output_mask) {
  auto [dx, dw, db, unused] = batch_norm_act_backward_cpu(grad_out, input, std::nullopt, weight, std::nullopt,
                                                          save_mean, save_invstd, training, eps, std::nullopt,
                                                          {output_mask[0], output_mask[1], output_mask[2], false});
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  const Tensor x = input.contiguous(batch_norm_memory_format(input));
  const BatchNormGeometry g = batch_norm_geometry(x);
  std::vector<double> mean(g.C, 0.0), m2(g.C, 0.0);
  if (x.numel() > 0) cpu_kernels().batch_norm->moments(x, g, mean.data(), m2.data());
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
      // Any shape of C elements (a (1, C) buffer, say), in its own order.
      const Tensor flat = t.view({-1});
      scalar_t* p = flat.mutable_data_ptr<scalar_t>();
      const int64_t stride = flat.stride(0);
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
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
}

}  // namespace bn_ext::cpu
