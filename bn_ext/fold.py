"""Eval-mode BatchNorm folding into the neighbouring Conv, ConvTranspose or
Linear, pairwise and across whole models, with a verification report.

The arithmetic (float64, rounded once) lives in C++ (csrc/fold.cpp) and is
shared with the C++ API. Pairs are found by data flow in a torch.fx graph;
models that cannot be traced are analysed by running them once on the example
inputs and following tensor identity.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils import _pytree

import bn_ext.functional  # noqa: F401  (registers the operators)
from bn_ext.fold_verification import ReferenceRun, Verification
from bn_ext.norm_classes import class_name, frozen_batch_norm_classes, holds_running_statistics, norm_modules

__all__ = [
    "FoldReport",
    "FoldVerificationError",
    "FrozenBatchNorm",
    "WeightQuantization",
    "fold_exported_program",
    "fold_model",
    "fuse_bn_conv",
    "fuse_bn_linear",
    "fuse_conv_bn",
    "fuse_layer_norm_linear",
    "fuse_linear_bn",
]

_ops = torch.ops.bn_ext
_aten = torch.ops.aten

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


# ---------------------------------------------------------------------------
# Pairwise folding


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


# ---------------------------------------------------------------------------
# Graph analysis: BatchNorm-like and layer-like nodes of a torch.fx graph,
# whether they call modules or functions on attributes (as torch.export does).

_BN_FUNCTION_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    _aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                               "eps"),
}
# instance_norm calls are BatchNorm-like too; their use_input_stats argument
# (instance statistics) stands where batch_norm's `training` does.
_INSTANCE_NORM_FUNCTION_ARGS = {
    F.instance_norm: _BN_FUNCTION_ARGS[F.batch_norm],
    torch.instance_norm: _BN_FUNCTION_ARGS[torch.batch_norm],
    _aten.instance_norm.default: _BN_FUNCTION_ARGS[_aten.batch_norm.default],
}
_BN_FUNCTION_ARGS.update(_INSTANCE_NORM_FUNCTION_ARGS)
# bn_ext's own forward operators (as torch.export records bn_ext's modules)
# return (out, save_mean, save_invstd); only out may be read for them to fold.
_BN_EXT_FORWARD_ARGS = {
    _ops.batch_norm_forward.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "eps"),
    _ops.batch_norm_act_forward.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "eps",
                                          "activation", "residual"),
}
_BN_FUNCTION_ARGS.update(_BN_EXT_FORWARD_ARGS)
# The aten op of each batch_norm_act activation, for what is left of a folded call.
_ACTIVATION_OPS = {"relu": _aten.relu.default, "silu": _aten.silu.default}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_LAYER_FUNCTION_ARGS = {
    **{f: ("conv", _CONV_ARGS) for f in (F.conv1d, F.conv2d, F.conv3d, _aten.conv1d.default,
                                         _aten.conv2d.default, _aten.conv3d.default)},
    **{f: ("conv_transpose", _CONV_T_ARGS) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                                     _aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
                                                     _aten.conv_transpose3d.input)},
    **{f: ("linear", ("input", "weight", "bias")) for f in (F.linear, _aten.linear.default)},
}


def _arg(node: torch.fx.Node, names: Sequence[str], name: str, default: Any = None) -> Any:
    i = names.index(name)
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: torch.fx.Node, names: Sequence[str], name: str, value: Any) -> None:
    i = names.index(name)
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _fetch(root: nn.Module, value: Any) -> Any:
    """The tensor a get_attr node names, or the constant itself."""
    if isinstance(value, torch.fx.Node):
        if value.op != "get_attr":
            raise LookupError(value.name)
        obj = root
        for part in value.target.split("."):
            obj = getattr(obj, part)
        return obj
    return value


@dataclasses.dataclass
class _Norm:
    """A BatchNorm-like node: its constants, and how to describe it."""

    node: torch.fx.Node
    name: str
    module: _BatchNorm | None
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    training: bool
    # What the forward does after normalising (a fused activation, residual
    # add): a module called as tail(out) or tail(out, residual); None if nothing.
    tail: nn.Module | None = None
    activation: str | None = None  # a functional call's fused activation
    residual: Any = None  # a functional call's residual node

    def affine_args(self) -> tuple:
        return self.running_mean, self.running_var, self.eps, _detach(self.weight), _detach(self.bias)


@dataclasses.dataclass
class _Layer:
    """A Conv / ConvTranspose / Linear node and where its weight and bias live."""

    node: torch.fx.Node
    name: str
    kind: str  # "conv", "conv_transpose" or "linear" ("module" where only the module matters)
    module: nn.Module | None
    names: Sequence[str] = ()

    def weight(self, root: nn.Module) -> Tensor:
        return self.module.weight if self.module is not None else _fetch(root, _arg(self.node, self.names, "weight"))

    def bias(self, root: nn.Module) -> Tensor | None:
        if self.module is not None:
            return self.module.bias
        return _fetch(root, _arg(self.node, self.names, "bias"))

    def groups(self) -> int:
        if self.module is not None:
            return getattr(self.module, "groups", 1)
        return _arg(self.node, self.names, "groups", 1) if self.kind != "linear" else 1

    def zero_padded(self) -> bool:
        if self.module is not None:
            return isinstance(self.module, _CONVS) and _has_zero_padding(self.module)
        padding = _arg(self.node, self.names, "padding", 0) if self.kind != "linear" else 0
        if isinstance(padding, str):
            return padding == "same"
        return any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))


# Reads of a tensor that see only its metadata, never its values: they do not
# keep a producer's output from being replaced by a folded one of the same shape.
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "layout", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}


def _reads_values(user: torch.fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] not in _METADATA_ATTRIBUTES
    if user.op == "call_method":
        return user.target not in _METADATA_METHODS
    return not (user.op == "call_function" and user.target is len)


def _reads_metadata_only(func) -> bool:
    """The execution trace's counterpart of _reads_values: x.shape, x.size(), len(x)..."""
    descriptor = getattr(getattr(func, "__self__", None), "__name__", None)
    if getattr(func, "__name__", None) == "__get__":
        return descriptor in _METADATA_ATTRIBUTES
    return getattr(func, "__name__", None) in _METADATA_METHODS | {"__len__"}


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if _reads_values(u)]


def _overrides_forward(bn: nn.Module) -> bool:
    """Whether a BatchNorm module's class has a forward of its own (timm's
    BatchNormAct2d applies an activation after normalising, say): replacing
    such a module as a whole would drop what its forward adds."""
    from bn_ext import nn as bn_nn
    from bn_ext.distributed import SyncBatchNorm

    # Batch Renormalization is BatchNorm in eval (its running statistics normalise).
    known = {_BatchNorm.forward, nn.SyncBatchNorm.forward, bn_nn.BatchNorm2d.forward, SyncBatchNorm.forward,
             _InstanceNorm.forward, bn_nn.BatchRenorm2d.forward, bn_nn._FrozenBatchNormForward.forward,
             *(c.forward for c in frozen_batch_norm_classes())}
    return type(bn).forward not in known


def _unknown_forward(bn: nn.Module) -> bool:
    """A forward of its own that folding cannot keep (_activation_tail knows the BatchNorm + activation ones)."""
    return _overrides_forward(bn) and _activation_tail(bn) is None


_OWN_FORWARD = ("{0.__module__}.{0.__qualname__} has a forward of its own: removing the module would drop what it "
                "does after normalising")


def _activation_tail(bn: nn.Module) -> nn.Module | None:
    """What a BatchNorm + activation module does after normalising, as a
    module called tail(out[, residual]): bn_ext's BatchNormAct (its activation
    of out + residual), and timm's BatchNormAct2d and its bn_ext twin (drop,
    then act). None for any other module."""
    from bn_ext import nn as bn_nn

    forward = type(bn).forward
    if forward is bn_nn.BatchNormAct2d.forward:
        activation = {"relu": nn.ReLU(), "silu": nn.SiLU()}.get(bn.activation, nn.Identity())
        return NormThenActivation(nn.Identity(), activation)
    # timm's classes stay bases of their bn_ext twins.
    timm_classes = tuple(bn_nn._zoo_classes("timm.layers", "BatchNormAct2d", "FrozenBatchNormAct2d"))
    if isinstance(bn, timm_classes):
        return NormThenActivation(nn.Identity(), nn.Sequential(bn.drop, bn.act))
    return None


class NormThenActivation(nn.Module):
    """act(norm(input) + residual): a BatchNorm + activation module once its
    BatchNorm is folded away (norm is Identity) or frozen (FrozenBatchNorm)."""

    def __init__(self, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = self.norm(input)
        return self.act(out if residual is None else out + residual)


def _node_label(node: torch.fx.Node) -> str:
    """The module path a functional node came from (torch.export records it), else its name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


def _as_norm(root: nn.Module, node: torch.fx.Node) -> _Norm | None:
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if _is_foldable_norm(m):
            return _Norm(node, node.target, m, m.running_mean, m.running_var, m.weight, m.bias, m.eps,
                         _normalises_with_batch_statistics(m), _activation_tail(m))
        return None
    if node.op != "call_function" or node.target not in _BN_FUNCTION_ARGS or _depends_on_constants_only(node.args[0]):
        return None
    names = _BN_FUNCTION_ARGS[node.target]
    try:
        values = {n: _fetch(root, _arg(node, names, n)) for n in ("running_mean", "running_var", "weight", "bias")}
    except LookupError:
        return None  # statistics computed in the graph, not constants
    activation = _arg(node, names, "activation") if "activation" in names else None
    residual = _arg(node, names, "residual") if "residual" in names else None
    return _Norm(node, _node_label(node), None, values["running_mean"], values["running_var"], values["weight"],
                 values["bias"], _arg(node, names, "eps", 1e-5), bool(_arg(node, names, "training", False)),
                 activation=None if activation == "none" else activation, residual=residual)


def _norm_output(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node holding a norm call's output: the call itself, or for bn_ext's
    forward operators the item 0 of its result; None when another item (the
    saved statistics) is read or the output is not."""
    if node.target not in _BN_EXT_FORWARD_ARGS:
        return node
    items = {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}
    if len(items) != len(node.users) or any(u.users for i, u in items.items() if i != 0):
        return None
    return items.get(0)


def _as_layer(root: nn.Module, node: torch.fx.Node) -> _Layer | None:
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if isinstance(m, _CONVS):
            return _Layer(node, node.target, "conv", m)
        if isinstance(m, _CONV_TRANSPOSES):
            return _Layer(node, node.target, "conv_transpose", m)
        if isinstance(m, nn.Linear):
            return _Layer(node, node.target, "linear", m)
        return None
    if node.op == "call_function" and node.target in _LAYER_FUNCTION_ARGS:
        kind, names = _LAYER_FUNCTION_ARGS[node.target]
        weight = _arg(node, names, "weight")
        bias = _arg(node, names, "bias")
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and (
            bias is None or (isinstance(bias, torch.fx.Node) and bias.op == "get_attr")
        ):
            return _Layer(node, _node_label(node), kind, None, names)
    return None


def _describe(root: nn.Module, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"'{node.name}' ({getattr(node.target, '__name__', str(node.target))})"
    return f"'{node.name}' ({node.op})"


# ---------------------------------------------------------------------------
# Whole-model folding


@dataclasses.dataclass
class WeightQuantization:
    """How the int8 weights of one folded layer would fare. Folding multiplies
    each output channel by gamma / sqrt(var + eps): a channel with a tiny
    running_var or gamma gets huge or vanishing weights, which per-tensor int8
    cannot hold and per-channel int8 holds at some cost."""

    layer: str
    channels: int
    range_spread: float  # largest over smallest non-zero per-channel max |w|
    dead_channels: int  # channels per-tensor int8 rounds to all zeros
    per_tensor_error: float  # ||W - Q(W)|| / ||W||, symmetric int8, one scale
    per_channel_error: float  # the same with one scale per output channel

    def __str__(self) -> str:
        flag = "  <- per-tensor int8 unsuitable" if self.dead_channels or self.range_spread > 100 else ""
        return (f"{self.layer:<40} {self.channels} channels, range spread {self.range_spread:.3g}x, "
                f"{self.dead_channels} dead per-tensor; int8 weight error per-tensor {self.per_tensor_error:.2e}, "
                f"per-channel {self.per_channel_error:.2e}{flag}")


def _int8_error(w: Tensor, absmax: Tensor) -> float:
    """Relative error of symmetric int8 quantization of the rows of w with the given per-row max |w|."""
    scale = (absmax / 127).clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    q = (w / scale).round().clamp(-127, 127) * scale
    return ((w - q).norm() / w.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def weight_quantization(layer: str, weight: Tensor, kind: str = "conv", groups: int = 1) -> WeightQuantization:
    """The int8 readiness of a layer's weight (output channels: dim 0, or for a
    ConvTranspose weight (in, out / groups, *k) the second dim within groups)."""
    w = weight.detach().double()
    if kind == "conv_transpose":
        # (in, out / groups, *k) -> (groups, out / groups, in / groups, k): a row per output channel
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)
        rows = w.reshape(groups * w.shape[1], -1)
    else:
        rows = w.reshape(w.shape[0], -1)
    channel_max = rows.abs().amax(1)
    largest = channel_max.max()
    nonzero = channel_max[channel_max > 0]
    spread = (largest / nonzero.min()).item() if nonzero.numel() else float("inf")
    dead = int((channel_max * 127 < 0.5 * largest).sum().item()) if largest > 0 else rows.shape[0]
    return WeightQuantization(layer, rows.shape[0], spread, dead, _int8_error(rows, largest.expand(rows.shape[0])),
                              _int8_error(rows, channel_max))


@dataclasses.dataclass
class FoldReport:
    """What fold_model did, and how the folded model compares on the example inputs."""

    method: str
    batch_norms_before: int
    batch_norms_after: int
    folded: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (norm, layer, "after"/"before")
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (norm, reason)
    frozen: list[str] = dataclasses.field(default_factory=list)
    layer_norms_folded: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    max_abs_error: float = float("nan")
    max_rel_error: float = float("nan")
    atol: float = float("nan")
    rtol: float = float("nan")
    passed: bool = False
    # int8 readiness of every folded layer's weight, and (quantization=True)
    # the output error of the folded model through torch.ao's PT2E flow.
    quantization: list[WeightQuantization] = dataclasses.field(default_factory=list)
    pt2e_error: float | None = None
    pt2e_failure: str | None = None  # why the PT2E flow did not take the folded model
    # Decision ops (sort, topk, NMS, argmax, thresholds) the folded model ran
    # with the original's outcomes, and how far their inputs were apart.
    decisions: int = 0
    decision_rel_error: float = 0.0
    failure: str | None = None  # what verification found first, when it failed
    # Every norm module of the model by class, BatchNorm or not (the census).
    norms: dict[str, int] = dataclasses.field(default_factory=dict)
    equalization: Any = None  # fold_model(equalize=True): the EqualizationReport

    def _why_nothing_folded(self) -> str:
        if self.batch_norms_before:
            return "every BatchNorm is left, for the reasons listed"
        if self.norms:
            return ("the model holds no BatchNorm; its norms compute statistics of each input at run time, "
                    "which no Conv or Linear can absorb")
        return "the model holds no norm layer"

    def __str__(self) -> str:
        lines = [
            f"BatchNorm folding report (pairs found by {self.method})",
            f"  BatchNorms: {self.batch_norms_before} before, {self.batch_norms_after} left "
            f"({len(self.folded)} folded; of those left, {len(self.frozen)} frozen to a per-channel affine)",
        ]
        if self.norms:
            lines.append("  norm modules: " + ", ".join(f"{count} {cls}" for cls, count in self.norms.items()))
        if not self.folded:
            lines.append(f"  nothing folded: {self._why_nothing_folded()}")
        if self.folded:
            lines.append("  folded:")
            lines += [f"    {norm:<40} {'into' if where == 'after' else 'ahead of'} {layer}"
                      for norm, layer, where in self.folded]
        if self.layer_norms_folded:
            lines.append("  LayerNorm affine folded into Linear:")
            lines += [f"    {ln:<40} into {', '.join(layers)}" for ln, layers in self.layer_norms_folded]
        if self.left:
            lines.append("  not folded:")
            lines += [f"    {norm:<40} {reason}{' [frozen to affine]' if norm in self.frozen else ''}"
                      for norm, reason in self.left]
        if self.quantization:
            lines.append("  int8 weights of the folded layers:")
            lines += [f"    {q}" for q in self.quantization]
        if self.pt2e_error is not None:
            lines.append("  PT2E int8 (X86InductorQuantizer) on the example inputs: output error "
                         f"{self.pt2e_error:.3g} relative to the output scale")
        if self.pt2e_failure is not None:
            lines.append(f"  PT2E int8 (X86InductorQuantizer) did not take the folded model: {self.pt2e_failure}")
        if self.equalization is not None:
            lines += ["  " + line for line in str(self.equalization).splitlines()]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"  verification on the example inputs: max abs error {self.max_abs_error:.3g}, "
            f"max error relative to output scale {self.max_rel_error:.3g} "
            f"(atol {self.atol:.3g}, rtol {self.rtol:.3g}): {verdict}"
        )
        if self.decisions:
            lines.append(f"    {self.decisions} decisions (sort, topk, NMS, argmax, thresholds) taken as the original "
                         f"took them; their inputs agree to {self.decision_rel_error:.3g} of their scale")
        if self.failure:
            lines.append(f"    first difference: {self.failure}")
        return "\n".join(lines)


class _FoldTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps bn_ext's norm modules whole, like torch.nn's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (type(m).__module__.startswith("bn_ext") or isinstance(m, frozen_batch_norm_classes())
                or super().is_leaf_module(m, qualname))


def training_batch_norms(graph: torch.fx.Graph) -> list[str]:
    """The batch_norm calls of a graph in training mode (batch statistics)."""
    return [_node_label(n) for n in _batch_norm_calls(graph)
            if n.target not in _INSTANCE_NORM_FUNCTION_ARGS and _arg(n, _BN_FUNCTION_ARGS[n.target], "training", False)]


def _depends_on_constants_only(node: Any) -> bool:
    """Whether a graph value is computed from parameters and buffers alone
    (timm's StdConv2d standardises its weight with a batch_norm call)."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if not isinstance(current, torch.fx.Node) or current in seen:
            continue
        seen.add(current)
        if current.op in ("placeholder", "call_module"):
            return False
        pending += current.all_input_nodes
    return True


def _batch_norm_calls(graph: torch.fx.Graph | None) -> list[torch.fx.Node]:
    """The graph's batch_norm calls that normalise activations (not weights)."""
    return [node for node in (graph.nodes if graph is not None else ())
            if node.op == "call_function" and node.target in _BN_FUNCTION_ARGS
            and not _depends_on_constants_only(node.args[0])]


def _statistics_owner(node: torch.fx.Node) -> str | None:
    """The module whose running_mean a batch_norm call reads, if it reads an attribute."""
    stats = _arg(node, _BN_FUNCTION_ARGS[node.target], "running_mean")
    on_attribute = isinstance(stats, torch.fx.Node) and stats.op == "get_attr"
    return stats.target.rpartition(".")[0] if on_attribute else None


def _count_batch_norms(model: nn.Module, graph: torch.fx.Graph | None = None) -> int:
    """BatchNorm modules, plus functional batch_norm calls that are not a
    traced BatchNorm module's own (a subclass's forward traced through)."""
    modules = {n for n, m in model.named_modules() if _is_foldable_norm(m)}
    return len(modules) + sum(_statistics_owner(node) not in modules for node in _batch_norm_calls(graph))


def _unrecognised_norms(model: nn.Module, graph: torch.fx.Graph | None) -> list[tuple[str, str]]:
    """Modules with running statistics that are no BatchNorm class bn_ext
    knows and whose statistics no batch_norm call of the graph reads:
    (name, why it is left)."""
    read = {_statistics_owner(node) for node in _batch_norm_calls(graph)}
    return [(name, f"{class_name(m)} holds running statistics, but is no norm class bn_ext knows: what its forward "
                   "computes is unknown, so it is not folded")
            for name, m in model.named_modules()
            if holds_running_statistics(m) and not _is_foldable_norm(m) and name not in read]


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _set_attr_tensor(root: nn.Module, layer: _Layer, name: str, value: Tensor) -> None:
    """Point a functional layer's weight/bias argument at a new attribute."""
    root.register_buffer(f"_bn_ext_folded_{layer.node.name}_{name}", value)
    graph = layer.node.graph
    with graph.inserting_before(layer.node):
        attr = graph.get_attr(f"_bn_ext_folded_{layer.node.name}_{name}")
    _set_arg(layer.node, layer.names, name, attr)


def _set_layer_weights(root: nn.Module, layer: _Layer, weight: Tensor, bias: Tensor) -> None:
    if layer.module is not None:
        requires_grad = layer.module.weight.requires_grad
        layer.module.weight = nn.Parameter(weight, requires_grad=requires_grad)
        layer.module.bias = nn.Parameter(bias, requires_grad=requires_grad)
    else:
        _set_attr_tensor(root, layer, "weight", weight)
        _set_attr_tensor(root, layer, "bias", bias)


# ---------------------------------------------------------------------------
# The folding rules, one set for both views of a model: the fx graph and the
# execution trace. Each view describes a BatchNorm's neighbours the same way.


@dataclasses.dataclass
class _Neighbour:
    """A Conv, ConvTranspose or Linear next to a BatchNorm, as a view sees it."""

    key: str  # identifies the layer across folds (a layer absorbs one BatchNorm a side)
    label: str  # for the report
    kind: str  # "conv", "conv_transpose" or "linear"
    calls: int  # times the layer runs
    readers: int  # value readers of the tensor between the pair (the pair's own read included)
    rank: int | None  # rank of that tensor, where known
    feeds_input: bool = True  # (a following layer) whether that tensor is its input
    zero_padded: bool = False  # (a following layer) whether it pads its input with zeros
    blocked: str | None = None  # a reason of the view's own (a functional call folded in place)
    layer: Any = None  # what the view needs to apply the fold


def _why_not_fold_norm(tracks_stats: bool, training: bool, calls: int) -> str | None:
    if not tracks_stats:
        return "does not track running statistics (uses batch statistics in eval)"
    if training:
        return "called in training mode (batch statistics)"
    if calls > 1:
        return f"module called {calls} times (shared): no single call site to fold into"
    return None


def _why_not_after(producer: _Neighbour, absorbed: set) -> str | None:
    name = producer.label
    if producer.blocked:
        return producer.blocked
    if producer.calls > 1:
        return f"producer {name} is called {producer.calls} times (shared)"
    if producer.readers > 1:
        return f"output of {name} is also used by {producer.readers - 1} other node(s)"
    if (producer.key, "after") in absorbed:
        return f"{name} already absorbed a BatchNorm"
    if producer.kind == "linear" and producer.rank not in (None, 2):
        return f"{name} output is {producer.rank}-D: BatchNorm1d normalises dim 1, not the Linear's features"
    return None


def _why_not_before(consumer: _Neighbour, absorbed: set) -> str | None:
    name = consumer.label
    if consumer.blocked:
        return consumer.blocked
    if consumer.kind == "conv_transpose":
        return f"precedes ConvTranspose {name}: border outputs see fewer taps, so the shift does not fold"
    if consumer.calls > 1:
        return f"consumer {name} is called {consumer.calls} times (shared)"
    if not consumer.feeds_input:
        return f"feeds {name} other than as its input"
    if consumer.zero_padded:
        return f"precedes zero-padded {name}: folding would change the border outputs"
    if (consumer.key, "before") in absorbed:
        return f"{name} already absorbed a preceding BatchNorm"
    if consumer.kind == "linear" and consumer.rank not in (None, 2):
        return f"output is {consumer.rank}-D: the following Linear mixes the last dim, not the channels"
    return None


def _choose_fold(producer: _Neighbour | None, consumer: _Neighbour | None,
                 absorbed: set) -> tuple[str, _Neighbour] | list[str]:
    """("after", producer) or ("before", consumer) to fold into, else the reasons against each."""
    reasons = []
    for side, neighbour, why_not in (("after", producer, _why_not_after), ("before", consumer, _why_not_before)):
        if neighbour is not None:
            why = why_not(neighbour, absorbed)
            if why is None:
                absorbed.add((neighbour.key, side))
                return side, neighbour
            reasons.append(why)
    return reasons


class _GraphFolder:
    """Finds and applies the folds of one fx graph over `root`'s modules."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, shapes: dict[str, torch.Size],
                 rewrite_graph: bool = True):
        self.root, self.graph, self.shapes = root, graph, shapes
        # Whether folds of functional calls may rewrite the graph (not when
        # folding a model in place: its own forward would still run the call).
        self.rewrite_graph = rewrite_graph
        self.module_calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.report_folded: list[tuple[str, str, str]] = []
        self.report_left: list[tuple[str, str]] = []
        self.unfolded_norms: list[_Norm] = []
        self.frozen: list[str] = []
        self.quantization: list[WeightQuantization] = []
        # True once a fold rewrote the graph itself (a functional BatchNorm or
        # layer), so the result must be a GraphModule of that graph.
        self.graph_rewritten = False

    def calls(self, node: torch.fx.Node) -> int:
        return self.module_calls[node.target] if node.op == "call_module" else 1

    def run(self, progress: bool = False) -> None:
        absorbed: set[tuple[str, str]] = set()  # (layer node, side) already holding a BatchNorm
        nodes = list(self.graph.nodes)
        if progress:
            from tqdm import tqdm

            nodes = tqdm(nodes, desc="folding", unit="node", leave=False)
        for node in nodes:
            norm = _as_norm(self.root, node)
            if norm is None:
                continue
            reason = self.try_fold(norm, absorbed)
            if reason is not None:
                self.report_left.append((norm.name, reason))
                self.unfolded_norms.append(norm)

    def try_fold(self, norm: _Norm, absorbed: set) -> str | None:
        why = _why_not_fold_norm(norm.running_mean is not None and norm.running_var is not None, norm.training,
                                 self.calls(norm.node))
        if why is not None:
            return why
        if norm.module is None and not self.rewrite_graph:
            return "functional batch_norm call: folded only with inplace=False (the result is a GraphModule)"
        if norm.module is not None and _unknown_forward(norm.module):
            return _OWN_FORWARD.format(type(norm.module))
        output = _norm_output(norm.node)
        if output is None:
            return "its saved statistics are read, or its output is not"
        source = norm.node.args[0]
        layer = _as_layer(self.root, source) if isinstance(source, torch.fx.Node) else None
        users = _value_users(output)
        next_layer = _as_layer(self.root, users[0]) if len(users) == 1 else None
        producer = self.neighbour(layer, layer.node, "producer") if layer is not None else None
        consumer = None
        if next_layer is not None and norm.tail is None and norm.activation is None and norm.residual is None:
            consumer = self.neighbour(next_layer, output, "consumer")
            consumer.feeds_input = next_layer.node.args[0] is output
            consumer.zero_padded = next_layer.zero_padded()
        choice = _choose_fold(producer, consumer, absorbed)
        if isinstance(choice, tuple):
            side, neighbour = choice
            (self.fold_after if side == "after" else self.fold_before)(norm, neighbour.layer)
            return None
        if next_layer is not None and consumer is None:
            choice.append(f"its activation or residual add stands between it and {_describe(self.root, users[0])}")
        if not choice:
            consumers = ", ".join(_describe(self.root, u) for u in users) or "nothing"
            choice.append(
                f"input from {_describe(self.root, source) if isinstance(source, torch.fx.Node) else 'a constant'}, "
                f"output to {consumers}: no adjacent Conv/Linear to fold into"
            )
        return "; ".join(choice)

    def neighbour(self, layer: _Layer, between: torch.fx.Node, role: str) -> _Neighbour:
        """The rules' view of a layer next to a BatchNorm; `between` is the tensor joining them."""
        name = _describe(self.root, layer.node)
        shape = self.shapes.get(between.name)
        blocked = (f"{role} {name} is a functional call: folded only with inplace=False"
                   if layer.module is None and not self.rewrite_graph else None)
        return _Neighbour(layer.node.name, name, layer.kind, self.calls(layer.node), len(_value_users(between)),
                          None if shape is None else len(shape), blocked=blocked, layer=layer)

    def fold_after(self, norm: _Norm, layer: _Layer) -> None:
        weight, bias = _ops.fuse_conv_bn_weights(
            layer.weight(self.root).detach(), _detach(layer.bias(self.root)), *norm.affine_args(),
            layer.kind == "conv_transpose", layer.groups(),
        )
        _set_layer_weights(self.root, layer, weight, bias)
        self.remove(norm, layer.node)
        self.graph_rewritten |= layer.module is None
        self.report_folded.append((norm.name, layer.name, "after"))
        self.quantization.append(weight_quantization(layer.name, weight, layer.kind, layer.groups()))

    def fold_before(self, norm: _Norm, layer: _Layer) -> None:
        weight, bias = _ops.fuse_bn_conv_weights(
            layer.weight(self.root).detach(), _detach(layer.bias(self.root)), *norm.affine_args(), layer.groups()
        )
        _set_layer_weights(self.root, layer, weight, bias)
        self.remove(norm, norm.node.args[0])
        self.graph_rewritten |= layer.module is None
        self.report_folded.append((norm.name, layer.name, "before"))
        self.quantization.append(weight_quantization(layer.name, weight, layer.kind, layer.groups()))

    def remove(self, norm: _Norm, replacement: torch.fx.Node) -> None:
        """Drop the norm's normalisation: its output becomes `replacement`
        (the folded layer's), followed by what the norm did after normalising."""
        if norm.tail is not None:
            # The module keeps its call, with the input already replacement.
            _replace_submodule(self.root, norm.name, norm.tail)
            return
        if norm.module is not None:
            norm.node.replace_all_uses_with(replacement)
            self.graph.erase_node(norm.node)
            _replace_submodule(self.root, norm.name, nn.Identity())
            return
        output = _norm_output(norm.node)
        with self.graph.inserting_before(norm.node):
            if norm.residual is not None:
                replacement = self.graph.call_function(_aten.add.Tensor, (replacement, norm.residual))
            if norm.activation is not None:
                replacement = self.graph.call_function(_ACTIVATION_OPS[norm.activation], (replacement,))
        output.replace_all_uses_with(replacement)
        for item in list(norm.node.users):
            self.graph.erase_node(item)
        self.graph.erase_node(norm.node)
        self.graph_rewritten = True

    def fold_layer_norms(self) -> list[tuple[str, list[str]]]:
        folded = []
        for node in list(self.graph.nodes):
            if node.op != "call_module" or self.module_calls[node.target] != 1:
                continue
            ln = self.root.get_submodule(node.target)
            if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or len(ln.normalized_shape) != 1:
                continue
            layers = [_as_layer(self.root, u) for u in node.users]
            if not layers or any(
                layer is None or layer.module is None or layer.kind != "linear"
                or self.module_calls[layer.node.target] != 1 or layer.node.args[0] is not node
                for layer in layers
            ):
                continue
            plain, fused = fuse_layer_norm_linear(ln, [layer.module for layer in layers])
            _replace_submodule(self.root, node.target, plain)
            for layer, new in zip(layers, fused):
                _replace_submodule(self.root, layer.node.target, new)
            folded.append((node.target, [layer.node.target for layer in layers]))
        return folded


def _shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[str, torch.Size]:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return {n.name: n.meta["tensor_meta"].shape for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}


def _freeze(root: nn.Module, folder: _GraphFolder | _RuntimeFolder) -> None:
    """Replace unfolded BatchNorm modules that have running statistics by their exact affine map."""
    for norm in folder.unfolded_norms:
        if norm.module is not None and norm.running_mean is not None and not _unknown_forward(norm.module):
            frozen = FrozenBatchNorm(norm.module)
            if norm.tail is not None:
                frozen = NormThenActivation(frozen, norm.tail.act)
            _replace_submodule(root, norm.name, frozen)
            folder.frozen.append(norm.name)


def _outputs(model: nn.Module, example_inputs: tuple) -> list[Tensor]:
    with torch.no_grad():
        return [t for t in _pytree.tree_leaves(model(*example_inputs)) if isinstance(t, Tensor)]


class FoldVerificationError(RuntimeError):
    """The folded model's outputs differ from the original's beyond the
    tolerance; `report` holds the folding report and the measured error."""

    def __init__(self, what: str, report: FoldReport):
        found = report.failure or (f"the outputs differ from the original's by {report.max_abs_error:.3g} (allowed "
                                   f"atol {report.atol:.3g} + rtol {report.rtol:.3g} x |output|)")
        super().__init__(f"{what}: the folded model does not match the original: {found}; the folded model is "
                         "not returned (strict=False returns it anyway)\n" + str(report))
        self.report = report


def _verify(report: FoldReport, check: Verification) -> None:
    for field in dataclasses.fields(Verification):
        setattr(report, field.name, getattr(check, field.name))


def _pt2e_error(model: nn.Module, example_inputs: tuple) -> float:
    """Output error, relative to the output scale, of `model` quantized to int8
    by the PT2E flow with the X86 Inductor quantizer, calibrated on the inputs."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise ImportError("fold_model(quantization=True) needs torchao (pip install torchao)") from error
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example_inputs).module(), quantizer)
    with torch.no_grad():
        prepared(*example_inputs)
        quantized = convert_pt2e(prepared)
        expected, actual = _outputs(model, example_inputs), _outputs(quantized, example_inputs)
    scale = max(e.double().abs().max().item() for e in expected)
    error = max((a.double() - e.double()).abs().max().item() for a, e in zip(actual, expected))
    return error / scale if scale > 0 else error


def fold_model(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Any],
    *,
    inplace: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    freeze_unfolded: bool = True,
    layer_norm: bool = False,
    strict: bool = True,
    quantization: bool = False,
    equalize: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable eval-mode BatchNorm of `model` into its Conv/Linear.

    Returns (folded model in eval mode, FoldReport). Pairs are found by data
    flow: a BatchNorm folds into the layer that produces its input (or, exactly
    only, the Conv/Linear that alone consumes its output) when neither is
    called more than once and nothing else reads the tensor between them.
    BatchNorms that cannot fold become a frozen per-channel affine
    (freeze_unfolded) and are listed with the reason. `layer_norm=True` also
    moves LayerNorm affine parameters into the Linears they alone feed.
    The caller's model is not changed unless inplace=True.

    The folded model is checked against the original on the example inputs;
    when they differ beyond atol/rtol, FoldVerificationError (with the report)
    is raised, unless strict=False, which returns the model and a report whose
    `passed` is False.

    The report lists the int8 readiness of every folded layer's weights
    (per-channel range spread, channels per-tensor int8 zeroes, weight error
    per tensor and per channel). quantization=True also quantizes the folded
    model with the PT2E flow (X86InductorQuantizer, calibrated on the example
    inputs; needs torchao) and reports its output error.

    equalize=True then applies cross-layer equalization to the folded model
    (bn_ext.equalize; its report is `report.equalization`), before the PT2E
    flow where both are asked for.
    """
    example_inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    try:
        reference = ReferenceRun(target, example_inputs)
    except Exception as error:  # noqa: BLE001  (whatever the model raises on them)
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"fold_model: example_inputs: the model does not run on them ({type(error).__name__}: "
                         f"{first_line})") from error
    try:
        graph = _FoldTracer().trace(target)
        method = "torch.fx symbolic tracing"
    except Exception as error:  # noqa: BLE001  (any tracing failure means: fall back)
        graph, method = None, f"execution on the example inputs (fx tracing failed: {type(error).__name__})"
    before = _count_batch_norms(target, graph)
    unrecognised = _unrecognised_norms(target, graph)
    census = dict(Counter(type(m).__name__ for _, m in norm_modules(target)))
    with torch.no_grad():
        if graph is not None:
            folder = _GraphFolder(target, graph, _shapes(torch.fx.GraphModule(target, graph), example_inputs),
                                  rewrite_graph=not inplace)
            folder.run()
            layer_norms = folder.fold_layer_norms() if layer_norm else []
        else:
            folder = _RuntimeFolder(target, example_inputs)
            folder.run()
            layer_norms = []
        if freeze_unfolded:
            _freeze(target, folder)
    # Module-level folds are applied to `target` itself; only folds of
    # functional calls need the rewritten graph as the returned model.
    result: nn.Module = target
    if graph is not None and folder.graph_rewritten:
        graph.lint()
        result = torch.fx.GraphModule(target, graph)
    report = FoldReport(
        method=method,
        batch_norms_before=before + len(unrecognised),
        # Frozen affines count as BatchNorms left: they still cost a pass.
        batch_norms_after=before + len(unrecognised) - len(folder.report_folded),
        folded=folder.report_folded,
        left=folder.report_left + unrecognised,
        norms=census,
        frozen=folder.frozen,
        layer_norms_folded=layer_norms,
        quantization=folder.quantization,
    )
    _verify(report, reference.verify(result, atol, rtol))
    if equalize and report.passed:
        from bn_ext.equalization import equalize as equalize_layers

        result, report.equalization = equalize_layers(result, example_inputs, inplace=True)
    if quantization:
        try:
            report.pt2e_error = _pt2e_error(result.eval(), example_inputs)
        except ImportError:
            raise
        except Exception as error:  # noqa: BLE001  (the flow's own failure is the finding)
            report.pt2e_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if strict and not report.passed:
        raise FoldVerificationError("fold_model", report)
    return result.eval(), report


def _innermost_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the module a torch.export node came from."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _constant_value(root: nn.Module, node: Any) -> Any:
    """The value of a graph node computed from parameters and buffers alone."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return _fetch(root, node)
    args, kwargs = _pytree.tree_map_only(torch.fx.Node, lambda n: _constant_value(root, n), (node.args, node.kwargs))
    return node.target(*args, **kwargs)


def _per_channel(value: Any, channels: int) -> Tensor | None:
    """value as a (channels,) tensor when it broadcasts along dim 1 only."""
    if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] != channels or value.numel() != channels:
        return None
    return value.reshape(channels)


def _frozen_batch_norms_as_calls(root: nn.Module, graph: torch.fx.Graph,
                                 shapes: dict[str, torch.Size]) -> list[tuple[str, str]]:
    """torch.export decomposes a frozen BatchNorm into x * scale + shift,
    scale and shift computed from its buffers. Each such pair becomes one eval
    aten.batch_norm call computing the same (mean 0, variance 1, eps 0, weight
    scale, bias shift), which folds as any other. Returns (path, reason) of
    the frozen modules of the graph left as they were."""
    frozen_names = {f"{c.__module__}.{c.__qualname__}" for c in frozen_batch_norm_classes()}
    frozen = {module[0] for node in graph.nodes if (module := _innermost_module(node)) and module[1] in frozen_names}
    rewritten = set()
    for node in list(graph.nodes):
        module = _innermost_module(node)
        if node.target is not _aten.add.Tensor or module is None or module[0] not in frozen:
            continue
        product, shift = node.args[0], node.args[1]
        if not (isinstance(product, torch.fx.Node) and product.target is _aten.mul.Tensor
                and len(product.users) == 1 and _depends_on_constants_only(shift)):
            continue
        x, scale = product.args
        shape = shapes.get(getattr(x, "name", None))
        if _depends_on_constants_only(x) or not _depends_on_constants_only(scale) or shape is None or len(shape) < 2:
            continue
        scale, shift = (_per_channel(_constant_value(root, v), shape[1]) for v in (scale, shift))
        if scale is None or shift is None:
            continue
        constants = {"weight": scale, "bias": shift, "mean": torch.zeros_like(scale), "var": torch.ones_like(scale)}
        with graph.inserting_before(node):
            attrs = {}
            for key, value in constants.items():
                root.register_buffer(f"_bn_ext_frozen_{node.name}_{key}", value.detach().clone())
                attrs[key] = graph.get_attr(f"_bn_ext_frozen_{node.name}_{key}")
            call = graph.call_function(_aten.batch_norm.default, (x, attrs["weight"], attrs["bias"], attrs["mean"],
                                                                  attrs["var"], False, 0.0, 0.0, False))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        rewritten.add(module[0])
    graph.eliminate_dead_code()
    return [(path, "a frozen BatchNorm whose exported ops are not the x * scale + shift (per channel) bn_ext reads")
            for path in sorted(frozen - rewritten)]


def _exported_census(graph: torch.fx.Graph) -> dict[str, int]:
    """Norm modules of an exported graph by class, from its nodes' module stacks."""
    paths = {module for node in graph.nodes if (module := _innermost_module(node)) and "Norm" in module[1]}
    return dict(Counter(cls.rpartition(".")[2] for _, cls in sorted(paths)))


def fold_exported_program(
    program: torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    progress: bool = False,
    strict: bool = True,
    equalize: bool = False,
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold the eval BatchNorms of a torch.export program (aten.batch_norm on
    constants after aten.conv*/linear) and export the result again. As
    fold_model, raises FoldVerificationError when the result differs from the
    program beyond the tolerance, unless strict=False. equalize=True then
    applies cross-layer equalization to the folded program (bn_ext.equalize;
    its report is `report.equalization`)."""
    if example_inputs is None:
        if program.example_inputs is None:
            raise ValueError("fold_exported_program: the program has no example inputs; pass example_inputs")
        example_inputs = program.example_inputs[0]
    example_inputs = tuple(example_inputs)
    gm = program.module()
    reference = ReferenceRun(gm, example_inputs)
    census = _exported_census(gm.graph)
    with torch.no_grad():
        frozen_left = _frozen_batch_norms_as_calls(gm, gm.graph, _shapes(gm, example_inputs))
        gm.recompile()
        before = _count_batch_norms(gm, gm.graph) + len(frozen_left)
        folder = _GraphFolder(gm, gm.graph, _shapes(gm, example_inputs))
        folder.run(progress=progress)
    gm.graph.lint()
    gm.recompile()
    report = FoldReport(
        method="the torch.export graph",
        batch_norms_before=before,
        batch_norms_after=before - len(folder.report_folded),
        folded=folder.report_folded,
        left=folder.report_left + frozen_left,
        norms=census,
        quantization=folder.quantization,
    )
    _verify(report, reference.verify(gm, atol, rtol))
    if strict and not report.passed:
        raise FoldVerificationError("fold_exported_program", report)
    if equalize and report.passed:
        from bn_ext.equalization import equalize as equalize_layers

        # program.module() holds the program's own tensors (an exported
        # program shares its model's): equalization scales copies.
        for module in gm.modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                copied = tensor.detach().clone()
                setattr(module, name, nn.Parameter(copied, tensor.requires_grad) if isinstance(
                    tensor, nn.Parameter) else copied)
        gm, report.equalization = equalize_layers(gm, example_inputs, inplace=True)
    return torch.export.export(gm, example_inputs), report


# ---------------------------------------------------------------------------
# Fallback for models fx cannot trace: run once on the example inputs,
# recording which module call and which torch function reads each tensor.


class _RuntimeFolder:
    """Folds Conv/Linear -> BatchNorm pairs proven by one execution's data flow."""

    def __init__(self, root: nn.Module, example_inputs: tuple):
        self.root, self.example_inputs = root, example_inputs
        self.report_folded: list[tuple[str, str, str]] = []
        self.report_left: list[tuple[str, str]] = []
        self.unfolded_norms: list[_Norm] = []
        self.frozen: list[str] = []
        self.quantization: list[WeightQuantization] = []
        self.graph_rewritten = False

    def record(self) -> tuple[list, list[int], dict[int, Tensor]]:
        names = {m: n for n, m in self.root.named_modules()}
        watched = {m for m in names if _is_foldable_norm(m) or isinstance(m, (nn.Linear,) + _CONVS + _CONV_TRANSPOSES)}
        events: list[tuple[str, list[int], list[int]]] = []  # (who, input ids, output ids)
        keep: dict[int, Tensor] = {}  # the recorded tensors by id, alive so ids stay unique
        depth = [0]

        def ids(value) -> list[int]:
            leaves = [t for t in _pytree.tree_leaves(value) if isinstance(t, Tensor)]
            keep.update((id(t), t) for t in leaves)
            return [id(t) for t in leaves]

        class Recorder(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if depth[0] == 0 and not _reads_metadata_only(func):
                    events.append((f"fn:{getattr(func, '__name__', func)}", ids((args, kwargs)), ids(out)))
                return out

        def pre(module, args):
            depth[0] += 1

        def post(module, args, out):
            depth[0] -= 1
            events.append((names[module], ids(args), ids(out)))

        handles = [h for m in watched for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            with torch.no_grad(), Recorder():
                outputs = self.root(*self.example_inputs)
        finally:
            for h in handles:
                h.remove()
        return events, ids(outputs), keep

    def run(self) -> None:
        events, output_ids, self.tensors = self.record()
        self.module_calls = Counter(who for who, _, _ in events if not who.startswith("fn:"))
        readers: dict[int, list[str]] = {}
        producer: dict[int, str] = {}
        first_inputs: dict[str, int] = {}  # each layer call's input tensor
        for who, inputs, outputs in events:
            for i in inputs:
                readers.setdefault(i, []).append(who)
            for o in outputs:
                producer.setdefault(o, who)
            if inputs:
                first_inputs.setdefault(who, inputs[0])
        for out in output_ids:
            readers.setdefault(out, []).append("model output")
        modules = dict(self.root.named_modules())
        absorbed: set[tuple[str, str]] = set()
        for name, bn in list(modules.items()):
            if not _is_foldable_norm(bn):
                continue
            norm = _Norm(None, name, bn, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, False,
                         _activation_tail(bn))
            calls = [(inputs, outputs) for who, inputs, outputs in events if who == name]
            reason = self.try_fold(norm, calls, readers, producer, first_inputs, modules, absorbed)
            if reason is not None:
                self.report_left.append((name, reason))
                self.unfolded_norms.append(norm)

    def neighbour(self, name: str, between: int, readers: dict, modules: dict) -> _Neighbour | None:
        """The rules' view of module `name`, joined to the BatchNorm by tensor `between`."""
        layer = modules.get(name)
        if layer is None or not isinstance(layer, _CONVS + _CONV_TRANSPOSES + (nn.Linear,)):
            return None
        kind = "conv_transpose" if isinstance(layer, _CONV_TRANSPOSES) else "linear" if isinstance(
            layer, nn.Linear) else "conv"
        return _Neighbour(name, f"'{name}'", kind, self.module_calls[name], len(readers.get(between, [])),
                          self.tensors[between].dim(),
                          zero_padded=isinstance(layer, _CONVS) and _has_zero_padding(layer), layer=layer)

    def try_fold(self, norm, calls, readers, producer, first_inputs, modules, absorbed) -> str | None:
        bn = norm.module
        if _unknown_forward(bn):
            return _OWN_FORWARD.format(type(bn)) + " (fx tracing folds such subclasses)"
        why = _why_not_fold_norm(bn.running_mean is not None, False, len(calls))
        if why is not None:
            return why
        if not calls:
            return "not called on the example inputs"
        (inputs, outputs), = calls
        if not inputs or not outputs:
            return "called without a tensor input"
        before = self.neighbour(producer.get(inputs[0], ""), inputs[0], readers, modules)
        out_readers = readers.get(outputs[0], [])
        after = self.neighbour(out_readers[0], outputs[0], readers, modules) if len(out_readers) == 1 else None
        if after is not None:
            after.feeds_input = first_inputs.get(after.key) == outputs[0]
        if norm.tail is not None and after is not None:
            after.blocked = f"its activation or residual add stands between it and {after.label}"
        choice = _choose_fold(before, after, absorbed)
        if not isinstance(choice, tuple):
            source = producer.get(inputs[0], "the model input")
            return "; ".join(choice) or (f"input from {source}, output to {', '.join(out_readers) or 'nothing'}: "
                                         "no adjacent Conv/Linear to fold into")
        side, neighbour = choice
        layer = neighbour.layer
        if side == "after":
            weight, bias = _ops.fuse_conv_bn_weights(
                layer.weight.detach(), _detach(layer.bias), *norm.affine_args(), neighbour.kind == "conv_transpose",
                getattr(layer, "groups", 1),
            )
        else:
            weight, bias = _ops.fuse_bn_conv_weights(layer.weight.detach(), _detach(layer.bias), *norm.affine_args(),
                                                     getattr(layer, "groups", 1))
        _set_layer_weights(self.root, _Layer(None, neighbour.key, "module", layer), weight, bias)
        _replace_submodule(self.root, norm.name, norm.tail or nn.Identity())
        self.report_folded.append((norm.name, neighbour.key, side))
        self.quantization.append(weight_quantization(neighbour.key, weight, neighbour.kind,
                                                     getattr(layer, "groups", 1)))
        return None
