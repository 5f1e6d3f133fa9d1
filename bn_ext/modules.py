"""Drop-in modules with torch.nn's constructor arguments, parameter and
buffer names (SyncBatchNorm included), and the twin of each norm class
that bn_ext.conversion swaps in.

Each bn_ext module subclasses its torch.nn twin and replaces only `forward`,
so state_dicts, hooks, isinstance checks and `extra_repr` are torch.nn's own.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from bn_ext.distributed import _SyncBatchNormFunction

from bn_ext.functional import (
    _batch_norm,
    _check_activation,
    batch_norm_act,
    batch_renorm,
    group_norm,
    instance_norm,
    layer_norm,
    layer_norm_channels,
    rms_norm,
)
from bn_ext.norm_classes import frozen_batch_norm_classes

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "SyncBatchNorm",
]


class _BatchNormForward:
    """torch.nn's BatchNorm module semantics over bn_ext.batch_norm."""

    def _batch_norm_arguments(self, input: Tensor) -> tuple:
        """(running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked) of bn_ext's batch_norm for this call, after
        torch.nn's checks and num_batches_tracked's step."""
        self._check_input_dim(input)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        # Without running statistics, batch statistics are used in eval too.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        # momentum=None: a cumulative moving average driven by num_batches_tracked.
        return (
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked,
        )

    def forward(self, input: Tensor) -> Tensor:
        return _batch_norm(input, *self._batch_norm_arguments(input))


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bn_ext kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bn_ext kernels: (N, C, H, W) input."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bn_ext kernels: (N, C, D, H, W) input."""


def _unfused_activation(activation: str | None):
    return {"relu": torch.relu, "silu": torch.nn.functional.silu}.get(activation, lambda t: t)


class _BatchNormActForward(_BatchNormForward):
    """act(BatchNorm(input) + residual) in one bn_ext.batch_norm_act call."""

    activation: str | None = "relu"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, activation="relu"):
        _check_activation(type(self).__name__, activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        args = self._batch_norm_arguments(input)
        if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
            # A residual that broadcasts or promotes: the unfused ops, which do.
            out = _batch_norm(input, *args) + residual
            return _unfused_activation(self.activation)(out)
        running_mean, running_var, weight, bias, training, momentum, eps, tracked = args
        return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                              self.activation, residual, tracked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormActForward, torch.nn.BatchNorm1d):
    """BatchNorm1d fused with an activation ("relu", "silu" or None, keyword
    only; not part of the state_dict) of the output plus an optional
    residual: forward(input, residual=None) = act(bn(input) + residual).
    torch.nn.BatchNorm1d's state_dict."""


class BatchNormAct2d(_BatchNormActForward, torch.nn.BatchNorm2d):
    """BatchNormAct1d for (N, C, H, W) inputs."""


class BatchNormAct3d(_BatchNormActForward, torch.nn.BatchNorm3d):
    """BatchNormAct1d for (N, C, D, H, W) inputs."""


class _BatchRenormForward:
    """Batch Renormalization (Ioffe, 2017) over bn_ext.batch_renorm, with
    torch.nn's BatchNorm buffers (running_var holds sigma^2 - eps, as Keras's
    renorm keeps it), so state_dicts, folding and recalibration treat it as
    BatchNorm. The clipping ramps linearly over the first `warmup_steps`
    training steps, from r_max = 1, d_max = 0 (BatchNorm) at step 0 to rmax
    and dmax (the paper relaxes them gradually the same way); 0: no ramp."""

    def __init__(self, num_features, eps=1e-3, momentum=0.01, rmax=3.0, dmax=5.0, warmup_steps=0, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        name = type(self).__name__
        if momentum is None:
            raise ValueError(f"{name}: momentum must be a number (the paper's running averages), got None")
        if rmax < 1.0 or dmax < 0.0 or warmup_steps < 0:
            raise ValueError(f"{name}: rmax must be >= 1, dmax >= 0 and warmup_steps >= 0, got rmax={rmax}, "
                             f"dmax={dmax} and warmup_steps={warmup_steps}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), int(warmup_steps)

    def clipping(self, step: Tensor | int) -> tuple:
        """(r_max, d_max) at training step `step` (0 the first)."""
        if self.warmup_steps == 0:
            return self.rmax, self.dmax
        ramp = (torch.as_tensor(step, dtype=torch.float64) / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.rmax - 1.0) * ramp, self.dmax * ramp

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        rmax, dmax = self.clipping(self.num_batches_tracked.detach().clone() if tracking else 0)
        if tracking:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        return batch_renorm(input, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, self.weight, self.bias, use_batch_stats,
                            self.momentum, self.eps, rmax, dmax)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"


class BatchRenorm1d(_BatchRenormForward, torch.nn.BatchNorm1d):
    """Batch Renormalization of (N, C) or (N, C, L) inputs."""


class BatchRenorm2d(_BatchRenormForward, torch.nn.BatchNorm2d):
    """Batch Renormalization of (N, C, H, W) inputs."""


class BatchRenorm3d(_BatchRenormForward, torch.nn.BatchNorm3d):
    """Batch Renormalization of (N, C, D, H, W) inputs."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on bn_ext kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on bn_ext kernels."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on bn_ext kernels, with an optional fused activation
    of the output (`activation=None|"relu"|"silu"`, keyword only; not part of
    the state_dict)."""

    activation: str | None = None  # a converted torch.nn.GroupNorm has none

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True,
                 activation=None):
        _check_activation("GroupNorm", activation)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
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


def _zoo_classes(module: str, *names: str) -> list[type]:
    """The classes of a model zoo's module that are importable here."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return []
    return [getattr(imported, name) for name in names if hasattr(imported, name)]


def _fusable_activation(act: torch.nn.Module) -> str | None:
    """batch_norm_act's name for an activation module, or None when it has none."""
    return {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.Identity: "none"}.get(type(act))


def _kernel_activation(module: torch.nn.Module, fusable: tuple[str, ...] = ("none", "relu", "silu")) -> str | None:
    """The activation a zoo norm + activation module (norm, then its `drop`,
    then its `act` module) runs inside bn_ext's kernel: act's name where the
    kernel fuses it and there is no drop; None where drop and act run after."""
    activation = _fusable_activation(module.act)
    return activation if activation in fusable and isinstance(module.drop, torch.nn.Identity) else None


class _TimmBatchNormActForward(_BatchNormForward):
    """timm's BatchNormAct2d (BatchNorm, then its `drop`, then its `act`
    module) on bn_ext kernels: one fused call where act is ReLU, SiLU or
    Identity and there is no drop layer, BatchNorm then timm's own modules otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        running_mean, running_var, weight, bias, training, momentum, eps, tracked = self._batch_norm_arguments(x)
        activation = _kernel_activation(self)
        if activation is not None:
            return batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                                  None, tracked)
        x = _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, tracked)
        return self.act(self.drop(x))


class _FrozenBatchNormForward:
    """torchvision's and timm's frozen BatchNorms (eval BatchNorm on their
    buffers, whatever the mode) on bn_ext's eval kernel; timm's
    FrozenBatchNormAct2d's drop and act after it, fused where they can be."""

    def forward(self, x: Tensor) -> Tensor:
        activation = _kernel_activation(self) if hasattr(self, "act") else "none"
        out = batch_norm_act(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps,
                             activation or "none")
        return out if activation is not None else self.act(self.drop(out))


class _GroupNormActForward:
    """timm's GroupNormAct and GroupNorm1Act (GroupNorm, then drop, then act)
    on bn_ext's GroupNorm, with the activation fused where it is ReLU or SiLU
    and there is no drop layer."""

    def forward(self, x: Tensor) -> Tensor:
        activation = _kernel_activation(self)
        out = group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                         None if activation in (None, "none") else activation)
        return out if activation is not None else self.act(self.drop(out))


class _LayerNormAct2dForward:
    """timm's LayerNormAct2d: bn_ext's channels LayerNorm, then its drop and act."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(layer_norm_channels(x, self.weight, self.bias, self.eps)))


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

# The zoos' norm classes bn_ext runs: (module, class names, the forward that replaces theirs).
_ZOO_FORWARDS: list[tuple[str, tuple[str, ...], type]] = [
    ("torchvision.models.convnext", ("LayerNorm2d",), LayerNorm2d),
    ("torchvision.ops.misc", ("FrozenBatchNorm2d",), _FrozenBatchNormForward),
    ("timm.layers", ("LayerNorm2d",), LayerNorm2d),
    ("timm.layers", ("LayerNorm",), LayerNorm),
    ("timm.layers", ("GroupNorm", "GroupNorm1"), GroupNorm),
    ("timm.layers", ("BatchNormAct2d",), _TimmBatchNormActForward),
    ("timm.layers", ("GroupNormAct", "GroupNorm1Act"), _GroupNormActForward),
    ("timm.layers", ("LayerNormAct2d",), _LayerNormAct2dForward),
    ("timm.layers.norm_act", ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"), _FrozenBatchNormForward),
]

# A twin per zoo class, so `revert` restores each one's own class.
_ZOO_TWINS: dict[type, type] = {}


def _zoo_twin(base: type, forward: type) -> type:
    """bn_ext's forward over a zoo class: the zoo class stays a base, so its
    other modules (act, drop), methods and isinstance checks hold."""
    if base not in _ZOO_TWINS:
        name = base.__name__
        _ZOO_TWINS[base] = type(name, (forward, base), {"__module__": __name__, "__qualname__": name})
    return _ZOO_TWINS[base]


def _twins() -> dict[type, type]:
    """_TWINS plus the importable model zoos' norm classes."""
    zoo = {base: _zoo_twin(base, forward)
           for module, names, forward in _ZOO_FORWARDS for base in _zoo_classes(module, *names)}
    return {**_TWINS, **zoo}




def _overrides_forward(bn: nn.Module) -> bool:
    """Whether a BatchNorm module's class has a forward of its own (timm's
    BatchNormAct2d applies an activation after normalising, say): replacing
    such a module as a whole would drop what its forward adds."""
    # Batch Renormalization is BatchNorm in eval (its running statistics normalise).
    known = {_BatchNorm.forward, nn.SyncBatchNorm.forward, BatchNorm2d.forward, SyncBatchNorm.forward,
             _InstanceNorm.forward, BatchRenorm2d.forward, _FrozenBatchNormForward.forward,
             *(c.forward for c in frozen_batch_norm_classes())}
    return type(bn).forward not in known


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    """torch.nn.SyncBatchNorm on bn_ext kernels, for CPU (gloo) and CUDA process groups.

    Same constructor, parameters and buffers as torch.nn.SyncBatchNorm. Falls
    back to plain BatchNorm in eval mode, without an initialised process
    group, or in a group of one process. It is deliberately not a subclass of
    torch.nn.SyncBatchNorm: DistributedDataParallel refuses those on the CPU.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synchronising(self) -> bool:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronising():
            return super().forward(input)
        self._check_input_dim(input)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        group = self.process_group or dist.group.WORLD
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.num_batches_tracked, self.momentum, self.eps, group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*d (torch.nn's or bn_ext's) in `module` by a
        bn_ext SyncBatchNorm with the same state; returns the converted module.
        A BatchNorm subclass with a forward of its own (timm's BatchNormAct2d
        applies an activation after normalising) is refused with ValueError:
        replacing it would silently drop what that forward adds."""
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls) and _overrides_forward(module):
            raise ValueError(
                f"SyncBatchNorm.convert_sync_batchnorm: {type(module).__module__}.{type(module).__qualname__} is a "
                "BatchNorm subclass with its own forward; a SyncBatchNorm in its place would drop what that forward "
                "does after normalising. Convert such models with their library's own converter (timm: "
                "timm.layers.convert_sync_batchnorm)."
            )
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
