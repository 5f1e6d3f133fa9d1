// Argument checks and shapes shared by LayerNorm and RMSNorm on every backend:
// the input is viewed as `rows` rows of `cols` = prod(normalized_shape) values.
#pragma once

#include "norm_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <limits>

namespace bn_ext {

struct RowGeometry {
  int64_t rows, cols;
};

// Shape of the per-row statistics: the input's leading dims, then a 1 for
// every normalized dim (as torch's native_layer_norm returns them).
inline std::vector<int64_t> row_stat_shape(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  for (size_t i = shape.size() - normalized_shape.size(); i < shape.size(); ++i) shape[i] = 1;
  return shape;
}

inline RowGeometry check_row_norm_args(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias) {
  check_floating_input(input, op);
  TORCH_CHECK(!normalized_shape.empty(), op,
              ": expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
              "but got normalized_shape = ", normalized_shape);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(input.dim() >= k && input.sizes().slice(input.dim() - k).equals(normalized_shape), op,
              ": given normalized_shape=", normalized_shape, ", expected input with shape [*, ",
              c10::Join(", ", normalized_shape), "], but got input of size", input.sizes());
  for (const auto& [param, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!has(*param)) continue;
    check_param_device_dtype(**param, name, input);
    TORCH_CHECK((*param)->sizes().equals(normalized_shape), op, ": expected ", name,
                " to be of same shape as normalized_shape, but got ", name, " of shape ", (*param)->sizes(),
                " and normalized_shape = ", normalized_shape);
  }
  TORCH_CHECK(!has(weight) || !has(bias) || weight->scalar_type() == bias->scalar_type(), op,
              ": weight and bias must have the same dtype, got ", weight->scalar_type(), " and ",
              bias->scalar_type());
  int64_t cols = 1;
  for (int64_t s : normalized_shape) cols *= s;
  int64_t rows = 1;
  for (int64_t d = 0; d < input.dim() - k; ++d) rows *= input.size(d);
  return {rows, cols};
}

// grad_out like the input; the saved statistics one per row (mean null for RMSNorm).
inline void check_row_norm_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                         const at::Tensor* mean, const at::Tensor& rstd, int64_t rows) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out must have the input's size ", input.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out must have dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), op, ": grad_out must be on the input's device ",
              input.device(), ", got ", grad_out.device());
  if (mean != nullptr) {
    TORCH_CHECK(mean->numel() == rows && rstd.numel() == rows, op, ": mean and rstd should have ", rows,
                " elements, got ", mean->numel(), " and ", rstd.numel());
  } else {
    TORCH_CHECK(rstd.numel() == rows, op, ": rstd should have ", rows, " elements, got ", rstd.numel());
  }
}

// RMSNorm's output in the input's memory format: torch's RMSNorm keeps a
// channels-last input's format (the kernels write contiguous rows).
inline at::Tensor rms_norm_output_format(const at::Tensor& out, const at::Tensor& input) {
  const auto fmt = input.suggest_memory_format();
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

// RMSNorm's eps when None: torch's default, the machine epsilon of the op-math type.
inline double rms_norm_eps(std::optional<double> eps, at::ScalarType dtype) {
  if (eps.has_value()) return *eps;
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

// LayerNorm's input gradient where each row holds one value: exactly zero
// (the output is the bias, whatever x is). The kernels' sum of its terms
// leaves an unbalanced rounding of rstd * w * dy there, and rstd = 1/sqrt(eps)
// magnifies it (1e-4 for float32 and eps 1e-5).
inline void zero_single_value_rows(at::Tensor& dx, int64_t cols) {
  if (cols == 1 && dx.numel() > 0) dx.zero_();
}

}  // namespace bn_ext
