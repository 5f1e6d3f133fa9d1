// Folding arithmetic for eval-mode BatchNorm, shared by the Python API
// (bn_ext.fuse_*, through these operators) and the C++ API. Everything is
// computed in float64 and rounded once to the layer's dtype; the result keeps
// the layer weight's device and memory format.
#include "norm_common.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace bn_ext {
namespace {

using at::Tensor;

// Per-channel scale a = gamma / sqrt(var + eps) and shift b = beta - mean * a
// of an eval BatchNorm, in float64: y = x * a + b.
std::pair<Tensor, Tensor> batch_norm_affine(const Tensor& running_mean, const Tensor& running_var, double eps,
                                            const std::optional<Tensor>& bn_weight,
                                            const std::optional<Tensor>& bn_bias) {
  const auto opts = running_mean.options().dtype(at::kDouble);
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C, "running_var should contain ", C, " elements (running_mean's) not ",
              running_var.numel());
  const Tensor gamma = has(bn_weight) ? bn_weight->to(at::kDouble).reshape({C}) : at::ones({C}, opts);
  const Tensor beta = has(bn_bias) ? bn_bias->to(at::kDouble).reshape({C}) : at::zeros({C}, opts);
  TORCH_CHECK(gamma.numel() == C && beta.numel() == C, "BatchNorm weight and bias should contain ", C,
              " elements (running_mean's), got ", gamma.numel(), " and ", beta.numel());
  const Tensor scale = gamma * (running_var.to(at::kDouble) + eps).rsqrt();
  return {scale, beta - running_mean.to(at::kDouble) * scale};
}

// `value` (float64) rounded once into a tensor shaped, typed and laid out like `like`.
Tensor rounded_like(const Tensor& value, const Tensor& like) {
  return at::empty_like(like).copy_(value.reshape(like.sizes()));
}

Tensor bias_like(const Tensor& value, const Tensor& weight, const std::optional<Tensor>& bias) {
  return has(bias) ? rounded_like(value, *bias) : value.to(weight.scalar_type()).to(weight.device());
}

// Layer (Conv, ConvTranspose, Linear) followed by BatchNorm over its output channels.
// Conv / Linear weights are (out, in/groups, *k); ConvTranspose weights are
// (in, out/groups, *k), so the output channel of weight[i, j] is
// (i / (in/groups)) * (out/groups) + j.
std::tuple<Tensor, Tensor> fuse_conv_bn_weights(const Tensor& weight, const std::optional<Tensor>& bias,
                                                const Tensor& running_mean, const Tensor& running_var, double eps,
                                                const std::optional<Tensor>& bn_weight,
                                                const std::optional<Tensor>& bn_bias, bool transposed,
                                                int64_t groups) {
  TORCH_CHECK(weight.dim() >= 2, "fuse_conv_bn_weights: weight must have at least 2 dims, got ", weight.dim());
  TORCH_CHECK(groups >= 1, "fuse_conv_bn_weights: groups must be positive, got ", groups);
  const auto [scale, shift] = batch_norm_affine(running_mean, running_var, eps, bn_weight, bn_bias);
  const Tensor w = weight.to(at::kDouble);
  const int64_t out_channels = transposed ? weight.size(1) * groups : weight.size(0);
  TORCH_CHECK(scale.numel() == out_channels, "fuse_conv_bn_weights: BatchNorm has ", scale.numel(),
              " channels but the layer has ", out_channels, " output channels");
  TORCH_CHECK(!transposed || weight.size(0) % groups == 0, "fuse_conv_bn_weights: weight.size(0)=",
              weight.size(0), " is not divisible by groups=", groups);
  Tensor fused;
  if (transposed) {
    std::vector<int64_t> grouped = {groups, weight.size(0) / groups, weight.size(1)};
    std::vector<int64_t> scale_shape = {groups, 1, weight.size(1)};
    for (int64_t d = 2; d < weight.dim(); ++d) {
      grouped.push_back(weight.size(d));
      scale_shape.push_back(1);
    }
    fused = (w.reshape(grouped) * scale.reshape(scale_shape)).reshape(weight.sizes());
  } else {
    std::vector<int64_t> scale_shape(weight.dim(), 1);
    scale_shape[0] = out_channels;
    fused = w * scale.reshape(scale_shape);
  }
  const Tensor b = has(bias) ? bias->to(at::kDouble) : at::zeros({out_channels}, w.options());
  return {rounded_like(fused, weight), bias_like(b * scale + shift, weight, bias)};
}

// BatchNorm over the input channels of a following Conv or Linear (not
// ConvTranspose): weight (out, in/groups, *k). Exact only when no zero padding
// reaches the BatchNorm's output; callers check that.
std::tuple<Tensor, Tensor> fuse_bn_conv_weights(const Tensor& weight, const std::optional<Tensor>& bias,
                                                const Tensor& running_mean, const Tensor& running_var, double eps,
                                                const std::optional<Tensor>& bn_weight,
                                                const std::optional<Tensor>& bn_bias, int64_t groups) {
  TORCH_CHECK(weight.dim() >= 2, "fuse_bn_conv_weights: weight must have at least 2 dims, got ", weight.dim());
  const auto [scale, shift] = batch_norm_affine(running_mean, running_var, eps, bn_weight, bn_bias);
  const int64_t out = weight.size(0), in_per_group = weight.size(1);
  TORCH_CHECK(groups >= 1 && out % groups == 0, "fuse_bn_conv_weights: out channels ", out,
              " not divisible by groups=", groups);
  TORCH_CHECK(scale.numel() == in_per_group * groups, "fuse_bn_conv_weights: BatchNorm has ", scale.numel(),
              " channels but the layer has ", in_per_group * groups, " input channels");
  // Input channel of weight[o, i] is (o / (out/groups)) * in_per_group + i.
  std::vector<int64_t> grouped = {groups, out / groups, in_per_group};
  std::vector<int64_t> per_input = {groups, 1, in_per_group};
  for (int64_t d = 2; d < weight.dim(); ++d) {
    grouped.push_back(weight.size(d));
    per_input.push_back(1);
  }
  const Tensor w = weight.to(at::kDouble).reshape(grouped);
  const Tensor fused = (w * scale.reshape(per_input)).reshape(weight.sizes());
  // The shift becomes a bias: sum over each output's inputs and taps of w * shift.
  std::vector<int64_t> sum_dims;
  for (int64_t d = 2; d < static_cast<int64_t>(grouped.size()); ++d) sum_dims.push_back(d);
  const Tensor shift_contribution = (w * shift.reshape(per_input)).sum(sum_dims).reshape({out});
  const Tensor b = has(bias) ? bias->to(at::kDouble) : at::zeros({out}, w.options());
  return {rounded_like(fused, weight), bias_like(b + shift_contribution, weight, bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CompositeExplicitAutograd, m) {
  m.impl("fuse_conv_bn_weights", &fuse_conv_bn_weights);
  m.impl("fuse_bn_conv_weights", &fuse_bn_conv_weights);
}

}  // namespace bn_ext
