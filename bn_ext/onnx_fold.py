"""Eval BatchNormalization folding in ONNX files.

A BatchNormalization whose statistics and affine parameters are constants
folds into the Conv, ConvTranspose (any group count), Gemm (any transA,
transB, alpha, beta) or 2-D MatMul with a constant weight that produces its
input, when nothing else reads that output; otherwise, where that is exact,
into the Conv without zero padding, Gemm (transA=0) or MatMul that alone
reads its output, also through Flatten, Reshape and Transpose nodes whose
shapes prove where the channels go. The folded weights are computed
in float64 and rounded once to the layer's type. A weight or bias that other
nodes share is copied, never changed in place; a producer whose output has
other readers is left alone with the reason. The result is checked with
onnx.checker and run with onnxruntime on random inputs against the original,
and described by the same FoldReport as fold_model.
"""

from __future__ import annotations

import copy
import os
from collections import Counter

import numpy as np
import onnx

from bn_ext.fold import FoldReport, FoldVerificationError, _verify
from bn_ext.fold_verification import compare_outputs
from bn_ext.onnx_equalization import equalize_onnx
from bn_ext.onnx_graph import (
    _LAYERS,
    _attribute,
    _Graph,
    _label,
    _layer_constants,
    _random_inputs,
    _run,
    _set_attribute,
)

__all__ = ["fold_onnx"]



def _batch_norm_affine(g: _Graph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) of an eval BatchNormalization, or why it has none."""
    if len([o for o in bn.output if o]) > 1 or _attribute(bn, "training_mode", 0):
        return "in training mode (outputs batch statistics)"
    values = [g.constant(name) for name in bn.input[1:5]]
    if any(v is None for v in values):
        return "scale, bias, mean or variance is computed in the graph, not a constant"
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    scale = gamma / np.sqrt(var + float(_attribute(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def _fold_into(g: _Graph, layer: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> str | None:
    """Scale the layer's output channels and add the shift to its bias; why not, if it cannot."""
    constants = _layer_constants(g, layer)
    if isinstance(constants, str):
        return constants
    weight_name, weight, bias_name, bias = constants
    w = weight.astype(np.float64)
    channels = scale.shape[0]
    if layer.op_type == "Conv":
        if w.shape[0] != channels:
            return f"Conv {_label(layer)} has {w.shape[0]} output channels, the BatchNorm {channels}"
        fused = w * scale.reshape(-1, *[1] * (w.ndim - 1))
        b = (bias.astype(np.float64) if bias is not None else 0.0) * scale + shift
    elif layer.op_type == "ConvTranspose":
        groups = int(_attribute(layer, "group", 1))
        per_group = w.shape[1]  # weight (C_in, C_out / group, k...)
        if per_group * groups != channels:
            return f"ConvTranspose {_label(layer)} has {per_group * groups} output channels, the BatchNorm {channels}"
        grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        fused = (grouped * scale.reshape(groups, 1, per_group, *[1] * (w.ndim - 2))).reshape(w.shape)
        b = (bias.astype(np.float64) if bias is not None else 0.0) * scale + shift
    else:  # Gemm, or a 2-D MatMul made one: Y = alpha * A' B' + beta * C, features along B's output axis
        if layer.op_type == "MatMul" and (g.ranks.get(layer.input[0]) != 2 or w.ndim != 2):
            return (f"MatMul {_label(layer)} is not 2-D: BatchNormalization normalises dim 1, not the features "
                    "the weight maps to")
        trans_b = layer.op_type == "Gemm" and bool(_attribute(layer, "transB", 0))
        features = w.shape[0] if trans_b else w.shape[1]
        if features != channels:
            return f"{layer.op_type} {_label(layer)} has {features} output features, the BatchNorm {channels}"
        fused = w * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
        beta = float(_attribute(layer, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0
        c = beta * bias.astype(np.float64) if bias is not None else 0.0
        b = np.asarray(c * scale + shift)  # beta C scaled per feature, then shifted; beta becomes 1
        if layer.op_type == "MatMul":
            layer.op_type = "Gemm"
        _set_attribute(layer, "beta", 1.0)
    g.set_constant(layer, 1, fused, weight_name)
    g.set_constant(layer, 2, np.asarray(b), bias_name or weight_name)
    return None


def _fold_ahead_of(g: _Graph, layer: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray,
                   channels_last: bool = False) -> str | None:
    """Fold a BatchNorm on the layer's input into it: the input channels'
    weights scaled, the shift summed through the weights into the bias; why
    not, if it cannot be done exactly. channels_last: the channels reach the
    layer on the input's last axis (through Transposes), as MatMul reads it."""
    name = f"{layer.op_type} {_label(layer)}"
    if layer.op_type == "ConvTranspose":
        return f"precedes {name}: border outputs see fewer taps, so the shift does not fold"
    constants = _layer_constants(g, layer)
    if isinstance(constants, str):
        return constants
    weight_name, weight, bias_name, bias = constants
    w = weight.astype(np.float64)
    channels = scale.shape[0]
    if layer.op_type == "Conv":
        pads = _attribute(layer, "pads", [])
        if any(pads) or _attribute(layer, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            return f"precedes zero-padded {name}: folding would change the border outputs"
        groups = int(_attribute(layer, "group", 1))
        if w.shape[1] * groups != channels:
            return f"{name} has {w.shape[1] * groups} input channels, the BatchNorm {channels}"
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        per_input = (groups, 1, w.shape[1], *[1] * (w.ndim - 2))
        fused = (grouped * scale.reshape(per_input)).reshape(w.shape)
        through = (grouped * shift.reshape(per_input)).sum(axis=tuple(range(2, grouped.ndim))).reshape(-1)
        b = (bias.astype(np.float64) if bias is not None else 0.0) + through
    else:  # Gemm or 2-D MatMul: A's columns are the normalised features
        if layer.op_type == "Gemm" and _attribute(layer, "transA", 0):
            return f"feeds {name} with transA=1: BatchNormalization's channels are then its rows"
        rank = g.ranks.get(layer.input[0])
        if layer.op_type == "MatMul" and (w.ndim != 2 or (rank != 2 and not channels_last)):
            return f"feeds {name}, which is not 2-D: the BatchNorm's channels are not the features the weight reads"
        if layer.op_type == "Gemm" and channels_last and rank != 2:
            return f"reaches {name} through Transposes that leave it no 2-D input"
        trans_b = layer.op_type == "Gemm" and bool(_attribute(layer, "transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        if k != channels:
            return f"{name} reads {k} input features, the BatchNorm has {channels}"
        fused = w * (scale.reshape(1, -1) if trans_b else scale.reshape(-1, 1))
        alpha = float(_attribute(layer, "alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
        beta = float(_attribute(layer, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0
        through = alpha * (shift @ (w.T if trans_b else w))
        b = (beta * bias.astype(np.float64) if bias is not None else 0.0) + through
        if layer.op_type == "MatMul" and rank != 2:
            # An N-D MatMul has no bias input: the shift becomes an Add after it.
            g.set_constant(layer, 1, fused, weight_name)
            g.add_bias_after(layer, b.astype(weight.dtype))
            return None
        if layer.op_type == "MatMul":
            layer.op_type = "Gemm"
        _set_attribute(layer, "beta", 1.0)
    g.set_constant(layer, 1, fused, weight_name)
    g.set_constant(layer, 2, np.asarray(b), bias_name or weight_name)
    return None


def _fold_graph(g: _Graph) -> tuple[list, list]:
    """Each BatchNorm into the layer before it, else (where exact) the one after it."""
    folded, left = [], []
    for bn in [n for n in g.graph.node if n.op_type == "BatchNormalization"]:
        affine = _batch_norm_affine(g, bn)
        if isinstance(affine, str):
            left.append((_label(bn), affine))
            continue
        reasons = []
        layer = g.producer.get(bn.input[0])
        if layer is not None and layer.op_type in _LAYERS:
            if g.readers[bn.input[0]] > 1 or bn.input[0] in g.outputs:
                others = g.readers[bn.input[0]] - 1 + (bn.input[0] in g.outputs)
                reasons.append(f"output of {layer.op_type} {_label(layer)} is also read by {others} other(s)")
            elif (why := _fold_into(g, layer, *affine)) is not None:
                reasons.append(why)
            else:
                # The layer now writes the BatchNorm's output itself.
                layer.output[0] = bn.output[0]
                g.producer[bn.output[0]] = layer
                g.graph.node.remove(bn)
                folded.append((_label(bn), _label(layer), "after"))
                continue
        readers = g.single_reader_path(bn.output[0])
        after = readers[-1] if readers else None
        if after is not None and after.op_type in _LAYERS:
            between = readers[-2].output[0] if len(readers) > 1 else bn.output[0]
            moved_last = g.channels_moved_last(bn.input[0], readers[:-1])
            repeat = 1 if moved_last else g.flattened_channels(bn.input[0], readers[:-1])
            if after.input[0] != between:
                reasons.append(f"feeds {after.op_type} {_label(after)} other than as its input")
            elif repeat is None:
                reasons.append(f"reaches {after.op_type} {_label(after)} through "
                               f"{', '.join(n.op_type for n in readers[:-1])} that do not provably keep channels")
            elif repeat > 1 and after.op_type not in ("Gemm", "MatMul"):
                reasons.append(f"reaches {after.op_type} {_label(after)} through a flattening")
            elif (why := _fold_ahead_of(g, after, *(np.repeat(a, repeat) for a in affine), moved_last)) is not None:
                reasons.append(why)
            else:
                # The first node after the BatchNorm reads its input instead
                # (one reader for another: the input's reader count stays).
                readers[0].input[list(readers[0].input).index(bn.output[0])] = bn.input[0]
                g.graph.node.remove(bn)
                folded.append((_label(bn), _label(after), "before"))
                continue
        readers = [n for n in g.graph.node if bn.output[0] in n.input]
        if not reasons:
            source = g.producer.get(bn.input[0])
            source = f"{source.op_type} {_label(source)}" if source is not None else "a graph input"
            targets = ", ".join(f"{n.op_type} {_label(n)}" for n in readers) or "the graph output"
            reasons.append(f"input from {source}, output to {targets}: no adjacent Conv/Gemm/MatMul to fold into")
        left.append((_label(bn), "; ".join(reasons)))
    g.drop_unused_constants()
    return folded, left


def training_batch_norms(model: onnx.ModelProto) -> list[str]:
    """The BatchNormalization nodes in training mode (batch statistics)."""
    return [_label(n) for n in model.graph.node
            if n.op_type == "BatchNormalization" and _attribute(n, "training_mode", 0)]


# The ONNX norm operators, for the report's census (BatchNormalization folds).
_NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
             "RMSNormalization", "MeanVarianceNormalization", "LpNormalization", "LRN")


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    example_inputs: dict[str, np.ndarray] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = True,
    seed: int = 0,
    equalize: bool = False,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold the eval BatchNormalization nodes of an ONNX model (a ModelProto,
    never changed, or a file path) into the layers before them.

    Returns (folded ModelProto, FoldReport). The folded model passes
    onnx.checker and is run with onnxruntime against the original on
    example_inputs (default: random inputs of the graph's shapes, dynamic
    dimensions 1); when they differ beyond atol/rtol, FoldVerificationError is
    raised unless strict=False. equalize=True then applies cross-layer
    equalization (bn_ext.onnx_equalization.equalize_onnx; its report is
    `report.equalization`).
    """
    original = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    folded_model = copy.deepcopy(original)
    g = _Graph(folded_model)
    before = sum(n.op_type == "BatchNormalization" for n in g.graph.node)
    census = dict(Counter(n.op_type for n in g.graph.node if n.op_type in _NORM_OPS))
    folded, left = _fold_graph(g)
    onnx.checker.check_model(folded_model)
    report = FoldReport(method="the ONNX graph", batch_norms_before=before, batch_norms_after=before - len(folded),
                        folded=folded, left=left, norms=census)
    feeds = example_inputs if example_inputs is not None else _random_inputs(original, seed)
    _verify(report, compare_outputs(_run(original, feeds), _run(folded_model, feeds), atol, rtol))
    if strict and not report.passed:
        raise FoldVerificationError("fold_onnx", report)
    if equalize and report.passed:
        folded_model, report.equalization = equalize_onnx(folded_model, feeds)
    return folded_model, report
