"""The normalization classes of torch.nn and of the model zoos (torchvision,
timm) that folding and conversion know, and a census of a model's norm
modules that also finds the classes they do not know."""

from __future__ import annotations

import functools

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# torch.nn's norm classes (BatchNorm, InstanceNorm and SyncBatchNorm derive from _NormBase).
_TORCH_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)


@functools.cache
def frozen_batch_norm_classes() -> tuple[type, ...]:
    """The zoos' frozen BatchNorms: eval BatchNorm whatever the mode, on
    weight, bias, running_mean and running_var buffers with an eps:
    torchvision's (every detector backbone built for pretrained weights) and
    timm's, with and without an activation after it (drop, then act). timm
    re-exports torchvision's FrozenBatchNorm2d where torchvision is installed."""
    classes = []
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        classes.append(FrozenBatchNorm2d)
    except ImportError:
        pass
    try:
        from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

        classes += [FrozenBatchNorm2d, FrozenBatchNormAct2d]
    except ImportError:
        pass
    return tuple(dict.fromkeys(classes))


def holds_running_statistics(module: nn.Module) -> bool:
    """Whether a module holds running_mean and running_var tensors of its own."""
    buffers = dict(module.named_buffers(recurse=False))
    return buffers.get("running_mean") is not None and buffers.get("running_var") is not None


def _named_as_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def is_norm_module(module: nn.Module) -> bool:
    """A normalization layer: a torch.nn or known zoo norm class, any module
    with running statistics, or a module whose class is named as a norm
    (timm's RmsNorm, EvoNorm2dB0, ...) and is no container: what it holds has
    no parameters (an activation, a drop layer). NormMlpClassifierHead and
    Conv2dNormActivation hold layers and are not norms."""
    if isinstance(module, _TORCH_NORMS + frozen_batch_norm_classes()) or holds_running_statistics(module):
        return True
    return _named_as_norm(module) and not any(
        any(True for _ in child.parameters()) or isinstance(child, _TORCH_NORMS) for child in module.children())


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization module of `model`, by qualified name."""
    return [(name, m) for name, m in model.named_modules() if is_norm_module(m)]


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


