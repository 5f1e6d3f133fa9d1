// CPU helpers shared by LayerNorm and RMSNorm: dtype dispatch of the input and
// its parameters, tensor allocation for per-row statistics and parameter
// gradients, and deterministic column sums over blocks of rows.
#pragma once

#include "cpu/kernel_utils.h"
#include "row_norm_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <type_traits>
#include <vector>

namespace bn_ext::cpu {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<input type>, TypeTag<parameter type>): parameters have the
// input's type, or float32 beside a half-precision input.
template <typename Fn>
void dispatch_input_and_param(at::ScalarType input_type, at::ScalarType param_type,
                              const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_type, "row_norm", [&] {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      if (param_type == at::kFloat) return fn(TypeTag<scalar_t>{}, TypeTag<float>{});
    }
    fn(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
  });
}

inline at::ScalarType param_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
  if (has(weight)) return weight->scalar_type();
  if (has(bias)) return bias->scalar_type();
  return input.scalar_type();
}

template <typename P>
const P* data_or_null(const std::optional<at::Tensor>& t) {
  return has(t) ? t->const_data_ptr<P>() : nullptr;
}

// Fixed split of rows into blocks for parameter-gradient partials: at most
// kMaxRowBlocks blocks (memory is blocks x cols accumulators), at least
// kCacheChunk * 8 elements each. Depends on the shape only.
constexpr int64_t kMaxRowBlocks = 32;

// Runs row_fn(row, sums) for every row, where `sums` points at n_sums * cols
// zeroed op-math accumulators private to the row's block, and returns the
// per-column totals with the blocks added in order.
template <typename Acc, typename RowFn>
std::vector<double> rows_with_column_sums(const RowGeometry& g, int64_t n_sums, const RowFn& row_fn) {
  const int64_t width = n_sums * g.cols;
  const int64_t blocks =
      n_sums == 0 ? std::max<int64_t>(1, g.rows)
                  : part_count(g.rows, std::max<int64_t>(1, kCacheChunk * 8 / std::max<int64_t>(g.cols, 1)),
                               kMaxRowBlocks);
  std::vector<Acc> partial(blocks * width, Acc(0));
  at::parallel_for(0, blocks, n_sums == 0 ? grain_for(g.cols) : 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Acc* sums = width ? partial.data() + b * width : nullptr;
      for (int64_t r = part_begin(b, blocks, g.rows); r < part_begin(b + 1, blocks, g.rows); ++r) row_fn(r, sums);
    }
  });
  std::vector<double> total(width, 0.0);
  at::parallel_for(0, width, kElementwiseGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = j0; j < j1; ++j) total[j] += static_cast<double>(partial[b * width + j]);
    }
  });
  return total;
}

// A tensor of `shape` and `dtype` holding values[offset, offset + numel).
inline at::Tensor tensor_from(const std::vector<double>& values, int64_t offset, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tensor_from", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(values[offset + i]);
  });
  return t;
}

// sum over chunks of f(i0, i1) (op-math partial sums of a row segment), in
// double across chunks so long rows keep their precision.
template <typename ChunkSum>
inline double chunked_sum(int64_t n, const ChunkSum& chunk_sum) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kCacheChunk) total += static_cast<double>(chunk_sum(i, std::min(n, i + kCacheChunk)));
  return total;
}

}  // namespace bn_ext::cpu
