// BatchNorm on CUDA: launchers only; device code in kernels/batch_norm.cuh.
// The same argument checks and output conventions as the CPU op
// (batch_norm_common.h): statistics in the op-math dtype, outputs in the
// input's memory format, gradients not asked for as empty tensors.
#include "batch_norm_common.h"
#include "cuda/channel_launch.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <string_view>
#include <type_traits>
#ifndef BN_EXT_CUDA_EMULATOR
#include <torch/library.h>
#endif

namespace bn_ext::cuda {

using at::Tensor;

namespace {

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    std::optional<std::string_view> activation, const std::optional<Tensor>& residual) {
  check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
  check_batch_norm_forward_args(input, training, eps);
  check_residual(residual, input);
  const Activation act = parse_activation(activation, "batch_norm_act");
  const DeviceGuard guard(input);
  const auto fmt = batch_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor res = has(residual) ? residual->contiguous(fmt) : Tensor();
  const BatchNormGeometry g = batch_norm_geometry(x);
  Tensor out = at::empty_like(x);
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  if (x.numel() == 0 && training) return {out, at::zeros({g.C}, acc_options), at::zeros({g.C}, acc_options)};
  Tensor save_mean = at::empty({g.C}, acc_options), save_invstd = at::empty({g.C}, acc_options);
  Tensor coefficients = at::empty({kCoefficientCount * g.C}, acc_options);
  const auto w = as_acc(weight, acc), b = as_acc(bias, acc);
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (training) {
      const ChannelShift<T> shift = channel_shift<T>(x, g);
      const TrainingForwardFinish<T> finish{shift,
                                            device_data_or_null<A>(w),
                                            device_data_or_null<A>(b),
                                            A(eps),
                                            device_data_mut<A>(save_mean),
                                            device_data_mut<A>(save_invstd),
                                            device_data_mut<A>(coefficients),
                                            g.C};
      reduce_channels<T>(MomentsReduction<T>{device_data<T>(x), nullptr, shift}, g, finish, acc_options);
    } else {
      const auto rm = as_acc(running_mean, acc), rv = as_acc(running_var, acc);
      map_channels(g.C, EvalForwardCoefficients<A>{device_data_or_null<A>(w), device_data_or_null<A>(b),
                                                   device_data<A>(*rm), device_data<A>(*rv), A(eps),
                                                   device_data_mut<A>(save_mean), device_data_mut<A>(save_invstd),
                                                   device_data_mut<A>(coefficients), g.C});
    }
    with_activation(act, [&](auto activation) {
      with_residual(res.defined(), [&](auto has_residual) {
        affine_pass<T, ActivatedAffine<T, decltype(activation), has_residual()>>(
            g, nullptr, device_data<T>(x), device_data_mut<T>(out), device_data<A>(coefficients), 1,
            has_residual() ? device_data<T>(res) : nullptr);
      });
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias,
                                                           const std::optional<Tensor>& running_mean,
                                                           const std::optional<Tensor>& running_var, bool training,
                                                           double eps) {
  return batch_norm_act_forward_cuda(input, weight, bias, running_mean, running_var, training, eps, std::nullopt,
                                     std::nullopt);
}

// BatchNorm's backward of dz, the gradient of the pre-activation value z:
// dy itself without activation and residual, else dy * act'(z) with z
// recomputed from x, the residual and the saved statistics in both passes.
// dz is stored only as the residual's gradient, which the dx pass then reads.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cuda(
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
  const DeviceGuard guard(input);
  const auto fmt = batch_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt), dy = grad_out.contiguous(fmt);
  const Tensor res = has(residual) ? residual->contiguous(fmt) : Tensor();
  const BatchNormGeometry g = batch_norm_geometry(x);
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  const auto param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  const bool wants_residual_grad = output_mask[3] && res.defined();
  Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor grad_weight = at::empty({output_mask[1] ? C : 0}, acc_options);
  Tensor grad_bias = at::empty({output_mask[2] ? C : 0}, acc_options);
  Tensor grad_residual = wants_residual_grad ? at::empty_like(x) : at::empty({0}, input.options());
  const Tensor mean = save_mean.to(acc).contiguous(), invstd = save_invstd.to(acc).contiguous();
  const auto w = as_acc(weight, acc), b = as_acc(bias, acc);
  const bool through = act != Activation::kNone || res.defined();
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]) || wants_residual_grad;
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    Tensor coefficients = at::empty({output_mask[0] ? kCoefficientCount * C : 0}, acc_options);
    Tensor forward = at::empty({through ? kCoefficientCount * C : 0}, acc_options);
    if (through) {
      map_channels(C, ForwardCoefficientsFromStats<A>{device_data_or_null<A>(w), device_data_or_null<A>(b),
                                                      device_data<A>(mean), device_data<A>(invstd),
                                                      device_data_mut<A>(forward), C});
    }
    const BackwardFinish<A> finish{device_data_or_null<A>(w),
                                   device_data<A>(mean),
                                   device_data<A>(invstd),
                                   A(g.reduce_size()),
                                   training,
                                   output_mask[1] ? device_data_mut<A>(grad_weight) : nullptr,
                                   output_mask[2] ? device_data_mut<A>(grad_bias) : nullptr,
                                   output_mask[0] ? device_data_mut<A>(coefficients) : nullptr,
                                   C,
                                   through,
                                   device_data_or_null<A>(b)};
    with_activation(act, [&](auto activation) {
      with_residual(res.defined(), [&](auto has_residual) {
        using Act = decltype(activation);
        constexpr bool kThrough = !std::is_same_v<Act, NoActivation> || has_residual();
        using Gradient = std::conditional_t<kThrough, GradientThrough<T, Act, has_residual()>, PlainGradient>;
        Gradient gradient{};
        if constexpr (kThrough) {
          gradient = {has_residual() ? device_data<T>(res) : nullptr,
                      wants_residual_grad ? device_data_mut<T>(grad_residual) : nullptr, device_data<A>(forward), C};
        }
        if (need_sums && x.numel() > 0) {
          reduce_channels<T>(
              GradSumsReduction<T, PerChannel<A>, Gradient>{device_data<T>(x), device_data<T>(dy), {device_data<A>(mean)},
                                                            gradient},
              g, finish, acc_options);
        } else if (C > 0) {
          finish_without_reduction<Sums<A>>(C, finish);
        }
        if (!output_mask[0]) return;
        T* dx = device_data_mut<T>(grad_input);
        const A* k = device_data<A>(coefficients);
        if (kThrough && !wants_residual_grad) {
          affine_pass<T, AffineThroughActivation<T, Act, has_residual()>>(g, device_data<T>(dy), device_data<T>(x), dx,
                                                                         k, 1, has_residual() ? device_data<T>(res) : nullptr);
        } else {
          // dz is dy, or stored as the residual's gradient.
          const T* dz = wants_residual_grad ? device_data<T>(grad_residual) : device_data<T>(dy);
          if (training) {
            affine_pass<T, Affine<true, true>>(g, dz, device_data<T>(x), dx, k);
          } else {
            affine_pass<T, Affine<true, false>>(g, dz, nullptr, dx, k);
          }
        }
      });
    });
  });
  return {grad_input, grad_weight.to(param_dtype), grad_bias.to(param_dtype), grad_residual};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                            const std::optional<Tensor>& weight,
                                                            const Tensor& save_mean, const Tensor& save_invstd,
                                                            bool training, double eps,
                                                            std::array<bool, 3> output_mask) {
  auto [grad_input, grad_weight, grad_bias, grad_residual] =
      batch_norm_act_backward_cuda(grad_out, input, std::nullopt, weight, std::nullopt, save_mean, save_invstd,
                                   training, eps, std::nullopt, {output_mask[0], output_mask[1], output_mask[2], false});
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input) {
  check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  const DeviceGuard guard(input);
  const Tensor x = input.contiguous(batch_norm_memory_format(input));
  const BatchNormGeometry g = batch_norm_geometry(x);
  Tensor mean = at::zeros({g.C}, x.options().dtype(at::kDouble));
  Tensor m2 = at::zeros({g.C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return {mean, m2};
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ChannelShift<T> shift = channel_shift<T>(x, g);
    reduce_channels<T>(MomentsReduction<T>{device_data<T>(x), nullptr, shift}, g,
                       MomentsFinish<T>{shift, device_data_mut<double>(mean), device_data_mut<double>(m2)},
                       x.options().dtype(stat_dtype(x.scalar_type())));
  });
  return {mean, m2};
}

void batch_norm_update_stats_cuda(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                  const Tensor& save_mean, const Tensor& save_invstd, std::optional<double> momentum,
                                  const std::optional<Tensor>& num_batches_tracked, double eps, int64_t count) {
  TORCH_CHECK(momentum.has_value() || has(num_batches_tracked),
              "batch_norm_update_stats: num_batches_tracked is required when momentum is None");
  const int64_t C = save_mean.numel();
  for (const auto* t : {&running_mean, &running_var}) {
    if (has(*t)) {
      TORCH_CHECK((*t)->numel() == C, "batch_norm_update_stats: running statistics should contain ", C,
                  " elements not ", (*t)->numel());
    }
  }
  if (C == 0 || (!has(running_mean) && !has(running_var))) return;
  const DeviceGuard guard(save_mean);
  const auto acc = save_mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor mean = save_mean.to(acc).contiguous(), invstd = save_invstd.to(acc).contiguous();
  const auto old_mean = as_acc(running_mean, acc), old_var = as_acc(running_var, acc);
  const Tensor new_mean = at::empty({has(running_mean) ? C : 0}, mean.options());
  const Tensor new_var = at::empty({has(running_var) ? C : 0}, mean.options());
  const std::optional<Tensor> batches =
      momentum.has_value() ? std::nullopt : std::optional<Tensor>(num_batches_tracked->to(at::kLong));
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  auto update = [&](auto tag) {
    using A = typename decltype(tag)::type;
    map_channels(C, RunningStatsUpdate<A>{device_data<A>(mean), device_data<A>(invstd),
                                          device_data_or_null<A>(old_mean), device_data_or_null<A>(old_var),
                                          device_data_mut<A>(new_mean), device_data_mut<A>(new_var),
                                          momentum.value_or(0.0), device_data_or_null<int64_t>(batches), eps,
                                          unbias});
  };
  if (acc == at::kDouble) {
    update(TypeTag<double>{});
  } else {
    update(TypeTag<float>{});
  }
  if (has(running_mean)) running_mean->copy_(new_mean.view_as(*running_mean));
  if (has(running_var)) running_var->copy_(new_var.view_as(*running_var));
}

}  // namespace

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
}
#endif

}  // namespace bn_ext::cuda
