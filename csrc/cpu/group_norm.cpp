// GroupNorm's and LayerNorm-over-channels' CPU part (group_norm_ops.h holds
// the operators): per-channel values as float64 host arrays around the
// kernels of kernels/group_norm_kernel.cpp (channels-last LayerNorm over
// channels is LayerNorm over each position's contiguous row:
// kernels/row_norm_kernel.cpp).
#include "cpu/dispatch.h"
#include "cpu/host_values.h"
#include "cpu/output_memory.h"
#include "group_norm_ops.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

Tensor param_grad(bool asked, const std::vector<double>& values, at::ScalarType dtype, const Tensor& input) {
  return asked ? channel_tensor(values, dtype) : at::empty({0}, input.options().dtype(dtype));
}

Tensor param_grad(bool asked, const std::vector<double>& values, const std::optional<Tensor>& param,
                  const Tensor& input) {
  return param_grad(asked, values, has(param) ? param->scalar_type() : input.scalar_type(), input);
}

// Statistics of LayerNorm over channels: one per (n, position), shaped (N, 1, *).
std::vector<int64_t> channels_stat_shape(const Tensor& input) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[1] = 1;
  return shape;
}

// A channels-last input is LayerNorm over the contiguous channel rows of its
// positions; a channels-first one goes to the channels-first kernel.
bool channel_rows(const Tensor& x) { return group_norm_geometry(x, 1).channels_last; }

std::optional<Tensor> contiguous_or_none(const std::optional<Tensor>& t) {
  return has(t) ? std::optional(t->contiguous()) : std::nullopt;
}

struct GroupNormDevice {
  static Tensor empty_like(const Tensor& x) { return empty_output_like(x, at::MemoryFormat::Preserve); }

  static std::tuple<Tensor, Tensor> forward(const GroupNormForwardCall& a) {
    const GroupNormGeometry& g = a.g;
    std::vector<double> mean(g.N * g.G, 0.0), rstd(g.N * g.G, 0.0);
    const auto w = channel_values(a.weight, g.C, 1.0), b = channel_values(a.bias, g.C, 0.0);
    cpu_kernels().group_norm->forward(a.x, a.out, g, w.data(), b.data(), a.eps, a.act, mean.data(), rstd.data());
    const auto sdtype = stat_dtype(a.x.scalar_type());
    return {channel_tensor(mean, sdtype).view({g.N, g.G}), channel_tensor(rstd, sdtype).view({g.N, g.G})};
  }

  static std::tuple<Tensor, Tensor> backward(const GroupNormBackwardCall& a) {
    const GroupNormGeometry& g = a.g;
    const auto& mask = a.output_mask;
    std::vector<double> dweight(g.C, 0.0), dbias(g.C, 0.0);
    const auto m = channel_values(a.mean.contiguous().view(-1), g.N * g.G, 0.0);
    const auto r = channel_values(a.rstd.contiguous().view(-1), g.N * g.G, 1.0);
    const auto w = channel_values(a.weight, g.C, 1.0), b = channel_values(a.bias, g.C, 0.0);
    cpu_kernels().group_norm->backward(a.dy, a.x, a.dx, g, m.data(), r.data(), w.data(), b.data(), a.act,
                                       mask[1] || mask[2], dweight.data(), dbias.data());
    return {param_grad(mask[1], dweight, a.weight_dtype, a.x), param_grad(mask[2], dbias, a.bias_dtype, a.x)};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward(const Tensor& input,
                                                                        const std::optional<Tensor>& weight,
                                                                        const std::optional<Tensor>& bias, double eps) {
    const Tensor x = input.contiguous(group_norm_memory_format(input));
    Tensor out = empty_like(x);
    const auto stats_options = x.options().dtype(stat_dtype(x.scalar_type()));
    Tensor mean = at::empty(channels_stat_shape(x), stats_options);
    Tensor rstd = at::empty(channels_stat_shape(x), stats_options);
    if (mean.numel() == 0) return {out, mean, rstd};
    const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
    // No channel: each position's statistics are LayerNorm's of an empty row.
    if (x.size(1) == 0 || channel_rows(x)) {
      const RowGeometry rows{mean.numel(), x.size(1)};
      cpu_kernels().row_norm->layer_norm_forward(x, w, b, out, mean, rstd, rows, eps);
    } else {
      cpu_kernels().group_norm->layer_norm_channels_forward(x, w, b, out, mean, rstd, eps);
    }
    return {out, mean, rstd};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward(const Tensor& grad_out, const Tensor& input,
                                                                         const Tensor& mean, const Tensor& rstd,
                                                                         const std::optional<Tensor>& weight,
                                                                         const std::optional<Tensor>& bias,
                                                                         std::array<bool, 3> output_mask) {
    const int64_t C = input.size(1);
    const auto fmt = group_norm_memory_format(input);
    const Tensor x = input.contiguous(fmt), dy = grad_out.contiguous(fmt);
    const auto sdtype = stat_dtype(x.scalar_type());
    const Tensor m = mean.to(sdtype).contiguous(), r = rstd.to(sdtype).contiguous();
    Tensor dx = output_mask[0] ? empty_like(x) : at::empty({0}, x.options());
    std::vector<double> sums;
    if (x.numel() > 0) {
      const auto w = contiguous_or_none(weight);
      const bool param_grads = output_mask[1] || output_mask[2];
      const Tensor dx_or_none = output_mask[0] ? dx : Tensor();
      if (channel_rows(x)) {
        const RowGeometry rows{x.numel() / C, C};
        sums = cpu_kernels().row_norm->layer_norm_backward(dy, x, w, m, r, dx_or_none, rows, param_grads);
      } else {
        sums = cpu_kernels().group_norm->layer_norm_channels_backward(dy, x, w, m, r, dx_or_none, param_grads);
      }
    }
    if (sums.empty()) sums.assign(2 * C, 0.0);
    zero_single_value_rows(dx, C);
    const std::vector<double> dweight(sums.begin(), sums.begin() + C), dbias(sums.begin() + C, sums.end());
    return {dx, param_grad(output_mask[1], dweight, weight, x), param_grad(output_mask[2], dbias, bias, x)};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  GroupNormOps<GroupNormDevice>::bind([&](const char* name, auto function) { m.impl(name, function); });
}

}  // namespace bn_ext::cpu
