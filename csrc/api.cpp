// The C++ API (include/bn_ext/bn_ext.h): typed calls through the dispatcher.
#include "bn_ext/bn_ext.h"

#include "cpu/dispatch.h"
#include "op_handle.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <limits>
#include <utility>

namespace bn_ext {
namespace {

using Optional = const std::optional<Tensor>&;

// torch accepts an empty 1-D input (it has no channel dimension to check)
// and returns an empty copy, scaled and shifted by the first parameters.
Tensor empty_one_dim_batch_norm(const Tensor& input, Optional weight, Optional bias) {
  Tensor out = input.clone();
  if (weight.has_value() && weight->defined()) out = out.mul((*weight)[0]);
  if (bias.has_value() && bias->defined()) out = out.add((*bias)[0]);
  return out;
}

// The values a channel of an (N, C, *) input holds (N * prod(*)), the
// count the running variance's unbiasing takes; under torch.compile sizes may
// be symbolic, and the count is a constant of the compiled graph.
int64_t values_per_channel(const Tensor& input) {
  return (input.sym_numel() / input.sym_size(1)).guard_int(__FILE__, __LINE__);
}

// After a BatchNorm forward in training: the running statistics, when
// given, moved in place (batch_norm_update_stats).
void update_running_stats(const Tensor& input, Optional running_mean, Optional running_var, const Tensor& save_mean,
                          const Tensor& save_invstd, bool training, std::optional<double> momentum,
                          Optional num_batches_tracked, double eps) {
  if (!training || !running_mean.has_value() || !running_mean->defined() || input.sym_numel() == 0) return;
  const c10::AutoGradMode no_grad(false);  // running statistics are buffers
  batch_norm_update_stats(running_mean, running_var, save_mean, save_invstd, momentum, num_batches_tracked, eps,
                          values_per_channel(input));
}

// An activation name as the operators take it.
std::optional<c10::string_view> view_of(const std::optional<std::string>& activation) {
  return activation.has_value() ? std::optional<c10::string_view>(*activation) : std::nullopt;
}

}  // namespace

std::string cpu_capability() { return cpu::cpu_kernels().level; }

std::vector<std::string> cpu_capabilities() { return cpu::available_cpu_capabilities(); }

std::vector<const char*> operator_names() { return {std::begin(kOperatorNames), std::end(kOperatorNames)}; }

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& input, Optional weight, Optional bias,
                                                      Optional running_mean, Optional running_var, bool training,
                                                      double eps) {
  return ops::handle<ops::batch_norm_forward>().call(input, weight, bias, running_mean, running_var, training, eps);
}

void batch_norm_update_stats(Optional running_mean, Optional running_var, const Tensor& save_mean,
                             const Tensor& save_invstd, std::optional<double> momentum, Optional num_batches_tracked,
                             double eps, int64_t count) {
  ops::handle<ops::batch_norm_update_stats>().call(running_mean, running_var, save_mean, save_invstd, momentum,
                                                   num_batches_tracked, eps, count);
}

Tensor batch_norm(const Tensor& input, Optional running_mean, Optional running_var, Optional weight, Optional bias,
                  bool training, std::optional<double> momentum, double eps, Optional num_batches_tracked) {
  if (input.dim() == 1 && input.sym_numel() == 0) return empty_one_dim_batch_norm(input, weight, bias);
  auto [out, save_mean, save_invstd] =
      batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps);
  update_running_stats(input, running_mean, running_var, save_mean, save_invstd, training, momentum,
                       num_batches_tracked, eps);
  return out;
}

Tensor batch_norm(const Tensor& input, Optional running_mean, Optional running_var, Optional weight, Optional bias,
                  bool training, double momentum, double eps) {
  return batch_norm(input, running_mean, running_var, weight, bias, training, std::optional<double>(momentum), eps,
                    std::nullopt);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input, Optional weight,
                                                       const Tensor& save_mean, const Tensor& save_invstd,
                                                       bool training, double eps, std::array<bool, 3> output_mask) {
  return ops::handle<ops::batch_norm_backward>().call(grad_out, input, weight, save_mean, save_invstd, training, eps,
                                                      output_mask);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward(const Tensor& input, Optional weight, Optional bias,
                                                          Optional running_mean, Optional running_var, bool training,
                                                          double eps, const std::optional<std::string>& activation,
                                                          Optional residual) {
  return ops::handle<ops::batch_norm_act_forward>().call(input, weight, bias, running_mean, running_var, training, eps,
                                                         view_of(activation), residual);
}

Tensor batch_norm_act(const Tensor& input, Optional running_mean, Optional running_var, Optional weight,
                      Optional bias, bool training, std::optional<double> momentum, double eps,
                      const std::optional<std::string>& activation, Optional residual, Optional num_batches_tracked) {
  auto [out, save_mean, save_invstd] =
      batch_norm_act_forward(input, weight, bias, running_mean, running_var, training, eps, activation, residual);
  update_running_stats(input, running_mean, running_var, save_mean, save_invstd, training, momentum,
                       num_batches_tracked, eps);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(const Tensor& grad_out, const Tensor& input,
                                                                   Optional residual, Optional weight, Optional bias,
                                                                   const Tensor& save_mean, const Tensor& save_invstd,
                                                                   bool training, double eps,
                                                                   const std::optional<std::string>& activation,
                                                                   std::array<bool, 4> output_mask) {
  return ops::handle<ops::batch_norm_act_backward>().call(grad_out, input, residual, weight, bias, save_mean,
                                                          save_invstd, training, eps, view_of(activation), output_mask);
}

namespace {

// Batch Renormalization with its clipping bounds as 0-dim tensors (a
// schedule computed in a compiled graph); the float overload checks them.
Tensor batch_renorm_bounded(const Tensor& input, Optional running_mean, Optional running_var, Optional weight,
                            Optional bias, bool training, double momentum, double eps, const Tensor& rmax,
                            const Tensor& dmax) {
  if (!training) return batch_norm(input, running_mean, running_var, weight, bias, false, 0.0, eps);
  auto defined = [](Optional t) { return t.has_value() && t->defined(); };
  if (!defined(running_mean) || !defined(running_var)) {
    return batch_norm(input, std::nullopt, std::nullopt, weight, bias, true, 0.0, eps);
  }
  // No batch statistics: BatchNorm's empty output, the running statistics left as they are.
  if (input.sym_numel() == 0) return batch_norm(input, running_mean, running_var, weight, bias, true, momentum, eps);
  Tensor r, d, mean_b, sigma_b, sigma, old_mean;
  {
    const c10::AutoGradMode no_grad(false);  // r and d are constants of the backward
    std::tie(mean_b, sigma_b) = ops::handle<ops::batch_norm_stats>().call(input.detach());
    const c10::SymFloat count(input.sym_numel() / input.sym_size(1));
    sigma_b = (sigma_b.div(at::Scalar(count)) + eps).sqrt();
    old_mean = running_mean->detach().to(at::kDouble);
    sigma = (running_var->detach().to(at::kDouble) + eps).sqrt();
    const auto param_dtype = (defined(weight) ? *weight : defined(bias) ? *bias : *running_mean).scalar_type();
    r = (sigma_b / sigma).clamp(rmax.reciprocal(), rmax).to(param_dtype);
    d = ((mean_b - old_mean) / sigma).clamp(-dmax, dmax).to(param_dtype);
  }
  const Tensor scaled_weight = defined(weight) ? *weight * r : r;
  Tensor shifted_bias = defined(weight) ? *weight * d : d;
  if (defined(bias)) shifted_bias = shifted_bias + *bias;
  Tensor out = batch_norm(input, std::nullopt, std::nullopt, scaled_weight, shifted_bias, true, 0.0, eps);
  const c10::AutoGradMode no_grad(false);  // running statistics are buffers
  running_mean->copy_(old_mean + momentum * (mean_b - old_mean));
  const Tensor new_sigma = sigma + momentum * (sigma_b - sigma);
  running_var->copy_(new_sigma * new_sigma - eps);
  return out;
}

}  // namespace

Tensor batch_renorm(const Tensor& input, Optional running_mean, Optional running_var, Optional weight, Optional bias,
                    bool training, double momentum, double eps, double rmax, double dmax) {
  TORCH_CHECK_VALUE(!training || (rmax >= 1.0 && dmax >= 0.0),
                    "batch_renorm: rmax must be >= 1 and dmax >= 0, got rmax=", rmax, " and dmax=", dmax);
  const auto bound = [&](double value) { return at::scalar_tensor(value, input.options().dtype(at::kDouble)); };
  return batch_renorm_bounded(input, running_mean, running_var, weight, bias, training, momentum, eps, bound(rmax),
                              bound(dmax));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape,
                                                      Optional weight, Optional bias, double eps) {
  return ops::handle<ops::layer_norm_forward>().call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, bias,
                                                     eps);
}

std::tuple<Tensor, Tensor, Tensor> group_norm_forward(const Tensor& input, int64_t num_groups, Optional weight,
                                                      Optional bias, double eps,
                                                      const std::optional<std::string>& activation) {
  return ops::handle<ops::group_norm_forward>().call(input, num_groups, weight, bias, eps,
                     view_of(activation));
}

Tensor group_norm(const Tensor& input, int64_t num_groups, Optional weight, Optional bias, double eps,
                  const std::optional<std::string>& activation) {
  return std::get<0>(group_norm_forward(input, num_groups, weight, bias, eps, activation));
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward(const Tensor& grad_out, const Tensor& input, int64_t num_groups,
                                                       const Tensor& mean, const Tensor& rstd, Optional weight,
                                                       Optional bias, double eps,
                                                       const std::optional<std::string>& activation,
                                                       std::array<bool, 3> output_mask) {
  return ops::handle<ops::group_norm_backward>().call(grad_out, input, num_groups, mean, rstd, weight, bias, eps,
                                                      view_of(activation), output_mask);
}

Tensor instance_norm(const Tensor& input, Optional running_mean, Optional running_var, Optional weight, Optional bias,
                     bool use_input_stats, double momentum, double eps) {
  auto defined = [](Optional t) { return t.has_value() && t->defined(); };
  if (!use_input_stats) {
    TORCH_CHECK(defined(running_mean) && defined(running_var),
                "instance_norm: running_mean and running_var must be defined when use_input_stats is False");
    return batch_norm(input, running_mean, running_var, weight, bias, false, momentum, eps);
  }
  // torch.nn.functional.instance_norm's checks, in its order and words.
  // Sizes as SymInts: under torch.compile they may be symbolic.
  c10::SymInt spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.sym_size(d);
  TORCH_CHECK_VALUE(spatial != 1, "Expected more than 1 spatial element when training, got input size ",
                    input.sym_sizes());
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var),
                    "instance_norm: running_mean and running_var must either both be None or neither be None");
  // running_var is moved by 1 / rstd^2 - eps: NaN for these.
  TORCH_CHECK_VALUE(!defined(running_var) || (eps >= 0.0 && eps < std::numeric_limits<double>::infinity()),
                    "instance_norm eps must be non-negative and finite with running statistics, got ", eps);
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(!defined(*stat) || (*stat)->sym_numel() == input.sym_size(1), "instance_norm: ", name,
                " should have the input's channel count, input.size(1) = ", input.sym_size(1), " elements, got ",
                (*stat)->sym_numel());
  }
  // As torch's (BatchNorm of the empty input): an empty copy, running statistics unchanged.
  if (input.sym_numel() == 0) return input.clone();
  const int64_t channels = input.sym_size(1).guard_int(__FILE__, __LINE__);  // the parameters' size
  auto [out, mean, rstd] = group_norm_forward(input, channels, weight, bias, eps, std::nullopt);
  if (defined(running_mean)) {
    // torch's update: each sample's statistics move its own copy of the
    // running statistics by momentum; the copies are averaged over the batch.
    const c10::NoGradGuard no_grad;
    running_mean->copy_(
        running_mean->to(at::kDouble).mul(1 - momentum).add(mean.to(at::kDouble).mean(0).mul(momentum)));
    const c10::SymFloat unbias = c10::SymFloat(spatial) / c10::SymFloat(spatial - 1);  // spatial > 1 here
    const Tensor var = rstd.to(at::kDouble).pow(-2).sub(eps).mul(at::Scalar(unbias));
    running_var->copy_(running_var->to(at::kDouble).mul(1 - momentum).add(var.mean(0).mul(momentum)));
  }
  return out;
}

// The operators composed of others (ops.cpp): autograd, torch.compile and
// torch.export see the operators they call.
TORCH_LIBRARY_IMPL(bn_ext, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", static_cast<Tensor (*)(const Tensor&, Optional, Optional, Optional, Optional, bool,
                                               std::optional<double>, double, Optional)>(&batch_norm));
  m.impl("batch_norm_act", [](const Tensor& input, Optional running_mean, Optional running_var, Optional weight,
                              Optional bias, bool training, std::optional<double> momentum, double eps,
                              std::optional<c10::string_view> activation, Optional residual,
                              Optional num_batches_tracked) {
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          activation.has_value() ? std::optional<std::string>(*activation) : std::nullopt, residual,
                          num_batches_tracked);
  });
  m.impl("instance_norm", &instance_norm);
  m.impl("batch_renorm", &batch_renorm);
  m.impl("batch_renorm.bounds_tensors", &batch_renorm_bounded);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward(const Tensor& input, Optional weight, Optional bias,
                                                               double eps) {
  return ops::handle<ops::layer_norm_channels_forward>().call(input, weight, bias, eps);
}

Tensor layer_norm_channels(const Tensor& input, Optional weight, Optional bias, double eps) {
  return std::get<0>(layer_norm_channels_forward(input, weight, bias, eps));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward(const Tensor& grad_out, const Tensor& input,
                                                                const Tensor& mean, const Tensor& rstd,
                                                                Optional weight, Optional bias, double eps,
                                                                std::array<bool, 3> output_mask) {
  return ops::handle<ops::layer_norm_channels_backward>().call(grad_out, input, mean, rstd, weight, bias, eps,
                                                               output_mask);
}

Tensor layer_norm(const Tensor& input, at::IntArrayRef normalized_shape, Optional weight, Optional bias,
                  double eps) {
  return std::get<0>(layer_norm_forward(input, normalized_shape, weight, bias, eps));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       at::IntArrayRef normalized_shape, const Tensor& mean,
                                                       const Tensor& rstd, Optional weight, Optional bias, double eps,
                                                       std::array<bool, 3> output_mask) {
  return ops::handle<ops::layer_norm_backward>().call(grad_out, input, c10::fromIntArrayRefSlow(normalized_shape), mean,
                                                      rstd, weight, bias, eps, output_mask);
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape, Optional weight,
                                            std::optional<double> eps) {
  return ops::handle<ops::rms_norm_forward>().call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, eps);
}

Tensor rms_norm(const Tensor& input, at::IntArrayRef normalized_shape, Optional weight, std::optional<double> eps) {
  return std::get<0>(rms_norm_forward(input, normalized_shape, weight, eps));
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad_out, const Tensor& input,
                                             at::IntArrayRef normalized_shape, const Tensor& rstd, Optional weight,
                                             std::optional<double> eps, std::array<bool, 2> output_mask) {
  return ops::handle<ops::rms_norm_backward>().call(grad_out, input, c10::fromIntArrayRefSlow(normalized_shape), rstd,
                                                    weight, eps, output_mask);
}

std::tuple<Tensor, Tensor> fuse_conv_bn_weights(const Tensor& conv_weight, Optional conv_bias,
                                                const Tensor& running_mean, const Tensor& running_var, double eps,
                                                Optional bn_weight, Optional bn_bias, bool transposed,
                                                int64_t groups) {
  return ops::handle<ops::fuse_conv_bn_weights>().call(conv_weight, conv_bias, running_mean, running_var, eps,
                                                       bn_weight, bn_bias, transposed, groups);
}

std::tuple<Tensor, Tensor> fuse_linear_bn_weights(const Tensor& linear_weight, Optional linear_bias,
                                                  const Tensor& running_mean, const Tensor& running_var, double eps,
                                                  Optional bn_weight, Optional bn_bias) {
  return fuse_conv_bn_weights(linear_weight, linear_bias, running_mean, running_var, eps, bn_weight, bn_bias, false,
                              1);
}

}  // namespace bn_ext
