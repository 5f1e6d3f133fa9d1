// BatchNorm CPU kernels, built once per SIMD level (cpu/dispatch.h). Two
// memory layouts: channels-first (N, C, S), reduced over runs of S elements
// per channel, and channels-last (M, C), reduced down columns with vectors
// across channels.
#include "cpu/dispatch.h"
#include "cpu/kernels/channel_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace bn_ext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// Backward coefficients of channel c: dx = dy * alpha + (x - center) * beta + gamma,
// from sum(dy) and sum(dy * (x - mean)) over the channel's M values.
//   training: dx = alpha * (dy - sum(dy)/M - (x - mean) * invstd^2 * sum(dy (x - mean))/M)
//   eval:     dx = alpha * dy
template <typename T>
inline void set_backward_coefficients(ChannelCoefficients<T>& k, int64_t c, double mean, double invstd, double w,
                                      double sum_dy, double sum_dy_xmu, double M, bool training) {
  using Op = opmath_t<T>;
  const double alpha = w * invstd;
  k.alpha[c] = static_cast<Op>(alpha);
  if (training) {
    const double proj = invstd * invstd * sum_dy_xmu / M;
    k.beta[c] = static_cast<Op>(-alpha * proj);
    k.gamma[c] = static_cast<Op>(alpha * (proj * (mean - static_cast<double>(k.center[c])) - sum_dy / M));
  }
}


// ---------------------------------------------------------------------------
// Table entries.

void train_forward(const Tensor& x, const Tensor& y, const BatchNormGeometry& g, const double* w, const double* b,
                   double eps, double* mean, double* invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train_forward", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    ChannelCoefficients<scalar_t> k(g.C);
    if (!g.channels_last && !short_planes<scalar_t>(g) && stripe_count(g) == 1) {
      // Each channel reduces in one stripe: statistics and normalisation of
      // a block of channels in one task, its data still in cache.
      for_each_channel_block(g, channels_per_block(g, sizeof(scalar_t)), 2, [&](int64_t c0, int64_t c1) {
        Moments m[kMaxBlockChannels];
        add_block_moments(px, g, c0, c1, 0, g.reduce_size(), m);
        for (int64_t c = c0; c < c1; ++c) {
          mean[c] = m[c - c0].mean;
          invstd[c] = invstd_of(m[c - c0], eps);
          set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
        }
        block_form_pass<scalar_t, Affine<false, true>>(py, nullptr, px, k, g, c0, c1);
      });
      return;
    }
    const auto moments = channel_moments(px, g);
    for (int64_t c = 0; c < g.C; ++c) {
      mean[c] = moments[c].mean;
      invstd[c] = invstd_of(moments[c], eps);
      set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    }
    channel_form_pass<scalar_t, Affine<false, true>>(py, nullptr, px, k, g);
  });
}

void affine_forward(const Tensor& x, const Tensor& y, const BatchNormGeometry& g, const double* mean,
                    const double* invstd, const double* w, const double* b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_affine_forward", [&] {
    ChannelCoefficients<scalar_t> k(g.C);
    for (int64_t c = 0; c < g.C; ++c) set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
    channel_form_pass<scalar_t, Affine<false, true>>(y.mutable_data_ptr<scalar_t>(), nullptr, x.const_data_ptr<scalar_t>(),
                                               k, g);
  });
}

void moments(const Tensor& x, const BatchNormGeometry& g, double* mean, double* m2) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_moments", [&] {
    const auto m = channel_moments(x.const_data_ptr<scalar_t>(), g);
    for (int64_t c = 0; c < g.C; ++c) {
      mean[c] = m[c].mean;
      m2[c] = m[c].m2;
    }
  });
}

void backward(const Tensor& dy, const Tensor& x, const Tensor& dx, const BatchNormGeometry& g, const double* mean,
              const double* invstd, const double* w, bool training, bool need_sums, double* sum_dy,
              double* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    using Op = opmath_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const double M = static_cast<double>(g.reduce_size());
    ChannelCoefficients<scalar_t> k(g.C);
    for (int64_t c = 0; c < g.C; ++c) k.center[c] = static_cast<Op>(mean[c]);
    // sum(dy * (x - mean)) from the sum about the rounded center.
    auto set_sums = [&](int64_t c, const GradSums& s) {
      sum_dy[c] = s.dy;
      sum_dy_xmu[c] = s.dy_xc - (mean[c] - static_cast<double>(k.center[c])) * s.dy;
    };
    if (training && dx.defined() && !g.channels_last && !short_planes<scalar_t>(g) && stripe_count(g) == 1) {
      // A block of channels' sums and their dx in one task, dy and x still
      // in cache for the second read.
      scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
      for_each_channel_block(g, channels_per_block(g, 2 * sizeof(scalar_t)), 3, [&](int64_t c0, int64_t c1) {
        GradSums sums[kMaxBlockChannels];
        add_block_grad_sums(pdy, px, k.center.data(), g, c0, c1, 0, g.reduce_size(), sums);
        for (int64_t c = c0; c < c1; ++c) {
          set_sums(c, sums[c - c0]);
          set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, true);
        }
        block_form_pass<scalar_t, Affine<true, true>>(pdx, pdy, px, k, g, c0, c1);
      });
      return;
    }
    if (need_sums || (training && dx.defined())) {
      const auto sums = channel_grad_sums(pdy, px, k.center.data(), g);
      for (int64_t c = 0; c < g.C; ++c) set_sums(c, sums[c]);
    }
    if (!dx.defined()) return;
    for (int64_t c = 0; c < g.C; ++c) {
      set_backward_coefficients(k, c, mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], M, training);
    }
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    if (training) {
      channel_form_pass<scalar_t, Affine<true, true>>(pdx, pdy, px, k, g);
    } else {
      channel_form_pass<scalar_t, Affine<true, false>>(pdx, pdy, nullptr, k, g);
    }
  });
}

}  // namespace

extern const BatchNormKernels batch_norm_kernels = {&train_forward, &affine_forward, &moments, &backward};

}  // namespace bn_ext::cpu::CPU_CAPABILITY
