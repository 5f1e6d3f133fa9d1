"""An ONNX graph as the ONNX folder and equalizer read it: its nodes,
initializers and consumers, node attributes, a layer's weight and bias
constants, and running a model on random inputs with onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper


_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# Nodes a BatchNorm's channels may pass through on the way to the layer it folds into.
_CHANNEL_MOVERS = ("Flatten", "Reshape", "Transpose")


# Nodes whose output is a constant when their input is (_Graph.constant).
_CONSTANT_PASSERS = ("Identity", "Cast")


class _Graph:
    """The model's graph with its constants, producers and readers at hand."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.readers = Counter(i for n in self.graph.node for i in n.input if i)
        self.outputs = {o.name for o in self.graph.output}
        self.names = {t for n in self.graph.node for t in (*n.input, *n.output)} | set(self.initializers)
        inferred = onnx.shape_inference.infer_shapes(model)
        # Each tensor's shape where inference knows it: a size per dim, None where unknown.
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim]
                       for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
                       if v.type.tensor_type.HasField("shape")}
        self.ranks = {name: len(shape) for name, shape in self.shapes.items()}

    def single_reader_path(self, name: str) -> list[onnx.NodeProto]:
        """The nodes from tensor `name` on while each output has one reader and
        is no graph output: through Flatten, Reshape and Transpose to the first
        other node."""
        path = []
        while name not in self.outputs:
            readers = [n for n in self.graph.node if name in n.input]
            if len(readers) != 1:
                break
            path.append(readers[0])
            if readers[0].op_type not in _CHANNEL_MOVERS:
                break
            name = readers[0].output[0]
        return path if path and path[-1].op_type not in _CHANNEL_MOVERS else []

    def channels_moved_last(self, name: str, path: list[onnx.NodeProto]) -> bool:
        """Whether Transposes alone take dim 1 of tensor `name` to the last axis."""
        rank = self.ranks.get(name)
        if not path or rank is None or any(n.op_type != "Transpose" for n in path):
            return False
        axis = 1
        for node in path:
            perm = list(_attribute(node, "perm", list(reversed(range(rank)))))
            axis = perm.index(axis)
        return axis == rank - 1

    def add_bias_after(self, layer: onnx.NodeProto, bias: np.ndarray) -> None:
        """An Add of a new bias constant after layer, writing layer's output."""
        output = layer.output[0]
        layer.output[0] = self.unique(f"{output}_before_bias")
        bias_name = self.unique(f"{layer.name or layer.op_type}_bn_folded_bias")
        self.graph.initializer.append(numpy_helper.from_array(bias, bias_name))
        add = helper.make_node("Add", [layer.output[0], bias_name], [output], name=self.unique(f"{layer.name}_bias"))
        position = list(self.graph.node).index(layer) + 1
        self.graph.node.insert(position, add)
        self.producer[output] = add

    def flattened_channels(self, name: str, path: list[onnx.NodeProto]) -> int | None:
        """How many features each channel (dim 1) of tensor `name` becomes
        after the Flatten/Reshape nodes of `path` (1 for none), where the
        shapes prove it: neither reorders elements, so (N, C, *S) ending as
        (N, C * prod(S)) puts channel c at features [c * S, (c + 1) * S)."""
        if not path:
            return 1
        if any(n.op_type == "Transpose" for n in path):
            return None
        shape = self.shapes.get(name)
        end = self.shapes.get(path[-1].output[0])
        if shape is None or end is None or len(shape) < 2 or None in shape or None in end:
            return None
        spatial = int(np.prod(shape[2:]))
        return spatial if end == [shape[0], shape[1] * spatial] else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of tensor `name` where it is a constant: an initializer, a
        Constant node, or an Identity or Cast of a constant (the TorchScript
        exporter shares equal initializers through Identity nodes)."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
            return None
        node = self.producer.get(name)
        if node is None or node.op_type not in _CONSTANT_PASSERS or not node.input:
            return None
        value = self.constant(node.input[0])
        if value is not None and node.op_type == "Cast":
            value = value.astype(helper.tensor_dtype_to_np_dtype(_attribute(node, "to", TensorProto.FLOAT)))
        return value

    def set_constant(self, node: onnx.NodeProto, index: int, value: np.ndarray, like: str | None) -> None:
        """Point input `index` of node at a new initializer holding value (in the
        type of constant `like`, float32 if none); shared constants stay as they were."""
        dtype = self.constant(like).dtype if like else np.float32
        name = self.unique(f"{node.name or node.op_type}_bn_folded_{index}")
        self.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def drop_unused_constants(self) -> None:
        # Nodes that only held constants the folds replaced, until none is left
        # (dropping an Identity may leave the Constant it read unread).
        while True:
            used = {i for n in self.graph.node for i in n.input} | self.outputs
            dead = [n for n in self.graph.node
                    if n.op_type in ("Constant", *_CONSTANT_PASSERS) and n.output[0] not in used]
            if not dead:
                break
            for node in dead:
                self.graph.node.remove(node)
        used = {i for n in self.graph.node for i in n.input} | self.outputs
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _attribute(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def _layer_constants(g: _Graph, layer: onnx.NodeProto):
    """(weight name, weight, bias name or None, bias or None) of a layer, or why they are not constants."""
    weight_name = layer.input[1]
    weight = g.constant(weight_name)
    if weight is None:
        return f"the weight of {layer.op_type} {_label(layer)} is computed in the graph, not a constant"
    bias_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    bias = g.constant(bias_name) if bias_name else None
    if bias_name and bias is None:
        return f"the bias of {layer.op_type} {_label(layer)} is computed in the graph, not a constant"
    return weight_name, weight, bias_name, bias


def _random_inputs(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Compare the graphs as written, not after onnxruntime's own fusions.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]
