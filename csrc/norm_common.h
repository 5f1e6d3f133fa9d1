// Argument checks and shape helpers shared by every backend of every op, so
// the CPU and CUDA implementations reject the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace bn_ext {

// Statistics are float32 for half-precision inputs, the input's dtype otherwise.
inline at::ScalarType stat_dtype(at::ScalarType input_dtype) {
  return (input_dtype == at::kHalf || input_dtype == at::kBFloat16) ? at::kFloat : input_dtype;
}

inline void check_floating_input(const at::Tensor& input, const char* op) {
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
      ": input must be float32, float64, float16 or bfloat16, got ", t);
}

// A parameter-like tensor (weight, bias, running statistics) must be on the
// input's device, with the input's dtype or float32 beside a half-precision input.
inline void check_param_device_dtype(const at::Tensor& p, const char* name, const at::Tensor& input) {
  TORCH_CHECK(p.device() == input.device(), name, " must be on the same device as input (", input.device(),
              "), got ", p.device());
  const auto in = input.scalar_type();
  TORCH_CHECK(p.scalar_type() == in || (p.scalar_type() == at::kFloat && stat_dtype(in) == at::kFloat),
              name, " must have the input's dtype (", in, ")",
              stat_dtype(in) == at::kFloat && in != at::kFloat ? " or float32" : "", ", got ", p.scalar_type());
}

// ... and, for a per-channel parameter, hold `numel` elements.
inline void check_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& input,
                        int64_t numel, const char* what) {
  if (!param.has_value() || !param->defined()) return;
  const auto& p = *param;
  check_param_device_dtype(p, name, input);
  TORCH_CHECK(p.numel() == numel, name, " should contain ", numel, " elements (", what, ") not ", p.numel());
}

// An activation applied to a normalised output (the fused forms of GroupNorm and BatchNorm).
enum class Activation { kNone, kRelu, kSilu };

// fn(tag) with the tag type of `act` (each backend has its own three).
template <typename None, typename Relu, typename Silu, typename Fn>
void with_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kNone:
      return fn(None{});
    case Activation::kRelu:
      return fn(Relu{});
    case Activation::kSilu:
      return fn(Silu{});
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

inline Activation parse_activation(const std::optional<std::string_view>& name, const char* op) {
  if (!name.has_value() || *name == "none") return Activation::kNone;
  if (*name == "relu") return Activation::kRelu;
  if (*name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": activation must be None, 'relu' or 'silu', got '", *name, "'");
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether a and b may share memory: the same storage and intersecting byte
// ranges (interleaved views count as sharing).
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  auto bytes = [](const at::Tensor& t) {
    int64_t last = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::pair<int64_t, int64_t>{t.storage_offset() * t.element_size(), (last + 1) * t.element_size()};
  };
  const auto [a_begin, a_end] = bytes(a);
  const auto [b_begin, b_end] = bytes(b);
  return a_begin < b_end && b_begin < a_end;
}

}  // namespace bn_ext
