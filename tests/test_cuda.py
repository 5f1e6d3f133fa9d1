"""The CUDA operators on a real device, against the CPU operators and torch.
Skipped when no GPU is present; tests/test_cuda_emulated.py runs the same
kernels through the emulator on every machine."""

import copy

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from bn_ext.bench import has_cuda_kernels
from conftest import DTYPES, assert_close, param_dtype

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not has_cuda_kernels(), reason="CPU-only build of bn_ext"),
]

ops = torch.ops.bn_ext
# The device's rsqrt and contracted multiply-adds differ from the CPU's in the
# last bits: compare within a few times the dtype's tolerance.
SCALE = 4.0


def check(actual, expected, dtype, scale=SCALE):
    for a, e in zip(actual, expected):
        assert a.device.type == "cuda" and a.dtype == e.dtype and a.shape == e.shape
        assert_close(a.cpu(), e, dtype, scale=scale * max(1.0, e.double().abs().max().item() if e.numel() else 1.0))


BN_SHAPES = [((32, 64, 28, 28), False), ((32, 64, 28, 28), True), ((256, 3, 7, 7), False), ((4096, 512), False),
             ((8, 30, 5, 7), True), ((2, 2, 3000, 3), False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", BN_SHAPES)
def test_batch_norm_matches_the_cpu_op(shape, channels_last, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) + 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, dtype=param_dtype(dtype)), torch.randn(C, dtype=param_dtype(dtype))
    dy = torch.randn_like(x)
    cuda = lambda t: t.cuda()  # noqa: E731
    for training in (True, False):
        rm, rv = torch.randn(C, dtype=param_dtype(dtype)), torch.rand(C, dtype=param_dtype(dtype)) + 0.5
        want = ops.batch_norm_forward(x, w, b, rm, rv, training, 1e-5)
        got = ops.batch_norm_forward(cuda(x), cuda(w), cuda(b), cuda(rm), cuda(rv), training, 1e-5)
        check(got, want, dtype)
        assert got[0].is_contiguous(memory_format=x.suggest_memory_format())
        mask = [True, True, True]
        want_g = ops.batch_norm_backward(dy, x, w, want[1], want[2], training, 1e-5, mask)
        got_g = ops.batch_norm_backward(cuda(dy), cuda(x), cuda(w), cuda(want[1]), cuda(want[2]), training, 1e-5, mask)
        check(got_g, want_g, dtype)
    check(ops.batch_norm_stats(cuda(x)), ops.batch_norm_stats(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", [(4096, 64), (1000, 768), (257, 1030), (64, 16384), (33, 30)])
def test_row_norms_match_the_cpu_ops(rows, D, dtype):
    torch.manual_seed(1)
    x = (torch.randn(rows, D, dtype=torch.float64) + 1).to(dtype)
    dy = torch.randn_like(x)
    w, b = torch.randn(D, dtype=param_dtype(dtype)), torch.randn(D, dtype=param_dtype(dtype))
    want = ops.layer_norm_forward(x, [D], w, b, 1e-5)
    check(ops.layer_norm_forward(x.cuda(), [D], w.cuda(), b.cuda(), 1e-5), want, dtype)
    mask = [True, True, True]
    check(ops.layer_norm_backward(dy.cuda(), x.cuda(), [D], want[1].cuda(), want[2].cuda(), w.cuda(), b.cuda(), 1e-5,
                                  mask),
          ops.layer_norm_backward(dy, x, [D], want[1], want[2], w, b, 1e-5, mask), dtype)
    want = ops.rms_norm_forward(x, [D], w, None)
    check(ops.rms_norm_forward(x.cuda(), [D], w.cuda(), None), want, dtype)
    check(ops.rms_norm_backward(dy.cuda(), x.cuda(), [D], want[1].cuda(), w.cuda(), None, [True, True]),
          ops.rms_norm_backward(dy, x, [D], want[1], w, None, [True, True]), dtype)


def test_modules_train_on_the_gpu_like_torch():
    torch.manual_seed(2)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.LayerNorm(16 * 30 * 30)).cuda()
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for _ in range(3):
        y_ref, y_ours = ref(x), ours(x)
        torch.testing.assert_close(y_ours, y_ref, atol=1e-4, rtol=1e-4)
        y_ref.square().mean().backward()
        y_ours.square().mean().backward()
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-4, rtol=1e-3)
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
    assert out.device == x.device and rows.device == x.device
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, F.layer_norm(x, (5,)), atol=1e-5, rtol=1e-5)


def test_torch_compile_on_the_gpu():
    x = torch.randn(16, 8, 4, 4, device="cuda")
    w, b = torch.rand(8, device="cuda"), torch.randn(8, device="cuda")
    compiled = torch.compile(lambda t: bn_ext.batch_norm(t, None, None, w, b, True), fullgraph=True)
    torch.testing.assert_close(compiled(x), F.batch_norm(x, None, None, w, b, True), atol=1e-5, rtol=1e-5)
