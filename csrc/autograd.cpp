// Autograd for the forward operators, in C++ so that a training step pays no
// Python autograd overhead (a Python autograd.Function around the same ops
// cost about 20 us more a forward and backward; docs/perf-notes.md). One
// generic node serves every operator: its description below names the
// forward and backward operators (their signatures in op_handle.h), the
// arguments the backward reads, how the
// backward operator's arguments come from the forward's, and which
// arguments its outputs are the gradients of. The backward operators are
// called through the dispatcher, so their own autograd formulas
// (bn_ext/functional.py) still serve double backward.
#include "op_handle.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>

namespace bn_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Optional = const std::optional<Tensor>&;

// Entries of a description's backward argument list: a forward argument's
// index, or one of these.
constexpr int kGrad = -1;     // the output's gradient
constexpr int kMean = -2;     // the forward's second output (mean, or rstd for RMSNorm)
constexpr int kRstd = -3;     // its third output
constexpr int kMask = -4;     // which gradients are asked for

// The saved state of one call: the forward's non-tensor arguments as
// IValues (None for tensors), and per argument two integers (one IntList for
// autograd's context): its autograd input slot (-1: absent optional) and the
// dtype of a tensor a gradient is returned for (-1: none). The saved
// variables are Desc::kSaved's arguments in order, then the statistics.
enum Field { kSlot = 0, kDtype = 1, kFields = 2 };

template <typename Desc>
class OpFunction : public torch::autograd::Function<OpFunction<Desc>> {
  static_assert(std::is_sorted(Desc::kSaved.begin(), Desc::kSaved.end()), "kSaved in argument order");

 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const Args&... args) {
    variable_list outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      const auto results = ops::handle<typename Desc::Forward>().call(args...);
      std::apply([&](const auto&... out) { outputs = {out...}; }, results);
    }
    c10::impl::GenericList values(c10::AnyType::get());
    std::vector<int64_t> fields;
    std::vector<Tensor> saved;
    values.reserve(sizeof...(Args));
    fields.reserve(kFields * sizeof...(Args));
    int64_t index = 0, slot = 0;
    (record(values, fields, saved, index++, slot, args), ...);
    for (size_t k = 1; k < outputs.size(); ++k) saved.push_back(outputs[k]);
    ctx->save_for_backward(saved);
    ctx->saved_data["values"] = std::move(values);
    ctx->saved_data["fields"] = std::move(fields);
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(Desc::Backward::kName, "");
    const auto saved = ctx->get_saved_variables();
    const auto values = ctx->saved_data["values"].toList();
    const auto fields = ctx->saved_data["fields"].toIntVector();
    auto field = [&](int64_t arg, Field f) { return fields[kFields * arg + f]; };
    variable_list result(values.size());
    c10::List<bool> mask;
    bool any = false;
    for (int arg : Desc::kGradArgs) {
      mask.push_back(field(arg, kSlot) >= 0 && ctx->needs_input_grad(field(arg, kSlot)));
      any = any || mask.get(mask.size() - 1);
    }
    if (!grads[0].defined() || !any) return result;
    torch::jit::Stack stack;
    for (int entry : Desc::kBackwardArgs) {
      if (entry == kGrad) {
        stack.emplace_back(grads[0]);
      } else if (entry == kMean || entry == kRstd) {
        stack.emplace_back(saved[Desc::kSaved.size() + (kMean - entry)]);
      } else if (entry == kMask) {
        stack.emplace_back(mask);
      } else if (const int64_t at = saved_position(entry); at >= 0) {
        const Tensor& t = saved[at];
        stack.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
      } else {
        stack.push_back(values.get(entry));
      }
    }
    handle.callBoxed(&stack);
    for (size_t k = 0; k < Desc::kGradArgs.size(); ++k) {
      if (!mask.get(k)) continue;
      const int arg = Desc::kGradArgs[k];
      Tensor grad = stack[k].toTensor();
      const int64_t dtype = field(arg, kDtype);
      if (dtype >= 0 && grad.defined()) grad = grad.to(static_cast<at::ScalarType>(dtype));
      result[arg] = grad;
    }
    return result;
  }

 private:
  // Where argument `index` sits among the saved variables; -1: not saved.
  static int64_t saved_position(int64_t index) {
    const auto it = std::find(Desc::kSaved.begin(), Desc::kSaved.end(), index);
    return it == Desc::kSaved.end() ? -1 : it - Desc::kSaved.begin();
  }
  static bool is_grad_target(int64_t index) {
    return std::find(Desc::kGradArgs.begin(), Desc::kGradArgs.end(), index) != Desc::kGradArgs.end();
  }
  static void record_tensor(c10::impl::GenericList& values, std::vector<int64_t>& fields,
                            std::vector<Tensor>& saved, int64_t index, int64_t& slot, const Tensor* t) {
    const bool present = t != nullptr && t->defined();
    values.push_back(c10::IValue());
    fields.push_back(present ? slot++ : -1);
    fields.push_back(present && is_grad_target(index) ? static_cast<int64_t>(t->scalar_type()) : -1);
    if (saved_position(index) >= 0) saved.push_back(present ? *t : Tensor());
  }
  static void record(c10::impl::GenericList& values, std::vector<int64_t>& fields, std::vector<Tensor>& saved,
                     int64_t index, int64_t& slot, const Tensor& t) {
    record_tensor(values, fields, saved, index, slot, &t);
  }
  static void record(c10::impl::GenericList& values, std::vector<int64_t>& fields, std::vector<Tensor>& saved,
                     int64_t index, int64_t& slot, Optional t) {
    record_tensor(values, fields, saved, index, slot, t.has_value() ? &*t : nullptr);
  }
  template <typename T>
  static void record(c10::impl::GenericList& values, std::vector<int64_t>& fields, std::vector<Tensor>&, int64_t,
                     int64_t&, const T& value) {
    values.push_back(c10::IValue(value));
    fields.insert(fields.end(), {-1, -1});
  }
};

// The Autograd kernel of Desc's forward operator.
template <typename Desc, typename Signature = typename Desc::Forward::Signature>
struct AutogradKernel;
template <typename Desc, typename Result, typename... Args>
struct AutogradKernel<Desc, Result(Args...)> {
  static Result call(Args... args) {
    const variable_list out = OpFunction<Desc>::apply(args...);
    return [&]<size_t... I>(std::index_sequence<I...>) {
      return Result{out[I]...};
    }(std::make_index_sequence<std::tuple_size_v<Result>>());
  }
};

// --- The descriptions ---------------------------------------------------------
// kSaved: the tensor arguments the backward reads (never the running
// statistics: they change in place after the forward). kBackwardArgs: the
// backward operator's arguments in schema order. kGradArgs: the forward
// argument each of the backward's outputs is the gradient of.

struct BatchNorm {
  using Forward = ops::batch_norm_forward;
  using Backward = ops::batch_norm_backward;
  static constexpr std::array kSaved = {0, 1};
  static constexpr std::array kBackwardArgs = {kGrad, 0, 1, kMean, kRstd, 5, 6, kMask};
  static constexpr std::array kGradArgs = {0, 1, 2};
};

// Saves the input and the residual, from which the backward recomputes the
// pre-activation value; never the output.
struct BatchNormAct {
  using Forward = ops::batch_norm_act_forward;
  using Backward = ops::batch_norm_act_backward;
  static constexpr std::array kSaved = {0, 1, 2, 8};
  static constexpr std::array kBackwardArgs = {kGrad, 0, 8, 1, 2, kMean, kRstd, 5, 6, 7, kMask};
  static constexpr std::array kGradArgs = {0, 1, 2, 8};
};

struct LayerNorm {
  using Forward = ops::layer_norm_forward;
  using Backward = ops::layer_norm_backward;
  static constexpr std::array kSaved = {0, 2, 3};
  static constexpr std::array kBackwardArgs = {kGrad, 0, 1, kMean, kRstd, 2, 3, 4, kMask};
  static constexpr std::array kGradArgs = {0, 2, 3};
};

struct RMSNorm {
  using Forward = ops::rms_norm_forward;
  using Backward = ops::rms_norm_backward;
  static constexpr std::array kSaved = {0, 2};
  static constexpr std::array kBackwardArgs = {kGrad, 0, 1, kMean, 2, 3, kMask};  // kMean: its rstd
  static constexpr std::array kGradArgs = {0, 2};
};

struct GroupNorm {
  using Forward = ops::group_norm_forward;
  using Backward = ops::group_norm_backward;
  static constexpr std::array kSaved = {0, 2, 3};
  static constexpr std::array kBackwardArgs = {kGrad, 0, 1, kMean, kRstd, 2, 3, 4, 5, kMask};
  static constexpr std::array kGradArgs = {0, 2, 3};
};

struct LayerNormChannels {
  using Forward = ops::layer_norm_channels_forward;
  using Backward = ops::layer_norm_channels_backward;
  static constexpr std::array kSaved = {0, 1, 2};
  static constexpr std::array kBackwardArgs = {kGrad, 0, kMean, kRstd, 1, 2, 3, kMask};
  static constexpr std::array kGradArgs = {0, 1, 2};
};

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("batch_norm_forward", &AutogradKernel<BatchNorm>::call);
  m.impl("batch_norm_act_forward", &AutogradKernel<BatchNormAct>::call);
  m.impl("layer_norm_forward", &AutogradKernel<LayerNorm>::call);
  m.impl("rms_norm_forward", &AutogradKernel<RMSNorm>::call);
  m.impl("group_norm_forward", &AutogradKernel<GroupNorm>::call);
  m.impl("layer_norm_channels_forward", &AutogradKernel<LayerNormChannels>::call);
}

}  // namespace bn_ext
