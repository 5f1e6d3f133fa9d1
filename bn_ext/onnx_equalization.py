"""Cross-layer equalization of an ONNX graph (bn_ext.equalization's rule on
Conv, ConvTranspose and Gemm nodes with constant weights), after fold_onnx.

Pairs are joined through Relu, LeakyRelu, pooling, Identity or Dropout
nodes, each output read once. Weights are rescaled in float64 and written as
new initializers (a shared one stays as it was). onnxruntime judges, by
equalize's rule: a chain (or, failing that, each of its pairs) is kept only
where the output error under per-tensor int8 weights does not grow, and the
result must match the original within 1e-5 of the output scale.
Activation quantization (W8A8) is not measured here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import torch

from bn_ext.equalization import (
    EqualizationError,
    EqualizationReport,
    QuantizationError,
    _equalize_pairs,
    _input_ranges,
    _output_ranges,
    _output_rows,
    _Pair,
    _relative,
    _restore_layout,
    _scale_error,
    _spread,
    _Weights,
)
from bn_ext.onnx_graph import _attribute, _Graph, _label, _layer_constants, _random_inputs, _run

_HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity",
                    "Dropout")


def _weights(g: _Graph, node: onnx.NodeProto) -> _Weights | None:
    """A Conv, ConvTranspose or Gemm node's constants as float64 tensors in
    torch's layouts (a Gemm's weight as (out, in)); None if not constants."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
        return None
    constants = _layer_constants(g, node)
    if isinstance(constants, str) or constants[1].dtype != np.float32:
        return None
    weight_name, weight, bias_name, bias = constants
    w = torch.from_numpy(weight.astype(np.float64))
    b = None if bias is None else torch.from_numpy(bias.astype(np.float64))
    if node.op_type == "Gemm":
        if _attribute(node, "transA", 0) or w.dim() != 2 or (b is not None and b.dim() != 1):
            return None
        if not _attribute(node, "transB", 0):
            w = w.t().contiguous()
        if b is not None:
            b = b * float(_attribute(node, "beta", 1.0))
        kind, groups, padded = "linear", 1, False
    else:
        kind = "conv" if node.op_type == "Conv" else "conv_transpose"
        groups = int(_attribute(node, "group", 1))
        pads = _attribute(node, "pads", [])
        padded = any(p != 0 for p in pads) or _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
    return _Weights(_label(node), weight_name, kind, groups, w, b, padded)


def _write(g: _Graph, node: onnx.NodeProto, layer: _Weights) -> None:
    weight = layer.weight
    if node.op_type == "Gemm":
        if not _attribute(node, "transB", 0):
            weight = weight.t()
        if layer.bias is not None:
            for attribute in node.attribute:
                if attribute.name == "beta":
                    attribute.f = 1.0  # beta is in the bias now
    g.set_constant(node, 1, weight.numpy(), node.input[1])
    if layer.bias is not None:
        g.set_constant(node, 2, layer.bias.numpy(), node.input[2])


def _find_pairs(g: _Graph, layers: dict[str, tuple[onnx.NodeProto, _Weights]]) -> tuple[list[_Pair], list]:
    """The layer pairs joined through homogeneous nodes only, and the layers
    whose chain stops, with what stops it."""
    pairs, stopped = [], []
    for name, (node, first) in layers.items():
        tensor, reason = node.output[0], None
        while reason is None:
            if tensor in g.outputs:
                reason = "its output is the model's"
                break
            readers = [n for n in g.graph.node if tensor in n.input]
            if len(readers) != 1:
                reason = f"its output has {len(readers)} readers (a residual add or a branch)"
                break
            reader = readers[0]
            if _label(reader) in layers and reader.input[0] == tensor:
                second = layers[_label(reader)][1]
                if (second.kind == "linear") != (first.kind == "linear"):
                    reason = f"the next layer {second.name} reads channels on another axis"
                elif _input_ranges(second).numel() != _output_ranges(first).numel():
                    reason = f"the next layer {second.name} reads another number of channels"
                else:
                    pairs.append(_Pair(first, second))
                break
            if reader.op_type not in _HOMOGENEOUS_OPS or reader.input[0] != tensor:
                reason = f"{reader.op_type} stands before the next layer (not positively homogeneous)"
                break
            tensor = reader.output[0]
        if reason is not None:
            stopped.append((name, reason))
    return pairs, stopped


def _current(g: _Graph, layers) -> onnx.ModelProto:
    """The graph with each layer's (scaled) weights written in."""
    model = copy.deepcopy(g.model)
    scratch = _Graph(model)
    nodes = {_label(n): n for n in model.graph.node}
    for name, (_, layer) in layers.items():
        _write(scratch, nodes[name], layer)
    return model


def _quantized(layer: _Weights, per_channel: bool) -> np.ndarray:
    w = layer.weight
    if per_channel:
        rows = _output_rows(layer)
        scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(1e-300)
        q = _restore_layout(layer, (rows / scale).round().clamp(-127, 127) * scale)
    else:
        scale = max(w.abs().max().item() / 127, 1e-300)
        q = (w / scale).round().clamp(-127, 127) * scale
    return q


def _error(model: onnx.ModelProto, layers, feeds, reference, per_channel: bool) -> float:
    """Output error with every layer's weight int8 fake-quantized."""
    quantized = copy.deepcopy(model)
    scratch = _Graph(quantized)
    nodes = {_label(n): n for n in quantized.graph.node}
    for name, (_, layer) in layers.items():
        _write(scratch, nodes[name], _Weights(layer.name, layer.key, layer.kind, layer.groups,
                                              _quantized(layer, per_channel), layer.bias, layer.zero_padded))
    scratch.drop_unused_constants()
    return _relative(_flat(_run(quantized, feeds)), reference)


def _flat(outputs) -> torch.Tensor:
    return torch.cat([o.double().reshape(-1) for o in outputs])


def equalize_onnx(model: onnx.ModelProto, example_inputs: dict[str, np.ndarray] | None = None, *,
                  max_sweeps: int = 8, seed: int = 0) -> tuple[onnx.ModelProto, EqualizationReport]:
    """Cross-layer equalization of an ONNX model (fold it first: fold_onnx);
    returns (equalized ModelProto, EqualizationReport). The report's W8A8
    error is NaN: activations are not fake-quantized here."""
    feeds = example_inputs if example_inputs is not None else _random_inputs(model, seed)
    g = _Graph(copy.deepcopy(model))
    layers = {}
    for node in g.graph.node:
        layer = _weights(g, node)
        if layer is not None:
            layers[_label(node)] = (node, layer)
    uses = {}
    for _, layer in layers.values():
        uses[layer.key] = uses.get(layer.key, 0) + 1
    report = EqualizationReport()
    pairs, report.left = _find_pairs(g, {name: value for name, value in layers.items() if uses[value[1].key] == 1})
    report.left += [(name, "its weight is shared") for name, (_, layer) in layers.items() if uses[layer.key] > 1]
    reference = _flat(_run(model, feeds))
    before = _error(g.model, layers, feeds, reference, False)
    report.before = QuantizationError(before, _error(g.model, layers, feeds, reference, True), math.nan)
    spreads = {layer.name: _spread(layer) for pair in pairs for layer in (pair.first, pair.second)}
    _, error = _equalize_pairs(pairs, max_sweeps, lambda: _error(g.model, layers, feeds, reference, False), before,
                               report)
    report.layers = {name: (*spreads[name], *_spread(layers[name][1])) for pair in report.equalized for name in pair}
    equalized = _current(g, {name: value for name, value in layers.items()
                             if any(name in pair for pair in report.equalized)})
    written = _Graph(equalized)
    written.drop_unused_constants()
    onnx.checker.check_model(equalized)
    final = {_label(n): (n, layer) for n in equalized.graph.node if (layer := _weights(written, n)) is not None}
    report.after = QuantizationError(error, _error(equalized, final, feeds, reference, True), math.nan)
    report.float32_error = _scale_error(_flat(_run(equalized, feeds)), reference)
    report.float64_error = math.nan  # onnxruntime runs the float32 graph only
    if not report.float32_error <= report.float32_tolerance:
        raise EqualizationError(f"equalize_onnx: the equalized model differs from the original by "
                                f"{report.float32_error:.3g}\n{report}")
    return equalized, report
