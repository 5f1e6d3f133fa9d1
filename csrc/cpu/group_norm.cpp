// GroupNorm and LayerNorm-over-channels operators on the CPU: argument
// checks, layouts, allocation and parameter-gradient tensors; the kernels are
// in kernels/group_norm_kernel.cpp (channels-last LayerNorm over channels is
// LayerNorm over each position's contiguous row: kernels/row_norm_kernel.cpp).
#include "cpu/dispatch.h"
#include "cpu/host_values.h"
#include "cpu/output_memory.h"
#include "group_norm_common.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

Tensor param_grad(bool asked, const std::vector<double>& values, const std::optional<Tensor>& param,
                  const Tensor& input) {
  const auto dtype = has(param) ? param->scalar_type() : input.scalar_type();
  return asked ? channel_tensor(values, dtype) : at::empty({0}, input.options().dtype(dtype));
}

std::tuple<Tensor, Tensor, Tensor> group_norm_forward_cpu(const Tensor& input, int64_t num_groups,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps,
                                                          std::optional<std::string_view> activation) {
  check_group_norm_forward_args(input, num_groups, weight, bias);
  const Activation act = parse_activation(activation, "group_norm");
  const Tensor x = input.contiguous(group_norm_memory_format(input));
  const GroupNormGeometry g = group_norm_geometry(x, num_groups);
  Tensor out = empty_output_like(x, at::MemoryFormat::Preserve);
  std::vector<double> mean(g.N * g.G, 0.0), rstd(g.N * g.G, 0.0);
  if (x.numel() > 0) {
    const auto w = channel_values(weight, g.C, 1.0), b = channel_values(bias, g.C, 0.0);
    cpu_kernels().group_norm->forward(x, out, g, w.data(), b.data(), eps, act, mean.data(), rstd.data());
  }
  const auto sdtype = stat_dtype(x.scalar_type());
  return {out, channel_tensor(mean, sdtype).view({g.N, g.G}), channel_tensor(rstd, sdtype).view({g.N, g.G})};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           int64_t num_groups, const Tensor& mean, const Tensor& rstd,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, double eps,
                                                           std::optional<std::string_view> activation,
                                                           std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  check_group_norm_args(input, num_groups, weight, bias);
  const Activation act = parse_activation(activation, "group_norm");
  const int64_t N = input.size(0), C = input.size(1);
  check_group_norm_backward_args("group_norm_backward", grad_out, input, mean, rstd, N * num_groups);
  const auto fmt = group_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt), dy = grad_out.contiguous(fmt);
  const GroupNormGeometry g = group_norm_geometry(x, num_groups);
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Preserve) : at::empty({0}, x.options());
  std::vector<double> dweight(C, 0.0), dbias(C, 0.0);
  if (x.numel() > 0) {
    const auto m = channel_values(mean.contiguous().view(-1), N * num_groups, 0.0);
    const auto r = channel_values(rstd.contiguous().view(-1), N * num_groups, 1.0);
    const auto w = channel_values(weight, C, 1.0), b = channel_values(bias, C, 0.0);
    cpu_kernels().group_norm->backward(dy, x, output_mask[0] ? dx : Tensor(), g, m.data(), r.data(), w.data(),
                                       b.data(), act, output_mask[1] || output_mask[2], dweight.data(),
                                       dbias.data());
  }
  return {dx, param_grad(output_mask[1], dweight, weight, x), param_grad(output_mask[2], dbias, bias, x)};
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

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward_cpu(const Tensor& input,
                                                                   const std::optional<Tensor>& weight,
                                                                   const std::optional<Tensor>& bias, double eps) {
  check_layer_norm_channels_args(input, weight, bias);
  const Tensor x = input.contiguous(group_norm_memory_format(input));
  Tensor out = empty_output_like(x, at::MemoryFormat::Preserve);
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

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  check_layer_norm_channels_args(input, weight, bias);
  const int64_t C = input.size(1);
  check_group_norm_backward_args("layer_norm_channels_backward", grad_out, input, mean, rstd,
                                 layer_norm_channels_stat_count(input));
  const auto fmt = group_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt), dy = grad_out.contiguous(fmt);
  const auto sdtype = stat_dtype(x.scalar_type());
  const Tensor m = mean.to(sdtype).contiguous(), r = rstd.to(sdtype).contiguous();
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Preserve) : at::empty({0}, x.options());
  std::vector<double> sums;
  if (x.numel() > 0) {
    const auto w = contiguous_or_none(weight);
    const bool param_grads = output_mask[1] || output_mask[2];
    if (channel_rows(x)) {
      const RowGeometry rows{x.numel() / C, C};
      sums = cpu_kernels().row_norm->layer_norm_backward(dy, x, w, m, r, output_mask[0] ? dx : Tensor(), rows,
                                                         param_grads);
    } else {
      sums = cpu_kernels().group_norm->layer_norm_channels_backward(dy, x, w, m, r, output_mask[0] ? dx : Tensor(),
                                                                    param_grads);
    }
  }
  if (sums.empty()) sums.assign(2 * C, 0.0);
  zero_single_value_rows(dx, C);
  const std::vector<double> dweight(sums.begin(), sums.begin() + C), dbias(sums.begin() + C, sums.end());
  return {dx, param_grad(output_mask[1], dweight, weight, x), param_grad(output_mask[2], dbias, bias, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("group_norm_forward", &group_norm_forward_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
  m.impl("layer_norm_channels_forward", &layer_norm_channels_forward_cpu);
  m.impl("layer_norm_channels_backward", &layer_norm_channels_backward_cpu);
}

}  // namespace bn_ext::cpu
