// Argument checks and the view of an input shared by the group_norm family
// (GroupNorm, InstanceNorm, LayerNorm over the channels of an (N, C, *)
// tensor) on every backend.
#pragma once

#include "norm_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace bn_ext {

// An (N, C, *) input with S = prod(*) values per channel and sample, in one
// of two layouts:
//   channels_last == false: contiguous (N, C, S);
//   channels_last == true:  contiguous (N, S, C) (torch's channels_last or
//                           channels_last_3d formats).
// GroupNorm's statistics are per (sample, group) of G groups of C / G
// adjacent channels; InstanceNorm is GroupNorm with G = C.
struct GroupNormGeometry {
  bool channels_last;
  int64_t N, C, S, G;
  int64_t group_channels() const { return C / G; }
};

// The memory format a family kernel reads and writes an input in: channels-last
// where torch suggests it (so outputs keep the input's format), contiguous otherwise.
inline at::MemoryFormat group_norm_memory_format(const at::Tensor& input) {
  return input.dim() >= 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

inline GroupNormGeometry group_norm_geometry(const at::Tensor& dense, int64_t groups) {
  int64_t S = 1;
  for (int64_t d = 2; d < dense.dim(); ++d) S *= dense.size(d);
  const bool channels_last = S > 1 && group_norm_memory_format(dense) != at::MemoryFormat::Contiguous;
  return {channels_last, dense.size(0), dense.size(1), S, groups};
}

// torch.nn.functional.group_norm's checks, with its words.
inline void check_group_norm_args(const at::Tensor& input, int64_t groups, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
  check_floating_input(input, "group_norm");
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ", input.dim());
  const int64_t C = input.size(1);
  TORCH_CHECK(groups > 0, "group_norm: num_groups must be positive, got ", groups);
  TORCH_CHECK(C > 0, "Expected number of channels to be greater than 0, got ", C);
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.size(d);
  TORCH_CHECK(spatial > 0, "Expected HxW to be greater than 0, got ", spatial);
  TORCH_CHECK(C % groups == 0, "Expected number of channels in input to be divisible by num_groups, but got input "
              "of shape ", input.sizes(), " and num_groups=", groups);
  for (const auto& [param, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!has(*param)) continue;
    TORCH_CHECK((*param)->dim() == 1 && (*param)->numel() == C, "Expected ", name,
                " to be a vector of size equal to the number of channels in input, but got ", name, " of shape ",
                (*param)->sizes(), " and input of shape ", input.sizes());
    check_param_device_dtype(**param, name, input);
  }
}

// The forward's: torch.nn.functional.group_norm refuses groups of one value
// before its other checks (ValueError, its words).
inline void check_group_norm_forward_args(const at::Tensor& input, int64_t groups,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias) {
  if (input.dim() >= 2 && groups > 0) {
    int64_t values = input.size(0) * input.size(1) / groups;
    for (int64_t d = 2; d < input.dim(); ++d) values *= input.size(d);
    // The size torch's message names, built only for the message.
    auto torch_size = [&] {
      std::vector<int64_t> size{input.size(0) * input.size(1) / groups, groups};
      for (int64_t d = 2; d < input.dim(); ++d) size.push_back(input.size(d));
      return size;
    };
    TORCH_CHECK_VALUE(values != 1, "Expected more than 1 value per channel when training, got input size ",
                      at::IntArrayRef(torch_size()));
  }
  check_group_norm_args(input, groups, weight, bias);
}

// grad_out like the input; `stats` statistics saved by the forward.
inline void check_group_norm_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& rstd, int64_t stats) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out must have the input's size ", input.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out must have dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), op, ": grad_out must be on the input's device ", input.device(),
              ", got ", grad_out.device());
  TORCH_CHECK(mean.numel() == stats && rstd.numel() == stats, op, ": mean and rstd should have ", stats,
              " elements, got ", mean.numel(), " and ", rstd.numel());
}

// LayerNorm over the channels of an (N, C, *) input: weight and bias of C values.
inline void check_layer_norm_channels_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias) {
  check_floating_input(input, "layer_norm_channels");
  TORCH_CHECK_INDEX(input.dim() >= 2, "layer_norm_channels: expected an (N, C, *) input, got ", input.dim(),
                    "-D input of size ", input.sizes());
  const int64_t C = input.size(1);
  check_param(weight, "weight", input, C, "the input's channel count, input.size(1)");
  check_param(bias, "bias", input, C, "the input's channel count, input.size(1)");
}

// LayerNorm over channels saves one mean and rstd per (sample, position):
// the product of every size but the channel count's.
inline int64_t layer_norm_channels_stat_count(const at::Tensor& input) {
  int64_t count = 1;
  for (int64_t d = 0; d < input.dim(); ++d) count *= d == 1 ? 1 : input.size(d);
  return count;
}

}  // namespace bn_ext
