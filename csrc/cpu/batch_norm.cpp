// BatchNorm's CPU part (batch_norm_ops.h holds the operators): per-channel
// values as float64 host arrays around the kernels of
// kernels/batch_norm_forward_kernel.cpp and kernels/batch_norm_backward_kernel.cpp.
#include "batch_norm_ops.h"
#include "cpu/dispatch.h"
#include "cpu/host_values.h"
#include "cpu/output_memory.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

struct BatchNormDevice {
  static Tensor empty_like(const Tensor& x) { return empty_output_like(x, at::MemoryFormat::Preserve); }

  static std::tuple<Tensor, Tensor> forward(const BatchNormForwardCall& a) {
    const int64_t C = a.g.C;
    const auto w = channel_values(a.weight, C, 1.0);
    const auto b = channel_values(a.bias, C, 0.0);
    std::vector<double> mean(C), invstd(C);
    const auto& kernels = *cpu_kernels().batch_norm;
    if (a.training) {
      kernels.train_forward(a.x, a.residual, a.out, a.g, w.data(), b.data(), a.eps, a.act, mean.data(), invstd.data());
    } else {
      mean = channel_values(a.running_mean, C, 0.0);
      const auto var = channel_values(a.running_var, C, 1.0);
      for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + a.eps);
      if (a.x.numel() > 0) {
        kernels.affine_forward(a.x, a.residual, a.out, a.g, mean.data(), invstd.data(), w.data(), b.data(), a.act);
      }
    }
    const auto sdtype = stat_dtype(a.x.scalar_type());
    return {channel_tensor(mean, sdtype), channel_tensor(invstd, sdtype)};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const BatchNormBackwardCall& a) {
    const int64_t C = a.g.C;
    const auto& mask = a.output_mask;
    const auto mean = channel_values(a.save_mean, C, 0.0);
    const auto invstd = channel_values(a.save_invstd, C, 1.0);
    const auto w = channel_values(a.weight, C, 1.0);
    const auto b = channel_values(a.bias, C, 0.0);
    // With a residual the kernel stores the gradient of the sum, the
    // residual's, whenever any gradient is asked for: dx and the parameters'
    // gradients read it.
    const bool upstream = mask[0] || mask[1] || mask[2];
    const Tensor grad_residual = a.residual.defined() && (mask[3] || upstream) ? empty_like(a.x) : Tensor();
    std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
    if (a.x.numel() > 0 && (upstream || grad_residual.defined())) {
      cpu_kernels().batch_norm->backward(a.dy, a.x, a.residual, grad_residual, a.grad_input, a.g, mean.data(),
                                         invstd.data(), w.data(), b.data(), a.act, a.training, mask[1] || mask[2],
                                         sum_dy.data(), sum_dy_xmu.data());
    }
    auto param_grad = [&](bool asked, const std::vector<double>& values) {
      return asked ? channel_tensor(values, a.param_dtype) : at::empty({0}, a.x.options().dtype(a.param_dtype));
    };
    std::vector<double> gw(C);
    for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * invstd[c];
    return {param_grad(mask[1], gw), param_grad(mask[2], sum_dy),
            mask[3] && grad_residual.defined() ? grad_residual : at::empty({0}, a.x.options())};
  }

  static std::tuple<Tensor, Tensor> moments(const Tensor& x, const BatchNormGeometry& g) {
    std::vector<double> mean(g.C, 0.0), m2(g.C, 0.0);
    cpu_kernels().batch_norm->moments(x, g, mean.data(), m2.data());
    return {channel_tensor(mean, at::kDouble), channel_tensor(m2, at::kDouble)};
  }

  static void update_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                   const Tensor& save_mean, const Tensor& save_invstd, std::optional<double> momentum,
                                   const std::optional<Tensor>& num_batches_tracked, double eps, double unbias) {
    const double factor = momentum.has_value() ? *momentum : 1.0 / num_batches_tracked->item<double>();
    const int64_t C = save_mean.numel();
    const auto mean = channel_values(save_mean, C, 0.0);
    const auto invstd = channel_values(save_invstd, C, 1.0);
    auto update = [&](const Tensor& t, auto&& batch_value) {
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
};

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  BatchNormOps<BatchNormDevice>::bind([&](const char* name, auto function) { m.impl(name, function); });
}

}  // namespace bn_ext::cpu
