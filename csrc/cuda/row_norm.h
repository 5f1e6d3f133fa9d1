// LayerNorm's and RMSNorm's CUDA part (cuda/row_norm.cu), for the operators
// of row_norm_ops.h and those built on them (LayerNorm over channels,
// cuda/group_norm.cu).
#pragma once

#include "row_norm_ops.h"

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bn_ext::cuda {

struct RowNormDevice {
  static at::Tensor empty_like(const at::Tensor& x);
  static void forward(const RowNormForwardCall& call);
  static std::tuple<at::Tensor, at::Tensor> backward(const RowNormBackwardCall& call);
};

using RowNormCudaOps = RowNormOps<RowNormDevice>;

}  // namespace bn_ext::cuda
