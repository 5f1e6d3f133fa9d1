// BatchNorm's CUDA part (batch_norm_ops.h holds the operators): launchers
// only; device code in kernels/batch_norm.cuh. Statistics and parameter
// gradients are computed in the op-math dtype.
#include "batch_norm_ops.h"
#include "cuda/channel_launch.h"

#include <ATen/ops/empty_like.h>

#include <type_traits>
#ifndef BN_EXT_CUDA_EMULATOR
#include <torch/library.h>
#endif

namespace bn_ext::cuda {

using at::Tensor;

namespace {

struct BatchNormDevice {
  static Tensor empty_like(const Tensor& x) { return at::empty_like(x); }

  static std::tuple<Tensor, Tensor> forward(const BatchNormForwardCall& a) {
    const DeviceGuard guard(a.x);
    const BatchNormGeometry& g = a.g;
    const auto acc = stat_dtype(a.x.scalar_type());
    const auto acc_options = a.x.options().dtype(acc);
    Tensor save_mean = at::empty({g.C}, acc_options), save_invstd = at::empty({g.C}, acc_options);
    Tensor coefficients = at::empty({kCoefficientCount * g.C}, acc_options);
    const auto w = as_acc(a.weight, acc), b = as_acc(a.bias, acc);
    dispatch_device_type(a.x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      if (a.training) {
        const ChannelShift<T> shift = channel_shift<T>(a.x, g);
        const TrainingForwardFinish<T> finish{shift,
                                              device_data_or_null<A>(w),
                                              device_data_or_null<A>(b),
                                              A(a.eps),
                                              device_data_mut<A>(save_mean),
                                              device_data_mut<A>(save_invstd),
                                              device_data_mut<A>(coefficients),
                                              g.C};
        reduce_channels<T>(MomentsReduction<T>{device_data<T>(a.x), nullptr, shift}, g, finish, acc_options);
      } else {
        const auto rm = as_acc(a.running_mean, acc), rv = as_acc(a.running_var, acc);
        map_channels(
            g.C, EvalForwardCoefficients<A>{device_data_or_null<A>(w), device_data_or_null<A>(b), device_data<A>(*rm),
                                            device_data<A>(*rv), A(a.eps), device_data_mut<A>(save_mean),
                                            device_data_mut<A>(save_invstd), device_data_mut<A>(coefficients), g.C});
      }
      with_activation(a.act, [&](auto activation) {
        with_residual(a.residual.defined(), [&](auto has_residual) {
          affine_pass<T, ActivatedAffine<T, decltype(activation), has_residual()>>(
              g, nullptr, device_data<T>(a.x), device_data_mut<T>(a.out), device_data<A>(coefficients), 1,
              has_residual() ? device_data<T>(a.residual) : nullptr);
        });
      });
    });
    return {save_mean, save_invstd};
  }

  // The backward of dz, the gradient of the pre-activation value z: dy itself
  // without activation and residual, else dy * act'(z) with z recomputed from
  // x, the residual and the saved statistics in both passes. dz is stored only
  // as the residual's gradient, which the dx pass then reads.
  static std::tuple<Tensor, Tensor, Tensor> backward(const BatchNormBackwardCall& a) {
    const DeviceGuard guard(a.x);
    const BatchNormGeometry& g = a.g;
    const auto& mask = a.output_mask;
    const int64_t C = g.C;
    const Tensor& x = a.x;
    const Tensor& res = a.residual;
    const auto acc = stat_dtype(x.scalar_type());
    const auto acc_options = x.options().dtype(acc);
    const bool wants_residual_grad = mask[3] && res.defined();
    Tensor grad_weight = at::empty({mask[1] ? C : 0}, acc_options);
    Tensor grad_bias = at::empty({mask[2] ? C : 0}, acc_options);
    Tensor grad_residual = wants_residual_grad ? at::empty_like(x) : at::empty({0}, x.options());
    const Tensor mean = a.save_mean.to(acc).contiguous(), invstd = a.save_invstd.to(acc).contiguous();
    const auto w = as_acc(a.weight, acc), b = as_acc(a.bias, acc);
    const bool through = a.act != Activation::kNone || res.defined();
    const bool need_sums = mask[1] || mask[2] || (a.training && mask[0]) || wants_residual_grad;
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      Tensor coefficients = at::empty({mask[0] ? kCoefficientCount * C : 0}, acc_options);
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
                                     a.training,
                                     mask[1] ? device_data_mut<A>(grad_weight) : nullptr,
                                     mask[2] ? device_data_mut<A>(grad_bias) : nullptr,
                                     mask[0] ? device_data_mut<A>(coefficients) : nullptr,
                                     C,
                                     through,
                                     device_data_or_null<A>(b)};
      with_activation(a.act, [&](auto activation) {
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
                GradSumsReduction<T, PerChannel<A>, Gradient>{
                    device_data<T>(x), device_data<T>(a.dy), {device_data<A>(mean)}, gradient},
                g, finish, acc_options);
          } else if (C > 0) {
            finish_without_reduction<Sums<A>>(C, finish);
          }
          if (!mask[0]) return;
          T* dx = device_data_mut<T>(a.grad_input);
          const A* k = device_data<A>(coefficients);
          if (kThrough && !wants_residual_grad) {
            affine_pass<T, AffineThroughActivation<T, Act, has_residual()>>(
                g, device_data<T>(a.dy), device_data<T>(x), dx, k, 1, has_residual() ? device_data<T>(res) : nullptr);
          } else {
            // dz is dy, or stored as the residual's gradient.
            const T* dz = wants_residual_grad ? device_data<T>(grad_residual) : device_data<T>(a.dy);
            if (a.training) {
              affine_pass<T, Affine<true, true>>(g, dz, device_data<T>(x), dx, k);
            } else {
              affine_pass<T, Affine<true, false>>(g, dz, nullptr, dx, k);
            }
          }
        });
      });
    });
    return {grad_weight.to(a.param_dtype), grad_bias.to(a.param_dtype), grad_residual};
  }

  static std::tuple<Tensor, Tensor> moments(const Tensor& x, const BatchNormGeometry& g) {
    const DeviceGuard guard(x);
    Tensor mean = at::zeros({g.C}, x.options().dtype(at::kDouble));
    Tensor m2 = at::zeros({g.C}, x.options().dtype(at::kDouble));
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const ChannelShift<T> shift = channel_shift<T>(x, g);
      reduce_channels<T>(MomentsReduction<T>{device_data<T>(x), nullptr, shift}, g,
                         MomentsFinish<T>{shift, device_data_mut<double>(mean), device_data_mut<double>(m2)},
                         x.options().dtype(stat_dtype(x.scalar_type())));
    });
    return {mean, m2};
  }

  // The update computed into new tensors, then copied into the buffers (of
  // any shape of C elements).
  static void update_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                   const Tensor& save_mean, const Tensor& save_invstd, std::optional<double> momentum,
                                   const std::optional<Tensor>& num_batches_tracked, double eps, double unbias) {
    const DeviceGuard guard(save_mean);
    const int64_t C = save_mean.numel();
    const auto acc = save_mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor mean = save_mean.to(acc).contiguous(), invstd = save_invstd.to(acc).contiguous();
    const auto old_mean = as_acc(running_mean, acc), old_var = as_acc(running_var, acc);
    const Tensor new_mean = at::empty({has(running_mean) ? C : 0}, mean.options());
    const Tensor new_var = at::empty({has(running_var) ? C : 0}, mean.options());
    const std::optional<Tensor> batches =
        momentum.has_value() ? std::nullopt : std::optional<Tensor>(num_batches_tracked->to(at::kLong));
    auto update = [&](auto tag) {
      using A = typename decltype(tag)::type;
      map_channels(C, RunningStatsUpdate<A>{
                          device_data<A>(mean), device_data<A>(invstd), device_data_or_null<A>(old_mean),
                          device_data_or_null<A>(old_var), device_data_mut<A>(new_mean), device_data_mut<A>(new_var),
                          momentum.value_or(0.0), device_data_or_null<int64_t>(batches), eps, unbias});
    };
    if (acc == at::kDouble) {
      update(TypeTag<double>{});
    } else {
      update(TypeTag<float>{});
    }
    if (has(running_mean)) running_mean->copy_(new_mean.view_as(*running_mean));
    if (has(running_var)) running_var->copy_(new_var.view_as(*running_var));
  }
};

}  // namespace

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  BatchNormOps<BatchNormDevice>::bind([&](const char* name, auto function) { m.impl(name, function); });
}
#endif

}  // namespace bn_ext::cuda
