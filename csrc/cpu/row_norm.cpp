// LayerNorm's and RMSNorm's CPU part (row_norm_ops.h holds the operators):
// the kernels of kernels/row_norm_kernel.cpp, and the parameters' gradients
// from their float64 column totals.
#include "cpu/dispatch.h"
#include "cpu/output_memory.h"
#include "row_norm_ops.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace bn_ext::cpu {
namespace {

using at::Tensor;

std::optional<Tensor> contiguous_or_none(const std::optional<Tensor>& t) {
  return has(t) ? std::optional(t->contiguous()) : std::nullopt;
}

// The gradient of a parameter shaped `shape` from values[offset, offset +
// numel), or an empty tensor when it was not asked for.
Tensor param_grad(bool asked, const std::vector<double>& values, int64_t offset, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  if (!asked) return at::empty({0}, at::TensorOptions().dtype(dtype));
  Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "param_grad", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(values[offset + i]);
  });
  return t;
}

struct RowNormDevice {
  static Tensor empty_like(const Tensor& x) { return empty_output_like(x, at::MemoryFormat::Contiguous); }

  static void forward(const RowNormForwardCall& a) {
    const auto& kernels = *cpu_kernels().row_norm;
    if (a.mean.defined()) {
      kernels.layer_norm_forward(a.x, contiguous_or_none(a.weight), contiguous_or_none(a.bias), a.out, a.mean, a.rstd,
                                 a.g, a.eps);
    } else {
      kernels.rms_norm_forward(a.x, contiguous_or_none(a.weight), a.out, a.rstd, a.g, a.eps);
    }
  }

  static std::tuple<Tensor, Tensor> backward(const RowNormBackwardCall& a) {
    const auto& kernels = *cpu_kernels().row_norm;
    const auto& mask = a.output_mask;
    const auto sdtype = stat_dtype(a.x.scalar_type());
    const Tensor rstd = a.rstd.to(sdtype).contiguous();
    // Column totals: dweight's, then LayerNorm's dbias.
    const std::vector<double> sums =
        a.mean.defined()
            ? kernels.layer_norm_backward(a.dy, a.x, contiguous_or_none(a.weight), a.mean.to(sdtype).contiguous(), rstd,
                                          a.dx, a.g, mask[1] || mask[2])
            : kernels.rms_norm_backward(a.dy, a.x, contiguous_or_none(a.weight), rstd, a.dx, a.g, mask[1]);
    return {param_grad(mask[1], sums, 0, a.normalized_shape, a.weight_dtype),
            param_grad(mask[2], sums, a.g.cols, a.normalized_shape, a.bias_dtype)};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  RowNormOps<RowNormDevice>::bind([&](const char* name, auto function) { m.impl(name, function); });
}

}  // namespace bn_ext::cpu
