"""Converting a model's norm layers to bn_ext's twins (and back), in place,
with a census of what was swapped and what was left, and why."""

from __future__ import annotations

import dataclasses

import torch

from bn_ext.activation_fusion import fuse_activations as _fuse_activations
from bn_ext.activation_fusion import unfuse_activations
from bn_ext.modules import _kernel_activation, _LayerNormAct2dForward, _twins
from bn_ext.norm_classes import class_name, norm_modules

__all__ = ["ConvertReport", "convert", "revert"]


@dataclasses.dataclass
class ConvertReport:
    """What `convert` did to each norm module: swapped (with what still runs
    outside bn_ext's kernel) or left, and why."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, class, note)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, class, reason)

    def __str__(self) -> str:
        lines = [f"bn_ext.nn.convert: {len(self.swapped)} norm modules swapped, {len(self.left)} left"]
        for title, rows in (("swapped", self.swapped), ("left", self.left)):
            if rows:
                lines.append(f"  {title}:")
                lines += [f"    {name or '(the model)':<40} {cls}{': ' + why if why else ''}" for name, cls, why in rows]
        return "\n".join(lines)


def _unfused_note(module: torch.nn.Module, forward: type) -> str:
    """What of a swapped module still runs outside bn_ext's kernel."""
    if not hasattr(module, "act"):
        return ""
    activation = _kernel_activation(module, ("none",)) if forward is _LayerNormAct2dForward else _kernel_activation(
        module)
    if activation is not None:
        return "activation fused" if activation != "none" else ""
    outside = [type(m).__name__ for m in (module.drop, module.act) if not isinstance(m, torch.nn.Identity)]
    return f"{' and '.join(outside)} run after the kernel, unfused"


def _why_left(module: torch.nn.Module, twins: dict[type, type]) -> str:
    if type(module) is torch.nn.SyncBatchNorm:
        return "bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm converts it"
    known = next((base for base in twins if isinstance(module, base)), None)
    if known is not None:
        return (f"a subclass of {known.__module__}.{known.__qualname__}: only exact classes are swapped (a subclass "
                "may change what it computes)")
    return f"no bn_ext twin for {class_name(module)}"


def _swap_classes(model: torch.nn.Module, mapping: dict[type, type]) -> torch.nn.Module:
    for module in model.modules():
        twin = mapping.get(type(module))
        if twin is not None:
            # The twin adds no state, so the instance keeps its parameters,
            # buffers, hooks and train/eval mode.
            module.__class__ = twin
    return model


def _convert_report(model: torch.nn.Module, twins: dict[type, type]) -> ConvertReport:
    """The census of `model`'s norm modules before the swap."""
    report = ConvertReport()
    for name, module in norm_modules(model):
        if type(module).__module__.startswith("bn_ext"):
            continue  # already bn_ext's
        twin = twins.get(type(module))
        if twin is None:
            report.left.append((name, type(module).__name__, _why_left(module, twins)))
        else:
            forward = twin.__mro__[1]
            report.swapped.append((name, type(module).__name__, _unfused_note(module, forward)))
    return report


def convert(model: torch.nn.Module, *, fuse_activations: bool = False, report: bool = False):
    """Switch every torch.nn norm layer of `model` to its bn_ext twin, in place,
    and the model zoos' norm classes: torchvision's FrozenBatchNorm2d and
    LayerNorm2d; timm's BatchNormAct2d, GroupNormAct, GroupNorm1Act,
    GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, LayerNormAct2d,
    FrozenBatchNorm2d and FrozenBatchNormAct2d (their activation fused where
    it is ReLU or SiLU and no drop layer stands before it; others run after
    the kernel).

    Returns `model`, or (model, ConvertReport) with report=True: every norm
    module swapped (and what of it still runs unfused) or left, and why.
    Parameters, buffers (the same tensor objects, so an optimizer built
    before keeps working), hooks and train/eval mode are kept.

    fuse_activations: also rewrite each BatchNorm -> ReLU and BatchNorm ->
    add -> ReLU found by data flow (torchvision's ResNet blocks) into one
    fused BatchNormAct call, equal bitwise in outputs and gradients. The
    result is then a new model (a torch.fx.GraphModule, or a shallow copy
    holding them where the forward does not trace) whose fused layers share
    `model`'s parameter and buffer tensors; `model` stays converted and unfused.
    """
    twins = _twins()
    census = _convert_report(model, twins) if report else None
    _swap_classes(model, twins)
    if fuse_activations:
        model = _fuse_activations(model)
    return (model, census) if report else model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert`: switch bn_ext norm layers back to torch.nn, in place.
    The fused calls of a `fuse_activations` result are unfused first
    (BatchNorm, add, torch.relu), so it computes what the unfused model does;
    the layers it did not fuse are shared with the model it came from, which
    they switch back in too."""
    return _swap_classes(unfuse_activations(model), {twin: base for base, twin in _twins().items()})
