// Every bn_ext operator schema, in one place. Implementations are registered
// per backend (cpu/, cuda/); the forward ops' autograd in autograd.cpp; fake
// kernels and the backward ops' autograd (double backward) in bn_ext/functional.py.
#include <torch/library.h>

TORCH_LIBRARY(bn_ext, m) {
  // BatchNorm. The forward is functional: it returns the statistics it used
  // (batch statistics in training, running ones in eval); running statistics
  // are updated by the separate in-place op below.
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  // momentum None: cumulative average, factor 1 / num_batches_tracked (read
  // here rather than in Python so compiled graphs need no data-dependent scalar).
  m.def(
      "batch_norm_update_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor save_mean, "
      "Tensor save_invstd, float? momentum, Tensor? num_batches_tracked, float eps, int count) -> ()");
  // Per-channel mean and M2 = sum((x - mean)^2) in float64, for merging
  // statistics across processes (SyncBatchNorm).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  // Gradients not asked for by output_mask come back as empty tensors.
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // BatchNorm fused with an activation (None, 'relu' or 'silu') of the
  // output plus an optional residual: out = act(batch_norm(input) + residual).
  // The backward recomputes the pre-activation value from input, residual
  // and the saved statistics; output_mask's last entry is the residual's gradient.
  m.def(
      "batch_norm_act_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, str? activation, Tensor? residual) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, bool training, float eps, str? activation, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // torch.nn.functional.batch_norm (momentum None: the cumulative average
  // over num_batches_tracked) and its fused form, composed of the operators
  // above (CompositeImplicitAutograd, api.cpp): the forward, then the
  // running statistics moved in place.
  m.def(
      "batch_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, Tensor? bias, "
      "bool training, float? momentum, float eps, Tensor? num_batches_tracked) -> Tensor");
  m.def(
      "batch_norm_act(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
      "Tensor? bias, bool training, float? momentum, float eps, str? activation, Tensor? residual, "
      "Tensor? num_batches_tracked) -> Tensor");

  // LayerNorm and RMSNorm over the trailing normalized_shape dims. Statistics
  // have the input's leading dims and a 1 per normalized dim. eps in the
  // backward ops serves their own autograd formula (double backward).
  m.def(
      "layer_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // eps None: the machine epsilon of the op-math type, as torch.
  m.def(
      "rms_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, float? eps)"
      " -> (Tensor out, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor rstd, Tensor? weight, "
      "float? eps, bool[2] output_mask) -> (Tensor, Tensor)");

  // GroupNorm over groups of adjacent channels of an (N, C, *) input, with an
  // optional activation of the output (None, 'relu' or 'silu'); statistics
  // (N, num_groups). InstanceNorm is num_groups = C.
  m.def(
      "group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, str? activation)"
      " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, int num_groups, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, float eps, str? activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // torch.nn.functional.instance_norm, composed of the operators above
  // (CompositeImplicitAutograd, api.cpp): it moves the running statistics,
  // when given, towards their batch averages.
  m.def(
      "instance_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
      "Tensor? bias, bool use_input_stats, float momentum, float eps) -> Tensor");
  // Batch Renormalization (Ioffe, 2017), composed of the BatchNorm operators
  // (CompositeImplicitAutograd, api.cpp); the clipping bounds as numbers, or
  // as 0-dim tensors (a schedule computed in a compiled graph).
  m.def(
      "batch_renorm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
      "Tensor? bias, bool training, float momentum, float eps, float rmax, float dmax) -> Tensor");
  m.def(
      "batch_renorm.bounds_tensors(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight, Tensor? bias, bool training, float momentum, float eps, Tensor rmax, Tensor dmax) -> Tensor");
  // LayerNorm over the channels (dim 1) of an (N, C, *) input, as ConvNeXt's
  // LayerNorm2d, in either memory format; statistics (N, 1, *).
  m.def(
      "layer_norm_channels_forward(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_channels_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Eval-mode BatchNorm folding (csrc/fold.cpp): the folded layer's (weight, bias).
  // Layer then BatchNorm; `transposed` for ConvTranspose weights.
  m.def(
      "fuse_conv_bn_weights(Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
      "Tensor? bn_weight, Tensor? bn_bias, bool transposed, int groups) -> (Tensor, Tensor)");
  // BatchNorm then Conv / Linear (over the layer's input channels).
  m.def(
      "fuse_bn_conv_weights(Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
      "Tensor? bn_weight, Tensor? bn_bias, int groups) -> (Tensor, Tensor)");
}
