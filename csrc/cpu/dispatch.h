// The CPU kernels of every op family, compiled once per SIMD level into the
// one library and chosen once, at load, for the CPU at hand (as ATen does
// with its native/cpu kernels).
//
// A family's kernel files (cpu/kernels/<family>_kernel.cpp; BatchNorm has a
// forward and a backward one) are built once per level with that level's
// flags and CPU_CAPABILITY set to its name, and define the family's table in
// namespace bn_ext::cpu::<level>; cpu/dispatch.cpp
// picks one table per family. Everything else (op wrappers, registration,
// the C++ API) is built for the baseline CPU and reaches SIMD code only
// through these tables.
//
// The level is at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY),
// raised to AVX512_BF16 where the CPU has the bfloat16 conversion
// instructions, and lowered by BN_EXT_CPU_CAPABILITY, never past what the
// CPU runs or the build holds.
#pragma once

#include "batch_norm_common.h"
#include "group_norm_common.h"
#include "row_norm_common.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace bn_ext::cpu {

// BatchNorm. Per-channel values are float64 arrays of C elements.
struct BatchNormKernels {
  // Training forward: mean and invstd per channel, and y = act(normalised x
  // [+ residual]) (residual undefined: none).
  void (*train_forward)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& y,
                        const BatchNormGeometry& g, const double* weight, const double* bias, double eps,
                        Activation act, double* mean, double* invstd);
  // y = act((x - mean) * invstd * weight + bias [+ residual]).
  void (*affine_forward)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& y,
                         const BatchNormGeometry& g, const double* mean, const double* invstd, const double* weight,
                         const double* bias, Activation act);
  // mean and M2 = sum((x - mean)^2) per channel.
  void (*moments)(const at::Tensor& x, const BatchNormGeometry& g, double* mean, double* m2);
  // Of the gradient dz = dy * act'(z) of the pre-activation value z,
  // recomputed from x (+ residual), `bias` and the statistics: sum(dz) and
  // sum(dz * (x - mean)) per channel when `need_sums`, dx when it is defined
  // (training: the full formula; eval: dz * weight * invstd), and with a
  // residual (undefined: none) dz itself into grad_residual.
  void (*backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
                   const at::Tensor& grad_residual, const at::Tensor& dx, const BatchNormGeometry& g,
                   const double* mean, const double* invstd, const double* weight, const double* bias,
                   Activation act, bool training, bool need_sums, double* sum_dy, double* sum_dy_xmu);
};

// LayerNorm and RMSNorm over rows of `cols` values. Parameter gradients come
// back as per-column float64 totals (dweight then, for LayerNorm, dbias).
struct RowNormKernels {
  void (*layer_norm_forward)(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& y, const at::Tensor& mean,
                             const at::Tensor& rstd, const RowGeometry& g, double eps);
  // dx is written when defined.
  std::vector<double> (*layer_norm_backward)(const at::Tensor& dy, const at::Tensor& x,
                                             const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& dx, const RowGeometry& g,
                                             bool param_grads);
  void (*rms_norm_forward)(const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& y,
                           const at::Tensor& rstd, const RowGeometry& g, double eps);
  std::vector<double> (*rms_norm_backward)(const at::Tensor& dy, const at::Tensor& x,
                                           const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                           const at::Tensor& dx, const RowGeometry& g, bool weight_grad);
};

// GroupNorm (InstanceNorm: groups = channels) with statistics per (sample,
// group) as float64 arrays of N * G values; per-channel parameters are
// float64 arrays of C values (ones and zeros when absent).
struct GroupNormKernels {
  // mean and rstd per (n, group), and y = act(normalised x * weight + bias).
  void (*forward)(const at::Tensor& x, const at::Tensor& y, const GroupNormGeometry& g, const double* weight,
                  const double* bias, double eps, Activation act, double* mean, double* rstd);
  // dx when defined, and dweight, dbias per channel when `param_grads`; the
  // activation's gradient is taken at the output recomputed from x.
  void (*backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const GroupNormGeometry& g,
                   const double* mean, const double* rstd, const double* weight, const double* bias, Activation act,
                   bool param_grads, double* dweight, double* dbias);
  // LayerNorm over the channels of a contiguous (N, C, *) input: mean and
  // rstd per (n, position) in the op-math type.
  void (*layer_norm_channels_forward)(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& y,
                                      const at::Tensor& mean, const at::Tensor& rstd, double eps);
  // dx when defined; per-channel float64 totals dweight then dbias when `param_grads`.
  std::vector<double> (*layer_norm_channels_backward)(const at::Tensor& dy, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& weight,
                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                      const at::Tensor& dx, bool param_grads);
};

// The tables of one level.
struct CpuKernels {
  const char* level;
  const BatchNormKernels* batch_norm;
  const RowNormKernels* row_norm;
  const GroupNormKernels* group_norm;
};

// The tables in use, chosen on the first call.
const CpuKernels& cpu_kernels();

// Levels this build holds and this CPU runs, lowest first.
std::vector<std::string> available_cpu_capabilities();

}  // namespace bn_ext::cpu
