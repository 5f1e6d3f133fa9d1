"""RMSNorm on the CPU against torch.nn.functional.rms_norm in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import DTYPES, assert_close, assert_error_within
from row_norm_cases import LAYOUTS, ROW_LENGTHS, SHAPES, f64, make_row_input, make_row_params


def default_eps(dtype):
    """torch's eps=None: the machine epsilon of the computation type."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def reference(x, normalized_shape, weight, eps):
    return F.rms_norm(f64(x), normalized_shape, f64(weight), default_eps(x.dtype) if eps is None else eps)


@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("eps", [None, 1e-6], ids=["eps-default", "eps-1e-6"])
def test_forward_row_lengths(length, dtype, with_weight, eps):
    x = make_row_input((6, length), dtype)
    weight = make_row_params((length,), dtype)[0] if with_weight else None
    out = bn_ext.rms_norm(x, length, weight, eps)
    assert out.dtype == dtype
    assert_close(out, reference(x, (length,), weight, eps), dtype)


def test_default_eps_matters_for_tiny_half_inputs():
    # Mean square 1e-8: float32's epsilon (not float16's) decides the output, as in torch.
    x = torch.full((2, 4), 1e-4, dtype=torch.float16)
    torch.testing.assert_close(bn_ext.rms_norm(x, [4]), F.rms_norm(x, [4]))


@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_shapes_and_layouts(shape, normalized_shape, dtype, layout):
    x = make_row_input(shape, dtype, layout)
    x_before = x.clone()
    weight = make_row_params(normalized_shape, dtype)[0]
    out = bn_ext.rms_norm(x, normalized_shape, weight, 1e-5)
    assert_close(out, reference(x, normalized_shape, weight, 1e-5), dtype)
    assert torch.equal(x, x_before)


def test_channels_last_input_keeps_its_memory_format():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    out = bn_ext.rms_norm(x, [5])
    assert out.stride() == F.rms_norm(x, [5]).stride()
    torch.testing.assert_close(out, F.rms_norm(x, [5]))


# torch warns that its fused kernel takes no mixed dtypes (the peer of half inputs).
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_gradients(shape, normalized_shape, dtype, with_weight):
    x = make_row_input(shape, dtype, "strided").requires_grad_()
    weight = make_row_params(normalized_shape, dtype)[0].requires_grad_() if with_weight else None
    inputs = (x, weight) if with_weight else (x,)
    dy = make_row_input(shape, dtype, seed=9)
    grads = torch.autograd.grad(bn_ext.rms_norm(x, normalized_shape, weight), inputs, dy)
    inputs64 = tuple(f64(t).requires_grad_() for t in inputs)
    ref = F.rms_norm(inputs64[0], normalized_shape, inputs64[1] if with_weight else None, default_eps(dtype))
    expected = torch.autograd.grad(ref, inputs64, f64(dy))
    # torch's kernel on the same rounded inputs: its error sets the bar.
    inputs_t = tuple(t.detach().clone().requires_grad_() for t in inputs)
    peer = torch.autograd.grad(F.rms_norm(inputs_t[0], normalized_shape, inputs_t[1] if with_weight else None),
                               inputs_t, dy)
    # grad_weight sums dy * x * rstd over rows, which cancel: no float32 sum
    # is more exact than a rounding of its largest term.
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    x_hat = f64(x) * (f64(x).square().mean(dims, keepdim=True) + default_eps(dtype)).rsqrt()
    terms = [None, (f64(dy) * x_hat).abs().max() if x.numel() else 0.0]
    for name, g, e, t, p, m in zip(("grad_input", "grad_weight"), grads, expected, peer, inputs, terms):
        assert g.dtype == p.dtype
        assert_error_within(g, e, t, msg=name, magnitude=m)


@pytest.mark.parametrize("mask", [(True, False), (False, True)])
def test_backward_output_mask(mask):
    x = make_row_input((7, 3, 10), torch.float32)
    weight = make_row_params((10,), torch.float32)[0]
    dy = make_row_input((7, 3, 10), torch.float32, seed=3)
    _, rstd = torch.ops.bn_ext.rms_norm_forward(x, [10], weight, None)
    full = torch.ops.bn_ext.rms_norm_backward(dy, x, [10], rstd, weight, None, [True, True])
    part = torch.ops.bn_ext.rms_norm_backward(dy, x, [10], rstd, weight, None, list(mask))
    for asked, f, p in zip(mask, full, part):
        assert torch.equal(p, f) if asked else p.numel() == 0


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["eps-default", "eps-1e-3"])
def test_double_backward(with_weight, eps):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, torch.rand(3, 5, dtype=torch.float64, requires_grad=True)) if with_weight else (x,)

    def fn(*args):
        return bn_ext.rms_norm(args[0], (3, 5), args[1] if with_weight else None, eps)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# Against one thread: the row blocks of the parameter-gradient partials are
# fixed by the shape, their assignment to threads is not.
@pytest.mark.parametrize("num_threads", [2, 3])
def test_results_do_not_depend_on_thread_count(threads, num_threads):
    x = make_row_input((4096, 96), torch.float32).requires_grad_()
    weight = make_row_params((96,), torch.float32)[0].requires_grad_()
    dy = make_row_input((4096, 96), torch.float32, seed=4)

    def run():
        out = bn_ext.rms_norm(x, (96,), weight)
        return (out, *torch.autograd.grad(out, (x, weight), dy))

    torch.set_num_threads(1)
    base = run()
    torch.set_num_threads(num_threads)
    for a, b in zip(run(), base):
        assert torch.equal(a, b)


@pytest.mark.parametrize("length", [64, 65537])
def test_large_values_no_worse_than_torch(length):
    x = make_row_input((8, length), torch.float64, mean=1e4, std=1e-2).float()
    exact = F.rms_norm(x.double(), (length,), eps=default_eps(torch.float32))
    err_ours = (bn_ext.rms_norm(x, (length,)).double() - exact).abs().max().item()
    err_torch = (F.rms_norm(x, (length,)).double() - exact).abs().max().item()
    assert err_ours <= max(err_torch, 1e-6), (err_ours, err_torch)


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(5, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    ours, ref = bn_ext.rms_norm(x, (16,)), F.rms_norm(x, (16,))
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours[ref.isfinite()], ref[ref.isfinite()])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leading=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    transpose=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    with_weight=st.booleans(),
)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_property_random_shapes(leading, normalized, transpose, dtype, with_weight):
    shape = (*leading, *normalized)
    x = make_row_input(shape, dtype, "transposed" if transpose and len(shape) >= 2 else "contiguous")
    weight = make_row_params(tuple(normalized), dtype)[0] if with_weight else None
    assert_error_within(bn_ext.rms_norm(x, normalized, weight), reference(x, normalized, weight, None),
                        F.rms_norm(x, normalized, weight))


@pytest.mark.level_independent
def test_module_state_dict_round_trip_repr_and_convert():
    ref = torch.nn.RMSNorm((4, 6), eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_()
    ours = bn_ext.nn.RMSNorm((4, 6), eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.RMSNorm((4, 6), eps=1e-6)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight)
    assert repr(ours) == repr(ref)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), ref(x))
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.RMSNorm(6, elementwise_affine=False))
    converted = bn_ext.nn.convert(copy.deepcopy(model))
    assert type(converted[1]) is bn_ext.nn.RMSNorm and converted[1].weight is None
    torch.testing.assert_close(converted(x), model(x))
    assert type(bn_ext.nn.revert(converted)[1]) is torch.nn.RMSNorm


@pytest.mark.level_independent
def test_bad_input():
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 4\], but got input of size\[2, 3\]"):
        bn_ext.rms_norm(torch.randn(2, 3), [4])
    with pytest.raises(RuntimeError, match="expected weight to be of same shape as normalized_shape"):
        bn_ext.rms_norm(torch.randn(2, 3), [3], torch.ones(4))
    with pytest.raises(NotImplementedError, match="rms_norm: input must be float32"):
        bn_ext.rms_norm(torch.ones(2, 3, dtype=torch.int32), [3])
    with pytest.raises(RuntimeError, match="weight must be on the same device as input"):
        bn_ext.rms_norm(torch.randn(2, 3), [3], torch.ones(3, device="meta"))
