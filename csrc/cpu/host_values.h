// Small per-channel tensors read into and written from host float64 arrays,
// for the CPU op wrappers (parameters, statistics, parameter gradients).
#pragma once

#include "norm_common.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <vector>

namespace bn_ext::cpu {

// A per-channel tensor (optional) read as doubles.
inline std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!has(t)) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values", [&] {
    // Any shape of C elements, read in its own order (a (1, C) weight as torch
    // takes it); a view for 0-d and 1-d tensors.
    const at::Tensor flat = t->reshape({-1});
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    const int64_t stride = flat.stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(p[c * stride]);
  });
  return v;
}

// Tensor of `dtype` holding `values`.
inline at::Tensor channel_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channel_tensor", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) p[c] = static_cast<scalar_t>(values[c]);
  });
  return t;
}

}  // namespace bn_ext::cpu
