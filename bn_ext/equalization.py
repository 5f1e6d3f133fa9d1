"""Cross-layer equalization of a folded model, for int8 (Nagel et al.,
"Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, section 4.1).

Folding scales each output channel of a layer by gamma / sigma, so the
per-channel weight ranges of a folded layer spread wide and per-tensor int8
rounds whole channels to zero. Where a layer's output reaches the next layer
through positively homogeneous functions only (f(s x) = s f(x) for s > 0:
ReLU, LeakyReLU, identity, max and average pooling), dividing the first
layer's output channel i by s_i and multiplying the second's input channel i
by s_i leaves the model's function unchanged; with s_i = sqrt(r1_i r2_i) / r2_i
both layers' ranges of channel i become sqrt(r1_i r2_i).

`equalize` does that for every such pair of Conv / ConvTranspose / Linear
layers (modules, or the functional calls of an fx graph or a torch.export
program on constant weights), sweeping until the scales settle, and keeps a pair only where the
model's output error under per-tensor int8 weights does not grow (the
paper's rule looks at weight ranges alone and can raise the error where
biases are large).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree

from bn_ext.fold_arithmetic import _CONV_TRANSPOSES, _CONVS, _has_zero_padding
from bn_ext.fold_graph import NormThenActivation, _arg, _as_layer, _FoldTracer, _shapes
from bn_ext.quantization_diagnostics import weight_quantization

_aten = torch.ops.aten

# Modules and functions with f(s x) = s f(x) for every per-channel s > 0.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, _aten.relu.default, _aten.relu_.default}
# After a ReLU, what a shift y - c passes through unchanged (f(y - c) = f(y) - c).
_SHIFT_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d,
                  nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_SHIFT_FUNCTIONS = _RELU_FUNCTIONS | {F.max_pool1d, F.max_pool2d, F.max_pool3d, _aten.max_pool1d.default,
                                      _aten.max_pool2d.default, _aten.max_pool3d.default, F.dropout,
                                      _aten.dropout.default, _aten.clone.default}
_HOMOGENEOUS_FUNCTIONS = _SHIFT_FUNCTIONS | {
    F.leaky_relu, _aten.leaky_relu.default, _aten.leaky_relu_.default, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, _aten.avg_pool1d.default,
    _aten.avg_pool2d.default, _aten.avg_pool3d.default, _aten.adaptive_avg_pool1d.default,
    _aten._adaptive_avg_pool2d.default, _aten.adaptive_avg_pool2d.default, _aten.adaptive_avg_pool3d.default}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous"}


def _is_homogeneous_module(m: nn.Module) -> bool:

    if isinstance(m, NormThenActivation):  # a folded BatchNorm + activation: Identity, then its activation
        return isinstance(m.norm, nn.Identity) and _is_homogeneous_module(m.act)
    if isinstance(m, nn.Sequential):
        return all(_is_homogeneous_module(child) for child in m)
    return isinstance(m, _HOMOGENEOUS_MODULES)


# --- a layer's weights, and per-channel views of them ---------------------------------------


@dataclasses.dataclass(eq=False)
class _Weights:
    """A Conv, ConvTranspose or Linear layer's weight and bias tensors (a
    module's parameters, or a graph's constant attributes), changed in place."""

    name: str  # for the report
    key: str  # the weight's qualified name under the root
    kind: str  # "conv", "conv_transpose" or "linear"
    groups: int
    weight: Tensor
    bias: Tensor | None
    zero_padded: bool
    module: nn.Module | None = None

    @staticmethod
    def of_module(module: nn.Module, name: str = "") -> _Weights:

        kind = "linear" if isinstance(module, nn.Linear) else "conv_transpose" if isinstance(
            module, _CONV_TRANSPOSES) else "conv"
        return _Weights(name, f"{name}.weight" if name else "weight", kind, getattr(module, "groups", 1),
                        module.weight, module.bias, isinstance(module, _CONVS) and _has_zero_padding(module), module)


def _layer_weights(root: nn.Module, node: torch.fx.Node) -> _Weights | None:
    """The weights of a graph node that is a layer with constant weights."""

    layer = _as_layer(root, node)
    if layer is None:
        return None
    if layer.module is not None:
        return _Weights.of_module(layer.module, node.target)
    return _Weights(layer.name, _arg(node, layer.names, "weight").target, layer.kind, layer.groups(),
                    layer.weight(root), layer.bias(root), layer.zero_padded())


def _output_rows(layer: _Weights) -> Tensor:
    """The weight as (out_channels, -1): a row per output channel."""
    w, groups = layer.weight.detach(), layer.groups
    if layer.kind == "conv_transpose":  # (in, out / G, *k)
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)  # (G, out/G, in/G, k)
        return w.reshape(groups * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _restore_layout(layer: _Weights, rows: Tensor) -> Tensor:
    """_output_rows' inverse."""
    w, groups = layer.weight, layer.groups
    if layer.kind == "conv_transpose":
        return rows.reshape(groups, w.shape[1], w.shape[0] // groups, -1).transpose(1, 2).reshape(w.shape)
    return rows.reshape(w.shape)


def _output_ranges(layer: _Weights) -> Tensor:
    return _output_rows(layer).abs().amax(1)


def _input_ranges(layer: _Weights) -> Tensor:
    """max |w| over what reads each input channel."""
    w, groups = layer.weight.detach(), layer.groups
    if layer.kind == "linear":
        return w.abs().amax(0)
    if layer.kind == "conv_transpose":  # (in, out / G, *k): input channel i is row i
        return w.abs().reshape(w.shape[0], -1).amax(1)
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    return w.abs().reshape(groups, out_per_group, in_per_group, -1).amax(dim=(1, 3)).reshape(-1)


def _grouped(factor: Tensor, weight: Tensor, groups: int) -> Tensor:
    """factor over the channels a (rows, cols / groups, *k) weight's second
    dim indexes within each group, broadcast onto the weight."""
    rows, cols = weight.shape[0], weight.shape[1]
    full = factor.reshape(groups, 1, cols).expand(groups, rows // groups, cols).reshape(rows, cols)
    return full.reshape(rows, cols, *[1] * (weight.dim() - 2)).to(weight.dtype)


def _along_dim0(factor: Tensor, weight: Tensor) -> Tensor:
    return factor.reshape(-1, *[1] * (weight.dim() - 1)).to(weight.dtype)


def _scale_outputs(layer: _Weights, factor: Tensor) -> None:
    """Multiply output channel i of `layer` (weight and bias) by factor[i]."""
    w = layer.weight.data
    w.mul_(_grouped(factor, w, layer.groups) if layer.kind == "conv_transpose" else _along_dim0(factor, w))
    if layer.bias is not None:
        layer.bias.data.mul_(factor.to(layer.bias.dtype))


def _scale_inputs(layer: _Weights, factor: Tensor) -> None:
    """Multiply what reads input channel i of `layer` by factor[i]."""
    w = layer.weight.data
    if layer.kind == "linear":
        w.mul_(factor.reshape(1, -1).to(w.dtype))
    else:
        w.mul_(_along_dim0(factor, w) if layer.kind == "conv_transpose" else _grouped(factor, w, layer.groups))


def _spread(layer: _Weights) -> tuple[float, int]:
    """(per-channel weight range spread, channels per-tensor int8 rounds to zero)."""

    readiness = weight_quantization("", layer.weight, layer.kind, layer.groups)
    return readiness.range_spread, readiness.dead_channels


# --- running a model: its layers, their weights swapped, their inputs quantized -------------


def run_with_hooks(model: nn.Module, inputs: tuple, handles: list) -> Any:
    """model(*inputs) without autograd, the hook handles removed after, whatever happens."""
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


class _Network:
    """A model's layers, and runs of it that see or change each layer's
    input and output. With an fx graph (traced, or the model's own), the
    graph runs node by node and its functional layers count too; without
    one, module hooks see the layer modules."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph | None):
        self.model = model
        if graph is None:
            self.gm, self.by_node = None, {}
            self.by_module = {m: _Weights.of_module(m, name) for name, m in model.named_modules()
                              if isinstance(m, (nn.Linear, *_conv_classes()))}
            found = self.by_module.values()
        else:
            self.gm = torch.fx.GraphModule(model, graph)  # shares the model's modules and tensors
            self.by_node = {n: w for n in graph.nodes if (w := _layer_weights(model, n)) is not None}
            found = self.by_node.values()
        # one per weight tensor: a module called twice, or layers sharing a weight, hold one
        self.layers = list({id(w.weight): w for w in reversed(list(found))}.values())[::-1]

    def run(self, inputs: tuple, weights: dict[str, Tensor] | None = None, on_input=None, on_output=None) -> Any:
        """The model's output; `weights` (key -> tensor) in place of the layers'
        own for this run; on_input(layer, x) returns what the layer reads
        instead of x; on_output(layer, y) sees each layer's output."""
        saved = {}
        try:
            for layer in self.layers:
                if weights and layer.key in weights:
                    saved[layer.key] = layer.weight.detach().clone()
                    layer.weight.data.copy_(weights[layer.key])
            if self.gm is None:
                return self._run_modules(inputs, on_input, on_output)
            return self._run_graph(inputs, on_input, on_output)
        finally:
            for layer in self.layers:
                if layer.key in saved:
                    layer.weight.data.copy_(saved[layer.key])

    def _run_modules(self, inputs, on_input, on_output):
        handles = []
        for module, layer in self.by_module.items():
            if on_input is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, layer=layer: (on_input(layer, args[0]), *args[1:])))
            if on_output is not None:
                handles.append(module.register_forward_hook(lambda m, args, out, layer=layer: on_output(layer, out)))
        return run_with_hooks(self.model, inputs, handles)

    def _run_graph(self, inputs, on_input, on_output):
        by_node = self.by_node

        class Runner(torch.fx.Interpreter):
            def run_node(self, node):
                layer = by_node.get(node)
                if layer is None or (on_input is None and on_output is None):
                    return super().run_node(node)
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                if on_input is not None:
                    args = (on_input(layer, args[0]), *args[1:])
                out = getattr(self, node.op)(node.target, args, kwargs)
                if on_output is not None:
                    on_output(layer, out)
                return out

        with torch.no_grad():
            return Runner(self.gm).run(*inputs)

    def outputs(self, inputs: tuple, **run_args) -> Tensor:
        """The output's tensors, flattened into one float64 vector."""
        out = self.run(inputs, **run_args)
        return torch.cat([t.detach().double().reshape(-1) for t in _pytree.tree_leaves(out) if isinstance(t, Tensor)])


def _conv_classes() -> tuple[type, ...]:

    return _CONVS + _CONV_TRANSPOSES


# --- int8 fake quantization of a model's weights and activations -----------------------


def _quantized_weights(network: _Network, per_channel: bool) -> dict[str, Tensor]:
    """Symmetric int8 fake quantization of every layer's weight: one scale, or one per output channel."""
    weights = {}
    for layer in network.layers:
        w = layer.weight.detach()
        if per_channel:
            rows = _output_rows(layer)
            scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(w.dtype).tiny)
            weights[layer.key] = _restore_layout(layer, (rows / scale).round().clamp(-127, 127) * scale)
        else:
            scale = (w.abs().max() / 127).clamp_min(torch.finfo(w.dtype).tiny)
            weights[layer.key] = (w / scale).round().clamp(-127, 127) * scale
    return weights


def _quantize_activation(x: Tensor, low: float, high: float) -> Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-30) / 255
    zero = round(-low / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def _activation_ranges(network: _Network, inputs: tuple) -> dict[str, tuple[float, float]]:
    ranges: dict[str, tuple[float, float]] = {}

    def record(layer: _Weights, x: Tensor) -> Tensor:
        low, high = ranges.get(layer.key, (math.inf, -math.inf))
        ranges[layer.key] = (min(low, x.min().item()), max(high, x.max().item()))
        return x

    network.run(inputs, on_input=record)
    return ranges


@dataclasses.dataclass
class QuantizationError:
    """A model's output error under int8 fake quantization, relative L2
    (||y_q - y|| / ||y||) against its float output, and as SQNR in dB."""

    per_tensor_weights: float
    per_channel_weights: float
    w8a8: float  # per-tensor weights and per-tensor uint8 activations (min/max calibrated)

    @staticmethod
    def sqnr(relative: float) -> float:
        return -20 * math.log10(relative) if relative > 0 else math.inf if relative == 0 else math.nan

    def __str__(self) -> str:
        return ", ".join(f"{label} {value:.3g} ({self.sqnr(value):.1f} dB)" if not math.isnan(value) else
                         f"{label} not measured" for label, value in (
            ("per-tensor W8", self.per_tensor_weights), ("per-channel W8", self.per_channel_weights),
            ("W8A8", self.w8a8)))


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _quantization_error(network: _Network, inputs: tuple) -> QuantizationError:
    reference = network.outputs(inputs)
    per_tensor = _quantized_weights(network, per_channel=False)
    ranges = _activation_ranges(network, inputs)
    return QuantizationError(
        _relative(network.outputs(inputs, weights=per_tensor), reference),
        _relative(network.outputs(inputs, weights=_quantized_weights(network, per_channel=True)), reference),
        _relative(network.outputs(inputs, weights=per_tensor,
                                  on_input=lambda layer, x: _quantize_activation(x, *ranges[layer.key])), reference),
    )


def _trace(model: nn.Module) -> torch.fx.Graph | None:

    try:
        return _FoldTracer().trace(model)
    except Exception:  # noqa: BLE001  (any tracing failure: the module view)
        return None


def quantization_error(model: nn.Module, example_inputs: Sequence[Any]) -> QuantizationError:
    """The output error of `model` with int8 fake-quantized weights (symmetric,
    per tensor or per output channel) and activations (each Conv/Linear
    input, per tensor, asymmetric uint8 over the range seen on the inputs).
    bn_ext's own fake quantization, not torch.ao's."""
    return _quantization_error(_Network(model, _trace(model)), tuple(example_inputs))


# --- finding the pairs -------------------------------------------------------------------


@dataclasses.dataclass
class _Pair:
    first: _Weights
    second: _Weights
    path: list = dataclasses.field(default_factory=list)  # the nodes between them


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _homogeneous(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return _is_homogeneous_module(modules[node.target])
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


_FLATTENS = {torch.flatten, _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default, torch.reshape}


def _keeps_channels_as_features(node: torch.fx.Node, modules: dict[str, nn.Module], shapes: dict) -> bool:
    """A flatten or reshape of an (N, C, 1, ...) tensor to (N, C): a Conv
    head's pooled channels become a Linear's features, in order."""
    flattens = (node.op == "call_module" and isinstance(modules[node.target], nn.Flatten)) or (
        node.op == "call_function" and node.target in _FLATTENS) or (
        node.op == "call_method" and node.target in ("flatten", "view", "reshape"))
    before, after = shapes.get(node.args[0].name if node.args else None), shapes.get(node.name)
    return (flattens and before is not None and after is not None and len(before) > 2
            and all(size == 1 for size in before[2:]) and list(after) == list(before[:2]))


def _find_pairs(network: _Network, graph: torch.fx.Graph,
                shapes: dict) -> tuple[list[_Pair], list[tuple[str, str]]]:
    """The layer pairs joined through homogeneous functions only (and, from a
    Conv to a Linear, a flatten of 1x1 maps), and the layers whose chain
    stops, with what stops it."""
    modules = dict(network.model.named_modules())
    uses: dict[int, int] = {}  # layer calls per weight tensor: a module called twice, or a shared weight
    for layer in network.by_node.values():
        uses[id(layer.weight)] = uses.get(id(layer.weight), 0) + 1
    pairs, stopped = [], []
    for node, first in network.by_node.items():
        if uses[id(first.weight)] > 1:
            stopped.append((first.name, "called more than once, or its weight is shared"))
            continue
        current, reason, path, flattened = node, None, [], False
        while reason is None:
            users = list(current.users)
            if len(users) != 1:
                reason = f"its output has {len(users)} readers (a residual add or a branch)" if users else "no reader"
                break
            user = users[0]
            second = network.by_node.get(user)
            if second is not None and user.args[0] is current:
                if uses[id(second.weight)] > 1:
                    reason = f"the next layer {second.name} is called more than once, or its weight is shared"
                elif (second.kind == "linear") != (first.kind == "linear" or flattened):
                    reason = f"the next layer {second.name} reads channels on another axis"
                elif _input_ranges(second).numel() != _output_ranges(first).numel():
                    reason = (f"the next layer {second.name} reads {_input_ranges(second).numel()} channels, not "
                              f"{_output_ranges(first).numel()}")
                else:
                    pairs.append(_Pair(first, second, path))
                break
            if user.op == "output":
                reason = "its output is the model's"
                break
            if first.kind != "linear" and not flattened and user.args and user.args[0] is current and \
                    _keeps_channels_as_features(user, modules, shapes):
                flattened = True
            elif not _homogeneous(user, modules) or user.args[0] is not current:
                reason = f"{_describe(user, modules)} stands before the next layer (not positively homogeneous)"
                break
            current = user
            path.append(user)
        if reason is not None:
            stopped.append((first.name, reason))
    return pairs, list(dict.fromkeys(stopped))  # a layer called twice stops once


# --- bias absorption (the paper's section 4.2) --------------------------------------------


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:

    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, NormThenActivation):
            m = m.act[-1] if isinstance(m.act, nn.Sequential) else m.act
        return isinstance(m, nn.ReLU)
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("relu", "relu_"))


def _absorbable(pair: _Pair, modules: dict[str, nn.Module]) -> bool:
    """Whether a constant c >= 0 below the first layer's outputs can move
    into the second layer's bias exactly: a ReLU first (relu(y) = relu(y - c)
    + c where y >= c), then only what commutes with the shift, and a second
    layer that reads every input position with its whole kernel (a Linear, a
    Conv without zero padding) and has a bias to take it (or is a module,
    which gets one)."""
    path = list(pair.path)
    while path and path[0].op == "call_module" and isinstance(modules[path[0].target], (nn.Identity, nn.Dropout)):
        path.pop(0)  # a folded BatchNorm's Identity
    if not path or not _is_relu(path[0], modules) or pair.first.bias is None:
        return False
    second = pair.second
    if second.kind == "conv_transpose" or second.zero_padded or (second.bias is None and second.module is None):
        return False
    return all(_is_relu(node, modules) or (node.op == "call_module" and isinstance(modules[node.target], _SHIFT_MODULES))
               or (node.op == "call_function" and node.target in _SHIFT_FUNCTIONS) for node in path[1:])


def _output_extremes(network: _Network, layer: _Weights, inputs: tuple) -> tuple[Tensor, Tensor]:
    """Each output channel's smallest and largest value on the inputs."""
    found = []

    def record(seen: _Weights, out: Tensor) -> None:
        if seen is layer:
            moved = out.detach().movedim(-1 if layer.kind == "linear" else 1, 0).double()
            flat = moved.reshape(moved.shape[0], -1)
            found.append((flat.amin(1), flat.amax(1)))

    network.run(inputs, on_output=record)
    return found[0]


def _absorb(first: _Weights, second: _Weights, shift: Tensor) -> None:
    """first's bias less `shift`, second's bias plus what `shift` adds to it."""
    first.bias.data.sub_(shift.to(first.bias.dtype))
    w = second.weight.detach().double()
    added = w @ shift if second.kind == "linear" else (w * _grouped(shift, w, second.groups)).reshape(
        w.shape[0], -1).sum(1)
    if second.bias is None:
        weight = second.module.weight
        second.module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=weight.dtype, device=weight.device),
                                          requires_grad=weight.requires_grad)
        second.bias = second.module.bias
    second.bias.data.add_(added.to(second.bias.dtype))


def _absorb_biases(network: _Network, inputs: tuple, pairs: list[_Pair], report: EqualizationReport
                   ) -> list[tuple[_Pair, Tensor]]:
    """Moves the part of each ReLU input that is always positive on the
    example inputs into the next layer's bias (the paper estimates it as
    beta - 3 gamma from the BatchNorm; its lowest value on the inputs, less a
    margin for rounding, is what holds here). A pair whose absorption raises
    the per-tensor W8 or the W8A8 output error is undone and listed.
    Returns the shifts kept."""
    modules = dict(network.model.named_modules())
    shifts = []
    error = _quantization_error(network, inputs)
    for pair in pairs:
        first, second = pair.first, pair.second
        if not _absorbable(pair, modules):
            continue
        low, high = _output_extremes(network, first, inputs)
        shift = (low - 1e-5 * (high - low).abs()).clamp_min(0)
        if not (shift > 0).any():
            continue
        saved = first.bias.detach().clone(), None if second.bias is None else second.bias.detach().clone()
        _absorb(first, second, shift)
        candidate = _quantization_error(network, inputs)
        if candidate.per_tensor_weights > error.per_tensor_weights or candidate.w8a8 > error.w8a8:
            first.bias.data.copy_(saved[0])
            if saved[1] is None:
                second.module.bias = second.bias = None  # absorption added it
            else:
                second.bias.data.copy_(saved[1])
            report.left.append((first.name, f"absorbing its bias into {second.name} would raise the int8 output "
                                            f"error (per-tensor W8 {error.per_tensor_weights:.3g} -> "
                                            f"{candidate.per_tensor_weights:.3g}, W8A8 {error.w8a8:.3g} -> "
                                            f"{candidate.w8a8:.3g})"))
            continue
        error = candidate
        shifts.append((pair, shift))
        report.absorbed[first.name] = (high.clamp_min(0).max().item(), (high - shift).clamp_min(0).max().item())
    return shifts


# --- the report and the algorithm --------------------------------------------------------


@dataclasses.dataclass
class EqualizationReport:
    """What `equalize` did."""

    equalized: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (first, second) layers
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (layer, why its chain stops / was undone)
    # per layer: (range spread, channels per-tensor int8 zeroes) before and after
    layers: dict[str, tuple[float, int, float, int]] = dataclasses.field(default_factory=dict)
    relu6_replaced: int = 0  # relu6_to_relu=True: ReLU6 modules made ReLU
    relu6_error: float = 0.0  # and the output change that made, relative to the output scale
    # absorb_bias=True: per first layer, the largest value after its ReLU before and after absorption
    absorbed: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    before: QuantizationError | None = None
    after: QuantizationError | None = None
    float32_error: float = float("nan")  # equalized vs unequalized output, relative to the output scale
    float64_error: float = float("nan")  # the same scalings applied in float64
    float32_tolerance: float = 1e-5
    sweeps: int = 0

    def __str__(self) -> str:
        lines = [f"Cross-layer equalization: {len(self.equalized)} layer pairs equalized in {self.sweeps} sweeps"]
        if self.relu6_replaced:
            lines.append(f"  {self.relu6_replaced} ReLU6 made ReLU first: the output moved by {self.relu6_error:.3g} "
                         "of its scale on the example inputs")
        lines += [f"    {a} -> {b}" for a, b in self.equalized]
        if self.left:
            lines.append("  left:")
            lines += [f"    {name:<40} {why}" for name, why in self.left]
        if self.layers:
            lines.append("  per-channel weight range spread, per-tensor dead channels (before -> after):")
            lines += [f"    {name:<40} {s0:.3g}x, {d0} dead -> {s1:.3g}x, {d1} dead"
                      for name, (s0, d0, s1, d1) in self.layers.items()]
        if self.absorbed:
            lines.append("  bias absorbed into the next layer (activation range after the ReLU, before -> after):")
            lines += [f"    {name:<40} [0, {a:.3g}] -> [0, {b:.3g}]" for name, (a, b) in self.absorbed.items()]
        lines.append(f"  int8 output error before: {self.before}")
        lines.append(f"  int8 output error after:  {self.after}")
        float64 = ("float64 not run" if math.isnan(self.float64_error) else
                   f"float64 {self.float64_error:.3g} (allowed 1e-10)")
        lines.append(f"  equalized vs original: float32 {self.float32_error:.3g} (allowed {self.float32_tolerance:.3g}), "
                     f"{float64}, relative to the output scale")
        return "\n".join(lines)


class EqualizationError(RuntimeError):
    """The equalized model does not compute what the original does."""


def _scale_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _apply(first: _Weights, second: _Weights, scale: Tensor) -> None:
    _scale_outputs(first, 1 / scale)
    _scale_inputs(second, scale)


def _chains(pairs: list[_Pair]) -> list[list[_Pair]]:
    """Pairs joined by a shared layer (a -> b, b -> c), in graph order."""
    chains: list[list[_Pair]] = []
    for pair in pairs:
        chain = next((c for c in chains if c[-1].second is pair.first), None)
        if chain is None:
            chains.append([pair])
        else:
            chain.append(pair)
    return chains


def _equalize_chain(chain: list[_Pair], max_sweeps: int, applied: list[tuple[_Pair, Tensor]]) -> int:
    """Equalizes each pair of the chain in turn until the scales settle
    (a depthwise layer's input scale moves its output ranges, so the pair
    after it changes); appends each scaling to `applied`; returns the sweeps
    it took."""
    for sweep in range(max_sweeps):
        moved = False
        for pair in chain:
            r1, r2 = _output_ranges(pair.first).double(), _input_ranges(pair.second).double()
            usable = (r1 > 0) & (r2 > 0)
            scale = torch.where(usable, (r1 * r2).sqrt() / r2.clamp_min(1e-300), torch.ones_like(r1))
            if (scale.log().abs().max() < 1e-3).item():
                continue
            _apply(pair.first, pair.second, scale)
            applied.append((pair, scale))
            moved = True
        if not moved:
            return sweep + 1
    return max_sweeps


def _equalize_pairs(pairs: list[_Pair], max_sweeps: int, per_tensor_error: Callable[[], float], error: float,
                    report: EqualizationReport) -> tuple[list[tuple[_Pair, Tensor]], float]:
    """Equalizes the chains of `pairs`, each kept only where
    per_tensor_error() (the model's output error under per-tensor int8
    weights, its layers as they now are) does not grow past `error`. A chain
    that raises it as a whole has its pairs tried alone, and the refused ones
    once more after their neighbours moved; those still refused are listed in
    report.left. Returns the scalings kept, in order, and the error reached."""
    applied: list[tuple[_Pair, Tensor]] = []

    def attempt(chain: list[_Pair]) -> float | None:
        """Equalizes the chain; keeps it and returns None, or undoes it and
        returns the error it would have had."""
        nonlocal error
        tensors = [t for pair in chain for layer in (pair.first, pair.second) for t in _tensors(layer)]
        saved = [t.detach().clone() for t in tensors]
        scalings: list[tuple[_Pair, Tensor]] = []
        report.sweeps = max(report.sweeps, _equalize_chain(chain, max_sweeps, scalings))
        candidate = per_tensor_error()
        if candidate <= error:
            error = candidate
            report.equalized += [(pair.first.name, pair.second.name) for pair in chain]
            applied.extend(scalings)
            return None
        for tensor, value in zip(tensors, saved):
            tensor.data.copy_(value)
        return candidate

    refused: dict[int, tuple[_Pair, float]] = {}
    for chain in _chains(pairs):
        worse = attempt(chain)
        if worse is None:
            continue
        for pair in chain:
            alone = attempt([pair]) if len(chain) > 1 else worse
            if alone is not None:
                refused[id(pair)] = (pair, alone)
    for key, (pair, _) in list(refused.items()):
        alone = attempt([pair])
        if alone is None:
            del refused[key]
        else:
            refused[key] = (pair, alone)
    report.left += [(pair.first.name, f"equalizing it with {pair.second.name} would raise the per-tensor int8 "
                                      f"output error from {error:.3g} to {alone:.3g}") for pair, alone in refused.values()]
    return applied, error


def _replace_relu6(model: nn.Module) -> int:
    """ReLU6 modules made ReLU (same inplace); returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.ReLU6:
                setattr(module, name, nn.ReLU(inplace=child.inplace))
                replaced += 1
    return replaced


def _tensors(layer: _Weights) -> list[Tensor]:
    return [t for t in (layer.weight, layer.bias) if t is not None]


def _replay(original: nn.Module, inputs: tuple, applied: list[tuple[_Pair, Tensor]],
            shifts: list[tuple[_Pair, Tensor]]) -> tuple[Tensor, Tensor]:
    """The original's and the equalized model's outputs in float64: the same
    scalings and shifts applied to a float64 copy."""
    doubled = tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)
    original64 = copy.deepcopy(original).double()
    equalized64 = copy.deepcopy(original64)
    network64 = _Network(equalized64, _trace(equalized64))
    by_key = {layer.key: layer for layer in network64.layers}
    for pair, scale in applied:
        _apply(by_key[pair.first.key], by_key[pair.second.key], scale)
    for pair, shift in shifts:
        first64, second64 = by_key[pair.first.key], by_key[pair.second.key]
        # the shift the float64 values allow: the float32 model's rounding put its minimum elsewhere
        low64, _ = _output_extremes(network64, first64, doubled)
        _absorb(first64, second64, torch.minimum(shift, low64.clamp_min(0)))
    return (_Network(original64, _trace(original64)).outputs(doubled), network64.outputs(doubled))


def equalize(model: nn.Module, example_inputs: Tensor | Sequence[Any], *, inplace: bool = False,
             absorb_bias: bool = False, relu6_to_relu: bool = False,
             max_sweeps: int = 8) -> tuple[nn.Module, EqualizationReport]:
    """Cross-layer equalization of a (folded) eval model; returns (model, report).

    Pairs are found by data flow in a torch.fx trace (a GraphModule's own
    graph: a torch.export program's module, say): a Conv, ConvTranspose or
    Linear (a module, or a functional call on constant weights) whose output
    reaches exactly one next layer through ReLU, LeakyReLU, identity, pooling
    or a folded BatchNorm's activation (anything else, a residual add or a
    second reader stops the chain, and the report names it), neither layer
    called twice nor sharing its weight. Pairs that share a layer form a
    chain (Conv -> depthwise Conv -> Conv), equalized pair by pair in sweeps
    until the scales settle; a chain whose equalization raises the model's
    output error under per-tensor int8 weights (on the example inputs) is
    undone, and its pairs are tried one by one, each kept only where it
    lowers that error; the others are listed.

    absorb_bias=True then moves, for each pair joined by a ReLU whose second
    layer reads every position with its whole kernel (a Linear, a Conv
    without zero padding), the part of the ReLU's input that is positive on
    every example input into the second layer's bias (the paper's section
    4.2), narrowing the activation range int8 must hold; undone pair by pair
    where the per-tensor W8 or W8A8 output error would grow. Exact where
    inputs stay above that part, as the example inputs do (less a margin of
    1e-5 of the range, for rounding).

    relu6_to_relu=True first makes every ReLU6 module a ReLU, as AIMET does
    for equalization: this changes the model wherever an activation exceeds
    6; the report gives the change of the output on the example inputs, and
    the checks below compare against the model with ReLU.

    The result is checked against the model in float32 (1e-5 of the output
    scale, or 4x the model's own float32 error where that is larger) and, the
    same changes applied in float64, to 1e-10; EqualizationError otherwise.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    # A torch.export program's module refuses eval() (NotImplementedError):
    # its mode was fixed at export, and it is equalized as it is.
    with contextlib.suppress(NotImplementedError):
        target.eval()
    report = EqualizationReport()
    if relu6_to_relu:
        before_relu = _Network(target, _trace(target)).outputs(inputs)
        report.relu6_replaced = _replace_relu6(target)
        report.relu6_error = _scale_error(_Network(target, _trace(target)).outputs(inputs), before_relu)
    original = copy.deepcopy(target)
    graph = _trace(target)
    network = _Network(target, graph)
    report.before = _quantization_error(network, inputs)
    if graph is None:
        report.left.append(("(the model)", "torch.fx cannot trace it: nothing equalized"))
        report.after, report.float32_error, report.float64_error = report.before, 0.0, 0.0
        return target, report

    pairs, report.left = _find_pairs(network, graph, _shapes(network.gm, inputs))
    spreads_before = {layer.name: _spread(layer) for pair in pairs for layer in (pair.first, pair.second)}
    reference = network.outputs(inputs)
    error = report.before.per_tensor_weights
    applied, error = _equalize_pairs(
        pairs, max_sweeps, lambda: _relative(network.outputs(inputs, weights=_quantized_weights(network, False)),
                                             reference), error, report)
    layers = {layer.name: layer for pair in pairs for layer in (pair.first, pair.second)}
    report.layers = {name: (*spreads_before[name], *_spread(layers[name])) for pair in report.equalized
                     for name in pair}
    shifts = _absorb_biases(network, inputs, pairs, report) if absorb_bias else []
    report.after = _quantization_error(network, inputs)
    expected = _Network(original, _trace(original)).outputs(inputs)
    report.float32_error = _scale_error(network.outputs(inputs), expected)
    exact, equalized64 = _replay(original, inputs, applied, shifts)
    report.float64_error = _scale_error(equalized64, exact)
    # A model that amplifies rounding (deep, with spread statistics) moves
    # further in float32 from any change of its weights' rounding: its own
    # float32 error against float64 sets the floor.
    report.float32_tolerance = max(1e-5, 4 * _scale_error(expected, exact))
    if not (report.float32_error <= report.float32_tolerance and report.float64_error <= 1e-10):
        raise EqualizationError(f"equalize: the equalized model differs from the original by {report.float32_error:.3g}"
                                f" (float32) and {report.float64_error:.3g} (float64)\n{report}")
    return target, report
