"""Sample arguments of every bn_ext operator, in one table (as ATen's OpInfo
and extension-cpp's sample_inputs). test_op_samples.py runs
torch.library.opcheck (schema, fake kernel, autograd registration, AOT
dispatch with static and dynamic shapes) over each operator's samples, and
fails for a registered operator that has none. A backward operator's samples
take the statistics its forward saved. check_samples runs a device
operator's samples against the float64 reference: on the CPU at each level
(test_op_samples.py), through the CUDA emulator and on a GPU (test_cuda*.py)."""

import torch

from conftest import assert_close, assert_error_within, in_float64, op_math

ops = torch.ops.bn_ext


def registered_operators() -> list[str]:
    """Every bn_ext operator overload the dispatcher knows, as 'name' or 'name.overload'."""
    return sorted(n.removeprefix("bn_ext::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("bn_ext::"))


def _grad(*tensors):
    """Copies that require grad (None stays None)."""
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in tensors)


def _channel_params(C, dtype=torch.float32):
    return torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)


def _running_stats(C, dtype=torch.float32):
    return torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5


# --- BatchNorm -------------------------------------------------------------------


def batch_norm_forward():
    x = torch.randn(3, 4, 5, 6)
    w, b = _channel_params(4)
    rm, rv = _running_stats(4)
    return [
        (x, w, b, None, None, True, 1e-5),
        (*_grad(x, w, b), rm, rv, False, 1e-5),
        (x.to(memory_format=torch.channels_last), w, None, rm, rv, True, 1e-3),
        (torch.randn(8, 3, 10)[:, :, ::2], None, None, None, None, True, 1e-5),
        (x.to(torch.bfloat16), w, b, rm, rv, True, 1e-5),
        (torch.randn(6, 4, dtype=torch.float64), None, None, None, None, True, 1e-5),
    ]


def batch_norm_backward():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    dy = torch.randn_like(x)
    cases = []
    for training in (True, False):
        _, mean, invstd = ops.batch_norm_forward(x, w, None, torch.zeros(4, dtype=torch.float64),
                                                 torch.ones(4, dtype=torch.float64), training, 1e-5)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            cases.append((dy, x, w, mean, invstd, training, 1e-5, mask))
            cases.append((*_grad(dy, x, w), mean, invstd, training, 1e-5, mask))
    return cases


def batch_norm_update_stats():
    return [
        (torch.randn(4), torch.rand(4), torch.randn(4), torch.rand(4) + 1, 0.1, None, 1e-5, 10),
        (torch.randn(4), torch.rand(4), torch.randn(4), torch.rand(4) + 1, None, torch.tensor(3), 1e-5, 3),
    ]


def batch_norm_stats():
    return [(torch.randn(6, 3, 4, 5),), (torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last),),
            (torch.randn(5, 4, dtype=torch.bfloat16),)]


def _act_inputs():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w, b = _channel_params(4, torch.float64)
    rm, rv = _running_stats(4, torch.float64)
    r = torch.randn_like(x)
    return x, w, b, rm, rv, r


def batch_norm_act_forward():
    x, w, b, rm, rv, r = _act_inputs()
    cases = [
        (x, w, b, None, None, True, 1e-5, "relu", r),
        (x, w, b, rm, rv, False, 1e-5, "silu", None),
        (x.to(memory_format=torch.channels_last), None, b, None, None, True, 1e-5, "silu", r),
        (x.float().to(torch.bfloat16), w.float(), b.float(), None, None, True, 1e-5, "relu", r.to(torch.bfloat16)),
        (x, w, b, None, None, True, 1e-5, None, r),
    ]
    with_grad = [(*_grad(c[0], c[1], c[2]), *c[3:8], *_grad(c[8])) for c in cases if c[0].dtype == torch.float64]
    return cases + with_grad


def batch_norm_act_backward():
    cases = []
    for x, w, b, rm, rv, training, eps, activation, r in batch_norm_act_forward()[:5]:
        _, mean, invstd = ops.batch_norm_act_forward(x, w, b, rm, rv, training, eps, activation, r)
        dy = torch.randn_like(x)
        for mask in ([True] * 4, [False, True, False, True]):
            cases.append((dy, x, r, w, b, mean, invstd, training, eps, activation, mask))
    return cases


def _composite_inputs():
    torch.manual_seed(0)
    x, r = _grad(torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6))
    w, b = _grad(*_channel_params(4))
    return x, r, w, b


def batch_norm():
    """The composite: forward, then the running statistics moved (momentum,
    or the cumulative average over num_batches_tracked)."""
    x, _, w, b = _composite_inputs()
    cases = []
    for training in (True, False):
        for momentum in (0.1, None):
            cases.append((x, *_running_stats(4), w, b, training, momentum, 1e-5, torch.tensor(3)))
        if training:  # eval needs the running statistics
            cases.append((x, None, None, w, b, training, 0.1, 1e-5, None))
    return cases


def batch_norm_act():
    x, r, w, b = _composite_inputs()
    return [(x, *_running_stats(4), w, b, training, momentum, 1e-5, "silu", r, torch.tensor(3))
            for training in (True, False) for momentum in (0.1, None)]


def _renorm_cases(bounds):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, b = _grad(*_channel_params(3))
    cases = [(x, *_running_stats(3), w, b, training, 0.1, 1e-3, *bounds) for training in (True, False)]
    return cases + [(x, None, None, w, b, True, 0.1, 1e-3, *bounds)]


def batch_renorm():
    return _renorm_cases((1.5, 0.5))


def batch_renorm_bounds_tensors():
    return _renorm_cases((torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)))


# --- LayerNorm and RMSNorm ---------------------------------------------------------


def _row_inputs():
    """(x, normalized_shape, weight, bias)."""
    x = torch.randn(4, 3, 8)
    w, b = torch.rand(3, 8) + 0.5, torch.randn(3, 8)
    return [
        (x, [8], w[0], b[0]),
        (*_grad(x), [3, 8], *_grad(w, b)),
        (torch.randn(5, 12)[:, ::2], [6], None, None),
        (torch.randn(2, 5, 16, dtype=torch.bfloat16), [16], torch.rand(16), None),
        (torch.randn(3, 7, dtype=torch.float64), [7], torch.rand(7, dtype=torch.float64), None),
    ]


def layer_norm_forward():
    return [(x, shape, w, b, 1e-5) for x, shape, w, b in _row_inputs()]


def layer_norm_backward():
    cases = []
    for x, shape, w, b in _row_inputs():
        x, w, b = (None if t is None else t.detach() for t in (x, w, b))
        _, mean, rstd = ops.layer_norm_forward(x, shape, w, b, 1e-5)
        dy = torch.randn_like(x, memory_format=torch.contiguous_format)
        for mask in ([True, True, True], [False, w is not None, b is not None]):
            cases.append((dy, x, shape, mean, rstd, w, b, 1e-5, mask))
    return cases


def rms_norm_forward():
    cases = [(x, shape, w, eps) for x, shape, w, _ in _row_inputs() for eps in (None, 1e-6)]
    return cases + [(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), [5], None, None)]


def rms_norm_backward():
    cases = []
    for x, shape, w, _ in _row_inputs():
        x, w = (None if t is None else t.detach() for t in (x, w))
        for eps in (None, 1e-6):
            _, rstd = ops.rms_norm_forward(x, shape, w, eps)
            dy = torch.randn_like(x, memory_format=torch.contiguous_format)
            cases.append((dy, x, shape, rstd, w, eps, [True, w is not None]))
    return cases


# --- GroupNorm, InstanceNorm, LayerNorm over channels ------------------------------


def _channel_inputs():
    """(x, weight, bias) in both memory formats, with gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5) * 2 + 0.5
    w, b = _channel_params(6)
    return [(*_grad(x), *_grad(w, b)), (*_grad(x.to(memory_format=torch.channels_last)), *_grad(w, b))]


def group_norm_forward():
    return [(x, 3, w, b, 1e-5, "silu") for x, w, b in _channel_inputs()]


def group_norm_backward():
    x, w, b = (t.detach() for t in _channel_inputs()[0])
    _, mean, rstd = ops.group_norm_forward(x, 3, w, b, 1e-5, "silu")
    return [(torch.randn_like(x), x, 3, mean, rstd, w, b, 1e-5, "silu", [True, True, True])]


def layer_norm_channels_forward():
    return [(x, w, b, 1e-6) for x, w, b in _channel_inputs()]


def layer_norm_channels_backward():
    x, w, b = (t.detach() for t in _channel_inputs()[0])
    _, mean, rstd = ops.layer_norm_channels_forward(x, w, b, 1e-6)
    return [(torch.randn_like(x), x, mean, rstd, w, b, 1e-6, [True, True, True])]


def instance_norm():
    x, w, b = _channel_inputs()[0]
    return [(x, None, None, w, b, True, 0.1, 1e-5), (x, *_running_stats(6), w, b, True, 0.1, 1e-5),
            (x, *_running_stats(6), w, b, False, 0.1, 1e-5)]


# --- Folding arithmetic ------------------------------------------------------------


def _fold_norm_args(C):
    return (*_running_stats(C), 1e-5, *_channel_params(C))


def fuse_conv_bn_weights():
    return [(torch.randn(4, 3, 3, 3), torch.randn(4), *_fold_norm_args(4), False, 1),
            (torch.randn(4, 3, 3, 3), None, *_fold_norm_args(6), True, 2)]


def fuse_bn_conv_weights():
    return [(torch.randn(4, 3, 3, 3), torch.randn(4), *_fold_norm_args(3), 1),
            (torch.randn(4, 3, 3, 3), torch.randn(4), *_running_stats(3), 1e-5, None, torch.randn(3), 1),
            (torch.randn(4, 2, 3, 3), None, *_fold_norm_args(4), 2)]


# The operators with a part per device (csrc/*_ops.h over cpu/*.cpp and
# cuda/*.cu); the composites and the weight folding are the same C++ on every device.
DEVICE_OPERATORS = [
    "batch_norm_forward", "batch_norm_backward", "batch_norm_act_forward", "batch_norm_act_backward",
    "batch_norm_update_stats", "batch_norm_stats", "layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
    "rms_norm_backward", "group_norm_forward", "group_norm_backward", "layer_norm_channels_forward",
    "layer_norm_channels_backward",
]


def operator_runner(library):
    """run(op, args) for check_samples: operator `op` of `library`
    (torch.ops.bn_ext, or the emulator's) on copies of the arguments."""

    def run(op, args):
        given = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        result = getattr(library, op)(*given)
        outputs = result if isinstance(result, tuple) else () if result is None else (result,)
        return [*outputs, *(a for a in given if isinstance(a, torch.Tensor) and a.is_floating_point())]

    return run


def check_samples(op, run, peer=None):
    """Every sample of device operator `op` through run(op, args) (its
    results: the outputs, then the floating arguments it updates in place,
    on the CPU) against the CPU operator on float64 copies. With a peer
    implementation, within conftest's error ratio of the peer's error; else
    within the dtype's table tolerance. Each result is a sum of terms no
    larger than the product of the two largest arguments' values."""
    reference = operator_runner(torch.ops.bn_ext)
    for k, args in enumerate(samples(op)):
        floating = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel()]
        largest = sorted(a.detach().double().abs().max().item() for a in floating)[-2:]
        magnitude = largest[0] * largest[-1] if len(largest) == 2 else largest[0]
        got, exact = run(op, args), reference(op, in_float64(args))
        peers = peer(op, args) if peer else got
        for i, (a, p, e) in enumerate(zip(got, peers, exact, strict=True)):
            what = f"{op} sample {k} [{i}]"
            assert a.shape == p.shape and a.dtype == p.dtype, f"{what}: {a.shape} {a.dtype} vs {p.shape} {p.dtype}"
            # Float64 results of a lower-precision input hold op-math sums.
            computed_in = op_math(floating[0].dtype) if a.dtype == torch.float64 else a.dtype
            if peer:
                assert_error_within(a, e, p, msg=what, dtype=computed_in, magnitude=magnitude)
            else:
                assert_close(a, e, computed_in, atol_scale=max(1.0, magnitude), msg=what)


def samples(op: str) -> list[tuple]:
    """The sample arguments of operator `op` ('name' or 'name.overload')."""
    make = globals().get(op.replace(".", "_"))
    if make is None or op.startswith("_") or op in ("registered_operators", "samples", "operator_runner", "check_samples"):
        raise LookupError(f"bn_ext::{op} has no samples in tests/op_samples.py")
    torch.manual_seed(0)
    return make()
