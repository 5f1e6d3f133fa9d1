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
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree

import bn_ext.functional  # noqa: F401  (registers the operators)
from bn_ext.fold_arithmetic import (
    _CONV_TRANSPOSES,
    _CONVS,
    FrozenBatchNorm,
    _detach,
    _has_zero_padding,
    _is_foldable_norm,
    fuse_bn_conv,
    fuse_bn_linear,
    fuse_conv_bn,
    fuse_layer_norm_linear,
    fuse_linear_bn,
)
from bn_ext.fold_graph import (
    _ACTIVATION_OPS,
    _activation_tail,
    _as_layer,
    _as_norm,
    _batch_norm_calls,
    _depends_on_constants_only,
    _describe,
    _fetch,
    _FoldTracer,
    _Layer,
    _Norm,
    _norm_output,
    _OWN_FORWARD,
    _reads_metadata_only,
    _set_arg,
    _shapes,
    _statistics_owner,
    _unknown_forward,
    _value_users,
    NormThenActivation,
    training_batch_norms,
)
from bn_ext.equalization import equalize as _equalize_layers
from bn_ext.fold_verification import ReferenceRun, Verification
from bn_ext.quantization_diagnostics import WeightQuantization, _pt2e_error, weight_quantization
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
    "training_batch_norms",
]

_ops = torch.ops.bn_ext
_aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Whole-model folding


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


def _freeze(root: nn.Module, folder: _GraphFolder | _RuntimeFolder) -> None:
    """Replace unfolded BatchNorm modules that have running statistics by their exact affine map."""
    for norm in folder.unfolded_norms:
        if norm.module is not None and norm.running_mean is not None and not _unknown_forward(norm.module):
            frozen = FrozenBatchNorm(norm.module)
            if norm.tail is not None:
                frozen = NormThenActivation(frozen, norm.tail.act)
            _replace_submodule(root, norm.name, frozen)
            folder.frozen.append(norm.name)


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

        result, report.equalization = _equalize_layers(result, example_inputs, inplace=True)
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

        # program.module() holds the program's own tensors (an exported
        # program shares its model's): equalization scales copies.
        for module in gm.modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                copied = tensor.detach().clone()
                setattr(module, name, nn.Parameter(copied, tensor.requires_grad) if isinstance(
                    tensor, nn.Parameter) else copied)
        gm, report.equalization = _equalize_layers(gm, example_inputs, inplace=True)
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
