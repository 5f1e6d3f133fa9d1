// LayerNorm and RMSNorm operators on the CPU: argument checks, allocation and
// the parameter-gradient tensors; the kernels are in kernels/row_norm_kernel.cpp.
#include "cpu/dispatch.h"
#include "cpu/output_memory.h"
#include "row_norm_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

std::optional<Tensor> contiguous_or_none(const std::optional<Tensor>& t) {
  return has(t) ? std::optional(t->contiguous()) : std::nullopt;
}

// A tensor of `shape` and `dtype` holding values[offset, offset + numel).
Tensor tensor_from(const std::vector<double>& values, int64_t offset, at::IntArrayRef shape, at::ScalarType dtype) {
  Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tensor_from", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(values[offset + i]);
  });
  return t;
}

// The gradient of a parameter shaped `shape` from values[offset, ...), or an
// empty tensor when it was not asked for.
Tensor param_grad(bool asked, const std::vector<double>& values, int64_t offset, at::IntArrayRef shape,
                  const std::optional<Tensor>& param, const Tensor& input) {
  const auto dtype = has(param) ? param->scalar_type() : input.scalar_type();
  return asked ? tensor_from(values, offset, shape, dtype) : at::empty({0}, input.options().dtype(dtype));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps) {
  const RowGeometry g = check_row_norm_args("layer_norm", input, normalized_shape, weight, bias);
  const Tensor x = input.contiguous();
  Tensor out = empty_output_like(x, at::MemoryFormat::Contiguous);
  const auto stats_options = x.options().dtype(stat_dtype(x.scalar_type()));
  Tensor mean = at::empty(row_stat_shape(x, normalized_shape), stats_options);
  Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), stats_options);
  cpu_kernels().row_norm->layer_norm_forward(x, contiguous_or_none(weight), contiguous_or_none(bias), out, mean, rstd,
                                             g, eps);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           at::IntArrayRef normalized_shape, const Tensor& mean,
                                                           const Tensor& rstd, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, double eps,
                                                           std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  const RowGeometry g = check_row_norm_args("layer_norm_backward", input, normalized_shape, weight, bias);
  check_row_norm_backward_args("layer_norm_backward", grad_out, input, &mean, rstd, g.rows);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const auto sdtype = stat_dtype(x.scalar_type());
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  std::vector<double> sums;
  if (g.rows * g.cols > 0) {
    sums = cpu_kernels().row_norm->layer_norm_backward(dy, x, contiguous_or_none(weight), mean.to(sdtype).contiguous(),
                                                       rstd.to(sdtype).contiguous(), output_mask[0] ? dx : Tensor(),
                                                       g, output_mask[1] || output_mask[2]);
  }
  if (sums.empty()) sums.assign(2 * g.cols, 0.0);
  zero_single_value_rows(dx, g.cols);
  return {dx, param_grad(output_mask[1], sums, 0, normalized_shape, weight, x),
          param_grad(output_mask[2], sums, g.cols, normalized_shape, bias, x)};
}

std::tuple<Tensor, Tensor> rms_norm_forward_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                                                const std::optional<Tensor>& weight, std::optional<double> eps) {
  const RowGeometry g = check_row_norm_args("rms_norm", input, normalized_shape, weight, std::nullopt);
  const Tensor x = input.contiguous();
  Tensor out = empty_output_like(x, at::MemoryFormat::Contiguous);
  Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), x.options().dtype(stat_dtype(x.scalar_type())));
  cpu_kernels().row_norm->rms_norm_forward(x, contiguous_or_none(weight), out, rstd, g,
                                           rms_norm_eps(eps, x.scalar_type()));
  return {rms_norm_output_format(out, input), rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                 at::IntArrayRef normalized_shape, const Tensor& rstd,
                                                 const std::optional<Tensor>& weight, std::optional<double> eps,
                                                 std::array<bool, 2> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernel
  const RowGeometry g = check_row_norm_args("rms_norm_backward", input, normalized_shape, weight, std::nullopt);
  check_row_norm_backward_args("rms_norm_backward", grad_out, input, nullptr, rstd, g.rows);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  Tensor dx = output_mask[0] ? empty_output_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  std::vector<double> sums;
  if (g.rows * g.cols > 0) {
    sums = cpu_kernels().row_norm->rms_norm_backward(dy, x, contiguous_or_none(weight),
                                                     rstd.to(stat_dtype(x.scalar_type())).contiguous(),
                                                     output_mask[0] ? dx : Tensor(), g, output_mask[1]);
  }
  if (sums.empty()) sums.assign(g.cols, 0.0);
  return {dx, param_grad(output_mask[1], sums, 0, normalized_shape, weight, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("rms_norm_forward", &rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace bn_ext::cpu
