"""The CUDA operators on a real device, against the float64 reference (the
CPU operators in float64), with errors bounded by the CPU operators' and by
torch's CUDA kernels' on the same inputs. Skipped when no GPU is present;
tests/test_cuda_emulated.py runs the same kernels through the emulator on
every machine."""

import copy

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from bn_ext.bench import has_cuda_kernels
from conftest import DTYPES, assert_error_within, in_float64, op_math, param_dtype
from op_samples import DEVICE_OPERATORS, check_samples, operator_runner

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not has_cuda_kernels(), reason="CPU-only build of bn_ext"),
]

ops = torch.ops.bn_ext
aten = torch.ops.aten


def to(args, convert):
    return [convert(a) if isinstance(a, torch.Tensor) else a for a in args]


def check(op, *args, torch_results=None, what=""):
    """bn_ext's CUDA operator `op` on CUDA copies of args: every output's
    error against the float64 reference at most ERROR_RATIO times the CPU
    operator's and, where torch_results holds torch's CUDA kernel's outputs
    for the same computation (None for outputs torch has no match for), at
    most ERROR_RATIO times theirs. Returns the CUDA results."""
    got = getattr(ops, op)(*to(args, torch.Tensor.cuda))
    cpu = getattr(ops, op)(*args)
    exact = getattr(ops, op)(*in_float64(args))
    computed_in = op_math(args[0].dtype)
    for i, (g, c, e) in enumerate(zip(got, cpu, exact)):
        assert g.device.type == "cuda" and g.dtype == c.dtype and g.shape == c.shape, f"{op} {what}[{i}]"
        dtype = computed_in if g.dtype == torch.float64 else None
        assert_error_within(g.cpu(), e, c, msg=f"{op} {what}[{i}] against the CPU operator", dtype=dtype)
        if torch_results is not None and torch_results[i] is not None:
            assert_error_within(g.cpu(), e, torch_results[i].cpu(), msg=f"{op} {what}[{i}] against torch", dtype=dtype)
    return got


BN_SHAPES = [((32, 64, 28, 28), False), ((32, 64, 28, 28), True), ((256, 3, 7, 7), False), ((4096, 512), False),
             ((8, 30, 5, 7), True), ((2, 2, 3000, 3), False)]


def bn_case(shape, channels_last, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 2).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    p = param_dtype(dtype)
    w, b = (torch.randn(C, generator=g, dtype=torch.float64).to(p) for _ in range(2))
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(p)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(p)
    return x, dy, w, b, rm, rv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", BN_SHAPES)
def test_batch_norm_matches_the_cpu_op_and_torch(shape, channels_last, dtype):
    x, dy, w, b, rm, rv = bn_case(shape, channels_last, dtype)
    c = to([x, dy, w, b, rm, rv], torch.Tensor.cuda)
    for training in (True, False):
        theirs = aten.native_batch_norm(c[0], c[2], c[3], c[4].clone(), c[5].clone(), training, 0.0, 1e-5)
        got = check("batch_norm_forward", x, w, b, rm, rv, training, 1e-5, what=f"training={training}",
                    torch_results=theirs if training else (theirs[0], None, None))
        assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        mean, invstd = ops.batch_norm_forward(x, w, b, rm, rv, training, 1e-5)[1:]
        mask = [True, True, True]
        # torch's eval backward takes the running statistics, its training
        # backward the saved ones (the same mean and invstd as ours).
        theirs = aten.native_batch_norm_backward(c[1], c[0], c[2], c[4], c[5], mean.cuda(), invstd.cuda(), training,
                                                 1e-5, mask)
        check("batch_norm_backward", dy, x, w, mean, invstd, training, 1e-5, mask, torch_results=theirs,
              what=f"training={training}")
    check("batch_norm_stats", x, what="statistics")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("shape,channels_last", BN_SHAPES[:2] + BN_SHAPES[4:5])
def test_batch_norm_act_matches_the_cpu_op(shape, channels_last, dtype, activation):
    x, dy, w, b, rm, rv = bn_case(shape, channels_last, dtype, seed=5)
    residual = bn_case(shape, channels_last, dtype, seed=6)[0] - 2
    for training in (True, False):
        got = check("batch_norm_act_forward", x, w, b, rm, rv, training, 1e-5, activation, residual,
                    what=f"training={training}")
        assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        mean, invstd = ops.batch_norm_act_forward(x, w, b, rm, rv, training, 1e-5, activation, residual)[1:]
        check("batch_norm_act_backward", dy, x, residual, w, b, mean, invstd, training, 1e-5, activation, [True] * 4,
              what=f"training={training}")


# (shape, groups, channels_last): Stable Diffusion's 32 groups, InstanceNorm
# (a group per channel), one group, 7x7 planes, an odd channels-last width.
GN_SHAPES = [((2, 320, 32, 32), 32, False), ((2, 320, 32, 32), 32, True), ((8, 64, 28, 28), 64, False),
             ((16, 256, 7, 7), 1, True), ((4, 30, 5, 7), 5, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape,groups,channels_last", GN_SHAPES)
def test_group_norm_matches_the_cpu_op_and_torch(shape, groups, channels_last, activation, dtype):
    x, dy, w, b, _, _ = bn_case(shape, channels_last, dtype, seed=3)
    c = to([x, w, b], torch.Tensor.cuda)
    N, C = shape[:2]
    HxW = x.numel() // (N * C)
    theirs = aten.native_group_norm(c[0], c[1], c[2], N, C, HxW, groups, 1e-5) if activation is None else None
    got = check("group_norm_forward", x, groups, w, b, 1e-5, activation, torch_results=theirs, what="forward")
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _, mean, rstd = ops.group_norm_forward(x, groups, w, b, 1e-5, activation)
    mask = [True, True, True]
    check("group_norm_backward", dy, x, groups, mean, rstd, w, b, 1e-5, activation, mask, what="backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((8, 96, 28, 28), False), ((8, 96, 28, 28), True), ((4, 40, 33), False)])
def test_layer_norm_channels_matches_the_cpu_op(shape, channels_last, dtype):
    x, dy, w, b, _, _ = bn_case(shape, channels_last, dtype, seed=4)
    got = check("layer_norm_channels_forward", x, w, b, 1e-6, what="forward")
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _, mean, rstd = ops.layer_norm_channels_forward(x, w, b, 1e-6)
    check("layer_norm_channels_backward", dy, x, mean, rstd, w, b, 1e-6, [True, True, True], what="backward")


ROW_SHAPES = [(4096, 64), (1000, 768), (257, 1030), (64, 16384), (33, 30)]


def row_case(rows, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, D, generator=g, dtype=torch.float64) + 1).to(dtype)
    dy = torch.randn(rows, D, generator=g, dtype=torch.float64).to(dtype)
    p = param_dtype(dtype)
    w, b = (torch.randn(D, generator=g, dtype=torch.float64).to(p) for _ in range(2))
    return x, dy, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", ROW_SHAPES)
def test_row_norms_match_the_cpu_ops_and_torch(rows, D, dtype):
    x, dy, w, b = row_case(rows, D, dtype)
    cx, cdy, cw, cb = to([x, dy, w, b], torch.Tensor.cuda)
    theirs = aten.native_layer_norm(cx, [D], cw, cb, 1e-5)
    check("layer_norm_forward", x, [D], w, b, 1e-5, torch_results=theirs)
    _, mean, rstd = ops.layer_norm_forward(x, [D], w, b, 1e-5)
    mask = [True, True, True]
    theirs = aten.native_layer_norm_backward(cdy, cx, [D], mean.cuda(), rstd.cuda(), cw, cb, mask)
    check("layer_norm_backward", dy, x, [D], mean, rstd, w, b, 1e-5, mask, torch_results=theirs)
    # torch's RMSNorm through autograd: its fused kernel takes no mixed dtypes.
    cx, cw = cx.requires_grad_(), cw.requires_grad_()
    out = F.rms_norm(cx, [D], cw)
    check("rms_norm_forward", x, [D], w, None, torch_results=(out, None))
    rstd = ops.rms_norm_forward(x, [D], w, None)[1]
    theirs = torch.autograd.grad(out, (cx, cw), cdy)
    check("rms_norm_backward", dy, x, [D], rstd, w, None, [True, True], torch_results=theirs)


def every_op(x, dy, w, b, rows, drows, rw, rb):
    """Every CUDA operator once on these CUDA tensors: their outputs in order."""
    out, mean, invstd = ops.batch_norm_forward(x, w, b, None, None, True, 1e-5)
    results = [out, mean, invstd, *ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, [True] * 3)]
    results += ops.batch_norm_stats(x)
    ln, ln_mean, ln_rstd = ops.layer_norm_forward(rows, [rows.shape[-1]], rw, rb, 1e-5)
    results += [ln, ln_mean, ln_rstd,
                *ops.layer_norm_backward(drows, rows, [rows.shape[-1]], ln_mean, ln_rstd, rw, rb, 1e-5, [True] * 3)]
    rms, rms_rstd = ops.rms_norm_forward(rows, [rows.shape[-1]], rw, None)
    results += [rms, rms_rstd, *ops.rms_norm_backward(drows, rows, [rows.shape[-1]], rms_rstd, rw, None, [True] * 2)]
    return results


def repeat_inputs(dtype, channels_last):
    x, dy, w, b, _, _ = bn_case((32, 64, 28, 28), channels_last, dtype, seed=3)
    rows, drows, rw, rb = row_case(1000, 768, dtype, seed=4)
    return to([x, dy, w, b, rows, drows, rw, rb], torch.Tensor.cuda)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_are_bitwise_repeatable(dtype, channels_last):
    # Split reductions merge in a fixed order: no atomics decide the bits.
    inputs = repeat_inputs(dtype, channels_last)
    first, second = every_op(*inputs), every_op(*inputs)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs"


def test_a_second_stream_gives_the_same_bits():
    inputs = repeat_inputs(torch.float32, False)
    want = every_op(*inputs)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # A long kernel first on the side stream: work launched on the default
        # stream by mistake would read unfinished results.
        torch.cuda._sleep(10_000_000)
        got = every_op(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs on a second stream"


def test_modules_train_on_the_gpu_like_torch():
    torch.manual_seed(2)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.LayerNorm(16 * 30 * 30)).cuda()
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for _ in range(3):
        y_ref, y_ours = ref(x), ours(x)
        torch.testing.assert_close(y_ours, y_ref, atol=2e-5, rtol=2e-5)
        y_ref.square().mean().backward()
        y_ours.square().mean().backward()
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-5 * p_ref.grad.abs().max().item(), rtol=2e-5)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)


def test_running_statistics_with_cumulative_average():
    bn = bn_ext.nn.BatchNorm2d(5, momentum=None).cuda()
    ref = torch.nn.BatchNorm2d(5, momentum=None).cuda()
    for i in range(3):
        x = torch.randn(4, 5, 6, 6, device="cuda") * (i + 1)
        bn(x)
        ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_input_on_a_gpu_other_than_the_current_one():
    x = torch.randn(8, 4, 5, 5, device="cuda:1")
    with torch.cuda.device(0):
        out = bn_ext.batch_norm(x, None, None, training=True)
        rows = bn_ext.layer_norm(x, (5,))
        rms = bn_ext.rms_norm(x, (5,))
    assert out.device == x.device and rows.device == x.device and rms.device == x.device
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rows, F.layer_norm(x, (5,)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rms, F.rms_norm(x, (5,)), atol=2e-5, rtol=2e-5)


def test_torch_compile_on_the_gpu():
    x = torch.randn(16, 8, 4, 4, device="cuda")
    w, b = torch.rand(8, device="cuda"), torch.randn(8, device="cuda")
    compiled = torch.compile(lambda t: bn_ext.batch_norm(t, None, None, w, b, True), fullgraph=True)
    torch.testing.assert_close(compiled(x), F.batch_norm(x, None, None, w, b, True), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("op", DEVICE_OPERATORS)
def test_samples_against_the_cpu_operator(op):
    """Every sample of tests/op_samples.py on the GPU, within the error ratio
    of the CPU operator's (tests/test_cuda_emulated.py runs the same through
    the emulator)."""
    on_device = operator_runner(torch.ops.bn_ext)

    def run(op, args):
        moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        return [r.cpu() for r in on_device(op, moved)]

    check_samples(op, run, peer=operator_runner(torch.ops.bn_ext))
