// BatchNorm CPU kernel, backward, built once per SIMD level (cpu/dispatch.h):
// the gradient sums and dx, through an activation and a residual when the
// forward had them, in both memory layouts (see batch_norm_forward_kernel.cpp).
#include "cpu/kernels/batch_norm_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>

namespace bn_ext::cpu::CPU_CAPABILITY {

using at::Tensor;

namespace {

// Backward coefficients of channel c: dx = dy * dy_scale + (x - center) * x_scale + constant,
// from sum(dy) and sum(dy * (x - mean)) over the channel's M values.
//   training: dx = dy_scale * (dy - sum(dy)/M - (x - mean) * invstd^2 * sum(dy (x - mean))/M)
//   eval:     dx = dy_scale * dy
template <typename T>
inline void set_backward_coefficients(ChannelCoefficients<T>& k, int64_t c, double mean, double invstd, double w,
                                      double sum_dy, double sum_dy_xmu, double M, bool training) {
  using Op = opmath_t<T>;
  const double dy_scale = w * invstd;
  k.dy_scale[c] = static_cast<Op>(dy_scale);
  if (training) {
    const double proj = invstd * invstd * sum_dy_xmu / M;
    k.x_scale[c] = static_cast<Op>(-dy_scale * proj);
    k.constant[c] = static_cast<Op>(dy_scale * (proj * (mean - static_cast<double>(k.center[c])) - sum_dy / M));
  }
}


// dx, and the sums when asked, of the gradient dz = dy * act'(z) of the
// pre-activation value z. Without a residual z is recomputed from x and dz
// is never stored (dz = dy for NoActivation); with one, dz is the residual's
// gradient, stored to dres by the pass that takes the sums.
template <typename T, typename Act, bool kResidual>
void backward_kernel(const T* pdy, const T* px, const T* residual, T* pdres, T* pdx, const BatchNormGeometry& g,
                     const double* mean, const double* invstd, const double* w, const double* b, bool training,
                     bool need_sums, double* sum_dy, double* sum_dy_xmu) {
  using Op = opmath_t<T>;
  constexpr bool kThrough = !kResidual && !std::is_same_v<Act, NoActivation>;
  const double M = static_cast<double>(g.reduce_size());
  ChannelCoefficients<T> k(g.C);
  // The forward's scale (weight * invstd, also the backward's dy_scale) and
  // shift (used with an activation or a residual; O(C) to set up).
  const ChannelCoefficients<T> forward = forward_coefficients<T>(g, mean, invstd, w, b);
  // The sums are taken about the mean rounded to op-math (about zero they
  // lost a digit of grad_weight); the dx pass takes the forward's center
  // (zero where it folded the mean), from which the gradient through an
  // activation recomputes the forward's z exactly.
  auto sums_center = column_array<Op>(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    sums_center[c] = static_cast<Op>(mean[c]);
    k.center[c] = forward.center[c];
    if constexpr (kThrough) k.shift[c] = forward.constant[c];
  }
  // Centers all zero (means folded, see set_forward_coefficients) or not.
  const bool centered = k.centered();
  // fn(gradient, training form, eval form) of this centering.
  auto with_forms = [&](const auto& fn) {
    auto call = [&](auto is_centered) {
      constexpr bool kCentered = is_centered();
      if constexpr (kResidual) {
        fn(GradientThroughResidual<T, Act>{&forward, pdy, px, residual, pdres}, Affine<true, true, kCentered>{},
           Affine<true, false>{});
      } else if constexpr (kThrough) {
        fn(GradientThrough<T, Act, kCentered>{forward.x_scale.data(), forward.constant.data(), forward.center.data()},
           AffineThrough<T, Act, true, kCentered>{}, AffineThrough<T, Act, false, kCentered>{});
      } else {
        fn(PlainGradient<T>{}, Affine<true, true, kCentered>{}, Affine<true, false>{});
      }
    };
    if (centered) {
      call(std::true_type{});
    } else {
      call(std::false_type{});
    }
  };
  // What the dx pass reads as the gradient: the stored dz, or dy.
  const FormInputs<T> in{kResidual ? pdres : pdy, px};
  const bool sums_pass = need_sums || (training && pdx != nullptr);
  if (kResidual && !sums_pass) {
    channel_form_pass<T, ActivationGradient<T, Act, true>>(pdres, {pdy, px, residual}, forward, g);
  }
  // sum(dy * (x - mean)) from the sum about the rounded center.
  auto set_sums = [&](int64_t c, const GradSums& s) {
    sum_dy[c] = s.dy;
    sum_dy_xmu[c] = s.dy_xc - (mean[c] - static_cast<double>(sums_center[c])) * s.dy;
  };
  with_forms([&](const auto& gradient, auto training_form, auto eval_form) {
    using TrainingForm = decltype(training_form);
    if (training && pdx != nullptr && !g.channels_last && !short_planes<T>(g) && stripe_count(g) == 1) {
      // A block of channels' sums and their dx in one task, dy and x still
      // in cache for the second read.
      for_each_channel_block(g, channels_per_block(g, 2 * sizeof(T)), 3, [&](int64_t c0, int64_t c1) {
        GradSums sums[kMaxBlockChannels];
        add_block_grad_sums(pdy, px, sums_center.data(), g, c0, c1, 0, g.reduce_size(), sums, gradient);
        for (int64_t c = c0; c < c1; ++c) {
          set_sums(c, sums[c - c0]);
          set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, true);
        }
        block_form_pass<T, TrainingForm>(pdx, in, k, g, c0, c1);
      });
      return;
    }
    if (sums_pass) {
      const auto sums = channel_grad_sums(pdy, px, sums_center.data(), g, gradient);
      for (int64_t c = 0; c < g.C; ++c) set_sums(c, sums[c]);
    }
    if (pdx == nullptr) return;
    for (int64_t c = 0; c < g.C; ++c) {
      set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, training);
    }
    if (training) {
      channel_form_pass<T, TrainingForm>(pdx, in, k, g);
    } else {
      channel_form_pass<T, decltype(eval_form)>(pdx, {in.dy, kThrough ? px : nullptr}, k, g);
    }
  });
}

}  // namespace

void batch_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& residual, const Tensor& grad_residual,
                         const Tensor& dx, const BatchNormGeometry& g, const double* mean, const double* invstd,
                         const double* w, const double* b, Activation act, bool training, bool need_sums,
                         double* sum_dy, double* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    with_activation(act, [&](auto activation) {
      with_residual(residual.defined(), [&](auto has_residual) {
        backward_kernel<scalar_t, decltype(activation), has_residual()>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            has_residual() ? residual.const_data_ptr<scalar_t>() : nullptr,
            has_residual() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
            dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr, g, mean, invstd, w, b, training, need_sums,
            sum_dy, sum_dy_xmu);
      });
    });
  });
}

}  // namespace bn_ext::cpu::CPU_CAPABILITY
