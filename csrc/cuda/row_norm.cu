// LayerNorm and RMSNorm on CUDA: launchers only; device code in
// kernels/row_norm.cuh, shared by the two ops through its kRms switch. The
// same checks and output conventions as the CPU ops (row_norm_common.h).
#include "cuda/kernels/row_norm.cuh"
#include "cuda/launch_utils.h"
#include "cuda/row_norm.h"
#include "row_norm_common.h"

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
std::tuple<Tensor, Tensor, Tensor> row_norm_forward_cuda(const Tensor& input, at::IntArrayRef normalized_shape,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, double eps) {
  const RowGeometry g =
      check_row_norm_args(kRms ? "rms_norm" : "layer_norm", input, normalized_shape, weight, bias);
  const DeviceGuard guard(input);
  const Tensor x = input.contiguous();
  const auto acc = stat_dtype(x.scalar_type());
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mean = at::empty(kRms ? std::vector<int64_t>{0} : row_stat_shape(x, normalized_shape), x.options().dtype(acc));
  Tensor rstd = at::empty(row_stat_shape(x, normalized_shape), x.options().dtype(acc));
  if (g.rows == 0) return {out, mean, rstd};
  const auto w = as_acc(weight, acc), b = as_acc(bias, acc);
  dispatch_device_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const bool vectorized = rows_vectorizable({x.const_data_ptr(), out.const_data_ptr()});
    with_row_launch_shape(g, [&](auto warp_per_row, dim3 grid, dim3 block) {
      const auto kernel = row_norm_forward<T, kRms, decltype(warp_per_row)::value>;
      BN_EXT_LAUNCH(kernel, grid, block, 0, current_stream(), device_data<T>(x), device_data_or_null<A>(w),
                    device_data_or_null<A>(b), device_data_mut<T>(out), kRms ? nullptr : device_data_mut<A>(mean),
                    device_data_mut<A>(rstd), g.rows, g.cols, A(eps), vectorized);
      BN_EXT_LAUNCH_CHECK();
    });
  });
  return {out, mean, rstd};
}

// dx (output_mask[0]), dweight (mask[1]) and dbias (mask[2]); mean is unused by RMSNorm.
template <bool kRms>
std::tuple<Tensor, Tensor, Tensor> row_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                          at::IntArrayRef normalized_shape, const Tensor& mean,
                                                          const Tensor& rstd, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          std::array<bool, 3> output_mask) {
  const char* op = kRms ? "rms_norm_backward" : "layer_norm_backward";
  const RowGeometry g = check_row_norm_args(op, input, normalized_shape, weight, bias);
  check_row_norm_backward_args(op, grad_out, input, kRms ? nullptr : &mean, rstd, g.rows);
  const DeviceGuard guard(input);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const auto acc = stat_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  const Tensor mean_c = kRms ? mean : mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  const auto w = as_acc(weight, acc);
  Tensor dx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  Tensor dweight = at::zeros({output_mask[1] ? g.cols : 0}, acc_options);
  Tensor dbias = at::zeros({output_mask[2] ? g.cols : 0}, acc_options);
  if (g.rows > 0 && g.cols > 0) {
    dispatch_device_type(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const A* mean_p = kRms ? nullptr : device_data<A>(mean_c);
      if (output_mask[0]) {
        const bool vectorized = rows_vectorizable({x.const_data_ptr(), dy.const_data_ptr(), dx.const_data_ptr()});
        with_row_launch_shape(g, [&](auto warp_per_row, dim3 grid, dim3 block) {
          const auto kernel = row_norm_backward_input<T, kRms, decltype(warp_per_row)::value>;
          BN_EXT_LAUNCH(kernel, grid, block, 0, current_stream(), device_data<T>(dy), device_data<T>(x),
                        device_data_or_null<A>(w), mean_p, device_data<A>(rstd_c), device_data_mut<T>(dx), g.rows,
                        g.cols, vectorized);
          BN_EXT_LAUNCH_CHECK();
        });
      }
      if (output_mask[1] || output_mask[2]) {
        const int64_t column_blocks = ceil_div(g.cols, kWarp);
        const int64_t max_count = std::min<int64_t>(1024, ceil_div(g.rows, 4 * kParamRows));
        const int count = static_cast<int>(
            std::clamp<int64_t>(ceil_div(int64_t(kBlocksPerSm) * sm_count(), column_blocks), 1, max_count));
        Tensor partials = at::empty({int64_t(count) * 2 * g.cols}, acc_options);
        const auto partial_kernel = row_norm_param_partials<T, kRms>;
        BN_EXT_LAUNCH(partial_kernel, dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(count)),
                      dim3(kWarp, kParamRows), 0, current_stream(), device_data<T>(dy), device_data<T>(x), mean_p,
                      device_data<A>(rstd_c), g.rows, g.cols, device_data_mut<A>(partials));
        BN_EXT_LAUNCH_CHECK();
        const auto sum_kernel = column_sums<A>;
        BN_EXT_LAUNCH(sum_kernel, dim3(static_cast<unsigned>(ceil_div(g.cols, kRowBlockThreads))),
                      dim3(kRowBlockThreads), 0, current_stream(), device_data<A>(partials), count, g.cols,
                      output_mask[1] ? device_data_mut<A>(dweight) : nullptr,
                      output_mask[2] ? device_data_mut<A>(dbias) : nullptr);
        BN_EXT_LAUNCH_CHECK();
      }
    });
  }
  if constexpr (!kRms) zero_single_value_rows(dx, g.cols);
  auto param_grad = [&](bool asked, const Tensor& grad, const std::optional<Tensor>& param) {
    const auto dtype = has(param) ? param->scalar_type() : x.scalar_type();
    return asked ? grad.to(dtype).view(normalized_shape) : at::empty({0}, x.options().dtype(dtype));
  };
  return {dx, param_grad(output_mask[1], dweight, weight), param_grad(output_mask[2], dbias, bias)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_cuda(const Tensor& input, at::IntArrayRef normalized_shape,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, double eps) {
  return row_norm_forward_cuda<false>(input, normalized_shape, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                            at::IntArrayRef normalized_shape, const Tensor& mean,
                                                            const Tensor& rstd, const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, double eps,
                                                            std::array<bool, 3> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernels
  return row_norm_backward_cuda<false>(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask);
}

std::tuple<Tensor, Tensor> rms_norm_forward_cuda(const Tensor& input, at::IntArrayRef normalized_shape,
                                                 const std::optional<Tensor>& weight, std::optional<double> eps) {
  auto [out, mean, rstd] = row_norm_forward_cuda<true>(input, normalized_shape, weight, std::nullopt,
                                                       rms_norm_eps(eps, input.scalar_type()));
  return {rms_norm_output_format(out, input), rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                  at::IntArrayRef normalized_shape, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight, std::optional<double> eps,
                                                  std::array<bool, 2> output_mask) {
  (void)eps;  // used by the autograd formula of this op, not by the kernels
  auto [dx, dweight, unused] = row_norm_backward_cuda<true>(grad_out, input, normalized_shape, rstd, rstd, weight,
                                                            std::nullopt, {output_mask[0], output_mask[1], false});
  return {dx, dweight};
}

#ifndef BN_EXT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
  m.impl("rms_norm_forward", &rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}
#endif

}  // namespace bn_ext::cuda
