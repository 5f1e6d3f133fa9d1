// BatchNorm argument checks and the view of an input as channels-first
// (N, C, S) or channels-last (M, C) memory, shared by the CPU and CUDA ops.
#pragma once

#include "norm_common.h"

#include <ATen/core/Tensor.h>

#include <limits>
#include <type_traits>

namespace bn_ext {

// An input in one of the two layouts the kernels handle.
//  channels_last == false: contiguous (N, C, S), S = product of the spatial sizes.
//  channels_last == true:  contiguous (M, C) rows, M = N * S (also 2-D inputs and S == 1).
struct BatchNormGeometry {
  bool channels_last;
  int64_t N, C, S;
  int64_t reduce_size() const { return N * S; }
};

// The memory format the kernels read and write an input in: torch's suggestion,
// so the output keeps the input's format as torch's own BatchNorm does.
inline at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

inline BatchNormGeometry batch_norm_geometry(const at::Tensor& dense) {
  int64_t S = 1;
  for (int64_t d = 2; d < dense.dim(); ++d) S *= dense.size(d);
  const bool channels_last = S == 1 || dense.suggest_memory_format() != at::MemoryFormat::Contiguous;
  return {channels_last, dense.size(0), dense.size(1), S};
}

inline void check_batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training) {
  check_floating_input(input, "batch_norm");
  TORCH_CHECK_INDEX(input.dim() >= 2, "batch_norm: input must have at least 2 dims (N, C, *), got ",
                    input.dim(), "-D input of size ", input.sizes());
  const int64_t C = input.size(1);
  check_param(weight, "weight", input, C, "the input's channel count, input.size(1)");
  check_param(bias, "bias", input, C, "the input's channel count, input.size(1)");
  check_param(running_mean, "running_mean", input, C, "the input's channel count, input.size(1)");
  check_param(running_var, "running_var", input, C, "the input's channel count, input.size(1)");
  // torch's exception types: RuntimeError in evaluation mode, ValueError in training.
  TORCH_CHECK(training || (has(running_mean) && has(running_var)),
              "batch_norm: running_mean and running_var must be defined in evaluation mode (training=False)");
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var),
                    "batch_norm: running_mean and running_var must either both be None or neither be None");
  if (training && has(running_mean)) {
    // Written in training: sharing memory with what is read (or each other),
    // the result would depend on the order of reads and writes.
    TORCH_CHECK(!may_share_memory(*running_mean, input) && !may_share_memory(*running_var, input),
                "batch_norm: running_mean and running_var must not share memory with the input in training "
                "(they are updated in place)");
    TORCH_CHECK(!may_share_memory(*running_mean, *running_var),
                "batch_norm: running_mean and running_var must not share memory with each other in training "
                "(they are updated in place)");
  }
}

// torch.nn.functional.batch_norm's own checks, done here so the C++ API raises them too.
inline void check_batch_norm_forward_args(const at::Tensor& input, bool training, double eps) {
  if (training) {
    int64_t values = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values *= input.size(d);
    TORCH_CHECK_VALUE(values != 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
    // Finite too: running_var is kept from 1 / invstd^2 - eps, NaN for eps = Inf.
    TORCH_CHECK_VALUE(eps > 0.0 && eps < std::numeric_limits<double>::infinity(),
                      "batch_norm eps must be positive and finite during training, but got ", eps);
  }
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
}

// fn(std::bool_constant<has_residual>): kernels templated on whether a residual is added.
template <typename Fn>
void with_residual(bool has_residual, const Fn& fn) {
  if (has_residual) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// A residual added before the activation: the input's size, dtype and device.
inline void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& input) {
  if (!has(residual)) return;
  TORCH_CHECK(residual->sizes() == input.sizes(), "batch_norm_act: residual must have the input's size ",
              input.sizes(), ", got ", residual->sizes());
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "batch_norm_act: residual must have the input's dtype ",
              input.scalar_type(), ", got ", residual->scalar_type());
  TORCH_CHECK(residual->device() == input.device(), "batch_norm_act: residual must be on the input's device ",
              input.device(), ", got ", residual->device());
}

inline void check_batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                          const at::Tensor& save_invstd) {
  check_batch_norm_args(input, weight, std::nullopt, std::nullopt, std::nullopt, true);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "batch_norm_backward: grad_out must have the input's size ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "batch_norm_backward: grad_out must have dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "batch_norm_backward: grad_out must be on the input's device ",
              input.device(), ", got ", grad_out.device());
  const int64_t C = input.size(1);
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C,
              "batch_norm_backward: save_mean and save_invstd should contain ", C, " elements, got ",
              save_mean.numel(), " and ", save_invstd.numel());
}

}  // namespace bn_ext
