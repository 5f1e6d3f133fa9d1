"""Functional API: thin wrappers over torch.ops.bn_ext.*, with their fake
(shape) kernels and autograd formulas.

The signatures and semantics are those of torch.nn.functional.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

import bn_ext._C as _C  # registers the operators; direct bindings of the functional calls

__all__ = ["batch_norm", "batch_norm_act", "batch_renorm", "group_norm", "instance_norm", "layer_norm", "layer_norm_channels", "rms_norm"]

_ops = torch.ops.bn_ext
# Overloads resolved once: the per-call lookup is measurable on small inputs.
_layer_norm_forward = _ops.layer_norm_forward.default
_rms_norm_forward = _ops.rms_norm_forward.default
_batch_norm_op = _ops.batch_norm.default
_batch_norm_act_op = _ops.batch_norm_act.default
_instance_norm_op = _ops.instance_norm.default


def _direct_call(*tensors: Tensor | None) -> bool:
    """Whether bn_ext._C's direct bindings may stand in for torch.ops: they
    skip torch.ops' schema-driven argument parsing (microseconds a call) but
    are invisible to torch.compile and to __torch_function__ overrides, which
    must see the operator call."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch.overrides.has_torch_function(tensors)
    )


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduction_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


# ---------------------------------------------------------------------------
# BatchNorm


def _check_same_device(input: Tensor, **tensors: Tensor | None) -> None:
    # The fake kernels also serve mixed real/meta calls, which reach no C++ check.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} must be on the same device as input ({input.device}), got {t.device}")


@torch.library.register_fake("bn_ext::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps):
    _check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    channels = input.shape[1]
    stat = _stat_dtype(input.dtype)
    out = torch.empty_like(input, memory_format=suggest_memory_format(input))
    return out, input.new_empty((channels,), dtype=stat), input.new_empty((channels,), dtype=stat)


@torch.library.register_fake("bn_ext::batch_norm_update_stats")
def _batch_norm_update_stats_fake(
    running_mean, running_var, save_mean, save_invstd, momentum, num_batches_tracked, eps, count
):
    return None


@torch.library.register_fake("bn_ext::batch_norm_stats")
def _batch_norm_stats_fake(input):
    channels = input.shape[1]
    return input.new_empty((channels,), dtype=torch.float64), input.new_empty((channels,), dtype=torch.float64)


@torch.library.register_fake("bn_ext::batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, weight, save_mean, save_invstd, training, eps, output_mask):
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = (
        torch.empty_like(input, memory_format=suggest_memory_format(input))
        if output_mask[0]
        else input.new_empty((0,))
    )
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


def _batch_norm_grads_reference(grad_out, input, weight, save_mean, save_invstd, training, eps):
    """BatchNorm's first derivatives as a composite of torch ops: those of
    BatchNorm + activation without activation, residual and bias."""
    return _batch_norm_act_grads_reference(grad_out, input, None, weight, None, save_mean, save_invstd, training,
                                           eps, None)[:3]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization over the channel dimension (dim 1) of an (N, C, *) input.

    Same signature and behaviour as torch.nn.functional.batch_norm: in training
    the batch statistics normalise the input and, when given, running_mean and
    running_var are updated in place (running_var with the unbiased variance).
    """
    if momentum is None:
        # As torch's: a float. (bn_ext.nn's BatchNorm modules take momentum=None
        # for the cumulative average over their num_batches_tracked.)
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """batch_norm, plus momentum=None: a cumulative average over num_batches_tracked."""
    if _direct_call(input, running_mean, running_var, weight, bias, num_batches_tracked):
        return _C.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )
    return _batch_norm_op(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)




# ---------------------------------------------------------------------------
# BatchNorm + activation (+ residual): act(batch_norm(x) + residual).

_ACTIVATIONS = (None, "none", "relu", "silu")


def _check_activation(op: str, activation) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None, 'none', 'relu' or 'silu', got {activation!r}")


@torch.library.register_fake("bn_ext::batch_norm_act_forward")
def _batch_norm_act_forward_fake(input, weight, bias, running_mean, running_var, training, eps, activation, residual):
    _check_same_device(input, residual=residual)
    return _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps)


@torch.library.register_fake("bn_ext::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_out, input, residual, weight, bias, save_mean, save_invstd, training, eps,
                                  activation, output_mask):
    grad_input, grad_weight, grad_bias = _batch_norm_backward_fake(
        grad_out, input, weight, save_mean, save_invstd, training, eps, output_mask[:3]
    )
    asked = output_mask[3] and residual is not None
    grad_residual = torch.empty_like(input, memory_format=suggest_memory_format(input)) if asked else input.new_empty((0,))
    return grad_input, grad_weight, grad_bias, grad_residual


def _batch_norm_act_grads_reference(grad_out, input, residual, weight, bias, save_mean, save_invstd, training, eps,
                                    activation):
    """BatchNorm + activation's first derivatives (dx, dweight, dbias,
    dresidual) as a composite of torch ops. In training the statistics are
    recomputed from `input`, so differentiating this gives the exact second
    derivatives (double backward)."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x, dy = input.to(compute), grad_out.to(compute)
    dims, shape = _reduction_dims(x), _channel_shape(x)
    if training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    else:
        mean, invstd = save_mean.to(compute).view(shape), save_invstd.to(compute).view(shape)
    w = torch.ones((), dtype=compute) if weight is None else weight.to(compute).view(shape)
    b = torch.zeros((), dtype=compute) if bias is None else bias.to(compute).view(shape)
    x_hat = (x - mean) * invstd
    z = x_hat * w + b
    if residual is not None:
        z = z + residual.to(compute)
    dz = _activation_grad(dy, z, activation)
    g = dz * w
    if training:
        grad_input = invstd * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    else:
        grad_input = g * invstd
    return grad_input.to(input.dtype), (dz * x_hat).sum(dims), dz.sum(dims), dz.to(input.dtype)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    residual: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """act(batch_norm(input) + residual) in one pass over memory.

    batch_norm's arguments and running-statistics update, then `activation`
    (None or "none", "relu", "silu") of the normalised input plus `residual`
    (a tensor of the input's shape, or None). Equal to the unfused ops:
    bn_ext.batch_norm, then `+ residual`, then the activation, each rounded
    to the input's dtype as they would be (ReLU's outputs and gradients
    bitwise; SiLU's within its exp's 2 ulp). The backward recomputes the
    activation's input from `input` and `residual` and returns the residual's
    gradient too; momentum None is the cumulative average over num_batches_tracked.
    """
    _check_activation("batch_norm_act", activation)
    return _batch_norm_act_op(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                              residual, num_batches_tracked)


# ---------------------------------------------------------------------------
# Batch Renormalization (Ioffe, 2017).


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-3,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
) -> Tensor:
    """Batch Renormalization over the channel dimension (dim 1) of an (N, C, *) input.

    Training: y = weight * ((x - mean_B) / sigma_B * r + d) + bias, with
    sigma_B = sqrt(var_B + eps) (biased batch variance), sigma =
    sqrt(running_var + eps), r = clip(sigma_B / sigma, 1 / rmax, rmax) and
    d = clip((mean_B - running_mean) / sigma, -dmax, dmax), r and d held
    constant in the backward (so it is BatchNorm's with weight * r). Then, as
    the paper: running_mean += momentum * (mean_B - running_mean) and
    sigma += momentum * (sigma_B - sigma), kept as running_var = sigma^2 - eps
    (Keras's renorm). Without running statistics r = 1, d = 0 (BatchNorm).
    Eval: BatchNorm with the running statistics, so it folds like BatchNorm.
    rmax and dmax may be 0-dim tensors (a schedule computed in a compiled graph).
    """
    if isinstance(rmax, Tensor) or isinstance(dmax, Tensor):
        rmax, dmax = (torch.as_tensor(v, dtype=torch.float64) for v in (rmax, dmax))
        return _ops.batch_renorm.bounds_tensors(input, running_mean, running_var, weight, bias, training, momentum,
                                                eps, rmax, dmax)
    return _ops.batch_renorm.default(input, running_mean, running_var, weight, bias, training, momentum, eps, rmax,
                                     dmax)


# ---------------------------------------------------------------------------
# Folding arithmetic (csrc/fold.cpp): the folded layer's weight keeps its
# layout; its bias has one value per output channel.


@torch.library.register_fake("bn_ext::fuse_conv_bn_weights")
def _fuse_conv_bn_weights_fake(weight, bias, running_mean, running_var, eps, bn_weight, bn_bias, transposed, groups):
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    return torch.empty_like(weight), weight.new_empty((out_channels,))


@torch.library.register_fake("bn_ext::fuse_bn_conv_weights")
def _fuse_bn_conv_weights_fake(weight, bias, running_mean, running_var, eps, bn_weight, bn_bias, groups):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# ---------------------------------------------------------------------------
# LayerNorm and RMSNorm: rows over the trailing normalized_shape dims.


def _normalized_dims(x: Tensor, normalized_shape: Sequence[int]) -> list[int]:
    return list(range(x.dim() - len(normalized_shape), x.dim()))


def _row_stat_shape(x: Tensor, normalized_shape: Sequence[int]) -> list[int]:
    return [*x.shape[: x.dim() - len(normalized_shape)], *([1] * len(normalized_shape))]


def _param_grad_fake(x: Tensor, param: Tensor | None, shape: Sequence[int], asked: bool) -> Tensor:
    dtype = x.dtype if param is None else param.dtype
    return x.new_empty(tuple(shape) if asked else (0,), dtype=dtype)


def _input_grad_fake(x: Tensor, asked: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if asked else x.new_empty((0,))


@torch.library.register_fake("bn_ext::layer_norm_forward")
def _layer_norm_forward_fake(input, normalized_shape, weight, bias, eps):
    _check_same_device(input, weight=weight, bias=bias)
    stat = _stat_dtype(input.dtype)
    shape = _row_stat_shape(input, normalized_shape)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        input.new_empty(shape, dtype=stat),
        input.new_empty(shape, dtype=stat),
    )


@torch.library.register_fake("bn_ext::layer_norm_backward")
def _layer_norm_backward_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias, eps, output_mask):
    return (
        _input_grad_fake(input, output_mask[0]),
        _param_grad_fake(input, weight, normalized_shape, output_mask[1]),
        _param_grad_fake(input, bias, normalized_shape, output_mask[2]),
    )


@torch.library.register_fake("bn_ext::rms_norm_forward")
def _rms_norm_forward_fake(input, normalized_shape, weight, eps):
    _check_same_device(input, weight=weight)
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(input)),
        input.new_empty(_row_stat_shape(input, normalized_shape), dtype=_stat_dtype(input.dtype)),
    )


@torch.library.register_fake("bn_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, input, normalized_shape, rstd, weight, eps, output_mask):
    return _input_grad_fake(input, output_mask[0]), _param_grad_fake(input, weight, normalized_shape, output_mask[1])


def _layer_norm_grads_reference(grad_out, input, normalized_shape, weight, eps):
    """LayerNorm's first derivatives as a composite of torch ops (statistics
    recomputed from `input`), for double backward."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x, dy = input.to(compute), grad_out.to(compute)
    dims = _normalized_dims(x, normalized_shape)
    leading = list(range(x.dim() - len(normalized_shape)))
    mean = x.mean(dims, keepdim=True)
    rstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    x_hat = (x - mean) * rstd
    g = dy if weight is None else dy * weight.to(compute)
    grad_input = rstd * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    return grad_input.to(input.dtype), (dy * x_hat).sum(leading), dy.sum(leading)


def _rms_norm_grads_reference(grad_out, input, normalized_shape, weight, eps):
    """RMSNorm's first derivatives as a composite of torch ops, for double backward."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x, dy = input.to(compute), grad_out.to(compute)
    dims = _normalized_dims(x, normalized_shape)
    leading = list(range(x.dim() - len(normalized_shape)))
    rstd = torch.rsqrt(x.square().mean(dims, keepdim=True) + _rms_norm_eps(eps, input.dtype))
    x_hat = x * rstd
    g = dy if weight is None else dy * weight.to(compute)
    grad_input = rstd * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))
    return grad_input.to(input.dtype), (dy * x_hat).sum(leading)


def _rms_norm_eps(eps: float | None, dtype: torch.dtype) -> float:
    if eps is not None:
        return eps
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _as_shape(normalized_shape: int | Sequence[int]) -> Sequence[int]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization over the trailing `normalized_shape` dims.

    Same signature and behaviour as torch.nn.functional.layer_norm.
    """
    if _direct_call(input, weight, bias):
        return _C.layer_norm(input, _as_shape(normalized_shape), weight, bias, eps)
    return _layer_norm_forward(input, _as_shape(normalized_shape), weight, bias, eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root Mean Square Layer Normalization over the trailing `normalized_shape` dims.

    Same signature and behaviour as torch.nn.functional.rms_norm; eps None
    means the machine epsilon of the computation type (float32 for half inputs).
    """
    if input.dim() == 0 and len(_as_shape(normalized_shape)) > 0:  # torch checks normalized_shape first
        raise ValueError("rms_norm: expected an input of at least 1 dimension, got a 0-d tensor")
    if _direct_call(input, weight):
        return _C.rms_norm(input, _as_shape(normalized_shape), weight, eps)
    return _rms_norm_forward(input, _as_shape(normalized_shape), weight, eps)[0]


# ---------------------------------------------------------------------------
# GroupNorm, InstanceNorm (GroupNorm with one channel per group) and
# LayerNorm over the channels of an (N, C, *) input.

_group_norm_forward = _ops.group_norm_forward.default
_group_norm_backward = _ops.group_norm_backward.default
_layer_norm_channels_forward = _ops.layer_norm_channels_forward.default
_layer_norm_channels_backward = _ops.layer_norm_channels_backward.default


def _family_memory_format(x: Tensor) -> torch.memory_format:
    # The kernels keep channels_last(_3d) where torch suggests it (csrc/group_norm_common.h).
    return suggest_memory_format(x) if x.dim() >= 4 else torch.contiguous_format


def _like_input(x: Tensor, asked: bool = True) -> Tensor:
    return torch.empty_like(x, memory_format=_family_memory_format(x)) if asked else x.new_empty((0,))


def _channel_grad_fake(x: Tensor, param: Tensor | None, asked: bool) -> Tensor:
    return x.new_empty((x.shape[1] if asked else 0,), dtype=x.dtype if param is None else param.dtype)


@torch.library.register_fake("bn_ext::group_norm_forward")
def _group_norm_forward_fake(input, num_groups, weight, bias, eps, activation):
    _check_same_device(input, weight=weight, bias=bias)
    stat = _stat_dtype(input.dtype)
    shape = (input.shape[0], num_groups)
    return _like_input(input), input.new_empty(shape, dtype=stat), input.new_empty(shape, dtype=stat)


@torch.library.register_fake("bn_ext::group_norm_backward")
def _group_norm_backward_fake(grad_out, input, num_groups, mean, rstd, weight, bias, eps, activation, output_mask):
    return (
        _like_input(input, output_mask[0]),
        _channel_grad_fake(input, weight, output_mask[1]),
        _channel_grad_fake(input, bias, output_mask[2]),
    )


@torch.library.register_fake("bn_ext::layer_norm_channels_forward")
def _layer_norm_channels_forward_fake(input, weight, bias, eps):
    _check_same_device(input, weight=weight, bias=bias)
    stat = _stat_dtype(input.dtype)
    shape = (input.shape[0], 1, *input.shape[2:])
    return _like_input(input), input.new_empty(shape, dtype=stat), input.new_empty(shape, dtype=stat)


@torch.library.register_fake("bn_ext::layer_norm_channels_backward")
def _layer_norm_channels_backward_fake(grad_out, input, mean, rstd, weight, bias, eps, output_mask):
    return (
        _like_input(input, output_mask[0]),
        _channel_grad_fake(input, weight, output_mask[1]),
        _channel_grad_fake(input, bias, output_mask[2]),
    )


def _activation_grad(dy: Tensor, z: Tensor, activation: str | None) -> Tensor:
    """dy * act'(z), as torch's relu and silu backward kernels compute it
    (ReLU's: zero where z <= 0, dy elsewhere, NaN z included)."""
    if activation == "relu":
        return dy.masked_fill(z <= 0, 0)
    if activation == "silu":
        s = torch.sigmoid(z)
        return dy * s * (1 + z * (1 - s))
    return dy


def _group_norm_grads_reference(grad_out, input, num_groups, weight, bias, eps, activation):
    """GroupNorm's first derivatives (after the activation, if any) as a
    composite of torch ops, statistics recomputed from `input`: differentiating
    it gives the exact second derivatives (double backward)."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x, dy = input.to(compute), grad_out.to(compute)
    N, C = x.shape[:2]
    shape = _channel_shape(x)
    groups = x.reshape(N, num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    rstd = torch.rsqrt(groups.var(-1, correction=0, keepdim=True) + eps)
    x_hat = ((groups - mean) * rstd).reshape(x.shape)
    w = torch.ones((), dtype=compute) if weight is None else weight.to(compute).view(shape)
    b = torch.zeros((), dtype=compute) if bias is None else bias.to(compute).view(shape)
    dy = _activation_grad(dy, x_hat * w + b, activation)
    dims = _reduction_dims(x)
    g = (dy * w).reshape(N, num_groups, -1)
    h = x_hat.reshape(N, num_groups, -1)
    grad_input = (rstd * (g - g.mean(-1, keepdim=True) - h * (g * h).mean(-1, keepdim=True))).reshape(x.shape)
    return grad_input.to(input.dtype), (dy * x_hat).sum(dims), dy.sum(dims)


def _layer_norm_channels_grads_reference(grad_out, input, weight, bias, eps):
    """LayerNorm-over-channels' first derivatives: LayerNorm's over the channel dim moved last."""
    grad_input, grad_weight, grad_bias = _layer_norm_grads_reference(
        grad_out.movedim(1, -1), input.movedim(1, -1), (input.shape[1],), weight, eps
    )
    return grad_input.movedim(-1, 1), grad_weight, grad_bias


# ---------------------------------------------------------------------------
# Double backward. The forward operators' autograd is in C++
# (csrc/autograd.cpp); a backward operator's own derivatives are those of its
# composite reference (statistics recomputed from the input, so exact).


def _register_double_backward(op: str, reference, differentiable: tuple[str, ...]) -> None:
    """Autograd for backward operator `op`: the gradients of its outputs with
    respect to its tensor arguments named in `differentiable`, through
    reference(...), called with the operator's arguments of its parameters'
    names and returning the operator's outputs in order."""
    schema = getattr(_ops, op).default._schema
    names = [a.name for a in schema.arguments]
    tensor_or_none = torch._C.OptionalType(torch._C.TensorType.get())
    tensors = [i for i, a in enumerate(schema.arguments) if a.type.isSubtypeOf(tensor_or_none)]
    wanted = list(inspect.signature(reference).parameters)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensors))
        ctx.others = {n: v for i, (n, v) in enumerate(zip(names, inputs)) if i not in tensors}

    def backward(ctx, *grads_of_grads):
        args = {**ctx.others, **{names[i]: t for i, t in zip(tensors, ctx.saved_tensors)}}
        primals = [n for n in differentiable if args[n] is not None]

        def first_derivatives(*values):
            given = {**args, **dict(zip(primals, values))}
            return reference(**{n: given[n] for n in wanted})

        outputs, vjp = torch.func.vjp(first_derivatives, *(args[n] for n in primals))
        # A gradient not asked for is an empty output: no cotangent flows from it.
        cotangents = tuple(
            g.to(o.dtype) if (asked and g is not None and g.numel() == o.numel()) else torch.zeros_like(o)
            for g, o, asked in zip(grads_of_grads, outputs, args["output_mask"])
        )
        grads = {n: g.to(args[n].dtype) for n, g in zip(primals, vjp(cotangents))}
        return tuple(grads.get(n) for n in names)

    torch.library.register_autograd(f"bn_ext::{op}", backward, setup_context=setup_context)


for _op, _reference, _differentiable in [
    ("batch_norm_backward", _batch_norm_grads_reference, ("grad_out", "input", "weight")),
    ("batch_norm_act_backward", _batch_norm_act_grads_reference, ("grad_out", "input", "residual", "weight", "bias")),
    ("layer_norm_backward", _layer_norm_grads_reference, ("grad_out", "input", "weight")),
    ("rms_norm_backward", _rms_norm_grads_reference, ("grad_out", "input", "weight")),
    ("group_norm_backward", _group_norm_grads_reference, ("grad_out", "input", "weight", "bias")),
    ("layer_norm_channels_backward", _layer_norm_channels_grads_reference, ("grad_out", "input", "weight", "bias")),
]:
    _register_double_backward(_op, _reference, _differentiable)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> Tensor:
    """Group Normalization over groups of adjacent channels of an (N, C, *) input.

    Same signature and behaviour as torch.nn.functional.group_norm, plus
    `activation` (None, "relu" or "silu"), applied to the normalised output in
    the same pass: exactly act(group_norm(...)), with its backward.
    """
    _check_activation("group_norm", activation)
    return _group_norm_forward(input, num_groups, weight, bias, eps, activation)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance Normalization: each (sample, channel) normalised over its own values.

    Same signature and behaviour as torch.nn.functional.instance_norm: with
    use_input_stats the instance statistics normalise the input and, when
    given, running_mean and running_var are moved towards their averages over
    the batch (running_var with the unbiased variance); without, the running
    statistics normalise it (BatchNorm in eval mode). Channels-last inputs
    give channels-last outputs.
    """
    return _instance_norm_op(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def layer_norm_channels(
    input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """LayerNorm over the channels (dim 1) of an (N, C, *) input, each position
    normalised over its C values: what ConvNeXt's LayerNorm2d computes by
    permute -> layer_norm -> permute, without the copies, in either memory
    format (the output keeps the input's)."""
    return _layer_norm_channels_forward(input, weight, bias, eps)[0]
