// GroupNorm's and LayerNorm-over-channels' CUDA part (group_norm_ops.h holds
// the operators): launchers only; device code in kernels/group_norm.cuh
// (GroupNorm) and kernels/row_norm.cuh (LayerNorm over channels is LayerNorm
// over each position's C values).
#include "cuda/channel_launch.h"
#include "cuda/kernels/group_norm.cuh"
#include "cuda/row_norm.h"
#include "group_norm_ops.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#ifndef BN_EXT_CUDA_EMULATOR
#include <torch/library.h>
#endif

#include <vector>

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

// LayerNorm over channels is LayerNorm over the last dim of the input with
// its channel dim moved last: a view for channels-last inputs, a copy otherwise.
Tensor channels_last_rows(const Tensor& t) { return t.movedim(1, -1).contiguous(); }

// A result over the moved layout back to the input's shape and memory format.
Tensor channels_first(const Tensor& rows, const Tensor& input) {
  return rows.movedim(-1, 1).contiguous(group_norm_memory_format(input));
}

// Statistics of LayerNorm over channels: (N, *, 1) in position order is (N, 1, *) in its own.
std::vector<int64_t> channels_stat_shape(const Tensor& input) {
  auto shape = input.sizes().vec();
  shape[1] = 1;
  return shape;
}

struct GroupNormDevice {
  static Tensor empty_like(const Tensor& x) { return at::empty_like(x); }

  static std::tuple<Tensor, Tensor> forward(const GroupNormForwardCall& a) {
    const DeviceGuard guard(a.x);
    const Tensor& x = a.x;
    const GroupNormGeometry& g = a.g;
    const auto acc = stat_dtype(x.scalar_type());
    const auto acc_options = x.options().dtype(acc);
    Tensor mean = at::empty({g.N, g.G}, acc_options), rstd = at::empty({g.N, g.G}, acc_options);
    const int64_t Cg = g.group_channels(), entries = g.N * g.C;
    Tensor coefficients = at::empty({kCoefficientCount * entries}, acc_options);
    const auto w = as_acc(a.weight, acc), b = as_acc(a.bias, acc);
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const GroupFirst<T> first = group_first<T>(x, g);
      const GroupForwardFinish<T> finish{first,
                                         device_data_or_null<A>(w),
                                         device_data_or_null<A>(b),
                                         A(a.eps),
                                         device_data_mut<A>(mean),
                                         device_data_mut<A>(rstd),
                                         device_data_mut<A>(coefficients),
                                         Cg,
                                         entries};
      if (g.channels_last) {
        // Per-(n, c) states about the group's first value, then C/G a group merged.
        Tensor states = at::empty({entries * 3}, acc_options);
        reduce_channels<T>(MomentsReduction<T, DomainGroupShift<T>>{device_data<T>(x), nullptr, {first, Cg}},
                           channel_view(g), StoreState<Moments<A>>{device_data_mut<Moments<A>>(states)}, acc_options,
                           g.N);
        finalize_domains(device_data<Moments<A>>(states), g.N * g.G, static_cast<int>(Cg), finish);
      } else {
        const BatchNormGeometry groups{false, 1, g.N * g.G, Cg * g.S};
        reduce_channels<T>(
            MomentsReduction<T>{device_data<T>(x), nullptr, ChannelShift<T>{device_data<T>(x), Cg * g.S}}, groups,
            finish, acc_options);
      }
      with_activation(a.act, [&](auto activation) {
        affine_pass<T, ActivatedAffine<T, decltype(activation)>>(channel_view(g), nullptr, device_data<T>(x),
                                                                 device_data_mut<T>(a.out),
                                                                 device_data<A>(coefficients), view_samples(g));
      });
    });
    return {mean, rstd};
  }

  static std::tuple<Tensor, Tensor> backward(const GroupNormBackwardCall& a) {
    const DeviceGuard guard(a.x);
    const Tensor& x = a.x;
    const GroupNormGeometry& g = a.g;
    const auto& mask = a.output_mask;
    const auto acc = stat_dtype(x.scalar_type());
    const auto acc_options = x.options().dtype(acc);
    Tensor grad_weight = at::zeros({mask[1] ? g.C : 0}, acc_options);
    Tensor grad_bias = at::zeros({mask[2] ? g.C : 0}, acc_options);
    const int64_t Cg = g.group_channels(), entries = g.N * g.C;
    const Tensor mean = a.mean.to(acc).contiguous(), rstd = a.rstd.to(acc).contiguous();
    const auto w = as_acc(a.weight, acc), b = as_acc(a.bias, acc);
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const BatchNormGeometry view = channel_view(g);
      const T* pdy = device_data<T>(a.dy);
      // Through an activation: dy * act'(z), z recomputed from the statistics.
      Tensor through;
      if (a.act != Activation::kNone) {
        Tensor forward_coefficients = at::empty({kCoefficientCount * entries}, acc_options);
        map_channels(g.N * g.G,
                     GroupCoefficientsFromStats<A>{device_data<A>(mean), device_data<A>(rstd),
                                                   device_data_or_null<A>(w), device_data_or_null<A>(b),
                                                   device_data_mut<A>(forward_coefficients), g.G, Cg, entries});
        through = at::empty_like(x);
        with_activation(a.act, [&](auto activation) {
          affine_pass<T, ActivationGradient<T, decltype(activation)>>(
              view, pdy, device_data<T>(x), device_data_mut<T>(through), device_data<A>(forward_coefficients),
              view_samples(g));
        });
        pdy = device_data<T>(through);
      }
      Tensor raw = at::empty({entries * 2}, acc_options), weighted = at::empty({entries * 2}, acc_options);
      reduce_channels<T>(GradSumsReduction<T, PerGroup<A>>{device_data<T>(x), pdy, {device_data<A>(mean), Cg}}, view,
                         ChannelGradSumsFinish<A>{device_data_or_null<A>(w), g.C, device_data_mut<Sums<A>>(raw),
                                                  device_data_mut<Sums<A>>(weighted)},
                         acc_options, view_samples(g));
      if (mask[1] || mask[2]) {
        map_channels(g.C, GroupParamGrads<A>{device_data<Sums<A>>(raw), device_data<A>(rstd), g.N, g.C, Cg,
                                             mask[1] ? device_data_mut<A>(grad_weight) : nullptr,
                                             mask[2] ? device_data_mut<A>(grad_bias) : nullptr});
      }
      if (mask[0]) {
        Tensor coefficients = at::empty({kCoefficientCount * entries}, acc_options);
        finalize_domains(device_data<Sums<A>>(weighted), g.N * g.G, static_cast<int>(Cg),
                         GroupBackwardFinish<A>{device_data_or_null<A>(w), device_data<A>(mean), device_data<A>(rstd),
                                                A(Cg * g.S), device_data_mut<A>(coefficients), g.G, Cg, entries});
        affine_pass<T, Affine<true, true>>(view, pdy, device_data<T>(x), device_data_mut<T>(a.dx),
                                           device_data<A>(coefficients), view_samples(g));
      }
    });
    return {grad_weight.to(a.weight_dtype), grad_bias.to(a.bias_dtype)};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward(const Tensor& input,
                                                                        const std::optional<Tensor>& weight,
                                                                        const std::optional<Tensor>& bias, double eps) {
    const DeviceGuard guard(input);
    auto [out, mean, rstd] =
        RowNormCudaOps::layer_norm_forward(channels_last_rows(input), {input.size(1)}, weight, bias, eps);
    return {channels_first(out, input), mean.view(channels_stat_shape(input)), rstd.view(channels_stat_shape(input))};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward(const Tensor& grad_out, const Tensor& input,
                                                                         const Tensor& mean, const Tensor& rstd,
                                                                         const std::optional<Tensor>& weight,
                                                                         const std::optional<Tensor>& bias,
                                                                         std::array<bool, 3> output_mask) {
    const DeviceGuard guard(input);
    const auto shape = channels_stat_shape(input);
    auto [dx, dweight, dbias] =
        RowNormCudaOps::layer_norm_backward(channels_last_rows(grad_out), channels_last_rows(input), {input.size(1)},
                                            channels_last_rows(mean.reshape(shape)),
                                            channels_last_rows(rstd.reshape(shape)), weight, bias, 0.0, output_mask);
    return {output_mask[0] ? channels_first(dx, input) : dx, dweight, dbias};
  }
};

}  // namespace

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  GroupNormOps<GroupNormDevice>::bind([&](const char* name, auto function) { m.impl(name, function); });
}
#endif

}  // namespace bn_ext::cuda
