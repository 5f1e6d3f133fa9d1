"""BatchNorm recalibration (precise BN, AdaBN): running statistics recomputed
as the exact statistics of every value the layers see over a set of batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_ext.modules import SyncBatchNorm, _BatchRenormForward

__all__ = ["recalibrate_batch_norm"]


class _Moments:
    """Count, float64 mean and M2 per channel, merged by Chan's formula, so
    the result is the statistics of all values, whatever the batch sizes."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, count: int, mean: Tensor, m2: Tensor) -> None:
        if count == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def all_reduce(self, group, channels: int, device: torch.device) -> None:
        """The moments of every process's values (two collectives)."""
        mean = self.mean if self.mean is not None else torch.zeros(channels, dtype=torch.float64, device=device)
        m2 = self.m2 if self.m2 is not None else torch.zeros_like(mean)
        sums = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=device), mean * self.count])
        dist.all_reduce(sums, group=group)
        total = int(sums[0].item())
        if total == 0:
            return
        global_mean = sums[1:] / total
        spread = m2 + (mean - global_mean).square() * self.count
        dist.all_reduce(spread, group=group)
        self.count, self.mean, self.m2 = total, global_mean, spread


def _channel_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    count = x.numel() // x.shape[1] if x.dim() >= 2 else 0
    if count == 0:
        return 0, None, None
    if x.device.type in ("cpu", "cuda"):
        mean, m2 = torch.ops.bn_ext.batch_norm_stats(x)
        return count, mean, m2
    dims = [0, *range(2, x.dim())]  # other devices: torch's reductions in float64
    var, mean = torch.var_mean(x.double(), dims, correction=0)
    return count, mean, var * count


def _is_synchronised(bn: nn.Module) -> bool:
    return isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)) and dist.is_available() and dist.is_initialized()


def _model_input(batch: Any, device: torch.device | str | None) -> tuple[tuple, dict]:
    """(args, kwargs) of the model for one batch: a tensor; a (input, target, ...)
    tuple or list, of which the first item is the input (torch's update_bn
    does the same); or a dict of keyword arguments."""
    def move(value):
        return value.to(device) if device is not None and isinstance(value, Tensor) else value

    if isinstance(batch, dict):
        return (), {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return (move(batch),), {}


def recalibrate_batch_norm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics over `batches`, in place.

    Each BatchNorm layer with running statistics (torch.nn's, bn_ext's,
    SyncBatchNorm, BatchNormAct, BatchRenorm and other _BatchNorm
    subclasses) gets running_mean and running_var equal to the mean and
    variance of all the values it was given over the batches, pooled
    exactly (batches of different sizes weigh by their values, not as a
    batch each), the unbiased variance as torch keeps (BatchRenorm: its
    biased sigma^2 - eps form). As in training, each layer normalises with
    its batch's statistics on the way; only the BatchNorm layers are put in
    training mode (dropout and the rest stay in eval), and every layer's
    mode, momentum and num_batches_tracked are restored after. SyncBatchNorm
    layers normalise with the group's batch statistics, as in training, and
    pool across the processes of their group: every process calls this with
    the same number of batches (of any sizes). Runs under torch.no_grad.

    batches: an iterable of tensors, (input, target, ...) tuples (the first
    item is the input) or dicts of keyword arguments; num_batches: stop
    after this many; device: move inputs there first; progress: a progress
    bar (default: when there are more than 50 batches). Returns `model`.
    Typical use: after pruning or fine-tuning, before folding.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None
             and m.running_var is not None]
    if not norms:
        return model
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in norms]
    moments = {bn: _Moments() for bn in norms}

    def record(module, args):
        x = args[0].detach()
        moments[module].add(*_channel_moments(x))

    hooks = [bn.register_forward_pre_hook(record) for bn in norms]
    if progress is None:
        progress = num_batches is not None and num_batches > 50 or (hasattr(batches, "__len__") and len(batches) > 50)
    iterator = iter(batches)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=num_batches, desc="recalibrating", unit="batch", leave=False)
    try:
        model.eval()
        for bn in norms:
            bn.train()
            bn.momentum = 0.0  # the running statistics stay put until the end
        with torch.no_grad():
            for i, batch in enumerate(iterator):
                if num_batches is not None and i >= num_batches:
                    break
                args, kwargs = _model_input(batch, device)
                model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.train(training)
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
    unseen = []
    with torch.no_grad():
        for bn in norms:
            m = moments[bn]
            if _is_synchronised(bn):
                m.all_reduce(bn.process_group or dist.group.WORLD, bn.num_features, bn.running_mean.device)
            if m.count == 0:
                unseen.append(bn)
                continue
            biased = isinstance(bn, _BatchRenormForward) or m.count == 1
            var = m.m2 / (m.count if biased else m.count - 1)
            bn.running_mean.copy_(m.mean)
            bn.running_var.copy_(var)
    if unseen:
        names = {bn: name for name, bn in model.named_modules()}
        warnings.warn("recalibrate_batch_norm: these BatchNorm layers saw no input and keep their running "
                      f"statistics: {', '.join(names[bn] for bn in unseen)}", stacklevel=2)
    return model
