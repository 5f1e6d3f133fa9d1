"""The CUDA operators' launchers and kernels (csrc/cuda), compiled for the CPU
against the emulator and run with CUDA semantics, compared with the CPU
operators. Every case runs under the forward, reverse and random thread
orders, so a missing barrier or a race between warps shows as a mismatch.

Shapes are small (the emulator runs every CUDA thread as a fiber) but chosen
to reach every path: vectorised and scalar accesses, split reductions (more
than one partial per channel or column), warp-per-row and block-per-row rows,
row heads and tails, misaligned tensors."""

import os
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from conftest import DTYPES, HALF_DTYPES, assert_close, assert_error_within, in_float64, op_math, param_dtype
from op_samples import DEVICE_OPERATORS, operator_runner, check_samples

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ["forward", "reverse", "random"]

pytestmark = pytest.mark.emulated

cpu_ops = torch.ops.bn_ext


def build_emulator():
    """The emulated operators, torch.ops.bn_ext_emulated.* (tests/emulator/
    emulated_library.cpp), built in build/emulated_ops and loaded: one object
    per op family, and only those whose files changed since the last build
    are compiled again. At -O1 unless BN_EXT_EMULATOR_OPTIMIZATION says
    otherwise (tests/mutants.py: -O0). Tensors above 1000 elements take the
    64-bit index kernels, so the test shapes cover both index types (the
    device build switches at 2^30)."""
    build = ROOT / "build" / "emulated_ops"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="bn_ext_emulated",
        sources=sorted(str(p) for p in (ROOT / "tests" / "emulator").glob("emulated_*.cpp")),
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "emulator")],
        extra_cflags=["-std=c++20", os.environ.get("BN_EXT_EMULATOR_OPTIMIZATION", "-O1"), "-fno-strict-aliasing",
                      "-Wno-unknown-pragmas", "-DBN_EXT_CUDA_EMULATOR", "-DBN_EXT_INDEX32_LIMIT=1000"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.bn_ext_emulated


@pytest.fixture(scope="module")
def emu():
    return build_emulator()


@pytest.fixture(params=ORDERS)
def order(request, emu):
    emu.set_order(request.param, seed=7)
    yield request.param
    emu.set_order("forward")


def misaligned(t):
    """A copy of the contiguous tensor t whose data starts one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def compare(emu, op, *args, what, magnitudes=None):
    """The emulated CUDA operator against the float64 reference (the CPU
    operator on float64 copies of the arguments): its error at most
    ERROR_RATIO times the CPU operator's on the same arguments, its strides
    the CPU operator's. magnitudes: {output index: largest term of the sum
    it cancels from}. Returns the CPU operator's results."""
    got = getattr(emu, op)(*args)
    want = getattr(cpu_ops, op)(*args)
    exact = getattr(cpu_ops, op)(*in_float64(args))
    # Float64 outputs of a float32 or half input (batch_norm_stats) hold
    # float32 op-math sums.
    computed_in = op_math(args[0].dtype)
    for i, (a, w, e) in enumerate(zip(got, want, exact)):
        assert a.shape == w.shape and a.dtype == w.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {w.shape} {w.dtype}"
        assert a.numel() <= 1 or a.stride() == w.stride(), f"{what}[{i}]: strides {a.stride()} vs {w.stride()}"
        assert_error_within(a, e, w, msg=f"{op} {what}[{i}]", dtype=computed_in if a.dtype == torch.float64 else None,
                            magnitude=(magnitudes or {}).get(i))
    return want


# --- BatchNorm ---------------------------------------------------------------

# (shape, channels_last, why)
BN_CASES = [
    ((4, 3, 5, 7), False, "S = 35: scalar channels-first path, few channels: split reductions"),
    ((4, 3, 4, 8), False, "S = 32: vectorised channels-first path, split reductions"),
    ((2, 20, 8, 8), False, "more channels than the target grid: one partial per channel"),
    ((3, 2, 50, 41), False, "S = 2050: several chunks per plane"),
    ((4, 3, 5, 7), True, "channels-last, C = 3: scalar channels-last path"),
    ((3, 16, 3, 5), True, "channels-last, C = 16: vectorised, split over rows"),
    ((70, 40), False, "(N, C): channels-last geometry, C % 8 == 0 and C % 4 == 0"),
    ((9, 6, 11), False, "(N, C, L) BatchNorm1d"),
    ((2, 72, 3, 3), True, "channels-last, C = 72: more than one column block of 32 * V"),
]


def bn_input(shape, channels_last, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last,why", BN_CASES)
def test_batch_norm_forward_training(emu, order, shape, channels_last, why, dtype):
    torch.manual_seed(0)
    x = bn_input(shape, channels_last, dtype)
    C = shape[1]
    w = torch.randn(C, dtype=param_dtype(dtype))
    b = torch.randn(C, dtype=param_dtype(dtype))
    out = compare(emu, "batch_norm_forward", x, w, b, None, None, True, 1e-5, what=why)[0]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,channels_last,why", BN_CASES[:2] + BN_CASES[4:6])
def test_batch_norm_forward_eval(emu, order, shape, channels_last, why, dtype, affine):
    torch.manual_seed(1)
    x = bn_input(shape, channels_last, dtype)
    C = shape[1]
    pdt = param_dtype(dtype)
    w, b = (torch.randn(C, dtype=pdt), torch.randn(C, dtype=pdt)) if affine else (None, None)
    rm, rv = torch.randn(C, dtype=pdt), torch.rand(C, dtype=pdt) + 0.5
    compare(emu, "batch_norm_forward", x, w, b, rm, rv, False, 1e-3, what=why)


# Every output mask, training and eval (eval: dx = w * invstd * dy, no reduction for dx).
MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, False, True], [False, True, False]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("shape,channels_last,why", BN_CASES[:2] + BN_CASES[4:7])
def test_batch_norm_backward(emu, order, shape, channels_last, why, dtype, training, mask):
    torch.manual_seed(2)
    x = bn_input(shape, channels_last, dtype)
    dy = bn_input(shape, channels_last, dtype) - 3
    C = shape[1]
    w = torch.randn(C, dtype=param_dtype(dtype))
    _, mean, invstd = cpu_ops.batch_norm_forward(x, w, None, None, None, True, 1e-5)
    compare(emu, "batch_norm_backward", dy, x, w, mean, invstd, training, 1e-5, mask, what=why)


def test_batch_norm_without_weight_and_misaligned(emu, order):
    torch.manual_seed(3)
    x = misaligned(bn_input((4, 3, 4, 8), False, torch.float32))
    dy = misaligned(torch.randn(4, 3, 4, 8))
    want = compare(emu, "batch_norm_forward", x, None, None, None, None, True, 1e-5, what="misaligned forward")
    compare(emu, "batch_norm_backward", dy, x, None, want[1], want[2], True, 1e-5, [True, True, True],
            what="misaligned backward")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 3, 3), (4, 3, 0)])
def test_batch_norm_empty_inputs(emu, shape):
    x = torch.randn(shape)
    C = shape[1]
    for training in (True, False):
        rm, rv = torch.zeros(C), torch.ones(C)
        want = compare(emu, "batch_norm_forward", x, None, None, rm, rv, training, 1e-5, what=f"empty {shape}")
        dy = torch.randn(shape)
        compare(emu, "batch_norm_backward", dy, x, None, want[1], want[2], training, 1e-5, [True, True, True],
                what=f"empty {shape} backward")


def test_batch_norm_large_mean(emu, order):
    # mean 1e4, std 1e-2: Welford keeps the variance where a sum of squares would not.
    torch.manual_seed(4)
    x = torch.randn(8, 3, 6, 6) * 1e-2 + 1e4
    compare(emu, "batch_norm_forward", x, None, None, None, None, True, 1e-5, what="mean 1e4, std 1e-2")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last,why", [BN_CASES[0], BN_CASES[5]])
def test_batch_norm_stats(emu, order, shape, channels_last, why, dtype):
    torch.manual_seed(5)
    x = bn_input(shape, channels_last, dtype)
    mean, m2 = compare(emu, "batch_norm_stats", x, what=why)
    assert mean.dtype == torch.float64 and m2.dtype == torch.float64


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_update_stats(emu, order, stat_dtype, momentum):
    torch.manual_seed(6)
    C = 5
    acc = torch.float64 if stat_dtype == torch.float64 else torch.float32
    save_mean, save_invstd = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
    start_mean, start_var = torch.randn(C, dtype=stat_dtype), torch.rand(C, dtype=stat_dtype) + 1
    batches = torch.tensor(3)
    emu_mean, emu_var = start_mean.clone(), start_var.clone()
    cpu_mean, cpu_var = start_mean.clone(), start_var.clone()
    emu.batch_norm_update_stats(emu_mean, emu_var, save_mean, save_invstd, momentum, batches, 1e-5, 40)
    cpu_ops.batch_norm_update_stats(cpu_mean, cpu_var, save_mean, save_invstd, momentum, batches, 1e-5, 40)
    assert not torch.equal(emu_mean, start_mean)
    assert_close(emu_mean, cpu_mean, stat_dtype)
    assert_close(emu_var, cpu_var, stat_dtype)


# --- BatchNorm + activation (+ residual) ---------------------------------------

BN_ACT_CASES = [BN_CASES[0], BN_CASES[1], BN_CASES[4], BN_CASES[5], BN_CASES[6]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "silu", None])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,channels_last,why", BN_ACT_CASES)
def test_batch_norm_act(emu, order, shape, channels_last, why, dtype, training, activation, with_residual):
    torch.manual_seed(30)
    x = bn_input(shape, channels_last, dtype)
    residual = bn_input(shape, channels_last, dtype) - 3 if with_residual else None
    dy = bn_input(shape, channels_last, dtype) - 3
    C = shape[1]
    pdt = param_dtype(dtype)
    w, b = torch.rand(C, dtype=pdt) + 0.5, torch.randn(C, dtype=pdt)
    rm, rv = torch.randn(C, dtype=pdt) + 3, torch.rand(C, dtype=pdt) + 3
    out, mean, invstd = compare(emu, "batch_norm_act_forward", x, w, b, rm, rv, training, 1e-5, activation, residual,
                                what=why)
    magnitudes = {1: 4 * (dy.double().abs().max() * 3).item(), 2: dy.double().abs().max().item()}
    compare(emu, "batch_norm_act_backward", dy, x, residual, w, b, mean, invstd, training, 1e-5, activation,
            [True] * 4, what=why, magnitudes=magnitudes)
    if with_residual:
        # Without the residual's gradient no dz is stored: dx recomputes it from dy, x and the residual.
        compare(emu, "batch_norm_act_backward", dy, x, residual, w, b, mean, invstd, training, 1e-5, activation,
                [True, True, True, False], what=why + " (dz not stored)", magnitudes=magnitudes)


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, True, False], [False, False, False, True]],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_batch_norm_act_masks_and_misaligned(emu, order, mask, activation):
    torch.manual_seed(31)
    x = misaligned(bn_input((4, 3, 4, 8), False, torch.float32))
    residual = misaligned(torch.randn(4, 3, 4, 8))
    dy = misaligned(torch.randn(4, 3, 4, 8))
    want = compare(emu, "batch_norm_act_forward", x, None, None, None, None, True, 1e-5, activation, residual,
                   what="misaligned forward")
    compare(emu, "batch_norm_act_backward", dy, x, residual, None, None, want[1], want[2], True, 1e-5, activation,
            mask, what="misaligned backward")


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act_relu_gradient_passes_at_nan(emu, order, channels_last):
    # torch.relu's gradient is zero where its output is <= 0 and passes
    # elsewhere, NaN included: the CPU operator's rule (tests/test_edge_cases.py).
    torch.manual_seed(32)
    x = bn_input((4, 3, 4, 8), channels_last, torch.float32)
    x[1, 0, 2, 3] = float("nan")
    w, b, dy = torch.randn(3), torch.randn(3), bn_input((4, 3, 4, 8), channels_last, torch.float32)
    want = compare(emu, "batch_norm_act_forward", x, w, b, None, None, True, 1e-5, "relu", None, what="NaN forward")
    got = compare(emu, "batch_norm_act_backward", dy, x, None, w, b, want[1], want[2], True, 1e-5, "relu",
                  [True, True, True, False], what="NaN backward")
    assert got[2][0] == pytest.approx(dy[:, 0].double().sum().item(), rel=1e-5)


# --- LayerNorm and RMSNorm -----------------------------------------------------

# (rows, D, why)
ROW_CASES = [
    (5, 1, "one value per row"),
    (9, 30, "rows not a multiple of the vector width: per-row heads and tails"),
    (6, 64, "aligned rows, warp per row"),
    (70, 64, "more rows than a parameter-gradient block: split column partials"),
    (4, 1000, "warp per row, long"),
    (3, 1030, "block per row, not a multiple of the vector width"),
    (2, 4096, "block per row, aligned"),
]


def row_input(rows, D, dtype, offset=False):
    x = (torch.randn(rows, D, dtype=torch.float64) * 2 + 1).to(dtype)
    return misaligned(x) if offset else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D,why", ROW_CASES)
def test_layer_norm_forward(emu, order, rows, D, why, dtype):
    torch.manual_seed(10)
    x = row_input(rows, D, dtype)
    w, b = torch.randn(D, dtype=param_dtype(dtype)), torch.randn(D, dtype=param_dtype(dtype))
    compare(emu, "layer_norm_forward", x, [D], w, b, 1e-5, what=why)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("rows,D,why", ROW_CASES)
def test_layer_norm_backward(emu, order, rows, D, why, dtype, mask):
    torch.manual_seed(11)
    x, dy = row_input(rows, D, dtype), row_input(rows, D, dtype)
    w, b = torch.randn(D, dtype=param_dtype(dtype)), torch.randn(D, dtype=param_dtype(dtype))
    _, mean, rstd = cpu_ops.layer_norm_forward(x, [D], w, b, 1e-5)
    compare(emu, "layer_norm_backward", dy, x, [D], mean, rstd, w, b, 1e-5, mask, what=why)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D,why", ROW_CASES)
def test_rms_norm_forward_backward(emu, order, rows, D, why, dtype):
    torch.manual_seed(12)
    x, dy = row_input(rows, D, dtype), row_input(rows, D, dtype)
    w = torch.randn(D, dtype=param_dtype(dtype))
    want = compare(emu, "rms_norm_forward", x, [D], w, None, what=why)
    rstd = want[1]
    # grad_weight sums dy * x * rstd over rows; with one value per row those
    # terms are about +-dy and cancel to a result 1000 times smaller.
    terms = (dy.double() * x.double() * rstd.double()).abs().max().item()
    for mask in ([True, True], [True, False], [False, True]):
        compare(emu, "rms_norm_backward", dy, x, [D], rstd, w, None, mask, what=f"{why}, mask {mask}",
                magnitudes={1: terms})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,D", [(9, 30), (3, 1030)])
def test_row_norms_misaligned_and_without_params(emu, order, rows, D, dtype):
    # A tensor one element past a 16-byte boundary: the scalar row walk.
    torch.manual_seed(13)
    x, dy = row_input(rows, D, dtype, offset=True), row_input(rows, D, dtype, offset=True)
    want = compare(emu, "layer_norm_forward", x, [D], None, None, 1e-5, what="layer_norm misaligned")
    compare(emu, "layer_norm_backward", dy, x, [D], want[1], want[2], None, None, 1e-5, [True, False, False],
            what="layer_norm_backward misaligned")
    compare(emu, "rms_norm_forward", x, [D], None, 1e-6, what="rms_norm misaligned")


def test_layer_norm_multi_dim_and_large_mean(emu, order):
    torch.manual_seed(14)
    x = torch.randn(3, 4, 5, 6) * 1e-2 + 1e4
    w, b = torch.randn(5, 6), torch.randn(5, 6)
    want = compare(emu, "layer_norm_forward", x, [5, 6], w, b, 1e-5, what="multi-dim normalized_shape, mean 1e4")
    assert want[1].shape == (3, 4, 1, 1)


def test_every_case_uses_half_parameters_too(emu, order):
    # Parameters in the input's half dtype (not float32) beside a half input.
    torch.manual_seed(15)
    for dtype in HALF_DTYPES:
        x = bn_input((4, 3, 4, 8), False, dtype)
        w, b = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
        compare(emu, "batch_norm_forward", x, w, b, None, None, True, 1e-5, what="half params")
        y = row_input(6, 64, dtype)
        w, b = torch.randn(64, dtype=dtype), torch.randn(64, dtype=dtype)
        compare(emu, "layer_norm_forward", y, [64], w, b, 1e-5, what="half params")


def test_errors_match_the_cpu_ops(emu):
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        emu.batch_norm_forward(x, torch.ones(4), None, None, None, True, 1e-5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        emu.batch_norm_forward(torch.randn(1, 3), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="expected input with shape"):
        emu.layer_norm_forward(x, [3], None, None, 1e-5)


def test_results_are_bitwise_repeatable_across_thread_orders(emu):
    # Two-stage reductions merge in a fixed order, whatever order threads run in.
    torch.manual_seed(16)
    x, dy = bn_input((4, 3, 4, 8), False, torch.float32), torch.randn(4, 3, 4, 8)
    rows, drows = row_input(70, 64, torch.float32), row_input(70, 64, torch.float32)
    results = []
    for order in ORDERS:
        emu.set_order(order, seed=3)
        out, mean, invstd = emu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
        grads = emu.batch_norm_backward(dy, x, None, mean, invstd, True, 1e-5, [True, True, True])
        ln = emu.layer_norm_forward(rows, [64], None, None, 1e-5)
        ln_grads = emu.layer_norm_backward(drows, rows, [64], ln[1], ln[2], None, None, 1e-5, [True, True, True])
        results.append([out, mean, invstd, *grads, *ln, *ln_grads])
    emu.set_order("forward")
    assert emu.sm_count() == 4  # few SMs: these shapes split their reductions
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- GroupNorm, InstanceNorm and LayerNorm over channels -----------------------

# (shape, groups, channels_last, why)
GN_CASES = [
    ((4, 6, 5, 7), 3, False, "S = 35: scalar channels-first path, two channels a group"),
    ((2, 8, 4, 8), 4, False, "S = 32: vectorised channels-first path"),
    ((3, 12, 3, 5), 4, True, "channels-last, C = 12: vectorised for float32, scalar for half types"),
    ((2, 32, 3, 3), 8, True, "channels-last, C = 32, four channels a group"),
    ((2, 6, 7), 6, False, "InstanceNorm of a 1-D input: one channel a group"),
    ((3, 4), 2, False, "(N, C): one value a channel"),
    ((2, 72, 2, 3), 1, True, "one group of 72 channels: more than one column block, a long group merge"),
]
ACTIVATIONS = [None, "relu", "silu"]


def gn_params(C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype(dtype)
    return torch.rand(C, generator=g).to(pdt) + 0.5, torch.randn(C, generator=g).to(pdt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,channels_last,why", GN_CASES)
def test_group_norm_forward(emu, order, shape, groups, channels_last, why, dtype, activation):
    torch.manual_seed(20)
    x = bn_input(shape, channels_last, dtype)
    w, b = gn_params(shape[1], dtype)
    out = compare(emu, "group_norm_forward", x, groups, w, b, 1e-5, activation, what=why)[0]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,channels_last,why", GN_CASES)
def test_group_norm_backward(emu, order, shape, groups, channels_last, why, dtype, activation):
    torch.manual_seed(21)
    x = bn_input(shape, channels_last, dtype)
    dy = bn_input(shape, channels_last, dtype) - 3
    w, b = gn_params(shape[1], dtype)
    _, mean, rstd = cpu_ops.group_norm_forward(x, groups, w, b, 1e-5, activation)
    # The parameter gradients sum dy * x_hat over N * S terms that cancel.
    magnitudes = {1: 4 * (dy.double().abs().max() * 3).item(), 2: dy.double().abs().max().item()}
    compare(emu, "group_norm_backward", dy, x, groups, mean, rstd, w, b, 1e-5, activation, [True, True, True],
            what=why, magnitudes=magnitudes)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("shape,groups,channels_last,why", [GN_CASES[0], GN_CASES[3]])
def test_group_norm_backward_masks_without_params(emu, order, shape, groups, channels_last, why, mask):
    torch.manual_seed(22)
    x = bn_input(shape, channels_last, torch.float32)
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _, mean, rstd = cpu_ops.group_norm_forward(x, groups, None, None, 1e-5, None)
    compare(emu, "group_norm_backward", dy, x, groups, mean, rstd, None, None, 1e-5, None, mask, what=why)


def test_group_norm_large_mean_and_misaligned(emu, order):
    torch.manual_seed(23)
    for channels_last in (False, True):
        x = bn_input((2, 8, 4, 4), channels_last, torch.float32) * 1e-2 + 1e4
        compare(emu, "group_norm_forward", x, 2, None, None, 1e-5, None, what=f"mean 1e4 cl={channels_last}")
    x = misaligned(bn_input((2, 8, 4, 8), False, torch.float32))
    dy = misaligned(torch.randn(2, 8, 4, 8))
    want = compare(emu, "group_norm_forward", x, 4, None, None, 1e-5, "silu", what="misaligned forward")
    compare(emu, "group_norm_backward", dy, x, 4, want[1], want[2], None, None, 1e-5, "silu", [True, True, True],
            what="misaligned backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((2, 6, 3, 5), False), ((2, 8, 3, 3), True), ((3, 5, 7), False)])
def test_layer_norm_channels(emu, order, shape, channels_last, dtype):
    torch.manual_seed(24)
    x = bn_input(shape, channels_last, dtype)
    dy = bn_input(shape, channels_last, dtype) - 3
    w, b = gn_params(shape[1], dtype)
    out, mean, rstd = compare(emu, "layer_norm_channels_forward", x, w, b, 1e-6, what=f"{shape}")
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    compare(emu, "layer_norm_channels_backward", dy, x, mean, rstd, w, b, 1e-6, [True, True, True], what=f"{shape}",
            magnitudes={1: 4 * (dy.double().abs().max() * 3).item(), 2: dy.double().abs().max().item()})


def test_group_norm_errors_match_the_cpu_ops(emu):
    x = torch.randn(2, 6, 3)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        emu.group_norm_forward(x, 4, None, None, 1e-5, None)
    with pytest.raises(ValueError, match="activation must be"):
        emu.group_norm_forward(x, 2, None, None, 1e-5, "gelu")


def test_group_norm_bitwise_repeatable_across_thread_orders(emu):
    torch.manual_seed(25)
    inputs = [(bn_input((2, 32, 3, 3), cl, torch.float32), bn_input((2, 32, 3, 3), cl, torch.float32) - 3)
              for cl in (False, True)]
    results = []
    for order in ORDERS:
        emu.set_order(order, seed=3)
        row = []
        for x, dy in inputs:
            out, mean, rstd = emu.group_norm_forward(x, 8, None, None, 1e-5, "silu")
            row += [out, mean, rstd, *emu.group_norm_backward(dy, x, 8, mean, rstd, None, None, 1e-5, "silu",
                                                               [True, True, True])]
        results.append(row)
    emu.set_order("forward")
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- Every device operator over the sample table ------------------------------


def test_the_emulator_binds_every_device_operator(emu):
    names = {n.removeprefix("bn_ext_emulated::") for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("bn_ext_emulated::")}
    assert names - {"set_order", "sm_count"} == set(DEVICE_OPERATORS)


@pytest.mark.parametrize("op", DEVICE_OPERATORS)
def test_samples_against_the_cpu_operator(emu, op):
    """Every sample of tests/op_samples.py through the emulated CUDA operator,
    within the error ratio of the CPU operator's."""
    check_samples(op, operator_runner(emu), peer=operator_runner(cpu_ops))
