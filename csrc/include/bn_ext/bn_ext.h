// bn_ext C++ API: the operators of the Python package, callable without Python.
//
// Link the CMake target bn_ext::bn_ext (find_package(bn_ext)). Every function
// goes through PyTorch's dispatcher, so it runs on whichever backend bn_ext was
// built for. Errors are c10::Error (c10::ValueError, c10::IndexError, ...) with
// the messages the Python API raises. The forward ops are differentiable with
// libtorch's autograd (first order); the *_backward functions give gradients
// directly. Double backward needs the Python package's formulas.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace bn_ext {

using at::Tensor;

// --- BatchNorm over dim 1 of an (N, C, *) input ------------------------------

// torch.nn.functional.batch_norm: in training, normalises with the batch
// statistics and updates running_mean / running_var in place (when given).
Tensor batch_norm(const Tensor& input, const std::optional<Tensor>& running_mean,
                  const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight = std::nullopt,
                  const std::optional<Tensor>& bias = std::nullopt, bool training = false, double momentum = 0.1,
                  double eps = 1e-5);

// The same with torch.nn's BatchNorm options: momentum nullopt keeps a
// cumulative average over num_batches_tracked (which the caller increments).
Tensor batch_norm(const Tensor& input, const std::optional<Tensor>& running_mean,
                  const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, bool training, std::optional<double> momentum, double eps,
                  const std::optional<Tensor>& num_batches_tracked);

// (out, save_mean, save_invstd): the statistics used (batch or running).
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var, bool training,
                                                      double eps);

// In place: running = (1 - f) * running + f * batch statistic, with f =
// momentum, or 1 / num_batches_tracked when momentum is nullopt (cumulative
// average); running_var gets the unbiased variance of `count` values per channel.
void batch_norm_update_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                             const Tensor& save_mean, const Tensor& save_invstd, std::optional<double> momentum,
                             const std::optional<Tensor>& num_batches_tracked, double eps, int64_t count);

// (grad_input, grad_weight, grad_bias); gradients not in output_mask are empty.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const std::optional<Tensor>& weight, const Tensor& save_mean,
                                                       const Tensor& save_invstd, bool training, double eps,
                                                       std::array<bool, 3> output_mask = {true, true, true});

// --- BatchNorm fused with an activation and a residual -----------------------

// act(batch_norm(input) + residual), activation "relu", "silu" or "none"
// (nullopt: none), residual nullopt for none: batch_norm's arguments and
// running-statistics update, in one pass; equal to the unfused ops.
Tensor batch_norm_act(const Tensor& input, const std::optional<Tensor>& running_mean,
                      const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, bool training, std::optional<double> momentum, double eps,
                      const std::optional<std::string>& activation = "relu",
                      const std::optional<Tensor>& residual = std::nullopt,
                      const std::optional<Tensor>& num_batches_tracked = std::nullopt);

// (out, save_mean, save_invstd).
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    const std::optional<std::string>& activation, const std::optional<Tensor>& residual);

// (grad_input, grad_weight, grad_bias, grad_residual); gradients not in output_mask are empty.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& save_mean,
    const Tensor& save_invstd, bool training, double eps, const std::optional<std::string>& activation,
    std::array<bool, 4> output_mask = {true, true, true, true});

// --- Batch Renormalization (Ioffe, 2017) -------------------------------------

// bn_ext.batch_renorm: training normalises with the batch statistics, scaled
// by r = clip(sigma_B / sigma, 1 / rmax, rmax) and shifted by d =
// clip((mean_B - running_mean) / sigma, -dmax, dmax) (sigma = sqrt(running_var
// + eps); r and d constant for autograd), then moves running_mean and sigma
// by `momentum` towards the batch's (running_var = sigma^2 - eps); eval is
// batch_norm with the running statistics.
Tensor batch_renorm(const Tensor& input, const std::optional<Tensor>& running_mean,
                    const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight = std::nullopt,
                    const std::optional<Tensor>& bias = std::nullopt, bool training = false, double momentum = 0.01,
                    double eps = 1e-3, double rmax = 3.0, double dmax = 5.0);

// --- LayerNorm and RMSNorm over the trailing normalized_shape dims ------------

Tensor layer_norm(const Tensor& input, at::IntArrayRef normalized_shape,
                  const std::optional<Tensor>& weight = std::nullopt, const std::optional<Tensor>& bias = std::nullopt,
                  double eps = 1e-5);

// (out, mean, rstd)
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape,
                                                      const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias, double eps);

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       at::IntArrayRef normalized_shape, const Tensor& mean,
                                                       const Tensor& rstd, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, double eps,
                                                       std::array<bool, 3> output_mask = {true, true, true});

// eps nullopt: the machine epsilon of the computation type, as torch.
Tensor rms_norm(const Tensor& input, at::IntArrayRef normalized_shape,
                const std::optional<Tensor>& weight = std::nullopt, std::optional<double> eps = std::nullopt);

// (out, rstd)
std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& input, at::IntArrayRef normalized_shape,
                                            const std::optional<Tensor>& weight, std::optional<double> eps);

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad_out, const Tensor& input,
                                             at::IntArrayRef normalized_shape, const Tensor& rstd,
                                             const std::optional<Tensor>& weight, std::optional<double> eps,
                                             std::array<bool, 2> output_mask = {true, true});

// --- GroupNorm, InstanceNorm and LayerNorm over the channels of (N, C, *) ---

// torch.nn.functional.group_norm, and an activation of the output fused in
// ("relu" or "silu"; nullopt or "none": none). Channels-last inputs stay so.
Tensor group_norm(const Tensor& input, int64_t num_groups, const std::optional<Tensor>& weight = std::nullopt,
                  const std::optional<Tensor>& bias = std::nullopt, double eps = 1e-5,
                  const std::optional<std::string>& activation = std::nullopt);
// (out, mean, rstd); the statistics are (N, num_groups).
std::tuple<Tensor, Tensor, Tensor> group_norm_forward(const Tensor& input, int64_t num_groups,
                                                      const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias, double eps,
                                                      const std::optional<std::string>& activation = std::nullopt);
std::tuple<Tensor, Tensor, Tensor> group_norm_backward(const Tensor& grad_out, const Tensor& input, int64_t num_groups,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, double eps,
                                                       const std::optional<std::string>& activation = std::nullopt,
                                                       std::array<bool, 3> output_mask = {true, true, true});
// torch.nn.functional.instance_norm: instance statistics (use_input_stats)
// with the running statistics, when given, moved towards their batch
// averages; or the running statistics (BatchNorm in eval mode).
Tensor instance_norm(const Tensor& input, const std::optional<Tensor>& running_mean = std::nullopt,
                     const std::optional<Tensor>& running_var = std::nullopt,
                     const std::optional<Tensor>& weight = std::nullopt,
                     const std::optional<Tensor>& bias = std::nullopt, bool use_input_stats = true,
                     double momentum = 0.1, double eps = 1e-5);
// LayerNorm over dim 1 at every position (ConvNeXt's LayerNorm2d), either
// memory format; statistics (N, 1, *).
Tensor layer_norm_channels(const Tensor& input, const std::optional<Tensor>& weight = std::nullopt,
                           const std::optional<Tensor>& bias = std::nullopt, double eps = 1e-6);
std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_forward(const Tensor& input,
                                                               const std::optional<Tensor>& weight,
                                                               const std::optional<Tensor>& bias, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_channels_backward(const Tensor& grad_out, const Tensor& input,
                                                                const Tensor& mean, const Tensor& rstd,
                                                                const std::optional<Tensor>& weight,
                                                                const std::optional<Tensor>& bias, double eps,
                                                                std::array<bool, 3> output_mask = {true, true, true});

// --- Folding eval BatchNorm into the preceding layer ---------------------------

// Conv / ConvTranspose (transposed = true) followed by BatchNorm: the folded
// (weight, bias), computed in float64 and rounded once into the layer's dtype,
// device and memory format.
std::tuple<Tensor, Tensor> fuse_conv_bn_weights(const Tensor& conv_weight, const std::optional<Tensor>& conv_bias,
                                                const Tensor& running_mean, const Tensor& running_var, double eps,
                                                const std::optional<Tensor>& bn_weight,
                                                const std::optional<Tensor>& bn_bias, bool transposed = false,
                                                int64_t groups = 1);

// Linear followed by BatchNorm1d.
std::tuple<Tensor, Tensor> fuse_linear_bn_weights(const Tensor& linear_weight,
                                                  const std::optional<Tensor>& linear_bias,
                                                  const Tensor& running_mean, const Tensor& running_var, double eps,
                                                  const std::optional<Tensor>& bn_weight,
                                                  const std::optional<Tensor>& bn_bias);

// Large CPU outputs (4 MB and more) take their memory from a cache of the
// memory of freed bn_ext outputs, so that a training loop, whose outputs have
// the same sizes every step, stops paying the OS's page faults and zeroing
// after its first step. The cache keeps at most a limit of freed memory
// (1 GiB, or BN_EXT_OUTPUT_CACHE_BYTES at start); live outputs do not count.
struct CpuOutputCacheStats {
  size_t limit_bytes;   // the most freed memory the cache keeps
  size_t cached_bytes;  // freed memory it keeps now
  size_t in_use_bytes;  // memory of live outputs it handed out
  size_t hits;          // outputs served from kept memory
  size_t misses;        // outputs that took new memory
};
CpuOutputCacheStats cpu_output_cache_stats();
// Sets the limit and releases kept memory beyond it; 0 keeps nothing.
void set_cpu_output_cache_limit(size_t bytes);
// Releases all kept memory; the limit stays.
void empty_cpu_output_cache();

// The SIMD level of the CPU kernels in use: "DEFAULT", "AVX2", "AVX512" or
// "AVX512_BF16". Every level the build holds is compiled in; the best one the
// CPU runs is chosen at the first call, lowered by the environment variable
// BN_EXT_CPU_CAPABILITY (or ATen's ATEN_CPU_CAPABILITY) when set.
std::string cpu_capability();
// The levels this build holds and this CPU runs, lowest first.
std::vector<std::string> cpu_capabilities();

// Names of every bn_ext operator, as registered: the one list that the C++
// tests and operator_names() read.
// Composed of others (CompositeImplicitAutograd): batch_norm, batch_norm_act,
// batch_renorm (and its bounds_tensors overload), instance_norm.
inline constexpr const char* kOperatorNames[] = {
    "bn_ext::batch_norm_forward",          "bn_ext::batch_norm_update_stats",
    "bn_ext::batch_norm_backward",         "bn_ext::batch_norm_stats",
    "bn_ext::batch_norm_act_forward",      "bn_ext::batch_norm_act_backward",
    "bn_ext::layer_norm_forward",          "bn_ext::layer_norm_backward",
    "bn_ext::rms_norm_forward",            "bn_ext::rms_norm_backward",
    "bn_ext::group_norm_forward",          "bn_ext::group_norm_backward",
    "bn_ext::layer_norm_channels_forward", "bn_ext::layer_norm_channels_backward",
    "bn_ext::batch_norm",                  "bn_ext::batch_norm_act",
    "bn_ext::batch_renorm",                "bn_ext::instance_norm",
    "bn_ext::fuse_conv_bn_weights",        "bn_ext::fuse_bn_conv_weights"};
std::vector<const char*> operator_names();

}  // namespace bn_ext
