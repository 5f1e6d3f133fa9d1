"""BatchNorm -> ReLU and BatchNorm -> add -> ReLU rewritten into fused
bn_ext.nn.BatchNormAct calls, found by data flow in a torch.fx trace
(bn_ext.nn.convert(fuse_activations=True)), and back (bn_ext.nn.revert).

The fused call computes what the unfused ops compute, bit for bit, outputs
and gradients (tests/test_batch_norm_act.py). A pattern is fused only where
nothing else reads the BatchNorm's or the sum's value and the BatchNorm
module is called once; the fused modules are new modules sharing the
original's parameter and buffer tensors, so the model passed in keeps
computing what it did.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn

from bn_ext import modules

_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


class _Tracer(torch.fx.Tracer):
    """Keeps bn_ext's modules whole, like torch.nn's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("bn_ext") or super().is_leaf_module(m, qualname)


def _fused_classes() -> dict[type, type]:
    return {modules.BatchNorm1d: modules.BatchNormAct1d, modules.BatchNorm2d: modules.BatchNormAct2d,
            modules.BatchNorm3d: modules.BatchNormAct3d}


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _residual_of(add: torch.fx.Node, bn: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand of `add` when it is bn + other (or other + bn), plain:
    no alpha, no scalar."""
    is_add = (add.op == "call_function" and add.target in _ADD_FUNCTIONS) or (
        add.op == "call_method" and add.target in _ADD_METHODS)
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    first, second = add.args
    if add.op == "call_method" and first is not bn:
        return None  # other.add_(bn) writes into other
    other = second if first is bn else first if second is bn else None
    return other if isinstance(other, torch.fx.Node) else None


def _fuse_graph(gm: torch.fx.GraphModule) -> int:
    """Rewrites gm's patterns in place; returns how many."""
    modules = dict(gm.named_modules())
    fused_classes = _fused_classes()
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_module" or type(modules[bn.target]) not in fused_classes or calls[bn.target] != 1:
            continue
        if len(bn.users) != 1 or len(bn.args) != 1 or bn.kwargs:
            continue
        (user,) = bn.users
        residual = None
        if _is_relu(user, modules):
            relu = user
        else:
            residual = _residual_of(user, bn)
            if residual is None or len(user.users) != 1:
                continue
            (relu,) = user.users
            if not _is_relu(relu, modules):
                continue
        module = modules[bn.target]
        twin = copy.copy(module)  # the same parameter and buffer tensors, in dicts of its own
        twin._parameters, twin._buffers = dict(module._parameters), dict(module._buffers)
        twin._modules = dict(module._modules)
        twin.__class__ = fused_classes[type(module)]
        twin.activation = "relu"
        twin.unfused_class = type(module)  # what unfuse_activations restores
        gm.set_submodule(bn.target, twin)
        if residual is None:
            relu.replace_all_uses_with(bn)
            gm.graph.erase_node(relu)
        else:
            # At the add, where the residual exists (torchvision computes a
            # downsampled identity after the block's last BatchNorm).
            with gm.graph.inserting_before(user):
                call = gm.graph.call_module(bn.target, bn.args, {"residual": residual})
            relu.replace_all_uses_with(call)
            gm.graph.erase_node(relu)
            gm.graph.erase_node(user)
            gm.graph.erase_node(bn)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def fuse_activations(module: nn.Module) -> nn.Module:
    """`module` with its BatchNorm -> (add ->) ReLU patterns fused: a
    torch.fx.GraphModule where its forward traces, else a shallow copy with
    its children fused the same way; `module` itself when nothing fused."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # control flow torch.fx cannot trace: fuse inside the children
        graph = None
    if graph is not None:
        gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
        gm.training = module.training
        return gm if _fuse_graph(gm) else module
    children = {name: fuse_activations(child) for name, child in module.named_children()}
    changed = {name: child for name, child in children.items() if child is not module._modules[name]}
    if not changed:
        return module
    result = copy.copy(module)
    result._modules = {**module._modules, **changed}
    return result


def unfuse_activations(model: nn.Module) -> nn.Module:
    """Undo fuse_activations in place: each fused call of `model`'s
    GraphModules becomes its BatchNorm, then the add, then torch.relu again."""
    for gm in model.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        unfused = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if "unfused_class" not in module.__dict__:
                continue
            module.__class__ = module.__dict__.pop("unfused_class")
            del module.activation
            residual = node.kwargs.get("residual")
            node.kwargs = {}
            with gm.graph.inserting_after(node):
                value = node if residual is None else gm.graph.call_function(operator.add, (node, residual))
            with gm.graph.inserting_after(value):
                relu = gm.graph.call_function(torch.relu, (value,))
            node.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not value and user is not relu)
            unfused += 1
        if unfused:
            gm.graph.lint()
            gm.recompile()
    return model
