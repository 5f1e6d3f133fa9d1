"""Checking a folded model against the original on example inputs.

A fold changes values by a few roundings. Detection and segmentation models
turn values into decisions (sort, topk, NMS, argmax, thresholds), and a change
of 1e-7 reorders tied scores, so their final outputs cannot be compared
element by element. The rule here:

1. The original model runs once; the inputs and outputs of every decision op
   are recorded in order.
2. The folded model runs with the same decisions: at each decision op, its
   inputs are compared with the original's (they must agree within the
   tolerance: this is where the fold's error shows before post-processing),
   and the original's outcome is returned in place of its own, so ties break
   the same way in both runs.
3. The final outputs are then compared element by element.

A wrong fold therefore fails at the first decision it feeds, or in the final
outputs when it sits after the last decision (a RoI head, say).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# Default tolerances by output dtype: a few roundings of the folded weights.
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _decision_ops() -> dict:
    """Decision op -> how the folded run rebuilds its outputs from the
    original's: "outcome" returns the recorded outputs; "gather" keeps the
    folded run's values, picked by the recorded indices (sort, topk)."""
    ops = {op: "gather" for op in (_aten.sort.default, _aten.sort.stable, _aten.topk.default, _aten.max.dim,
                                   _aten.min.dim, _aten.kthvalue.default)}
    ops.update({op: "outcome" for op in (_aten.argmax.default, _aten.argmin.default)})
    for name in ("gt", "ge", "lt", "le"):
        packet = getattr(_aten, name)
        ops.update({packet.Scalar: "outcome", packet.Tensor: "outcome"})
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        ops[torch.ops.torchvision.nms.default] = "outcome"
    return ops


def _difference(want: Tensor, got: Tensor) -> tuple[float, float]:
    """(largest difference, largest magnitude) over want's finite values; inf
    where the two differ in which values are infinite or NaN and how (SSD's
    loss sorts a tensor holding -inf)."""
    finite = want.isfinite()
    if not torch.equal(finite, got.isfinite()) or not torch.equal(
            want.isnan(), got.isnan()) or not torch.equal(want.isposinf(), got.isposinf()):
        return float("inf"), 0.0
    if not finite.any():
        return 0.0, 0.0
    want, got = want.double()[finite], got.double()[finite]
    return (got - want).abs().max().item(), want.abs().max().item()


def _float_tensors(args) -> list[Tensor]:
    return [t for t in _pytree.tree_leaves(args) if isinstance(t, Tensor) and t.is_floating_point()]


@dataclasses.dataclass
class _Decision:
    op: Any
    inputs: list[Tensor]
    outputs: Any


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: dict):
        super().__init__()
        self.ops, self.decisions = ops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _float_tensors(args) if func in self.ops else []
        if inputs:
            self.decisions.append(_Decision(func, [t.clone() for t in inputs],
                                            _pytree.tree_map_only(Tensor, torch.clone, out)))
        return out


def _dim_argument(func, args, kwargs) -> int:
    arguments = func._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == "dim")
    if index < len(args):
        return args[index]
    return kwargs.get("dim", arguments[index].default_value)


class _DecisionMismatch(Exception):
    pass


class _Replayer(TorchDispatchMode):
    def __init__(self, ops: dict, decisions: list[_Decision], tolerance: tuple[float, float]):
        super().__init__()
        self.ops, self.decisions, self.tolerance = ops, decisions, tolerance
        self.position, self.max_rel_error = 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _float_tensors(args)
        if func not in self.ops or not inputs:
            return func(*args, **kwargs)
        where = f"decision {self.position + 1} ({func})"
        if self.position >= len(self.decisions):
            raise _DecisionMismatch(f"{where}: the original model made only {len(self.decisions)} decisions")
        recorded = self.decisions[self.position]
        self.position += 1
        if recorded.op is not func or [t.shape for t in recorded.inputs] != [t.shape for t in inputs]:
            raise _DecisionMismatch(f"{where}: the original made {recorded.op} on inputs of shapes "
                                    f"{[tuple(t.shape) for t in recorded.inputs]} here")
        atol, rtol = self.tolerance
        for want, got in zip(recorded.inputs, inputs):
            if not want.numel():
                continue
            error, scale = _difference(want, got)
            self.max_rel_error = max(self.max_rel_error, error / scale if scale > 0 else error)
            if not error <= atol + rtol * scale:  # NaN fails
                raise _DecisionMismatch(f"{where}: its input differs from the original's by {error:.3g} "
                                        f"(allowed {atol:.3g} + {rtol:.3g} x {scale:.3g})")
        if self.ops[func] == "outcome":
            return _pytree.tree_map_only(Tensor, torch.clone, recorded.outputs)
        _, indices = recorded.outputs
        source, dim = args[0], _dim_argument(func, args, kwargs)
        keepdim = indices.dim() == source.dim()
        picked = source.gather(dim, indices if keepdim else indices.unsqueeze(dim))
        return picked if keepdim else picked.squeeze(dim), indices.clone()


@dataclasses.dataclass
class Verification:
    """What the check compared and found."""

    max_abs_error: float = float("nan")
    max_rel_error: float = float("nan")
    atol: float = float("nan")
    rtol: float = float("nan")
    passed: bool = False
    decisions: int = 0  # decision ops replayed from the original run
    decision_rel_error: float = 0.0  # largest error of their inputs, relative to each input's scale
    failure: str | None = None


def _leaves(out) -> list[Tensor]:
    return [t for t in _pytree.tree_leaves(out) if isinstance(t, Tensor)]


def tolerance_for(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    default_atol, default_rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


def compare_outputs(expected: list[Tensor], actual: list[Tensor], atol, rtol) -> Verification:
    """Element-wise comparison of output lists (for runtimes with no
    decision replay, such as ONNX Runtime)."""
    check = Verification()
    check.atol, check.rtol = tolerance_for(expected[0].dtype if expected else torch.float32, atol, rtol)
    max_abs, scale = 0.0, 0.0
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            check.failure = f"an output has shape {tuple(a.shape)} where the original's has {tuple(e.shape)}"
            max_abs = float("inf")
        elif e.is_floating_point() and e.numel():
            error, e_scale = _difference(e, a)
            max_abs, scale = max(max_abs, error), max(scale, e_scale)
        elif e.numel() and not torch.equal(e, a):
            check.failure = "an integer output differs"
            max_abs = float("inf")
    check.max_abs_error = max_abs
    check.max_rel_error = max_abs / scale if scale > 0 else max_abs
    check.passed = (len(expected) == len(actual) and check.failure is None
                    and max_abs <= check.atol + check.rtol * scale)
    if len(expected) != len(actual):
        check.failure = f"{len(actual)} outputs where the original has {len(expected)}"
    return check


class ReferenceRun:
    """The original model's outputs and decisions on the example inputs."""

    def __init__(self, model: nn.Module, example_inputs: tuple):
        self.ops = _decision_ops()
        recorder = _Recorder(self.ops)
        with torch.no_grad(), recorder:
            self.outputs = _leaves(model(*example_inputs))
        self.decisions = recorder.decisions
        self.example_inputs = example_inputs

    def verify(self, model: nn.Module, atol: float | None, rtol: float | None) -> Verification:
        """Runs `model` with the original's decisions and compares."""
        dtype = self.outputs[0].dtype if self.outputs else torch.float32
        replayer = _Replayer(self.ops, self.decisions, tolerance_for(dtype, atol, rtol))
        try:
            with torch.no_grad(), replayer:
                actual = _leaves(model(*self.example_inputs))
        except _DecisionMismatch as mismatch:
            check = Verification(max_abs_error=float("inf"), max_rel_error=float("inf"), failure=str(mismatch))
            check.atol, check.rtol = replayer.tolerance
        else:
            check = compare_outputs(self.outputs, actual, atol, rtol)
            if replayer.position != len(self.decisions):
                check.passed = False
                check.failure = f"the folded model made {replayer.position} decisions, the original {len(self.decisions)}"
        check.decisions = replayer.position
        check.decision_rel_error = replayer.max_rel_error
        return check
