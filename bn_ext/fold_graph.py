"""Reading an fx graph for folding: which nodes are norms, layers and
activations (as modules, functions or aten calls), their arguments, and who
reads their values."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_ext.functional  # noqa: F401  (registers the operators)
from bn_ext.fold_arithmetic import (
    _CONV_TRANSPOSES,
    _CONVS,
    _detach,
    _has_zero_padding,
    _is_foldable_norm,
    _normalises_with_batch_statistics,
)
from bn_ext import modules
from bn_ext.modules import _overrides_forward
from bn_ext.norm_classes import frozen_batch_norm_classes

_ops = torch.ops.bn_ext
_aten = torch.ops.aten


_BN_FUNCTION_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    _aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                               "eps"),
    _ops.batch_norm.default: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps",
                              "num_batches_tracked"),
    _ops.batch_norm_act.default: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
                                  "eps", "activation", "residual", "num_batches_tracked"),
}


# instance_norm calls are BatchNorm-like too; their use_input_stats argument
# (instance statistics) stands where batch_norm's `training` does.
_INSTANCE_NORM_FUNCTION_ARGS = {
    F.instance_norm: _BN_FUNCTION_ARGS[F.batch_norm],
    torch.instance_norm: _BN_FUNCTION_ARGS[torch.batch_norm],
    _aten.instance_norm.default: _BN_FUNCTION_ARGS[_aten.batch_norm.default],
    _ops.instance_norm.default: _BN_FUNCTION_ARGS[F.batch_norm],
}


# bn_ext's own forward operators (as torch.export records bn_ext's modules)
# return (out, save_mean, save_invstd); only out may be read for them to fold.
_BN_EXT_FORWARD_ARGS = {
    _ops.batch_norm_forward.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "eps"),
    _ops.batch_norm_act_forward.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "eps",
                                          "activation", "residual"),
}
_BN_FUNCTION_ARGS.update(_INSTANCE_NORM_FUNCTION_ARGS)
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
    forward = type(bn).forward
    if forward is modules.BatchNormAct2d.forward:
        activation = {"relu": nn.ReLU(), "silu": nn.SiLU()}.get(bn.activation, nn.Identity())
        return NormThenActivation(nn.Identity(), activation)
    # timm's classes stay bases of their bn_ext twins.
    timm_classes = tuple(modules._zoo_classes("timm.layers", "BatchNormAct2d", "FrozenBatchNormAct2d"))
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


def _shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[str, torch.Size]:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return {n.name: n.meta["tensor_meta"].shape for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}
