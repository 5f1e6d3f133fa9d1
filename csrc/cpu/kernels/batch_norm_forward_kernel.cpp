// BatchNorm CPU kernels, forward, built once per SIMD level (cpu/dispatch.h):
// the training forward (statistics, then the normalisation), the affine
// forward from given statistics, and the moments; the family's table. Two
// memory layouts: channels-first (N, C, S), reduced over runs of S elements
// per channel, and channels-last (M, C), reduced down columns with vectors
// across channels. The backward is in batch_norm_backward_kernel.cpp.
#include "cpu/kernels/batch_norm_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace bn_ext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// y = act(normalised x [+ residual]).
template <typename T, typename Act, bool kResidual>
void train_forward_kernel(const T* px, const T* residual, T* py, const BatchNormGeometry& g, const double* w,
                          const double* b, double eps, double* mean, double* invstd) {
  const FormInputs<T> in{nullptr, px, residual};
  ChannelCoefficients<T> k(g.C);
  if (!g.channels_last && !short_planes<T>(g) && stripe_count(g) == 1) {
    // Each channel reduces in one stripe: statistics and normalisation of
    // a block of channels in one task, its data still in cache.
    for_each_channel_block(g, channels_per_block(g, sizeof(T)), 2, [&](int64_t c0, int64_t c1) {
      Moments m[kMaxBlockChannels];
      add_block_moments(px, g, c0, c1, 0, g.reduce_size(), m);
      for (int64_t c = c0; c < c1; ++c) {
        mean[c] = as_saved<T>(m[c - c0].mean);
        invstd[c] = as_saved<T>(invstd_of(m[c - c0], eps));
        set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
      }
      with_centering(
          k,
          [&](auto centered) {
            block_form_pass<T, ActivatedAffine<T, Act, kResidual, centered()>>(py, in, k, g, c0, c1);
          },
          c0, c1);
    });
    return;
  }
  const auto moments = channel_moments(px, g);
  for (int64_t c = 0; c < g.C; ++c) {
    mean[c] = as_saved<T>(moments[c].mean);
    invstd[c] = as_saved<T>(invstd_of(moments[c], eps));
    set_forward_coefficients(k, c, mean[c], invstd[c], w[c], b[c]);
  }
  with_centering(k, [&](auto centered) {
    channel_form_pass<T, ActivatedAffine<T, Act, kResidual, centered()>>(py, in, k, g);
  });
}

// ---------------------------------------------------------------------------
// Table entries.

void train_forward(const Tensor& x, const Tensor& residual, const Tensor& y, const BatchNormGeometry& g,
                   const double* w, const double* b, double eps, Activation act, double* mean, double* invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train_forward", [&] {
    with_activation(act, [&](auto activation) {
      with_residual(residual.defined(), [&](auto has_residual) {
        train_forward_kernel<scalar_t, decltype(activation), has_residual()>(
            x.const_data_ptr<scalar_t>(), has_residual() ? residual.const_data_ptr<scalar_t>() : nullptr,
            y.mutable_data_ptr<scalar_t>(), g, w, b, eps, mean, invstd);
      });
    });
  });
}

void affine_forward(const Tensor& x, const Tensor& residual, const Tensor& y, const BatchNormGeometry& g,
                    const double* mean, const double* invstd, const double* w, const double* b, Activation act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_affine_forward", [&] {
    const FormInputs<scalar_t> in{nullptr, x.const_data_ptr<scalar_t>(),
                                  residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr};
    with_activation(act, [&](auto activation) {
      const auto k = forward_coefficients<scalar_t>(g, mean, invstd, w, b);
      with_residual(residual.defined(), [&](auto has_residual) {
        with_centering(k, [&](auto centered) {
          channel_form_pass<scalar_t, ActivatedAffine<scalar_t, decltype(activation), has_residual(), centered()>>(
              y.mutable_data_ptr<scalar_t>(), in, k, g);
        });
      });
    });
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

}  // namespace

// Fields by name: the compiler checks each against the table's declaration.
extern const BatchNormKernels batch_norm_kernels = {
    .train_forward = &train_forward, .affine_forward = &affine_forward, .moments = &moments,
    .backward = &batch_norm_backward};

}  // namespace bn_ext::cpu::CPU_CAPABILITY
