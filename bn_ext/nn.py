"""Drop-in modules with torch.nn's constructor arguments, parameter and
buffer names, and model conversion to and from torch.nn.

Each bn_ext module subclasses its torch.nn twin and replaces only `forward`,
so state_dicts, hooks, isinstance checks and `extra_repr` are torch.nn's own.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import Tensor

from bn_ext.functional import (
    _ACTIVATIONS,
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
    "ConvertReport",
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
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GroupNorm: activation must be None, 'relu' or 'silu', got {activation!r}")
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
    from bn_ext.norm_classes import class_name

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
    from bn_ext.norm_classes import norm_modules

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
        from bn_ext.activation_fusion import fuse_activations as fuse

        model = fuse(model)
    return (model, census) if report else model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert`: switch bn_ext norm layers back to torch.nn, in place.
    The fused calls of a `fuse_activations` result are unfused first
    (BatchNorm, add, torch.relu), so it computes what the unfused model does;
    the layers it did not fuse are shared with the model it came from, which
    they switch back in too."""
    from bn_ext.activation_fusion import unfuse_activations

    return _swap_classes(unfuse_activations(model), {twin: base for base, twin in _twins().items()})


# SyncBatchNorm lives with the distributed code; it is a module of this namespace too.
from bn_ext.distributed import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]
