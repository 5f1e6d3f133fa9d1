"""Drop-in modules with torch.nn's constructor arguments, parameter and
buffer names, and model conversion to and from torch.nn.

Each bn_ext module subclasses its torch.nn twin and replaces only `forward`,
so state_dicts, hooks, isinstance checks and `extra_repr` are torch.nn's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_ext.functional import _batch_norm, layer_norm, rms_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm", "convert", "revert"]


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


# torch.nn class -> bn_ext twin. Exact types only: subclasses of torch.nn's
# norms (SyncBatchNorm, user classes) may change behaviour and are left alone.
_TWINS: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
}


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
    return _swap_classes(model, _TWINS)


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert`: switch bn_ext norm layers back to torch.nn, in place."""
    return _swap_classes(model, {twin: base for base, twin in _TWINS.items()})


# SyncBatchNorm lives with the distributed code; it is a module of this namespace too.
from bn_ext.distributed import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]
