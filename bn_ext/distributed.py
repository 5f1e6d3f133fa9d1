"""The computation of SyncBatchNorm (bn_ext.modules) over torch.distributed,
on any backend it offers (gloo on the CPU as well as NCCL on GPUs).

Training forward: per-channel (count, mean, M2) of the local batch, one
all_gather, Chan's merge (exact for uneven and empty batches), normalisation
with the global statistics. Backward: local sum(dy) and sum(dy * x_hat), one
all_reduce, then dx. Weight and bias gradients are the local sums, as in
torch.nn.SyncBatchNorm (DistributedDataParallel averages them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


_ops = torch.ops.bn_ext


def _param_dtype(input: Tensor) -> torch.dtype:
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _merge_moments(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank rows [count, mean[C], m2[C]] (float64)."""
    counts = gathered[:, :1]
    means = gathered[:, 1 : 1 + channels]
    m2s = gathered[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group):
        channels = input.shape[1]
        count = input.numel() // channels if channels else 0
        if count > 0:
            mean, m2 = _ops.batch_norm_stats(input)
        else:
            mean = m2 = torch.zeros(channels, dtype=torch.float64, device=input.device)
        local = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=input.device), mean, m2])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        total, mean, m2 = _merge_moments(torch.stack(gathered), channels)
        if total.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total.item())} "
                             "values across the process group")
        var = m2 / total
        stat_dtype = _param_dtype(input)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            _ops.batch_norm_update_stats(
                running_mean, running_var, mean.to(stat_dtype), invstd.to(stat_dtype), momentum,
                num_batches_tracked, eps, int(total.item()),
            )
        # Normalise with the global statistics: the eval path of the kernel.
        out, save_mean, save_invstd = _ops.batch_norm_forward(
            input, weight, bias, mean.to(stat_dtype), var.to(stat_dtype), False, eps
        )
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.group, ctx.total, ctx.bias_dtype = group, total.item(), None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd = ctx.saved_tensors
        channels = input.shape[1]
        # Local sum(dy * x_hat) and sum(dy): the parameter gradients of the eval path.
        _, sum_dy_xhat, sum_dy = _ops.batch_norm_backward(
            grad_out, input, weight, mean, invstd, False, 0.0, [False, True, True]
        )
        sums = torch.cat([sum_dy.double(), sum_dy_xhat.double()])
        dist.all_reduce(sums, group=ctx.group)
        grad_input = None
        if ctx.needs_input_grad[0] and input.numel() > 0:
            compute = torch.promote_types(input.dtype, torch.float32)
            shape = [1, -1] + [1] * (input.dim() - 2)
            mean_dy = (sums[:channels] / ctx.total).to(compute).view(shape)
            mean_dy_xhat = (sums[channels:] / ctx.total).to(compute).view(shape)
            scale = invstd.to(compute) * (1.0 if weight is None else weight.to(compute))
            x_hat = (input.to(compute) - mean.to(compute).view(shape)) * invstd.to(compute).view(shape)
            grad_input = ((grad_out.to(compute) - mean_dy - x_hat * mean_dy_xhat) * scale.view(shape)).to(input.dtype)
        elif ctx.needs_input_grad[0]:
            grad_input = torch.zeros_like(input)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


