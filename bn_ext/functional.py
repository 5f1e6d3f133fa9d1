"""Functional API: thin wrappers over torch.ops.bn_ext.*, with their fake
(shape) kernels and autograd formulas.

The signatures and semantics are those of torch.nn.functional.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

import bn_ext._C  # noqa: F401  (registers the operators)

__all__ = ["batch_norm"]

_ops = torch.ops.bn_ext


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduction_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


# ---------------------------------------------------------------------------
# BatchNorm


def _check_same_device(input: Tensor, **tensors: Tensor | None) -> None:
    # The fake kernels also serve mixed real/meta calls, which reach no C++ check.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} must be on the same device as input ({input.device}), got {t.device}")


@torch.library.register_fake("bn_ext::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps):
    _check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    channels = input.shape[1]
    stat = _stat_dtype(input.dtype)
    out = torch.empty_like(input, memory_format=suggest_memory_format(input))
    return out, input.new_empty((channels,), dtype=stat), input.new_empty((channels,), dtype=stat)


@torch.library.register_fake("bn_ext::batch_norm_update_stats")
def _batch_norm_update_stats_fake(
    running_mean, running_var, save_mean, save_invstd, momentum, num_batches_tracked, eps, count
):
    return None


@torch.library.register_fake("bn_ext::batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, weight, save_mean, save_invstd, training, eps, output_mask):
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = (
        torch.empty_like(input, memory_format=suggest_memory_format(input))
        if output_mask[0]
        else input.new_empty((0,))
    )
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


def _batch_norm_forward_setup(ctx, inputs, output):
    input, weight, bias, _running_mean, _running_var, training, eps = inputs
    _, save_mean, save_invstd = output
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.training = training
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _batch_norm_forward_backward(ctx, grad_out, _grad_mean, _grad_invstd):
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    if grad_out is None or not any(mask):
        return (None,) * 7
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
        grad_out, input, weight, save_mean, save_invstd, ctx.training, ctx.eps, mask
    )
    return (
        grad_input if mask[0] else None,
        grad_weight if mask[1] else None,
        grad_bias.to(ctx.bias_dtype) if mask[2] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "bn_ext::batch_norm_forward", _batch_norm_forward_backward, setup_context=_batch_norm_forward_setup
)


def _batch_norm_grads_reference(grad_out, input, weight, save_mean, save_invstd, training, eps):
    """BatchNorm's first derivatives as a composite of torch ops.

    In training the statistics are recomputed from `input`, so differentiating
    this gives the exact second derivatives (double backward).
    """
    compute = torch.promote_types(input.dtype, torch.float32)
    x, dy = input.to(compute), grad_out.to(compute)
    dims, shape = _reduction_dims(x), _channel_shape(x)
    if training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    else:
        mean, invstd = save_mean.to(compute).view(shape), save_invstd.to(compute).view(shape)
    x_hat = (x - mean) * invstd
    grad_weight = (dy * x_hat).sum(dims)
    grad_bias = dy.sum(dims)
    g = dy if weight is None else dy * weight.to(compute).view(shape)
    if training:
        grad_input = invstd * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    else:
        grad_input = g * invstd
    return grad_input.to(input.dtype), grad_weight, grad_bias


def _batch_norm_backward_setup(ctx, inputs, output):
    grad_out, input, weight, save_mean, save_invstd, training, eps, output_mask = inputs
    ctx.save_for_backward(grad_out, input, weight, save_mean, save_invstd)
    ctx.training, ctx.eps, ctx.output_mask = training, eps, list(output_mask)


def _batch_norm_backward_backward(ctx, gg_input, gg_weight, gg_bias):
    grad_out, input, weight, save_mean, save_invstd = ctx.saved_tensors
    has_weight = weight is not None
    w = weight if has_weight else torch.ones(input.shape[1], dtype=input.dtype, device=input.device)

    def first_derivatives(dy, x, w_):
        return _batch_norm_grads_reference(dy, x, w_, save_mean, save_invstd, ctx.training, ctx.eps)

    outputs, vjp = torch.func.vjp(first_derivatives, grad_out, input, w)
    cotangents = tuple(
        g.to(o.dtype) if (asked and g is not None and g.numel() == o.numel()) else torch.zeros_like(o)
        for g, o, asked in zip((gg_input, gg_weight, gg_bias), outputs, ctx.output_mask)
    )
    d_grad_out, d_input, d_weight = vjp(cotangents)
    return d_grad_out, d_input, (d_weight.to(weight.dtype) if has_weight else None), None, None, None, None, None


torch.library.register_autograd(
    "bn_ext::batch_norm_backward", _batch_norm_backward_backward, setup_context=_batch_norm_backward_setup
)


def _verify_batch_size(size: Sequence[int]) -> None:
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization over the channel dimension (dim 1) of an (N, C, *) input.

    Same signature and behaviour as torch.nn.functional.batch_norm: in training
    the batch statistics normalise the input and, when given, running_mean and
    running_var are updated in place (running_var with the unbiased variance).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """batch_norm, plus momentum=None: a cumulative average over num_batches_tracked."""
    if training and input.dim() >= 2:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    out, save_mean, save_invstd = _ops.batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, eps
    )
    if training and running_mean is not None and input.numel() > 0:
        with torch.no_grad():
            _ops.batch_norm_update_stats(
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                momentum,
                num_batches_tracked,
                eps,
                input.numel() // input.shape[1],
            )
    return out


