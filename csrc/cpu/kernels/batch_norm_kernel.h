// What the two BatchNorm kernel files share (built, like them, once per SIMD
// level): the forward's coefficients from the statistics as it saved them,
// and the backward's table entry, which batch_norm_backward_kernel.cpp
// defines and batch_norm_forward_kernel.cpp puts in the family's table. The
// backward is a file of its own so that either half rebuilds alone, and the
// two compile side by side.
#pragma once

#include "cpu/dispatch.h"
#include "cpu/kernels/channel_kernels.h"

namespace bn_ext::cpu::CPU_CAPABILITY {

// The forward takes its coefficients from the statistics as saved (rounded
// to op-math, the saved dtype), as torch's kernels do: a backward that
// recomputes z from them (BatchNorm + activation's) finds every z, and so
// every ReLU mask, as the forward had it, and the fused and unfused forms
// give the same bits.
template <typename T>
inline double as_saved(double statistic) {
  return static_cast<double>(static_cast<opmath_t<T>>(statistic));
}

template <typename T>
ChannelCoefficients<T> forward_coefficients(const BatchNormGeometry& g, const double* mean, const double* invstd,
                                            const double* w, const double* b) {
  ChannelCoefficients<T> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    set_forward_coefficients(k, c, as_saved<T>(mean[c]), as_saved<T>(invstd[c]), w[c], b[c]);
  }
  return k;
}

// The table's backward (cpu/dispatch.h, BatchNormKernels::backward).
void batch_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& grad_residual, const at::Tensor& dx, const BatchNormGeometry& g,
                         const double* mean, const double* invstd, const double* w, const double* b, Activation act,
                         bool training, bool need_sums, double* sum_dy, double* sum_dy_xmu);

}  // namespace bn_ext::cpu::CPU_CAPABILITY
