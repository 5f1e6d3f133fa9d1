"""The group_norm family on the CPU: GroupNorm (with its fused activations),
InstanceNorm and LayerNorm over channels, against torch in float64 with
torch's own kernels on the same rounded inputs as the error bar."""

import copy

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from conftest import (DTYPES, HALF_DTYPES, assert_close, assert_error_within, check_training_step, last_level_cache_bytes,
                      param_dtype)

# Shapes and group counts: (N, C) with no positions, 1-D/3-D inputs, one
# group, one channel per group, a group longer than a cache chunk, planes
# shorter than a vector (3x3) and than the short-plane threshold (16x16),
# fewer groups than threads.
CASES = [
    pytest.param((6, 8), 4, id="NC-4"),
    pytest.param((3, 12, 17), 3, id="NCL-3"),
    pytest.param((2, 6, 5, 7), 1, id="one-group"),
    pytest.param((2, 6, 5, 7), 6, id="instance"),
    pytest.param((4, 32, 3, 3), 8, id="3x3"),
    pytest.param((2, 64, 16, 16), 32, id="16x16-32g"),
    pytest.param((1, 4, 80, 70), 2, id="long-groups"),
    pytest.param((2, 10, 2, 3, 4), 5, id="3d"),
    # Channels-last rows wider than the row-order walk's 512 columns, 4 KB
    # at float32 (see test_batch_norm.WIDE_CHANNELS_LAST).
    pytest.param((2, 1024, 5, 5), 32, id="wide-rows"),
    # Groups of 4 KB and more, channels-first, reduced and normalised in one
    # task: planes that end inside a vector (7x7), planes of whole vectors
    # (8x8), planes shorter than a float32 vector at AVX512 (3x3).
    pytest.param((2, 256, 7, 7), 4, id="fused-7x7"),
    pytest.param((2, 128, 8, 8), 2, id="fused-8x8"),
    pytest.param((2, 512, 3, 3), 4, id="fused-3x3"),
]

# Layouts: contiguous; torch's channels_last(_3d); a strided view that is
# neither (the kernels read a contiguous copy).
LAYOUTS = ["contiguous", "channels_last", "strided"]

ACTIVATIONS = [None, "relu", "silu"]


def make_input(shape, dtype, layout="contiguous", mean=0.5, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        full = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
        return (full * std + mean).to(dtype)[..., ::2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_params(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = param_dtype(dtype)
    return ((torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(p),
            torch.randn(C, generator=g, dtype=torch.float64).to(p))


def f64(t):
    return None if t is None else t.detach().double()


def activate(y, activation):
    return y if activation is None else getattr(F, activation)(y)


def torch_group_norm(x, groups, weight, bias, eps, activation):
    """torch's GroupNorm then its activation, in x's dtype (torch's CPU kernel
    takes float32 parameters beside half inputs too)."""
    return activate(F.group_norm(x, groups, weight, bias, eps), activation)


def expected_layout(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_group_norm_forward(shape, groups, dtype, layout, activation):
    x = make_input(shape, dtype, layout)
    before = x.clone()
    weight, bias = make_params(shape[1], dtype)
    out = bn_ext.group_norm(x, groups, weight, bias, 1e-5, activation)
    expected = activate(F.group_norm(f64(x), groups, f64(weight), f64(bias), 1e-5), activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=expected_layout(x))
    peer = torch_group_norm(x, groups, weight, bias, 1e-5, activation)
    assert_error_within(out, expected, peer, msg="out")
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_statistics_match_torch(dtype, layout):
    x = make_input((3, 12, 6, 5), dtype, layout)
    _, mean, rstd = torch.ops.bn_ext.group_norm_forward(x, 4, None, None, 1e-5, None)
    _, mean_t, rstd_t = torch.native_group_norm(f64(x), None, None, 3, 12, 30, 4, 1e-5)
    assert mean.shape == (3, 4) and mean.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    assert_close(mean, mean_t, torch.float32 if dtype != torch.float64 else dtype)
    assert_close(rstd, rstd_t, torch.float32 if dtype != torch.float64 else dtype)


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_gradients(shape, groups, dtype, layout, activation, affine):
    x = make_input(shape, dtype, layout).requires_grad_()
    weight, bias = make_params(shape[1], dtype) if affine else (None, None)
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]
    dy = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=9)
    grads = torch.autograd.grad(bn_ext.group_norm(x, groups, weight, bias, 1e-5, activation), (x, *params), dy)

    x64, *p64 = (f64(t).requires_grad_() for t in (x, *params))
    w64, b64 = (p64 if affine else (None, None))
    ref = activate(F.group_norm(x64, groups, w64, b64, 1e-5), activation)
    expected = torch.autograd.grad(ref, (x64, *p64), f64(dy))
    xt, *pt = (t.detach().clone().requires_grad_() for t in (x, *params))
    wt, bt = (pt if affine else (None, None))
    peer = torch.autograd.grad(torch_group_norm(xt, groups, wt, bt, 1e-5, activation), (xt, *pt), dy)
    # Parameter gradients are sums over N * S terms that cancel: no float32
    # sum is more exact than a rounding of its largest term.
    terms = [None, (f64(dy) * 4 * x64.detach().abs().max()).abs().max(), f64(dy).abs().max()]
    for name, got, want, theirs, term in zip(["grad_input", "grad_weight", "grad_bias"], grads, expected, peer,
                                             terms):
        assert got.dtype == (dtype if name == "grad_input" else param_dtype(dtype))
        assert_error_within(got, want, theirs, msg=name, dtype=dtype if name == "grad_input" else torch.float32
                            if dtype != torch.float64 else dtype, magnitude=term)
    assert grads[0].is_contiguous(memory_format=expected_layout(x))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_double_backward(activation, layout):
    x = make_input((2, 6, 3, 3), torch.float64, layout).requires_grad_()
    weight, bias = (p.requires_grad_() for p in make_params(6, torch.float64))
    torch.autograd.gradcheck(lambda *a: bn_ext.group_norm(a[0], 3, a[1], a[2], 1e-5, activation),
                             (x, weight, bias))
    torch.autograd.gradgradcheck(lambda *a: bn_ext.group_norm(a[0], 3, a[1], a[2], 1e-5, activation),
                                 (x, weight, bias))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_exact_on_large_means(layout, dtype):
    # torch's channels-last GroupNorm sums x and x^2 (E[x^2] - E[x]^2): with
    # a mean of 1e4 and unit spread float32 keeps no digit of the variance.
    x = make_input((2, 32, 8, 8), torch.float32, layout, mean=1e4, std=1.0).to(dtype)
    out = bn_ext.group_norm(x, 8)
    expected = F.group_norm(f64(x), 8)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_gradients_of_groups_far_apart(layout, dtype):
    # Each group about a mean of its own, tens of standard deviations from its
    # neighbours': a vector that spans two planes at a group's edge (45 planes
    # of 49 end a group mid-vector; several groups a task) must take each
    # plane's values about its own group's mean.
    shape, groups = (4, 360, 7, 7), 8
    offsets = torch.tensor([0.0, 60.0, -40.0, 120.0, -80.0, 30.0, 90.0, -20.0], dtype=torch.float64)
    offsets = offsets.repeat_interleave(shape[1] // groups)
    x = (make_input(shape, torch.float64, "contiguous") + offsets.view(1, -1, 1, 1)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x.requires_grad_()
    weight, bias = make_params(shape[1], dtype)
    dy = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=5)
    gx, gw = torch.autograd.grad(bn_ext.group_norm(x, groups, weight.requires_grad_(), bias), (x, weight), dy)
    x64, w64 = f64(x).requires_grad_(), f64(weight).requires_grad_()
    ex, ew = torch.autograd.grad(F.group_norm(x64, groups, w64, f64(bias)), (x64, w64), f64(dy))
    xt, wt = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    px, pw = torch.autograd.grad(F.group_norm(xt, groups, wt, bias), (xt, wt), dy)
    assert_error_within(gx, ex, px, msg="grad_input")
    assert_error_within(gw, ew, pw, msg="grad_weight")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_exact_when_the_first_values_are_outliers(layout, dtype):
    # The first 16 positions of every channel at 1e3, the rest near 0: each
    # group's shift (the mean of its first values) lies ~8 standard
    # deviations from its mean, so the single-pass sums would lose the
    # variance and the kernels must take their second pass.
    x = make_input((2, 16, 32, 32), torch.float32, "contiguous", mean=0.0, std=1e-2)
    x[:, :, 0, :16] += 1e3
    x = x.to(dtype).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    weight, bias = make_params(16, dtype)
    out = bn_ext.group_norm(x, 4, weight, bias)
    expected = F.group_norm(f64(x), 4, f64(weight), f64(bias))
    assert_error_within(out, expected, F.group_norm(x, 4, weight, bias), msg="out")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_outputs_larger_than_the_last_level_cache(layout, dtype):
    # Channels-first groups reduced and normalised one task each write an
    # output of the last-level cache's size or more with streaming stores
    # (kernel_utils.h), forward and backward; the values are the same.
    nbytes = min(int(1.5 * last_level_cache_bytes()), 192 << 20)
    C, S = 64, 96
    N = -(-nbytes // (C * S * S * dtype.itemsize))
    x = make_input((N, C, S, S), dtype, layout).requires_grad_()
    weight, bias = make_params(C, dtype)
    dy = make_input((N, C, S, S), dtype, layout, mean=0.0, std=1.0, seed=7)
    out = bn_ext.group_norm(x, 32, weight, bias)
    (gx,) = torch.autograd.grad(out, x, dy)
    x64 = f64(x).requires_grad_()
    ref = F.group_norm(x64, 32, f64(weight), f64(bias))
    assert_close(out, ref, dtype)
    (gx64,) = torch.autograd.grad(ref, x64, f64(dy))
    assert_close(gx, gx64, dtype)


def test_group_norm_nonfinite_inputs_propagate():
    x = make_input((2, 8, 4, 4), torch.float32)
    x[0, 0, 1, 1] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    for layout in (torch.contiguous_format, torch.channels_last):
        out = bn_ext.group_norm(x.contiguous(memory_format=layout), 4)
        ref = F.group_norm(x, 4)
        assert torch.equal(out.isnan(), ref.isnan())
        finite = ref.isfinite()
        assert_close(out[finite], ref[finite], torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_thread_count_invariance(layout, threads):
    # 2 x 4 groups and 8 planes: blocks and stripes depend on the thread count
    # (channels_per_block), the results must not.
    x = make_input((2, 64, 40, 40), torch.float32, layout)
    dy = make_input((2, 64, 40, 40), torch.float32, layout, seed=3)
    weight, bias = make_params(64, torch.float32)
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out, mean, rstd = torch.ops.bn_ext.group_norm_forward(x, 4, weight, bias, 1e-5, "silu")
        grads = torch.ops.bn_ext.group_norm_backward(dy, x, 4, mean, rstd, weight, bias, 1e-5, "silu",
                                                     [True, True, True])
        results.append((out, mean, rstd, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.level_independent
def test_group_norm_errors_match_torch():
    x = torch.randn(2, 6, 3)
    cases = [
        (lambda f: f(x, 4), RuntimeError, "divisible by num_groups"),
        (lambda f: f(x, 2, torch.randn(5)), RuntimeError, "weight to be a vector of size equal"),
        (lambda f: f(torch.randn(6), 2), RuntimeError, "at least 2 dimensions"),
        (lambda f: f(torch.randn(1, 2, 1), 2), ValueError, "more than 1 value per channel"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words):
            call(F.group_norm)
        with pytest.raises(kind, match=words):
            call(bn_ext.group_norm)
    with pytest.raises(ValueError, match="group_norm: activation must be None, 'none', 'relu' or 'silu', got 'gelu'"):
        bn_ext.group_norm(x, 2, activation="gelu")
    with pytest.raises(RuntimeError, match="weight must have the input's dtype"):
        bn_ext.group_norm(x, 2, torch.ones(6, dtype=torch.float64))


# ---------------------------------------------------------------------------
# InstanceNorm


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_module_matches_torch(dim, affine, track, dtype, layout):
    torch.manual_seed(0)
    shape = (3, 5) + (6,) * dim
    ref = getattr(torch.nn, f"InstanceNorm{dim}d")(5, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ref = ref.to(param_dtype(dtype))
    ours = copy.deepcopy(ref)
    bn_ext.nn.convert(ours)
    assert type(ours) is getattr(bn_ext.nn, f"InstanceNorm{dim}d")
    ref64 = copy.deepcopy(ref).double()
    for step in range(2):
        x = make_input(shape, dtype, layout if dim >= 2 else "contiguous", mean=1.0, std=3.0, seed=step)
        expected = ref64(f64(x))
        out = ours(x)
        peer = ref(x)  # torch's kernel in x's dtype; moves ref's running statistics once
        assert out.shape == x.shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=expected_layout(x))
        assert_error_within(out, expected, peer, msg=f"step {step}", dtype=dtype)
        if track:
            # Against float64's running statistics: torch's own round through
            # the input's dtype for half inputs (0.4% off in bfloat16).
            kept = torch.float32 if dtype != torch.float64 else dtype
            assert_close(ours.running_mean, ref64.running_mean, kept)
            assert_close(ours.running_var, ref64.running_var, kept)
            if dtype not in HALF_DTYPES:
                assert_close(ours.running_var, ref.running_var, kept)
    # eval: running statistics when tracked, instance statistics otherwise; a no-batch input too.
    ours.eval(), ref.eval()
    x = make_input(shape, dtype, seed=5)
    assert_close(ours(x), ref(x), dtype)
    assert_close(ours(x[0]), ref(x[0]), dtype)


def test_instance_norm_gradients_and_errors():
    x = make_input((2, 3, 5, 4), torch.float64).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(3, torch.float64))
    torch.autograd.gradcheck(lambda x, w, b: bn_ext.instance_norm(x, weight=w, bias=b), (x, w, b))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        bn_ext.instance_norm(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm(torch.randn(2, 3, 1))


@pytest.mark.level_independent
def test_instance_norm_momentum_none_is_torchs():
    # torch.nn's InstanceNorm passes momentum None on as 0: running statistics never move.
    ref = torch.nn.InstanceNorm2d(4, momentum=None, track_running_stats=True)
    ours = bn_ext.nn.InstanceNorm2d(4, momentum=None, track_running_stats=True)
    x = make_input((2, 4, 5, 5), torch.float32)
    assert_close(ours(x), ref(x), torch.float32)
    assert torch.equal(ours.running_mean, ref.running_mean) and torch.equal(ours.running_var, ref.running_var)


# ---------------------------------------------------------------------------
# LayerNorm over channels


def permute_layer_norm(x, weight, bias, eps):
    """ConvNeXt's LayerNorm2d: permute -> layer_norm -> permute."""
    dims = [0, *range(2, x.dim()), 1]
    back = [0, x.dim() - 1, *range(1, x.dim() - 1)]
    return F.layer_norm(x.permute(dims), (x.shape[1],), weight, bias, eps).permute(back)


LN_CASES = [
    pytest.param((2, 8, 5, 7), id="small"),
    pytest.param((2, 96, 14, 14), id="convnext-stage"),
    pytest.param((1, 3, 70, 90), id="long-rows"),
    pytest.param((3, 17, 9), id="1d"),
    pytest.param((2, 6, 3, 4, 5), id="3d"),
]


@pytest.mark.parametrize("shape", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_channels_forward(shape, dtype, layout):
    x = make_input(shape, dtype, layout)
    weight, bias = make_params(shape[1], dtype)
    out = bn_ext.layer_norm_channels(x, weight, bias, 1e-6)
    expected = permute_layer_norm(f64(x), f64(weight), f64(bias), 1e-6)
    xt = x if weight.dtype == dtype else x.float()
    peer = permute_layer_norm(xt, weight, bias, 1e-6).to(dtype)
    assert out.is_contiguous(memory_format=expected_layout(x)) and out.dtype == dtype
    assert_error_within(out, expected, peer, msg="out")


@pytest.mark.parametrize("shape", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_norm_channels_gradients(shape, dtype, layout):
    x = make_input(shape, dtype, layout).requires_grad_()
    weight, bias = (p.requires_grad_() for p in make_params(shape[1], dtype))
    dy = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=9)
    grads = torch.autograd.grad(bn_ext.layer_norm_channels(x, weight, bias), (x, weight, bias), dy)
    x64, w64, b64 = (f64(t).requires_grad_() for t in (x, weight, bias))
    expected = torch.autograd.grad(permute_layer_norm(x64, w64, b64, 1e-6), (x64, w64, b64), f64(dy))
    same = weight.dtype == dtype
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x if same else x.float(), weight, bias))
    peer = torch.autograd.grad(permute_layer_norm(xt, wt, bt, 1e-6), (xt, wt, bt), dy if same else dy.float())
    terms = [None, (f64(dy) * 8).abs().max(), f64(dy).abs().max()]
    for name, got, want, theirs, term in zip(["grad_input", "grad_weight", "grad_bias"], grads, expected, peer,
                                             terms):
        computed = dtype if name == "grad_input" else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_error_within(got, want, theirs.to(got.dtype) if name == "grad_input" else theirs, msg=name,
                            dtype=computed, magnitude=term)


def test_layer_norm_channels_double_backward():
    for layout in ("contiguous", "channels_last"):
        x = make_input((2, 5, 3, 3), torch.float64, layout).requires_grad_()
        w, b = (p.requires_grad_() for p in make_params(5, torch.float64))
        torch.autograd.gradgradcheck(lambda *a: bn_ext.layer_norm_channels(*a), (x, w, b))


# ---------------------------------------------------------------------------
# Modules, conversion and the operator contract


@pytest.mark.level_independent
def test_group_norm_module_state_dict_both_ways():
    ref = torch.nn.GroupNorm(4, 8)
    ours = bn_ext.nn.GroupNorm(4, 8, activation="relu")
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}
    assert "activation='relu'" in repr(ours)
    x = make_input((2, 8, 4, 4), torch.float32)
    assert_close(ours(x), F.relu(ref(x)), torch.float32)
    with pytest.raises(ValueError, match="GroupNorm: activation must be None, 'none', 'relu' or 'silu', got 'tanh'"):
        bn_ext.nn.GroupNorm(4, 8, activation="tanh")


@pytest.mark.level_independent
def test_layer_norm_2d_module_matches_the_zoos():
    timm = pytest.importorskip("timm")
    import torchvision

    for zoo in (torchvision.models.convnext.LayerNorm2d, timm.layers.LayerNorm2d):
        ref = zoo(12)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        ours = bn_ext.nn.LayerNorm2d(12)
        ours.load_state_dict(ref.state_dict())
        for layout in ("contiguous", "channels_last"):
            x = make_input((2, 12, 7, 9), torch.float32, layout)
            assert_close(ours(x), ref(x), torch.float32)
        model = torch.nn.Sequential(zoo(12))
        bn_ext.nn.convert(model)
        assert isinstance(model[0], bn_ext.nn.LayerNorm2d)
        bn_ext.nn.revert(model)
        assert type(model[0]) is zoo


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convnext_training_step_matches_torch(layout):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.convnext_tiny(num_classes=10)
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, bn_ext.nn.LayerNorm2d) for m in ours.modules()) == 5
    x = make_input((2, 3, 64, 64), torch.float32, layout)
    check_training_step(ref, ours, x)


def test_timm_group_norm_model_training_step_matches_torch():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # ResNet-26 with GroupNorm (timm's resnet26 with norm_layer GroupNorm of 32 groups).
    ref = timm.create_model("resnet26", pretrained=False, num_classes=10,
                            norm_layer=lambda c, **kw: torch.nn.GroupNorm(32 if c % 32 == 0 else 1, c))
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    assert sum(type(m) is bn_ext.nn.GroupNorm for m in ours.modules()) > 20
    x = make_input((2, 3, 64, 64), torch.float32, "channels_last")
    check_training_step(ref, ours, x)


@pytest.mark.level_independent
def test_compile_fullgraph_matches_eager():
    x = make_input((2, 6, 4, 5), torch.float32).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(6, torch.float32))

    def step(x, w, b):
        y = bn_ext.group_norm(x, 3, w, b, activation="relu") + bn_ext.layer_norm_channels(x, w, b)
        return bn_ext.instance_norm(y, weight=w, bias=b)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(x, w, b)
    got = compiled(x, w, b)
    assert_close(got, expected, torch.float32)
    g1 = torch.autograd.grad(expected.sum(), (x, w, b))
    g2 = torch.autograd.grad(got.sum(), (x, w, b))
    for a, e in zip(g2, g1):
        assert_close(a, e, torch.float32, atol_scale=10)


@pytest.mark.level_independent
def test_compiled_instance_norm_moves_running_statistics_as_eager():
    x = make_input((2, 6, 4, 5), torch.float32).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(6, torch.float32))
    stats = [(torch.randn(6), torch.rand(6) + 0.5) for _ in range(2)]
    stats[1] = tuple(s.clone() for s in stats[0])
    start = tuple(s.clone() for s in stats[0])

    def step(x, w, b, running_mean, running_var):
        return bn_ext.instance_norm(x, running_mean, running_var, w, b, momentum=0.3) * 2

    expected = step(x, w, b, *stats[0])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, b, *stats[1])
    assert_close(got, expected, torch.float32)
    for eager, compiled, before in zip(stats[0], stats[1], start):
        assert not torch.equal(eager, before)
        assert_close(compiled, eager, torch.float32)
    for a, e in zip(torch.autograd.grad(got.sum(), (x, w, b)), torch.autograd.grad(expected.sum(), (x, w, b))):
        assert_close(a, e, torch.float32, atol_scale=10)


@pytest.mark.level_independent
def test_export_group_norm_family():
    model = torch.nn.Sequential(bn_ext.nn.GroupNorm(2, 6, activation="silu"), bn_ext.nn.LayerNorm2d(6),
                                bn_ext.nn.InstanceNorm2d(6, affine=True)).eval()
    x = make_input((2, 6, 5, 5), torch.float32)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bn_ext.group_norm_forward.default", "bn_ext.layer_norm_channels_forward.default"} <= targets
    assert_close(program.module()(x), model(x), torch.float32)
