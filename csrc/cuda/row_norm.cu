// LayerNorm's and RMSNorm's CUDA part (row_norm_ops.h holds the operators):
// launchers only; device code in kernels/row_norm.cuh, shared by the two
// through its kRms switch.
#include "cuda/kernels/row_norm.cuh"
#include "cuda/launch_utils.h"
#include "cuda/row_norm.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#ifndef BN_EXT_CUDA_EMULATOR
#include <torch/library.h>
#endif

namespace bn_ext::cuda {

using at::Tensor;

namespace {

// Rows up to this long get a warp each; longer ones a block.
constexpr int64_t kWarpRowMax = 1024;

// The kernels' row walk is vectorised when every tensor starts on a 16-byte
// boundary: rows then share their offset from it (see for_each_row_piece).
bool rows_vectorizable(std::initializer_list<const void*> pointers) {
  return std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return p == nullptr || aligned16(p); });
}

// f(warp_per_row tag, grid, block) for rows of D values.
template <typename F>
void with_row_launch_shape(const RowGeometry& g, const F& f) {
  if (g.cols <= kWarpRowMax) {
    f(std::true_type{}, dim3(static_cast<unsigned>(ceil_div(g.rows, kWarpRowsPerBlock))),
      dim3(kWarp, kWarpRowsPerBlock));
  } else {
    f(std::false_type{}, dim3(static_cast<unsigned>(g.rows)), dim3(kRowBlockThreads));
  }
}

template <bool kRms>
void launch_forward(const RowNormForwardCall& a) {
  const DeviceGuard guard(a.x);
  const RowGeometry& g = a.g;
  const auto acc = stat_dtype(a.x.scalar_type());
  const auto w = as_acc(a.weight, acc), b = as_acc(a.bias, acc);
  dispatch_device_type(a.x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const bool vectorized = rows_vectorizable({a.x.const_data_ptr(), a.out.const_data_ptr()});
    with_row_launch_shape(g, [&](auto warp_per_row, dim3 grid, dim3 block) {
      const auto kernel = row_norm_forward<T, kRms, decltype(warp_per_row)::value>;
      BN_EXT_LAUNCH(kernel, grid, block, 0, current_stream(), device_data<T>(a.x), device_data_or_null<A>(w),
                    device_data_or_null<A>(b), device_data_mut<T>(a.out), kRms ? nullptr : device_data_mut<A>(a.mean),
                    device_data_mut<A>(a.rstd), g.rows, g.cols, A(a.eps), vectorized);
      BN_EXT_LAUNCH_CHECK();
    });
  });
}

template <bool kRms>
std::tuple<Tensor, Tensor> launch_backward(const RowNormBackwardCall& a) {
  const DeviceGuard guard(a.x);
  const RowGeometry& g = a.g;
  const auto& mask = a.output_mask;
  const Tensor &x = a.x, &dy = a.dy;
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  const Tensor mean = kRms ? Tensor() : a.mean.to(acc).contiguous(), rstd = a.rstd.to(acc).contiguous();
  const auto w = as_acc(a.weight, acc);
  Tensor dweight = at::zeros({mask[1] ? g.cols : 0}, acc_options);
  Tensor dbias = at::zeros({mask[2] ? g.cols : 0}, acc_options);
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const A* mean_p = kRms ? nullptr : device_data<A>(mean);
    if (mask[0]) {
      const bool vectorized = rows_vectorizable({x.const_data_ptr(), dy.const_data_ptr(), a.dx.const_data_ptr()});
      with_row_launch_shape(g, [&](auto warp_per_row, dim3 grid, dim3 block) {
        const auto kernel = row_norm_backward_input<T, kRms, decltype(warp_per_row)::value>;
        BN_EXT_LAUNCH(kernel, grid, block, 0, current_stream(), device_data<T>(dy), device_data<T>(x),
                      device_data_or_null<A>(w), mean_p, device_data<A>(rstd), device_data_mut<T>(a.dx), g.rows, g.cols,
                      vectorized);
        BN_EXT_LAUNCH_CHECK();
      });
    }
    if (mask[1] || mask[2]) {
      const int64_t column_blocks = ceil_div(g.cols, kWarp);
      const int64_t max_count = std::min<int64_t>(1024, ceil_div(g.rows, 4 * kParamRows));
      const int count = static_cast<int>(
          std::clamp<int64_t>(ceil_div(int64_t(kBlocksPerSm) * sm_count(), column_blocks), 1, max_count));
      Tensor partials = at::empty({int64_t(count) * 2 * g.cols}, acc_options);
      const auto partial_kernel = row_norm_param_partials<T, kRms>;
      BN_EXT_LAUNCH(partial_kernel, dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(count)),
                    dim3(kWarp, kParamRows), 0, current_stream(), device_data<T>(dy), device_data<T>(x), mean_p,
                    device_data<A>(rstd), g.rows, g.cols, device_data_mut<A>(partials));
      BN_EXT_LAUNCH_CHECK();
      const auto sum_kernel = column_sums<A>;
      BN_EXT_LAUNCH(sum_kernel, dim3(static_cast<unsigned>(ceil_div(g.cols, kRowBlockThreads))), dim3(kRowBlockThreads),
                    0, current_stream(), device_data<A>(partials), count, g.cols,
                    mask[1] ? device_data_mut<A>(dweight) : nullptr, mask[2] ? device_data_mut<A>(dbias) : nullptr);
      BN_EXT_LAUNCH_CHECK();
    }
  });
  auto param_grad = [&](bool asked, const Tensor& grad, at::ScalarType dtype) {
    return asked ? grad.to(dtype).view(a.normalized_shape) : at::empty({0}, x.options().dtype(dtype));
  };
  return {param_grad(mask[1], dweight, a.weight_dtype), param_grad(mask[2], dbias, a.bias_dtype)};
}

}  // namespace

Tensor RowNormDevice::empty_like(const Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

void RowNormDevice::forward(const RowNormForwardCall& call) {
  call.mean.defined() ? launch_forward<false>(call) : launch_forward<true>(call);
}

std::tuple<Tensor, Tensor> RowNormDevice::backward(const RowNormBackwardCall& call) {
  return call.mean.defined() ? launch_backward<false>(call) : launch_backward<true>(call);
}

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  RowNormCudaOps::bind([&](const char* name, auto function) { m.impl(name, function); });
}
#endif

}  // namespace bn_ext::cuda
