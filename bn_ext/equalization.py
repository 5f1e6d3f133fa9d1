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
modules, sweeping until the scales settle, and keeps a pair only where the
model's output error under per-tensor int8 weights does not grow (the
paper's rule looks at weight ranges alone and can raise the error where
biases are large).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = _CONVS + _CONV_TRANSPOSES + (nn.Linear,)

# Modules and functions with f(s x) = s f(x) for every per-channel s > 0.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                          F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                          F.adaptive_avg_pool3d, F.dropout}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous"}


def _is_homogeneous_module(m: nn.Module) -> bool:
    from bn_ext.fold import NormThenActivation

    if isinstance(m, NormThenActivation):  # a folded BatchNorm + activation: Identity, then its activation
        return isinstance(m.norm, nn.Identity) and _is_homogeneous_module(m.act)
    if isinstance(m, nn.Sequential):
        return all(_is_homogeneous_module(child) for child in m)
    return isinstance(m, _HOMOGENEOUS_MODULES)


# --- per-channel views of a layer's weight -------------------------------------------


def _kind(layer: nn.Module) -> str:
    return "linear" if isinstance(layer, nn.Linear) else "conv_transpose" if isinstance(layer, _CONV_TRANSPOSES) else "conv"


def _output_rows(layer: nn.Module) -> Tensor:
    """The weight as (out_channels, G, -1): a view per output channel."""
    w, groups = layer.weight, getattr(layer, "groups", 1)
    if _kind(layer) == "conv_transpose":  # (in, out / G, *k)
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)  # (G, out/G, in/G, k)
        return w.reshape(groups * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _output_ranges(layer: nn.Module) -> Tensor:
    return _output_rows(layer).detach().abs().amax(1)


def _input_ranges(layer: nn.Module) -> Tensor:
    """max |w| over what reads each input channel."""
    w, groups = layer.weight.detach(), getattr(layer, "groups", 1)
    if _kind(layer) == "linear":
        return w.abs().amax(0)
    if _kind(layer) == "conv_transpose":  # (in, out / G, *k): input channel i is row i
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


def _scale_outputs(layer: nn.Module, factor: Tensor) -> None:
    """Multiply output channel i of `layer` (weight and bias) by factor[i]."""
    w, groups = layer.weight.data, getattr(layer, "groups", 1)
    w.mul_(_grouped(factor, w, groups) if _kind(layer) == "conv_transpose" else _along_dim0(factor, w))
    if layer.bias is not None:
        layer.bias.data.mul_(factor.to(layer.bias.dtype))


def _scale_inputs(layer: nn.Module, factor: Tensor) -> None:
    """Multiply what reads input channel i of `layer` by factor[i]."""
    w, groups = layer.weight.data, getattr(layer, "groups", 1)
    if _kind(layer) == "linear":
        w.mul_(factor.reshape(1, -1).to(w.dtype))
    else:
        w.mul_(_along_dim0(factor, w) if _kind(layer) == "conv_transpose" else _grouped(factor, w, groups))


def _out_channels(layer: nn.Module) -> int:
    return _output_rows(layer).shape[0]


def _in_channels(layer: nn.Module) -> int:
    return _input_ranges(layer).shape[0]


# --- int8 fake quantization of a model's weights and activations -----------------------


def _quantized_weights(model: nn.Module, per_channel: bool) -> dict[str, Tensor]:
    weights = {}
    for name, layer in model.named_modules():
        if isinstance(layer, _LAYERS):
            w = layer.weight.detach()
            if per_channel:
                rows = _output_rows(layer).detach()
                scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(w.dtype).tiny)
                q = (rows / scale).round().clamp(-127, 127) * scale
                weights[f"{name}.weight"] = _restore_layout(layer, q)
            else:
                scale = (w.abs().max() / 127).clamp_min(torch.finfo(w.dtype).tiny)
                weights[f"{name}.weight"] = (w / scale).round().clamp(-127, 127) * scale
    return weights


def _restore_layout(layer: nn.Module, rows: Tensor) -> Tensor:
    """_output_rows' inverse."""
    w, groups = layer.weight, getattr(layer, "groups", 1)
    if _kind(layer) == "conv_transpose":
        g = rows.reshape(groups, w.shape[1], w.shape[0] // groups, -1).transpose(1, 2)
        return g.reshape(w.shape)
    return rows.reshape(w.shape)


def run_with_hooks(model: nn.Module, inputs: tuple, handles: list, weights: dict[str, Tensor] | None = None) -> Any:
    """model(*inputs) without autograd (on `weights` where given), the hook
    handles removed after, whatever happens."""
    try:
        with torch.no_grad():
            return torch.func.functional_call(model, weights, inputs, tie_weights=False) if weights else model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


def _outputs(model: nn.Module, inputs: tuple, weights: dict[str, Tensor] | None = None,
             activation_ranges: dict[str, tuple[float, float]] | None = None) -> Tensor:
    """The model's outputs, flattened into one vector; with `weights`, run on
    those weights; with `activation_ranges`, each layer's input fake-quantized
    to uint8 over its calibrated range."""
    handles = []
    if activation_ranges is not None:
        for name, layer in model.named_modules():
            if name in activation_ranges:
                low, high = activation_ranges[name]
                handles.append(layer.register_forward_pre_hook(
                    lambda m, args, low=low, high=high: (_quantize_activation(args[0], low, high), *args[1:])))
    out = run_with_hooks(model, inputs, handles, weights)
    return torch.cat([t.detach().double().reshape(-1) for t in _pytree.tree_leaves(out) if isinstance(t, Tensor)])


def _quantize_activation(x: Tensor, low: float, high: float) -> Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-30) / 255
    zero = round(-low / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def _activation_ranges(model: nn.Module, inputs: tuple) -> dict[str, tuple[float, float]]:
    ranges, handles = {}, []
    for name, layer in model.named_modules():
        if isinstance(layer, _LAYERS):
            def record(m, args, name=name):
                x = args[0].detach()
                low, high = ranges.get(name, (math.inf, -math.inf))
                ranges[name] = (min(low, x.min().item()), max(high, x.max().item()))
            handles.append(layer.register_forward_pre_hook(record))
    run_with_hooks(model, inputs, handles)
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
        return -20 * math.log10(relative) if relative > 0 else math.inf

    def __str__(self) -> str:
        return ", ".join(f"{label} {value:.3g} ({self.sqnr(value):.1f} dB)" for label, value in (
            ("per-tensor W8", self.per_tensor_weights), ("per-channel W8", self.per_channel_weights),
            ("W8A8", self.w8a8)))


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def quantization_error(model: nn.Module, example_inputs: Sequence[Any]) -> QuantizationError:
    """The output error of `model` with int8 fake-quantized weights (symmetric,
    per tensor or per output channel) and activations (each Conv/Linear
    input, per tensor, asymmetric uint8 over the range seen on the inputs)."""
    inputs = tuple(example_inputs)
    reference = _outputs(model, inputs)
    per_tensor = _quantized_weights(model, per_channel=False)
    return QuantizationError(
        _relative(_outputs(model, inputs, per_tensor), reference),
        _relative(_outputs(model, inputs, _quantized_weights(model, per_channel=True)), reference),
        _relative(_outputs(model, inputs, per_tensor, _activation_ranges(model, inputs)), reference),
    )


# --- finding the pairs -------------------------------------------------------------------


@dataclasses.dataclass
class _Pair:
    first: str
    second: str
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
        if node.target in (F.leaky_relu,):
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return isinstance(slope, (int, float))
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _find_pairs(model: nn.Module, graph: torch.fx.Graph) -> tuple[list[_Pair], list[tuple[str, str]]]:
    """The layer pairs joined through homogeneous functions only, and the
    layers whose chain stops, with what stops it."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    owners: dict[int, list[str]] = {}
    for name, m in modules.items():
        if isinstance(m, _LAYERS):
            owners.setdefault(id(m.weight), []).append(name)
    pairs, stopped = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS):
            continue
        name = node.target
        if calls[name] > 1 or len(owners[id(modules[name].weight)]) > 1:
            stopped.append((name, "called more than once, or its weight is shared"))
            continue
        current, reason, path = node, None, []
        while reason is None:
            users = list(current.users)
            if len(users) != 1:
                reason = f"its output has {len(users)} readers (a residual add or a branch)" if users else "no reader"
                break
            user = users[0]
            if user.op == "call_module" and isinstance(modules[user.target], _LAYERS) and user.args[0] is current:
                second = modules[user.target]
                if calls[user.target] > 1 or len(owners[id(second.weight)]) > 1:
                    reason = f"the next layer {user.target} is called more than once, or its weight is shared"
                elif (_kind(second) == "linear") != (_kind(modules[name]) == "linear"):
                    reason = f"the next layer {user.target} reads channels on another axis"
                elif _in_channels(second) != _out_channels(modules[name]):
                    reason = f"the next layer {user.target} reads {_in_channels(second)} channels, not " \
                             f"{_out_channels(modules[name])}"
                else:
                    pairs.append(_Pair(name, user.target, path))
                break
            if user.op == "output":
                reason = "its output is the model's"
                break
            if not _homogeneous(user, modules) or user.args[0] is not current:
                reason = f"{_describe(user, modules)} stands before the next layer (not positively homogeneous)"
                break
            current = user
            path.append(user)
        if reason is not None:
            stopped.append((name, reason))
    return pairs, stopped


# --- bias absorption (the paper's section 4.2) --------------------------------------------

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
# After the ReLU: what y - c passes through unchanged in shape (f(y - c) = f(y) - c).
_SHIFT_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d,
                  nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    from bn_ext.fold import NormThenActivation

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
    Conv without zero padding)."""
    from bn_ext.fold import _has_zero_padding

    second = modules[pair.second]
    path = list(pair.path)
    while path and path[0].op == "call_module" and isinstance(modules[path[0].target], (nn.Identity, nn.Dropout)):
        path.pop(0)  # a folded BatchNorm's Identity
    if not path or not _is_relu(path[0], modules):
        return False
    if isinstance(second, _CONV_TRANSPOSES) or (isinstance(second, _CONVS) and _has_zero_padding(second)):
        return False
    return all(_is_relu(node, modules) or (node.op == "call_module" and isinstance(modules[node.target], _SHIFT_MODULES))
               for node in path[1:])


def _output_extremes(model: nn.Module, layer: nn.Module, inputs: tuple) -> tuple[Tensor, Tensor]:
    """Each output channel's smallest and largest value on the inputs."""
    found = []

    def record(m, args, out):
        moved = out.detach().movedim(-1 if isinstance(m, nn.Linear) else 1, 0).double()
        flat = moved.reshape(moved.shape[0], -1)
        found.append((flat.amin(1), flat.amax(1)))

    run_with_hooks(model, inputs, [layer.register_forward_hook(record)])
    return found[0]


def _absorb_biases(model: nn.Module, inputs: tuple, pairs: list[_Pair], modules: dict[str, nn.Module],
                   report: EqualizationReport) -> list[tuple[_Pair, Tensor]]:
    """Moves the part of each ReLU input that is always positive on the
    example inputs into the next layer's bias (the paper estimates it as
    beta - 3 gamma from the BatchNorm; its lowest value on the inputs, less a
    margin for rounding, is what holds here). A pair whose absorption raises
    the per-tensor W8 or the W8A8 output error is undone and listed.
    Returns the shifts kept."""
    shifts = []
    error = quantization_error(model, inputs)
    for pair in pairs:
        first, second = modules[pair.first], modules[pair.second]
        if not _absorbable(pair, modules) or first.bias is None:
            continue
        low, high = _output_extremes(model, first, inputs)
        shift = (low - 1e-5 * (high - low).abs()).clamp_min(0)
        if not (shift > 0).any():
            continue
        saved = first.bias.detach().clone(), None if second.bias is None else second.bias.detach().clone()
        _absorb(first, second, shift)
        candidate = quantization_error(model, inputs)
        if candidate.per_tensor_weights > error.per_tensor_weights or candidate.w8a8 > error.w8a8:
            first.bias.data.copy_(saved[0])
            if saved[1] is None:
                second.bias = None  # absorption added it
            else:
                second.bias.data.copy_(saved[1])
            report.left.append((pair.first, f"absorbing its bias into {pair.second} would raise the int8 output "
                                            f"error (per-tensor W8 {error.per_tensor_weights:.3g} -> "
                                            f"{candidate.per_tensor_weights:.3g}, W8A8 {error.w8a8:.3g} -> "
                                            f"{candidate.w8a8:.3g})"))
            continue
        error = candidate
        shifts.append((pair, shift))
        report.absorbed[pair.first] = (high.clamp_min(0).max().item(), (high - shift).clamp_min(0).max().item())
    return shifts


def _absorb(first: nn.Module, second: nn.Module, shift: Tensor) -> None:
    """first's bias less `shift`, second's bias plus what `shift` adds to it."""
    first.bias.data.sub_(shift.to(first.bias.dtype))
    w = second.weight.detach().double()
    if _kind(second) == "linear":
        added = w @ shift
    else:
        added = (w * _grouped(shift, w, getattr(second, "groups", 1))).reshape(w.shape[0], -1).sum(1)
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=second.weight.dtype, device=second.weight.device),
                                   requires_grad=second.weight.requires_grad)
    second.bias.data.add_(added.to(second.bias.dtype))


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
        lines.append(f"  equalized vs original: float32 {self.float32_error:.3g} (allowed {self.float32_tolerance:.3g}), "
                     f"float64 {self.float64_error:.3g} (allowed 1e-10), relative to the output scale")
        return "\n".join(lines)


def _spread(layer: nn.Module) -> tuple[float, int]:
    """(per-channel weight range spread, channels per-tensor int8 rounds to zero)."""
    from bn_ext.fold import weight_quantization

    readiness = weight_quantization("", layer.weight, _kind(layer), getattr(layer, "groups", 1))
    return readiness.range_spread, readiness.dead_channels


class EqualizationError(RuntimeError):
    """The equalized model does not compute what the original does."""


def _scale_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _apply(first: nn.Module, second: nn.Module, scale: Tensor) -> None:
    _scale_outputs(first, 1 / scale)
    _scale_inputs(second, scale)


def _chains(pairs: list[_Pair]) -> list[list[_Pair]]:
    """Pairs joined by a shared layer (a -> b, b -> c), in graph order."""
    chains: list[list[_Pair]] = []
    for pair in pairs:
        chain = next((c for c in chains if c[-1].second == pair.first), None)
        if chain is None:
            chains.append([pair])
        else:
            chain.append(pair)
    return chains


def _equalize_chain(chain: list[_Pair], modules: dict[str, nn.Module], max_sweeps: int,
                    applied: list[tuple[_Pair, Tensor]]) -> int:
    """Equalizes each pair of the chain in turn until the scales settle
    (a depthwise layer's input scale moves its output ranges, so the pair
    after it changes); appends each scaling to `applied`; returns the sweeps
    it took."""
    for sweep in range(max_sweeps):
        moved = False
        for pair in chain:
            first, second = modules[pair.first], modules[pair.second]
            r1, r2 = _output_ranges(first).double(), _input_ranges(second).double()
            usable = (r1 > 0) & (r2 > 0)
            scale = torch.where(usable, (r1 * r2).sqrt() / r2.clamp_min(1e-300), torch.ones_like(r1))
            if (scale.log().abs().max() < 1e-3).item():
                continue
            _apply(first, second, scale)
            applied.append((pair, scale))
            moved = True
        if not moved:
            return sweep + 1
    return max_sweeps


def _replace_relu6(model: nn.Module) -> int:
    """ReLU6 modules made ReLU (same inplace); returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.ReLU6:
                setattr(module, name, nn.ReLU(inplace=child.inplace))
                replaced += 1
    return replaced


def equalize(model: nn.Module, example_inputs: Tensor | Sequence[Any], *, inplace: bool = False,
             absorb_bias: bool = False, relu6_to_relu: bool = False,
             max_sweeps: int = 8) -> tuple[nn.Module, EqualizationReport]:
    """Cross-layer equalization of a (folded) eval model; returns (model, report).

    Pairs are found by data flow in a torch.fx trace: a Conv, ConvTranspose or
    Linear module whose output reaches exactly one next layer through
    ReLU, LeakyReLU, identity, pooling or a folded BatchNorm's activation
    (anything else, a residual add or a second reader stops the chain, and the
    report names it), neither layer called twice nor sharing its weight.
    Pairs that share a layer form a chain (Conv -> depthwise Conv -> Conv),
    equalized pair by pair in sweeps until the scales settle; a chain whose
    equalization raises the model's output error under per-tensor int8
    weights (on the example inputs) is undone and listed.

    absorb_bias=True then moves, for each pair joined by a ReLU whose second
    layer reads every position with its whole kernel (a Linear, a Conv
    without zero padding), the part of the ReLU's input that is positive on
    every example input into the second layer's bias (the paper's section
    4.2), narrowing the activation range int8 must hold; undone pair by pair
    where the per-tensor W8 or W8A8 output error would grow. Exact where inputs stay above that part, as the
    example inputs do (less a margin of 1e-5 of the range, for rounding).

    relu6_to_relu=True first makes every ReLU6 module a ReLU, as AIMET does
    for equalization: this changes the model wherever an activation exceeds
    6; the report gives the change of the output on the example inputs, and
    the checks below compare against the model with ReLU.

    The result is checked against the model in float32 (1e-5 of the output
    scale, or 4x the model's own float32 error where that is larger) and, the
    same changes applied in float64, to 1e-10; EqualizationError otherwise.
    """
    from bn_ext.fold import _FoldTracer

    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    report = EqualizationReport()
    if relu6_to_relu:
        before_relu = _outputs(target, inputs)
        report.relu6_replaced = _replace_relu6(target)
        report.relu6_error = _scale_error(_outputs(target, inputs), before_relu)
    original = copy.deepcopy(target)
    try:
        graph = _FoldTracer().trace(target)
    except Exception as error:  # noqa: BLE001  (any tracing failure: nothing to equalize safely)
        report.left.append(("(the model)", f"torch.fx cannot trace it ({type(error).__name__}): nothing equalized"))
        report.before = report.after = quantization_error(target, inputs)
        report.float32_error = report.float64_error = 0.0
        return target, report
    pairs, report.left = _find_pairs(target, graph)
    modules = dict(target.named_modules())
    spreads_before = {name: _spread(modules[name]) for pair in pairs for name in (pair.first, pair.second)}
    report.before = quantization_error(target, inputs)
    reference = _outputs(target, inputs)
    error = report.before.per_tensor_weights
    applied: list[tuple[_Pair, Tensor]] = []  # the scalings kept, in order
    for chain in _chains(pairs):
        layers = [modules[name] for pair in chain for name in (pair.first, pair.second)]
        saved = [t.detach().clone() for layer in layers for t in (layer.weight, layer.bias) if t is not None]
        scalings: list[tuple[_Pair, Tensor]] = []
        report.sweeps = max(report.sweeps, _equalize_chain(chain, modules, max_sweeps, scalings))
        candidate = _relative(_outputs(target, inputs, _quantized_weights(target, per_channel=False)), reference)
        if candidate <= error:
            error = candidate
            report.equalized += [(pair.first, pair.second) for pair in chain]
            applied += scalings
            continue
        for tensor, value in zip([t for layer in layers for t in (layer.weight, layer.bias) if t is not None], saved):
            tensor.data.copy_(value)
        names = " -> ".join([chain[0].first] + [pair.second for pair in chain])
        report.left.append((chain[0].first, f"equalizing the chain {names} would raise the per-tensor int8 output "
                                            f"error from {error:.3g} to {candidate:.3g}"))
    report.layers = {name: (*spreads_before[name], *_spread(modules[name])) for pair in report.equalized
                     for name in pair}
    shifts = _absorb_biases(target, inputs, pairs, modules, report) if absorb_bias else []
    report.after = quantization_error(target, inputs)
    expected = _outputs(original, inputs)
    report.float32_error = _scale_error(_outputs(target, inputs), expected)
    # The same scalings on a float64 copy: the function is unchanged up to float64 rounding.
    doubled = tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)
    original64 = copy.deepcopy(original).double()
    equalized64 = copy.deepcopy(original64)
    modules64 = dict(equalized64.named_modules())
    for pair, scale in applied:
        _apply(modules64[pair.first], modules64[pair.second], scale)
    for pair, shift in shifts:
        # the shift the float64 values allow: the float32 model's rounding put its minimum elsewhere
        low64, _ = _output_extremes(equalized64, modules64[pair.first], doubled)
        _absorb(modules64[pair.first], modules64[pair.second], torch.minimum(shift, low64.clamp_min(0)))
    exact = _outputs(original64, doubled)
    report.float64_error = _scale_error(_outputs(equalized64, doubled), exact)
    # A model that amplifies rounding (deep, with spread statistics) moves
    # further in float32 from any change of its weights' rounding: its own
    # float32 error against float64 sets the floor.
    report.float32_tolerance = max(1e-5, 4 * _scale_error(expected, exact))
    if not (report.float32_error <= report.float32_tolerance and report.float64_error <= 1e-10):
        raise EqualizationError(f"equalize: the equalized model differs from the original by {report.float32_error:.3g}"
                                f" (float32) and {report.float64_error:.3g} (float64)\n{report}")
    return target, report
