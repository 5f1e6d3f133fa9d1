"""Folding one norm into one layer: the arithmetic of a BatchNorm (or an
InstanceNorm with running statistics, or a frozen BatchNorm) before or after
a Conv, ConvTranspose or Linear, and of a LayerNorm before a Linear."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

import bn_ext.functional  # noqa: F401  (registers the operators)
from bn_ext.norm_classes import frozen_batch_norm_classes

_ops = torch.ops.bn_ext


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# Norm modules whose eval output with tracked running statistics is a
# per-channel affine map, y = (x - running_mean) / sqrt(running_var + eps) * w + b:
# BatchNorm, and InstanceNorm with track_running_stats (eval uses the running
# statistics, as BatchNorm's).
_FOLDABLE_NORMS = (_BatchNorm, _InstanceNorm)


_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_foldable_norm(m: nn.Module) -> bool:
    return isinstance(m, _FOLDABLE_NORMS + frozen_batch_norm_classes())


def _normalises_with_batch_statistics(m: nn.Module) -> bool:
    """A norm module in training mode, unless it is frozen."""
    return m.training and not isinstance(m, frozen_batch_norm_classes())


def _require_eval(*modules: nn.Module) -> None:
    for m in modules:
        if m.training:
            raise RuntimeError(f"folding needs modules in eval mode: {type(m).__name__} is training (call .eval())")


def _require_running_stats(bn: _BatchNorm) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__} with track_running_stats=False: "
            "its eval output uses the batch's statistics, not constants"
        )


def _bn_args(bn: _BatchNorm) -> tuple:
    return bn.running_mean, bn.running_var, bn.eps, _detach(bn.weight), _detach(bn.bias)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _with_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    fused.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return fused


def _has_zero_padding(conv: nn.Module) -> bool:
    return conv.padding_mode == "zeros" and any(p != 0 for p in conv._reversed_padding_repeated_twice)


def fuse_conv_bn(conv: nn.Module, bn: _BatchNorm) -> nn.Module:
    """Conv{1,2,3}d or ConvTranspose{1,2,3}d followed by BatchNorm -> one new layer.

    Any groups (depthwise included), dilation, stride and padding mode, with or
    without conv bias; BatchNorm with or without affine. The inputs are not changed.
    """
    if not isinstance(conv, _CONVS + _CONV_TRANSPOSES):
        raise TypeError(f"fuse_conv_bn: conv must be a Conv or ConvTranspose module, got {type(conv).__name__}")
    _require_eval(conv, bn)
    _require_running_stats(bn)
    weight, bias = _ops.fuse_conv_bn_weights(
        conv.weight.detach(), _detach(conv.bias), *_bn_args(bn), isinstance(conv, _CONV_TRANSPOSES), conv.groups
    )
    return _with_weights(conv, weight, bias)


def fuse_linear_bn(linear: nn.Linear, bn: _BatchNorm) -> nn.Linear:
    """Linear followed by BatchNorm1d over its output features -> one new Linear."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"fuse_linear_bn: linear must be nn.Linear, got {type(linear).__name__}")
    _require_eval(linear, bn)
    _require_running_stats(bn)
    weight, bias = _ops.fuse_conv_bn_weights(linear.weight.detach(), _detach(linear.bias), *_bn_args(bn), False, 1)
    return _with_weights(linear, weight, bias)


def fuse_bn_conv(bn: _BatchNorm, conv: nn.Module) -> nn.Module:
    """BatchNorm followed by a Conv{1,2,3}d -> one new Conv.

    Exact only when no zero padding is added to the BatchNorm's output (padding
    0, or a padding_mode other than 'zeros'); otherwise refused.
    """
    if not isinstance(conv, _CONVS):
        raise TypeError(
            f"fuse_bn_conv: conv must be Conv1d/2d/3d, got {type(conv).__name__} (a BatchNorm before a "
            "ConvTranspose does not fold exactly: border outputs see fewer taps)"
        )
    _require_eval(conv, bn)
    _require_running_stats(bn)
    if _has_zero_padding(conv):
        raise ValueError(
            f"fuse_bn_conv: the conv zero-pads its input (padding={conv.padding}): the padded zeros would "
            "become BatchNorm's shift after folding, so the result would differ at the borders"
        )
    weight, bias = _ops.fuse_bn_conv_weights(conv.weight.detach(), _detach(conv.bias), *_bn_args(bn), conv.groups)
    return _with_weights(conv, weight, bias)


def fuse_bn_linear(bn: _BatchNorm, linear: nn.Linear) -> nn.Linear:
    """BatchNorm1d over (N, C) features followed by Linear(C, out) -> one new Linear."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"fuse_bn_linear: linear must be nn.Linear, got {type(linear).__name__}")
    _require_eval(linear, bn)
    _require_running_stats(bn)
    weight, bias = _ops.fuse_bn_conv_weights(linear.weight.detach(), _detach(linear.bias), *_bn_args(bn), 1)
    return _with_weights(linear, weight, bias)


def fuse_layer_norm_linear(
    ln: nn.LayerNorm, linears: nn.Linear | Sequence[nn.Linear]
) -> tuple[nn.LayerNorm, list[nn.Linear]]:
    """Move a LayerNorm's weight and bias into the Linear layers it feeds.

    Returns a LayerNorm of the same class without affine parameters and new
    Linears with W' = W * gamma and b' = b + W @ beta. Exact when the LayerNorm's
    output feeds only these Linears.
    """
    linears = [linears] if isinstance(linears, nn.Linear) else list(linears)
    if len(ln.normalized_shape) != 1:
        raise ValueError(f"fuse_layer_norm_linear: needs a 1-D normalized_shape, got {tuple(ln.normalized_shape)}")
    for linear in linears:
        if not isinstance(linear, nn.Linear) or linear.in_features != ln.normalized_shape[0]:
            raise ValueError(
                f"fuse_layer_norm_linear: every layer must be nn.Linear with in_features={ln.normalized_shape[0]}, "
                f"got {linear}"
            )
    plain = type(ln)(ln.normalized_shape, eps=ln.eps, elementwise_affine=False,
                     device=next(linears[0].parameters()).device)
    plain.train(ln.training)
    if not ln.elementwise_affine:
        return plain, [copy.deepcopy(linear) for linear in linears]
    gamma = ln.weight.detach().double()
    beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros_like(gamma)
    fused = []
    for linear in linears:
        w = linear.weight.detach().double()
        b = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        new_w = torch.empty_like(linear.weight).copy_(w * gamma)
        new_b = (b + w @ beta).to(linear.weight.dtype)
        fused.append(_with_weights(linear, new_w, new_b))
    return plain, fused


class FrozenBatchNorm(nn.Module):
    """An eval BatchNorm as a per-channel affine map, y = x * scale + shift (dim 1)."""

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        mean, var, eps, weight, bias = _bn_args(bn)
        scale = (weight.double() if weight is not None else 1.0) / (var.double() + eps).sqrt()
        shift = (bias.double() if bias is not None else 0.0) - mean.double() * scale
        dtype = (bn.weight if bn.weight is not None else bn.running_mean).dtype
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("shift", shift.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)
