// Autograd for the forward operators, in C++ so that a training step pays no
// Python autograd overhead (it dominated small inputs). The backward
// operators are called through the dispatcher, so their own autograd formulas
// (bn_ext/functional.py) still serve double backward.
#include "op_handle.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace bn_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> optional_of(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }
Tensor defined_or_empty(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
// A gradient the backward op returned, or none when it was not asked for.
Tensor asked(bool needed, const Tensor& grad) { return needed ? grad : Tensor(); }

// Autograd numbers only the tensors actually passed (absent optionals take no
// slot): the slot of the input is 0, of each present optional the next one.
struct InputSlots {
  int64_t next = 1;
  int64_t of(const std::optional<Tensor>& t) { return t.has_value() && t->defined() ? next++ : -1; }
};

bool needs_grad(AutogradContext* ctx, const char* slot_name) {
  const int64_t slot = ctx->saved_data[slot_name].toInt();
  return slot >= 0 && ctx->needs_input_grad(slot);
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, bool, double)>("bn_ext::batch_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd] = forward_op.call(input, weight, bias, running_mean, running_var, training, eps);
    ctx->save_for_backward({input, defined_or_empty(weight), mean, invstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["bias_slot"] = slots.of(bias);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double,
        std::array<bool, 3>)>("bn_ext::batch_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot"),
                                      needs_grad(ctx, "bias_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(7);
    auto [gi, gw, gb] = backward_op.call(grads[0], saved[0], optional_of(saved[1]), saved[2], saved[3],
                                         ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                                         mask);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    if (mask[2] && bias_dtype >= 0) gb = gb.to(static_cast<at::ScalarType>(bias_dtype));
    return {asked(mask[0], gi), asked(mask[1], gw), asked(mask[2], gb), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// BatchNorm + activation (+ residual): saves the input and the residual, from
// which the backward recomputes the pre-activation value; never the output.
class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps,
                               std::optional<c10::string_view> activation, const std::optional<Tensor>& residual) {
    static const auto forward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
        const std::optional<Tensor>&, bool, double, std::optional<c10::string_view>, const std::optional<Tensor>&)>(
        "bn_ext::batch_norm_act_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd] =
        forward_op.call(input, weight, bias, running_mean, running_var, training, eps, activation, residual);
    ctx->save_for_backward(
        {input, defined_or_empty(residual), defined_or_empty(weight), defined_or_empty(bias), mean, invstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["bias_slot"] = slots.of(bias);
    slots.of(running_mean);
    slots.of(running_var);
    ctx->saved_data["residual_slot"] = slots.of(residual);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation.has_value() ? c10::IValue(std::string(*activation)) : c10::IValue();
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
        const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double, std::optional<c10::string_view>,
        std::array<bool, 4>)>("bn_ext::batch_norm_act_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot"),
                                      needs_grad(ctx, "bias_slot"), needs_grad(ctx, "residual_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return variable_list(9);
    const auto& activation_value = ctx->saved_data["activation"];
    const std::string activation = activation_value.isNone() ? std::string() : activation_value.toStringRef();
    auto [gi, gw, gb, gr] = backward_op.call(
        grads[0], saved[0], optional_of(saved[1]), optional_of(saved[2]), optional_of(saved[3]), saved[4], saved[5],
        ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
        activation_value.isNone() ? std::nullopt : std::optional<c10::string_view>(activation), mask);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    if (mask[2] && bias_dtype >= 0) gb = gb.to(static_cast<at::ScalarType>(bias_dtype));
    return {asked(mask[0], gi), asked(mask[1], gw), asked(mask[2], gb), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), asked(mask[3], gr)};
  }
};

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::SymIntArrayRef normalized_shape,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::SymIntArrayRef, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, double)>("bn_ext::layer_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = forward_op.call(input, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({input, defined_or_empty(weight), defined_or_empty(bias), mean, rstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["bias_slot"] = slots.of(bias);
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&, const std::optional<Tensor>&,
        const std::optional<Tensor>&, double, std::array<bool, 3>)>("bn_ext::layer_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot"),
                                      needs_grad(ctx, "bias_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(5);
    const auto shape = ctx->saved_data["normalized_shape"].toSymIntVector();
    auto [gi, gw, gb] = backward_op.call(grads[0], saved[0], shape, saved[3], saved[4], optional_of(saved[1]),
                                         optional_of(saved[2]), ctx->saved_data["eps"].toDouble(), mask);
    return {asked(mask[0], gi), Tensor(), asked(mask[1], gw), asked(mask[2], gb), Tensor()};
  }
};

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::SymIntArrayRef normalized_shape,
                               const std::optional<Tensor>& weight, std::optional<double> eps) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor>(const Tensor&, c10::SymIntArrayRef, const std::optional<Tensor>&,
                                      std::optional<double>)>("bn_ext::rms_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, rstd] = forward_op.call(input, normalized_shape, weight, eps);
    ctx->save_for_backward({input, defined_or_empty(weight), rstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps.has_value() ? c10::IValue(*eps) : c10::IValue();
    ctx->mark_non_differentiable({rstd});
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&,
                                      const std::optional<Tensor>&, std::optional<double>, std::array<bool, 2>)>(
            "bn_ext::rms_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1])) return variable_list(4);
    const auto shape = ctx->saved_data["normalized_shape"].toSymIntVector();
    const auto& eps_value = ctx->saved_data["eps"];
    const std::optional<double> eps = eps_value.isNone() ? std::nullopt : std::optional(eps_value.toDouble());
    auto [gi, gw] = backward_op.call(grads[0], saved[0], shape, saved[2], optional_of(saved[1]), eps, mask);
    return {asked(mask[0], gi), Tensor(), asked(mask[1], gw), Tensor()};
  }
};

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, int64_t num_groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                               std::optional<c10::string_view> activation) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, double, std::optional<c10::string_view>)>(
            "bn_ext::group_norm_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = forward_op.call(input, num_groups, weight, bias, eps, activation);
    ctx->save_for_backward({input, defined_or_empty(weight), defined_or_empty(bias), mean, rstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["bias_slot"] = slots.of(bias);
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation.has_value() ? c10::IValue(std::string(*activation)) : c10::IValue();
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const std::optional<Tensor>&,
        const std::optional<Tensor>&, double, std::optional<c10::string_view>, std::array<bool, 3>)>(
        "bn_ext::group_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot"),
                                      needs_grad(ctx, "bias_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(6);
    const auto& activation_value = ctx->saved_data["activation"];
    const std::string activation = activation_value.isNone() ? std::string() : activation_value.toStringRef();
    auto [gi, gw, gb] = backward_op.call(
        grads[0], saved[0], ctx->saved_data["num_groups"].toInt(), saved[3], saved[4], optional_of(saved[1]),
        optional_of(saved[2]), ctx->saved_data["eps"].toDouble(),
        activation_value.isNone() ? std::nullopt : std::optional<c10::string_view>(activation), mask);
    return {asked(mask[0], gi), Tensor(), asked(mask[1], gw), asked(mask[2], gb), Tensor(), Tensor()};
  }
};

class LayerNormChannelsFunction : public torch::autograd::Function<LayerNormChannelsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, double eps) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, double)>(
            "bn_ext::layer_norm_channels_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = forward_op.call(input, weight, bias, eps);
    ctx->save_for_backward({input, defined_or_empty(weight), defined_or_empty(bias), mean, rstd});
    InputSlots slots;
    ctx->saved_data["weight_slot"] = slots.of(weight);
    ctx->saved_data["bias_slot"] = slots.of(bias);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
        const std::optional<Tensor>&, double, std::array<bool, 3>)>("bn_ext::layer_norm_channels_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_slot"),
                                      needs_grad(ctx, "bias_slot")};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(4);
    auto [gi, gw, gb] = backward_op.call(grads[0], saved[0], saved[3], saved[4], optional_of(saved[1]),
                                         optional_of(saved[2]), ctx->saved_data["eps"].toDouble(), mask);
    return {asked(mask[0], gi), asked(mask[1], gw), asked(mask[2], gb), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_autograd(const Tensor& input,
                                                               const std::optional<Tensor>& weight,
                                                               const std::optional<Tensor>& bias,
                                                               const std::optional<Tensor>& running_mean,
                                                               const std::optional<Tensor>& running_var,
                                                               bool training, double eps) {
  auto out = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    std::optional<c10::string_view> activation, const std::optional<Tensor>& residual) {
  auto out = BatchNormActFunction::apply(input, weight, bias, running_mean, running_var, training, eps, activation,
                                         residual);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_autograd(const Tensor& input,
                                                               c10::SymIntArrayRef normalized_shape,
                                                               const std::optional<Tensor>& weight,
                                                               const std::optional<Tensor>& bias, double eps) {
  auto out = LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_forward_autograd(const Tensor& input, c10::SymIntArrayRef normalized_shape,
                                                     const std::optional<Tensor>& weight,
                                                     std::optional<double> eps) {
  auto out = RMSNormFunction::apply(input, normalized_shape, weight, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_forward_autograd(const Tensor& input, int64_t num_groups,
                                                               const std::optional<Tensor>& weight,
                                                               const std::optional<Tensor>& bias, double eps,
                                                               std::optional<c10::string_view> activation) {
  auto out = GroupNormFunction::apply(input, num_groups, weight, bias, eps, activation);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward_autograd(const Tensor& input,
                                                                        const std::optional<Tensor>& weight,
                                                                        const std::optional<Tensor>& bias,
                                                                        double eps) {
  auto out = LayerNormChannelsFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("group_norm_forward", &group_norm_forward_autograd);
  m.impl("layer_norm_channels_forward", &layer_norm_channels_forward_autograd);
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_autograd);
  m.impl("layer_norm_forward", &layer_norm_forward_autograd);
  m.impl("rms_norm_forward", &rms_norm_forward_autograd);
}

}  // namespace bn_ext
