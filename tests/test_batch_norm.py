"""BatchNorm on the CPU against torch.nn.functional.batch_norm in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import DTYPES, TOLERANCE, assert_close, assert_error_within, last_level_cache_bytes, param_dtype

# Shapes: C=1 and C not a multiple of any vector width; H·W=1; 2-D, 3-D and 5-D
# inputs; a reduction long enough to be split into several stripes per channel.
SHAPES = [
    (2, 1),
    (16, 3),
    (5, 7, 1),
    (4, 3, 17),
    (2, 1, 5, 5),
    (3, 5, 1, 1),
    (4, 3, 7, 9),
    (2, 19, 3, 5),
    (2, 3, 3, 4, 5),
    (24, 2, 40, 40),
]

# Memory layouts: dense default, channels-last (4-D/5-D only) and a strided
# view (every other element of the last dim), which must be read correctly.
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Channels-last rows wider than the kernels' row-order walk (512 columns),
# which they sum down the columns instead: 4 KB rows at float32 (C1024) and
# bfloat16 (C2048), taken a cache line at a time at AVX2, and a width that
# is not (C1056), over several 16-row tiles.
WIDE_CHANNELS_LAST = [(4, 1024, 5, 5), (4, 2048, 3, 3), (3, 1056, 4, 4)]
SHAPE_LAYOUTS = [
    pytest.param(shape, layout, id=f"{shape}-{layout}")
    for shape in SHAPES
    for layout in LAYOUTS
    if layout != "channels_last" or len(shape) in (4, 5)
] + [pytest.param(shape, "channels_last", id=f"{shape}-channels_last") for shape in WIDE_CHANNELS_LAST]


def make_input(shape, dtype, layout, mean=0.5, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        full = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
        x = (full * std + mean).to(dtype)[..., ::2]
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_params(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = param_dtype(dtype)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(p)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(p)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(p)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(p)
    return weight, bias, running_mean, running_var


def f64(t):
    return None if t is None else t.detach().double()


def expected_memory_format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_and_running_stats(shape, dtype, layout, training, affine):
    x = make_input(shape, dtype, layout)
    x_before = x.clone()
    weight, bias, rm, rv = make_params(shape[1], dtype)
    if not affine:
        weight = bias = None
    rm_ref, rv_ref = f64(rm), f64(rv)
    expected = F.batch_norm(f64(x), rm_ref, rv_ref, f64(weight), f64(bias), training, 0.1, 1e-5)
    out = bn_ext.batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=expected_memory_format(x))
    assert_close(out, expected, dtype)
    torch.testing.assert_close(rm.double(), rm_ref, atol=TOLERANCE[param_dtype(dtype)][0], rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv_ref, atol=TOLERANCE[param_dtype(dtype)][0], rtol=1e-5)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients(shape, dtype, layout, training):
    x = make_input(shape, dtype, layout).requires_grad_()
    weight, bias, rm, rv = make_params(shape[1], dtype)
    weight.requires_grad_()
    bias.requires_grad_()
    dy = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=7)
    out = bn_ext.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training)
    gx, gw, gb = torch.autograd.grad(out, (x, weight, bias), dy)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.batch_norm(x64, f64(rm), f64(rv), w64, b64, training)
    expected = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    # torch's kernel on the same rounded inputs: its error sets the bar.
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    peer = torch.autograd.grad(F.batch_norm(xt, rm.clone(), rv.clone(), wt, bt, training), (xt, wt, bt), dy)
    assert gx.dtype == dtype and gw.dtype == weight.dtype and gb.dtype == bias.dtype
    # The parameter gradients are sums of dy * x_hat and of dy that cancel:
    # no float32 sum is more exact than a rounding of its largest term.
    reduced = [d for d in range(x.dim()) if d != 1]
    if training:
        var, mean = torch.var_mean(x64.detach(), reduced, unbiased=False, keepdim=True)
    else:
        mean, var = (f64(t).view(1, -1, *[1] * (x.dim() - 2)) for t in (rm, rv))
    x_hat = (x64.detach() - mean) / (var + 1e-5).sqrt()
    terms = [None, (dy.double() * x_hat).abs().max(), dy.double().abs().max()]
    for name, g, e, t, m in zip(("grad_input", "grad_weight", "grad_bias"), (gx, gw, gb), expected, peer, terms):
        assert_error_within(g, e, t, msg=name, magnitude=m)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_output_mask(mask, training):
    x = make_input((4, 3, 5, 5), torch.float32, "contiguous")
    weight, _, rm, rv = make_params(3, torch.float32)
    dy = make_input((4, 3, 5, 5), torch.float32, "contiguous", seed=3)
    _, mean, invstd = torch.ops.bn_ext.batch_norm_forward(x, weight, None, rm, rv, training, 1e-5)
    full = torch.ops.bn_ext.batch_norm_backward(dy, x, weight, mean, invstd, training, 1e-5, [True] * 3)
    part = torch.ops.bn_ext.batch_norm_backward(dy, x, weight, mean, invstd, training, 1e-5, list(mask))
    for asked, f, p in zip(mask, full, part):
        if asked:
            torch.testing.assert_close(p, f, rtol=0, atol=0)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4), (2, 3, 3, 2)], ids=str)
def test_double_backward(training, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_half_input_with_half_params():
    x = make_input((4, 6, 5, 5), torch.float16, "contiguous")
    w, b, rm, rv = (t.half() for t in make_params(6, torch.float32))
    rm_ref, rv_ref = f64(rm), f64(rv)
    out = bn_ext.batch_norm(x, rm, rv, w, b, training=True)
    expected = F.batch_norm(f64(x), rm_ref, rv_ref, f64(w), f64(b), True)
    assert_close(out, expected, torch.float16)
    assert rm.dtype == torch.float16
    assert_close(rv, rv_ref, torch.float16)


@pytest.mark.level_independent
def test_momentum_none_cumulative_average_in_module():
    torch.manual_seed(0)
    ours = bn_ext.nn.BatchNorm2d(3, momentum=None)
    ref = torch.nn.BatchNorm2d(3, momentum=None)
    for step in range(4):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_module_matches_torch_train_and_eval(cls, track):
    shape = {"BatchNorm1d": (6, 4, 5), "BatchNorm2d": (3, 4, 5, 6), "BatchNorm3d": (2, 4, 3, 4, 5)}[cls]
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls)(4, track_running_stats=track)
    ours = getattr(bn_ext.nn, cls)(4, track_running_stats=track)
    ours.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    ref.eval()
    ours.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x))
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.level_independent
def test_state_dict_round_trip_and_repr():
    ref = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True)
    with torch.no_grad():
        ref.weight.uniform_()
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
        ref.num_batches_tracked.fill_(7)
    ours = bn_ext.nn.BatchNorm2d(5, eps=1e-3, momentum=0.2)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(ours) == repr(ref)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(5)) and ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert torch.equal(ours.weight.detach(), torch.ones(5))
    assert isinstance(ours, torch.nn.BatchNorm2d)


@pytest.mark.level_independent
def test_module_dtype_and_device_arguments():
    m = bn_ext.nn.BatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    m = bn_ext.nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert m.weight is None and m.running_mean is None
    out = m.eval()(torch.randn(8, 3) * 3 + 2)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.level_independent
def test_convert_and_revert_keep_state_and_mode():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6),
    )
    model[5].eval()
    ref = copy.deepcopy(model)
    weight = model[1].weight
    bn_ext.nn.convert(model)
    assert type(model[1]) is bn_ext.nn.BatchNorm2d and type(model[5]) is bn_ext.nn.BatchNorm1d
    assert type(model[0]) is torch.nn.Conv2d and model[1].weight is weight
    assert model[1].training and not model[5].training
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(model(x), ref(x))
    bn_ext.nn.revert(model)
    assert type(model[1]) is torch.nn.BatchNorm2d and type(model[5]) is torch.nn.BatchNorm1d
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


# Shapes whose work split changes with the thread count, against one thread:
# channels-first with two stripes per channel (unfused passes); channels-first
# whose fused passes take channel blocks sized by the thread count (96
# channels: 24 a block at one thread, 12 at two, 8 at three); channels-last
# with several row stripes; channels-last with a partial column strip.
@pytest.mark.parametrize("num_threads", [2, 3])
@pytest.mark.parametrize(
    "shape,layout",
    [((32, 3, 64, 64), "contiguous"), ((8, 96, 7, 7), "contiguous"), ((16, 3, 64, 64), "channels_last"),
     ((64, 100, 5, 5), "channels_last")],
    ids=["stripes", "channel-blocks", "channels-last-stripes", "channels-last-partial-strip"],
)
def test_results_do_not_depend_on_thread_count(threads, num_threads, shape, layout):
    x = make_input(shape, torch.float32, layout).requires_grad_()
    w, b, rm, rv = make_params(shape[1], torch.float32)
    dy = make_input(shape, torch.float32, layout, seed=5)

    def run():
        out = bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
        return (out, *torch.autograd.grad(out, x, dy))

    torch.set_num_threads(1)
    base = run()
    torch.set_num_threads(num_threads)
    for a, b_ in zip(run(), base):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_small_std_no_worse_than_torch(layout):
    x = make_input((8, 4, 32, 32), torch.float64, layout, mean=1e4, std=1e-2).float()
    exact = F.batch_norm(x.double(), None, None, training=True)
    ours = bn_ext.batch_norm(x, None, None, training=True)
    theirs = F.batch_norm(x, None, None, training=True)
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (theirs.double() - exact).abs().max().item()
    assert err_ours <= max(err_torch, 1e-4), (err_ours, err_torch)
    # Running variance of such data (1e-4) must be right too.
    rm, rv = torch.zeros(4), torch.ones(4)
    bn_ext.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact_var = x.double().var([0, 2, 3])
    torch.testing.assert_close(rv.double(), exact_var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_means_folded_and_centered_in_one_pass(layout, training):
    # Means within 8 standard deviations of zero fold into the shift; the
    # others stay the center. Channels on both sides, and at the edge, in one
    # pass: each must be as exact as torch's, which folds every mean.
    C = 6
    deviations = torch.tensor([0.0, 7.9, 8.1, -300.0, 1e4, -2.0], dtype=torch.float64)
    std = 0.05
    x = make_input((8, C, 16, 16), torch.float64, layout, mean=0.0, std=1.0)
    x = (x * std + deviations.view(1, C, 1, 1) * std).float()
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = (deviations * std).float(), torch.full((C,), std**2).float()
    if training:
        rm_t = rv_t = None
    else:
        rm_t, rv_t = rm, rv
    exact = F.batch_norm(x.double(), f64(rm_t), f64(rv_t), w.double(), b.double(), training)
    ours = bn_ext.batch_norm(x, rm_t, rv_t, w, b, training)
    theirs = F.batch_norm(x, rm_t, rv_t, w, b, training)
    assert_error_within(ours, exact, theirs, msg="output", magnitude=exact.abs().max())
    dy = make_input((8, C, 16, 16), torch.float32, layout, mean=0.0, std=1.0, seed=3)
    xs = [t.clone().requires_grad_() for t in (x, x.double())]
    grads = [torch.autograd.grad(fn(t), t, dy.to(t.dtype))[0] for fn, t in
             ((lambda t: bn_ext.batch_norm(t, rm_t, rv_t, w, b, training), xs[0]),
              (lambda t: F.batch_norm(t, f64(rm_t), f64(rv_t), w.double(), b.double(), training), xs[1]))]
    xt = x.clone().requires_grad_()
    peer = torch.autograd.grad(F.batch_norm(xt, rm_t, rv_t, w, b, training), xt, dy)[0]
    assert_error_within(grads[0], grads[1], peer, msg="grad_input", magnitude=grads[1].abs().max())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_larger_than_the_last_level_cache(layout, dtype):
    # Passes whose output is at least the last-level cache's size write it
    # with streaming stores (kernel_utils.h); the values are the same. An
    # output of 1.5 times the cache (at most 192 MB) takes that path.
    nbytes = min(int(1.5 * last_level_cache_bytes()), 192 << 20)
    C, S = 64, 96
    N = -(-nbytes // (C * S * S * dtype.itemsize))
    x = make_input((N, C, S, S), dtype, layout, mean=0.5, std=2.0)
    w, b, rm, rv = make_params(C, dtype)
    out_eval = bn_ext.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(out_eval, F.batch_norm(f64(x), f64(rm), f64(rv), f64(w), f64(b), False), dtype)
    del out_eval
    xg = x.clone().requires_grad_()
    out = bn_ext.batch_norm(xg, None, None, w, b, training=True)
    dy = make_input((N, C, S, S), dtype, layout, mean=0.0, std=1.0, seed=7)
    (gx,) = torch.autograd.grad(out, xg, dy)
    x64 = f64(x).requires_grad_()
    ref = F.batch_norm(x64, None, None, f64(w), f64(b), True)
    assert_close(out, ref, dtype)
    (gx64,) = torch.autograd.grad(ref, x64, f64(dy))
    assert_close(gx, gx64, dtype)


@pytest.mark.parametrize("path", ["fused forward", "statistics", "channels_last"])
def test_statistics_exact_when_chunks_start_with_outliers(path):
    # The kernels shift each cache chunk (4,096 values) by the mean of its
    # first 16 values and sum d and d^2 in one pass. Outliers there put the
    # shift 16 standard deviations from the mean: the one-pass M2 would lose
    # 8 bits (measured: variance off by 8e-6 channels-first, 1e-2 channels-last,
    # outputs by 6e-5 and 1e-1), so such chunks must take a second pass.
    x = make_input((2, 3, 64, 64), torch.float64, "contiguous", mean=0.0, std=1e-3)
    x[:, :, 0, :16] = 1e3
    x = x.float()
    # Channels-last columns of three channels are summed by scalar loops, less
    # precisely (torch: variance 7e-5 off, outputs 5e-4).
    var_rtol, out_atol = (3e-6, 2e-5) if path != "channels_last" else (2e-4, 1e-3)
    if path == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    n = x.numel() // 3
    exact_mean = x.double().mean([0, 2, 3])
    exact_var = x.double().var([0, 2, 3], unbiased=False)
    if path == "statistics":
        mean, m2 = torch.ops.bn_ext.batch_norm_stats(x)
        var = m2 / n
    else:
        rm, rv = torch.zeros(3), torch.ones(3)
        out = bn_ext.batch_norm(x, rm, rv, training=True, momentum=1.0)
        mean, var = rm, rv * (n - 1) / n
        exact_out = F.batch_norm(x.double(), None, None, training=True)
        torch.testing.assert_close(out.double(), exact_out, rtol=0, atol=out_atol)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=0, atol=1e-6 * exact_var.sqrt().max().item())
    torch.testing.assert_close(var.double(), exact_var, rtol=var_rtol, atol=0)


def special_floats(n):
    """n float32 values that stress rounding to a half type: ties to even both
    ways, values just off a tie, denormals, the largest normals, infinities,
    NaN and zeros; random normals fill the rest."""
    bits = [
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bfloat16 ties (to even) and near-ties
        0x3F801000, 0x3F803000, 0x3F801001,  # float16 ties and a near-tie
        0x00000001, 0x00400000, 0x807FFFFF, 0x00008000,  # float32 denormals
        0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x477FF000,  # smallest/largest normals, float16 overflow edge
        0x7F800000, 0xFF800000, 0x7FC00000, 0x00000000,
    ]
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(3)
    rest = torch.randn(n - len(bits), generator=g) * torch.logspace(-30, 30, n - len(bits))
    return torch.cat([special, rest.float()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "2d"])
def test_half_outputs_round_like_torch(dtype, layout):
    # Eval mode with x = 0, running mean 0 and running variance 1 - eps gives
    # y = bias exactly in float32, so the output is the rounding of the bias
    # to the half type alone, which must be torch's (to nearest, ties to even,
    # denormals kept, on every vector path: runs of 49 have masked tails).
    C = 64
    bias = special_floats(C)
    shape = (3, C) if layout == "2d" else (3, C, 7, 7)
    x = torch.zeros(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    eps = 2.0**-10
    rm, rv = torch.zeros(C), torch.full((C,), 1.0 - eps)
    out = bn_ext.batch_norm(x, rm, rv, torch.ones(C), bias, training=False, eps=eps)
    want = bias.to(dtype).view(1, C, *([1] * (len(shape) - 2))).expand(shape)
    same = (out.view(torch.int16) == want.contiguous().view(torch.int16)) | (out.isnan() & want.isnan())
    assert same.all(), out.flatten()[~same.flatten()][:8]


def test_empty_batch_returns_empty_and_keeps_running_stats():
    w, b, rm, rv = make_params(3, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    wr = w.clone().requires_grad_()
    out = bn_ext.batch_norm(x, rm, rv, wr, b, training=True)
    assert out.shape == (0, 3, 4, 4)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    out.sum().backward()
    assert torch.equal(wr.grad, torch.zeros(3))
    assert bn_ext.batch_norm(x, rm, rv, w, b, training=False).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_like_torch(training):
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    w, b, rm, rv = make_params(3, torch.float32)
    ours = bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    ref = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(ours[finite], ref[finite])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    perm_seed=st.integers(0, 1000),
    step=st.integers(1, 2),
    training=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
# One value whose output cancels to 0.009 of terms near 0.38 (the DEFAULT
# level, without FMA, rounds both).
@example(dims=[1, 1, 1], perm_seed=328, step=1, training=False, dtype=torch.float32)
def test_property_random_shapes_and_strides(dims, perm_seed, step, training, dtype):
    """Any shape and any strides (permuted and sliced views) match torch."""
    if training and dims[0] * torch.tensor(dims[2:]).prod().item() == 1:
        dims[0] = 2
    g = torch.Generator().manual_seed(perm_seed)
    perm = torch.randperm(len(dims), generator=g).tolist()
    base_shape = [dims[p] * (step if i == len(dims) - 1 else 1) for i, p in enumerate(perm)]
    base = torch.randn(base_shape, generator=g, dtype=torch.float64).to(dtype)
    view = base[..., ::step]
    inverse = [perm.index(i) for i in range(len(dims))]
    x = view.permute(inverse)
    C = x.shape[1]
    w, b, rm, rv = make_params(C, dtype)
    rm_ref, rv_ref = f64(rm), f64(rv)
    # y = x * alpha + beta cancels where y is small beside its terms (one
    # sample, say): no op-math result is more exact than one rounding of them.
    dims_c = [0, *range(2, x.dim())]
    mean, var = (f64(x).mean(dims_c), f64(x).var(dims_c, correction=0)) if training else (rm_ref, rv_ref)
    shape = [1, C] + [1] * (x.dim() - 2)
    alpha = (f64(w) / torch.sqrt(var + 1e-5)).view(shape)
    terms = torch.cat([(f64(x) * alpha).flatten(), (f64(b).view(shape) - mean.view(shape) * alpha).flatten()])
    peer = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    out = bn_ext.batch_norm(x, rm, rv, w, b, training)
    expected = F.batch_norm(f64(x), rm_ref, rv_ref, f64(w), f64(b), training)
    assert_error_within(out, expected, peer, magnitude=terms.abs().max().item())
    assert_close(rm, rm_ref, param_dtype(dtype))
    assert_close(rv, rv_ref, param_dtype(dtype))


# --- bad input --------------------------------------------------------------


@pytest.mark.level_independent
def test_module_wrong_rank_is_value_error():
    with pytest.raises(ValueError, match="expected 4D input"):
        bn_ext.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bn_ext.nn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


@pytest.mark.level_independent
def test_one_value_per_channel_in_training_is_value_error():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_ext.batch_norm(torch.randn(1, 4), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_ext.nn.BatchNorm2d(4)(torch.randn(1, 4, 1, 1))


@pytest.mark.level_independent
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_channel_count_mismatch_names_both_sizes(name):
    args = dict(zip(["weight", "bias", "running_mean", "running_var"], make_params(4, torch.float32)))
    args[name] = torch.ones(3)
    with pytest.raises(RuntimeError, match=rf"{name} should contain 4 elements .* not 3"):
        bn_ext.batch_norm(torch.randn(2, 4, 3), args["running_mean"], args["running_var"], args["weight"],
                          args["bias"], training=True)


@pytest.mark.level_independent
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_non_floating_input_is_not_implemented_error(dtype):
    x = torch.ones(2, 3, 4).to(dtype)
    with pytest.raises(NotImplementedError, match="input must be float32"):
        bn_ext.batch_norm(x, None, None, training=True)


@pytest.mark.level_independent
def test_running_stats_of_wrong_dtype():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"running_mean must have the input's dtype \(Float\), got Double"):
        bn_ext.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), training=True)
    with pytest.raises(RuntimeError, match="weight must have the input's dtype"):
        bn_ext.batch_norm(x, None, None, torch.ones(3, dtype=torch.float16), training=True)


@pytest.mark.level_independent
def test_tensors_on_different_devices():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="weight must be on the same device as input"):
        bn_ext.batch_norm(x, None, None, torch.ones(3, device="meta"), training=True)


@pytest.mark.level_independent
def test_running_stats_both_or_neither_is_value_error():
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        bn_ext.batch_norm(torch.randn(3, 4), torch.zeros(4), None, training=True)


@pytest.mark.level_independent
@pytest.mark.parametrize("training,eps", [(True, 0.0), (False, -1e-5)])
def test_bad_eps_is_value_error(training, eps):
    with pytest.raises(ValueError, match="batch_norm eps must be"):
        bn_ext.batch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(4), training=training, eps=eps)


@pytest.mark.level_independent
def test_eval_without_running_stats_is_an_error():
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined in evaluation mode"):
        bn_ext.batch_norm(torch.randn(3, 4), None, None, training=False)


@pytest.mark.level_independent
def test_one_dim_input_is_index_error():
    with pytest.raises(IndexError, match="at least 2 dims"):
        bn_ext.batch_norm(torch.randn(3), None, None, training=False)


@pytest.mark.level_independent
def test_half_params_with_half_input_are_checked_against_float_weight():
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="or float32"):
        bn_ext.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), training=True)

