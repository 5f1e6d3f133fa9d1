"""Drop-in modules with torch.nn's constructor arguments, parameter and
buffer names, and model conversion to and from torch.nn.

Each bn_ext module subclasses its torch.nn twin and replaces only `forward`,
so state_dicts, hooks, isinstance checks and `extra_repr` are torch.nn's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_ext.functional import _ACTIVATIONS, _batch_norm, group_norm, instance_norm, layer_norm, layer_norm_channels, rms_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "convert",
    "revert",
]


class _BatchNormForward:
    """torch.nn's BatchNorm module semantics over bn_ext.batch_norm."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        # Without running statistics, batch statistics are used in eval too.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        # momentum=None: a cumulative moving average driven by num_batches_tracked.
        return _batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked,
        )


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bn_ext kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bn_ext kernels: (N, C, H, W) input."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bn_ext kernels: (N, C, D, H, W) input."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on bn_ext kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on bn_ext kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on bn_ext kernels, with an optional fused activation
    of the output (`activation=None|"relu"|"silu"`, keyword only; not part of
    the state_dict)."""

    activation: str | None = None  # a converted torch.nn.GroupNorm has none

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, activation=None):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GroupNorm: activation must be None, 'relu' or 'silu', got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra if self.activation is None else f"{extra}, activation={self.activation!r}"


class _InstanceNormForward:
    """torch.nn's InstanceNorm semantics (no-batch inputs, the mode and
    momentum rules are torch.nn's own) over bn_ext.instance_norm."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormForward, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d on bn_ext kernels: (N, C, L) or (C, L) input."""


class InstanceNorm2d(_InstanceNormForward, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d on bn_ext kernels: (N, C, H, W) or (C, H, W) input."""


class InstanceNorm3d(_InstanceNormForward, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d on bn_ext kernels: (N, C, D, H, W) or (C, D, H, W) input."""


class LayerNorm2d(torch.nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, *) input, as timm's and
    torchvision's ConvNeXt LayerNorm2d (a torch.nn.LayerNorm of C features
    applied by permute -> layer_norm -> permute), without the permute copies;
    the output keeps the input's memory format."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm_channels(input, self.weight, self.bias, self.eps)


def _layer_norm_2d_classes() -> list[type]:
    """The model zoos' LayerNorm2d classes that are importable here."""
    classes = []
    try:
        from torchvision.models.convnext import LayerNorm2d as torchvision_layer_norm_2d

        classes.append(torchvision_layer_norm_2d)
    except ImportError:
        pass
    try:
        from timm.layers import LayerNorm2d as timm_layer_norm_2d

        classes.append(timm_layer_norm_2d)
    except ImportError:
        pass
    return classes


# A twin per zoo class (a subclass of LayerNorm2d), so `revert` restores each one's own class.
_LAYER_NORM_2D_TWINS: dict[type, type] = {}


def _layer_norm_2d_twin(base: type) -> type:
    if base not in _LAYER_NORM_2D_TWINS:
        _LAYER_NORM_2D_TWINS[base] = type("LayerNorm2d", (LayerNorm2d,), {"__module__": __name__,
                                                                          "__qualname__": "LayerNorm2d"})
    return _LAYER_NORM_2D_TWINS[base]


# torch.nn class -> bn_ext twin. Exact types only: subclasses of torch.nn's
# norms (SyncBatchNorm, user classes) may change behaviour and are left alone.
_TWINS: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}


def _twins() -> dict[type, type]:
    """_TWINS plus the importable model zoos' LayerNorm2d classes."""
    return {**_TWINS, **{base: _layer_norm_2d_twin(base) for base in _layer_norm_2d_classes()}}


def _swap_classes(model: torch.nn.Module, mapping: dict[type, type]) -> torch.nn.Module:
    for module in model.modules():
        twin = mapping.get(type(module))
        if twin is not None:
            # The twin adds no state, so the instance keeps its parameters,
            # buffers, hooks and train/eval mode.
            module.__class__ = twin
    return model


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every torch.nn norm layer of `model` to its bn_ext twin, in place.

    Returns `model`. Parameters, buffers (the same tensor objects, so an
    optimizer built before keeps working), hooks and train/eval mode are kept.
    """
    return _swap_classes(model, _twins())


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert`: switch bn_ext norm layers back to torch.nn, in place."""
    return _swap_classes(model, {twin: base for base, twin in _twins().items()})


# SyncBatchNorm lives with the distributed code; it is a module of this namespace too.
from bn_ext.distributed import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]
