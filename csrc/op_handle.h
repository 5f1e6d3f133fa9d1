// Every bn_ext operator's C++ signature as the dispatcher calls it (the
// schemas are in ops.cpp; a mismatch throws at the first call), written once
// for the C++ that calls operators through the dispatcher: the C++ API
// (api.cpp) and the autograd nodes (autograd.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace bn_ext::ops {

using at::Tensor;
using Optional = const std::optional<Tensor>&;
using Activation = std::optional<c10::string_view>;
using Two = std::tuple<Tensor, Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;
using Mask3 = std::array<bool, 3>;

// struct <name> { Signature; kName = "bn_ext::<name>" }.
#define BN_EXT_OPERATOR(name, ...)                         \
  struct name {                                            \
    using Signature = __VA_ARGS__;                         \
    static constexpr const char* kName = "bn_ext::" #name; \
  };

BN_EXT_OPERATOR(batch_norm_forward, Three(const Tensor&, Optional, Optional, Optional, Optional, bool, double))
BN_EXT_OPERATOR(batch_norm_update_stats, void(Optional, Optional, const Tensor&, const Tensor&, std::optional<double>,
                                               Optional, double, int64_t))
BN_EXT_OPERATOR(batch_norm_stats, Two(const Tensor&))
BN_EXT_OPERATOR(batch_norm_backward,
                Three(const Tensor&, const Tensor&, Optional, const Tensor&, const Tensor&, bool, double, Mask3))
BN_EXT_OPERATOR(batch_norm_act_forward,
                Three(const Tensor&, Optional, Optional, Optional, Optional, bool, double, Activation, Optional))
BN_EXT_OPERATOR(batch_norm_act_backward,
                std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, Optional, Optional, Optional,
                                                           const Tensor&, const Tensor&, bool, double, Activation,
                                                           std::array<bool, 4>))
BN_EXT_OPERATOR(layer_norm_forward, Three(const Tensor&, c10::SymIntArrayRef, Optional, Optional, double))
BN_EXT_OPERATOR(layer_norm_backward, Three(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&,
                                           const Tensor&, Optional, Optional, double, Mask3))
BN_EXT_OPERATOR(rms_norm_forward, Two(const Tensor&, c10::SymIntArrayRef, Optional, std::optional<double>))
BN_EXT_OPERATOR(rms_norm_backward, Two(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, Optional,
                                       std::optional<double>, std::array<bool, 2>))
BN_EXT_OPERATOR(group_norm_forward, Three(const Tensor&, int64_t, Optional, Optional, double, Activation))
BN_EXT_OPERATOR(group_norm_backward, Three(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&,
                                           Optional, Optional, double, Activation, Mask3))
BN_EXT_OPERATOR(layer_norm_channels_forward, Three(const Tensor&, Optional, Optional, double))
BN_EXT_OPERATOR(layer_norm_channels_backward,
                Three(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Optional, Optional, double, Mask3))
BN_EXT_OPERATOR(fuse_conv_bn_weights,
                Two(const Tensor&, Optional, const Tensor&, const Tensor&, double, Optional, Optional, bool, int64_t))

#undef BN_EXT_OPERATOR

// The typed handle of operator Op, its schema looked up once.
template <typename Op>
const c10::TypedOperatorHandle<typename Op::Signature>& handle() {
  static const auto typed =
      c10::Dispatcher::singleton().findSchemaOrThrow(Op::kName, "").template typed<typename Op::Signature>();
  return typed;
}

}  // namespace bn_ext::ops
