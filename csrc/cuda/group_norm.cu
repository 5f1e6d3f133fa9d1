// GroupNorm and LayerNorm over channels on CUDA: launchers only; device code
// in kernels/group_norm.cuh (GroupNorm) and kernels/row_norm.cuh (LayerNorm
// over channels is LayerNorm over each position's C values). The same checks
// and output conventions as the CPU ops (group_norm_common.h).
#include "cuda/channel_launch.h"
#include "cuda/kernels/group_norm.cuh"
#include "cuda/row_norm.h"
#include "group_norm_common.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#ifndef BN_EXT_CUDA_EMULATOR
#include <torch/library.h>
#endif

#include <string_view>

namespace bn_ext::cuda {

using at::Tensor;

namespace {

template <typename T>
GroupFirst<T> group_first(const Tensor& x, const GroupNormGeometry& g) {
  const int64_t Cg = g.group_channels();
  return {device_data<T>(x), g.G, g.C * g.S, g.channels_last ? Cg : Cg * g.S};
}

// The (n, c) view of the elementwise passes and the per-channel reductions:
// channels-first (1, N*C, S); channels-last the N samples' rows.
BatchNormGeometry channel_view(const GroupNormGeometry& g) {
  return g.channels_last ? BatchNormGeometry{true, g.N, g.C, g.S} : BatchNormGeometry{false, 1, g.N * g.C, g.S};
}
int64_t view_samples(const GroupNormGeometry& g) { return g.channels_last ? g.N : 1; }

std::tuple<Tensor, Tensor, Tensor> group_norm_forward_cuda(const Tensor& input, int64_t num_groups,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, double eps,
                                                           std::optional<std::string_view> activation) {
  check_group_norm_forward_args(input, num_groups, weight, bias);
  const Activation act = parse_activation(activation, "group_norm");
  const DeviceGuard guard(input);
  const Tensor x = input.contiguous(group_norm_memory_format(input));
  const GroupNormGeometry g = group_norm_geometry(x, num_groups);
  Tensor out = at::empty_like(x);
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  Tensor mean = at::zeros({g.N, g.G}, acc_options), rstd = at::zeros({g.N, g.G}, acc_options);
  if (x.numel() == 0) return {out, mean, rstd};
  const int64_t Cg = g.group_channels(), entries = g.N * g.C;
  Tensor coefficients = at::empty({kCoefficientCount * entries}, acc_options);
  const auto w = as_acc(weight, acc), b = as_acc(bias, acc);
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const GroupFirst<T> first = group_first<T>(x, g);
    const GroupForwardFinish<T> finish{first, device_data_or_null<A>(w), device_data_or_null<A>(b), A(eps),
                                       device_data_mut<A>(mean), device_data_mut<A>(rstd),
                                       device_data_mut<A>(coefficients), Cg, entries};
    if (g.channels_last) {
      // Per-(n, c) states about the group's first value, then C/G a group merged.
      Tensor states = at::empty({entries * 3}, acc_options);
      reduce_channels<T>(MomentsReduction<T, DomainGroupShift<T>>{device_data<T>(x), nullptr, {first, Cg}},
                         channel_view(g), StoreState<Moments<A>>{device_data_mut<Moments<A>>(states)}, acc_options,
                         g.N);
      finalize_domains(device_data<Moments<A>>(states), g.N * g.G, static_cast<int>(Cg), finish);
    } else {
      const BatchNormGeometry groups{false, 1, g.N * g.G, Cg * g.S};
      reduce_channels<T>(MomentsReduction<T>{device_data<T>(x), nullptr, ChannelShift<T>{device_data<T>(x), Cg * g.S}},
                         groups, finish, acc_options);
    }
    with_activation(act, [&](auto activation) {
      affine_pass<T, ActivatedAffine<T, decltype(activation)>>(channel_view(g), nullptr, device_data<T>(x),
                                                            device_data_mut<T>(out), device_data<A>(coefficients),
                                                            view_samples(g));
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                            int64_t num_groups, const Tensor& save_mean,
                                                            const Tensor& save_rstd,
                                                            const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, double eps,
                                                            std::optional<std::string_view> activation,
                                                            std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernels
  check_group_norm_args(input, num_groups, weight, bias);
  const Activation act = parse_activation(activation, "group_norm");
  const int64_t N = input.size(0), C = input.size(1);
  check_group_norm_backward_args("group_norm_backward", grad_out, input, save_mean, save_rstd, N * num_groups);
  const DeviceGuard guard(input);
  const auto fmt = group_norm_memory_format(input);
  const Tensor x = input.contiguous(fmt), dy = grad_out.contiguous(fmt);
  const GroupNormGeometry g = group_norm_geometry(x, num_groups);
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  const auto weight_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  const auto bias_dtype = has(bias) ? bias->scalar_type() : input.scalar_type();
  Tensor dx = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor grad_weight = at::zeros({output_mask[1] ? C : 0}, acc_options);
  Tensor grad_bias = at::zeros({output_mask[2] ? C : 0}, acc_options);
  if (x.numel() > 0) {
    const int64_t Cg = g.group_channels(), entries = g.N * g.C;
    const Tensor mean = save_mean.to(acc).contiguous(), rstd = save_rstd.to(acc).contiguous();
    const auto w = as_acc(weight, acc), b = as_acc(bias, acc);
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const BatchNormGeometry view = channel_view(g);
      const T* pdy = device_data<T>(dy);
      // Through an activation: dy * act'(z), z recomputed from the statistics.
      Tensor through;
      if (act != Activation::kNone) {
        Tensor forward_coefficients = at::empty({kCoefficientCount * entries}, acc_options);
        map_channels(g.N * g.G, GroupCoefficientsFromStats<A>{device_data<A>(mean), device_data<A>(rstd),
                                                              device_data_or_null<A>(w), device_data_or_null<A>(b),
                                                              device_data_mut<A>(forward_coefficients), g.G, Cg,
                                                              entries});
        through = at::empty_like(x);
        with_activation(act, [&](auto activation) {
          affine_pass<T, ActivationGradient<T, decltype(activation)>>(view, pdy, device_data<T>(x),
                                                                   device_data_mut<T>(through),
                                                                   device_data<A>(forward_coefficients),
                                                                   view_samples(g));
        });
        pdy = device_data<T>(through);
      }
      Tensor raw = at::empty({entries * 2}, acc_options), weighted = at::empty({entries * 2}, acc_options);
      reduce_channels<T>(GradSumsReduction<T, PerGroup<A>>{device_data<T>(x), pdy, {device_data<A>(mean), Cg}}, view,
                         ChannelGradSumsFinish<A>{device_data_or_null<A>(w), g.C, device_data_mut<Sums<A>>(raw),
                                                  device_data_mut<Sums<A>>(weighted)},
                         acc_options, view_samples(g));
      if (output_mask[1] || output_mask[2]) {
        map_channels(g.C, GroupParamGrads<A>{device_data<Sums<A>>(raw), device_data<A>(rstd), g.N, g.C, Cg,
                                             output_mask[1] ? device_data_mut<A>(grad_weight) : nullptr,
                                             output_mask[2] ? device_data_mut<A>(grad_bias) : nullptr});
      }
      if (output_mask[0]) {
        Tensor coefficients = at::empty({kCoefficientCount * entries}, acc_options);
        finalize_domains(device_data<Sums<A>>(weighted), g.N * g.G, static_cast<int>(Cg),
                         GroupBackwardFinish<A>{device_data_or_null<A>(w), device_data<A>(mean), device_data<A>(rstd),
                                                A(Cg * g.S), device_data_mut<A>(coefficients), g.G, Cg, entries});
        affine_pass<T, Affine<true, true>>(view, pdy, device_data<T>(x), device_data_mut<T>(dx),
                                           device_data<A>(coefficients), view_samples(g));
      }
    });
  }
  return {dx, grad_weight.to(weight_dtype), grad_bias.to(bias_dtype)};
}

// LayerNorm over channels is LayerNorm over the last dim of the input with
// its channel dim moved last: a view for channels-last inputs, a copy otherwise.
Tensor channels_last_rows(const Tensor& t) { return t.movedim(1, -1).contiguous(); }

// A result over the moved layout back to the input's shape and memory format.
Tensor channels_first(const Tensor& rows, const Tensor& input) {
  return rows.movedim(-1, 1).contiguous(group_norm_memory_format(input));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward_cuda(const Tensor& input,
                                                                    const std::optional<Tensor>& weight,
                                                                    const std::optional<Tensor>& bias, double eps) {
  check_layer_norm_channels_args(input, weight, bias);
  const DeviceGuard guard(input);
  const int64_t C = input.size(1);
  auto [out, mean, rstd] = layer_norm_forward_cuda(channels_last_rows(input), {C}, weight, bias, eps);
  // (N, *, 1) in position order is (N, 1, *) in its own.
  auto stat_shape = input.sizes().vec();
  stat_shape[1] = 1;
  return {channels_first(out, input), mean.view(stat_shape), rstd.view(stat_shape)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    std::array<bool, 3> output_mask) {
  check_layer_norm_channels_args(input, weight, bias);
  const int64_t C = input.size(1);
  check_group_norm_backward_args("layer_norm_channels_backward", grad_out, input, mean, rstd,
                                 layer_norm_channels_stat_count(input));
  const DeviceGuard guard(input);
  auto stat_shape = input.sizes().vec();
  stat_shape[1] = 1;
  auto [dx, dweight, dbias] = layer_norm_backward_cuda(
      channels_last_rows(grad_out), channels_last_rows(input), {C}, channels_last_rows(mean.reshape(stat_shape)),
      channels_last_rows(rstd.reshape(stat_shape)), weight, bias, eps, output_mask);
  return {output_mask[0] ? channels_first(dx, input) : dx, dweight, dbias};
}

}  // namespace

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  m.impl("group_norm_forward", &group_norm_forward_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
  m.impl("layer_norm_channels_forward", &layer_norm_channels_forward_cuda);
  m.impl("layer_norm_channels_backward", &layer_norm_channels_backward_cuda);
}
#endif

}  // namespace bn_ext::cuda
