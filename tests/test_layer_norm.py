"""LayerNorm on the CPU against torch.nn.functional.layer_norm in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import DTYPES, assert_close, assert_error_within, last_level_cache_bytes
from row_norm_cases import LAYOUTS, ROW_LENGTHS, SHAPES, f64, make_row_input, make_row_params

# Which affine parameters exist: both, weight only (bias=False), none.
AFFINE = ["weight_bias", "weight", "none"]


def params_for(affine, normalized_shape, dtype):
    weight, bias = make_row_params(normalized_shape, dtype)
    return (weight if affine != "none" else None), (bias if affine == "weight_bias" else None)


@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_forward_row_lengths(length, dtype, affine):
    x = make_row_input((6, length), dtype)
    weight, bias = params_for(affine, (length,), dtype)
    out = bn_ext.layer_norm(x, length, weight, bias, 1e-5)
    expected = F.layer_norm(f64(x), (length,), f64(weight), f64(bias), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_shapes_and_layouts(shape, normalized_shape, dtype, layout):
    x = make_row_input(shape, dtype, layout)
    x_before = x.clone()
    weight, bias = make_row_params(normalized_shape, dtype)
    out = bn_ext.layer_norm(x, normalized_shape, weight, bias, 1e-3)
    expected = F.layer_norm(f64(x), normalized_shape, f64(weight), f64(bias), 1e-3)
    assert out.is_contiguous()
    assert_close(out, expected, dtype)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_gradients(shape, normalized_shape, dtype, affine):
    x = make_row_input(shape, dtype, "strided").requires_grad_()
    weight, bias = params_for(affine, normalized_shape, dtype)
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]
    dy = make_row_input(shape, dtype, seed=9)
    out = bn_ext.layer_norm(x, normalized_shape, weight, bias)
    grads = torch.autograd.grad(out, (x, *params), dy)

    x64 = f64(x).requires_grad_()
    params64 = [f64(p).requires_grad_() for p in params]
    w64 = params64[0] if weight is not None else None
    b64 = params64[1] if bias is not None else None
    ref = F.layer_norm(x64, normalized_shape, w64, b64)
    expected = torch.autograd.grad(ref, (x64, *params64), f64(dy))
    # torch's kernel on the same rounded inputs: its error sets the bar.
    xt, *params_t = (t.detach().clone().requires_grad_() for t in (x, *params))
    wt = params_t[0] if weight is not None else None
    bt = params_t[1] if bias is not None else None
    peer = torch.autograd.grad(F.layer_norm(xt, normalized_shape, wt, bt), (xt, *params_t), dy)
    # The parameter gradients are sums over rows of dy * x_hat and dy that
    # cancel: no float32 sum is more exact than a rounding of its largest term.
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    var, mean = torch.var_mean(f64(x), dims, unbiased=False, keepdim=True)
    x_hat = (f64(x) - mean) / (var + 1e-5).sqrt()
    terms = [None, (f64(dy) * x_hat).abs().max() if x.numel() else 0.0, f64(dy).abs().max() if x.numel() else 0.0]
    names = ("grad_input", "grad_weight" if weight is not None else "grad_bias", "grad_bias")
    if weight is None:
        terms = terms[:1] + terms[2:]
    for name, g, e, t, p, m in zip(names, grads, expected, peer, (x, *params), terms):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert_error_within(g, e, t, msg=name, magnitude=m)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_backward_output_mask(mask):
    x = make_row_input((7, 3, 10), torch.float32)
    weight, bias = make_row_params((3, 10), torch.float32)
    dy = make_row_input((7, 3, 10), torch.float32, seed=3)
    _, mean, rstd = torch.ops.bn_ext.layer_norm_forward(x, [3, 10], weight, bias, 1e-5)
    full = torch.ops.bn_ext.layer_norm_backward(dy, x, [3, 10], mean, rstd, weight, bias, 1e-5, [True] * 3)
    part = torch.ops.bn_ext.layer_norm_backward(dy, x, [3, 10], mean, rstd, weight, bias, 1e-5, list(mask))
    for asked, f, p in zip(mask, full, part):
        if asked:
            assert torch.equal(p, f)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("normalized_shape", [(5,), (3, 5)], ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_double_backward(normalized_shape, affine):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = params_for(affine, normalized_shape, torch.float64)
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]

    def fn(x, *ps):
        it = iter(ps)
        w = next(it) if weight is not None else None
        b = next(it) if bias is not None else None
        return bn_ext.layer_norm(x, normalized_shape, w, b)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_half_params(dtype):
    x = make_row_input((8, 40), dtype)
    weight, bias = (p.to(dtype) for p in make_row_params((40,), torch.float32))
    out = bn_ext.layer_norm(x, (40,), weight, bias)
    assert_close(out, F.layer_norm(f64(x), (40,), f64(weight), f64(bias)), dtype)


# Against one thread: the row blocks of the parameter-gradient partials are
# fixed by the shape, their assignment to threads is not.
@pytest.mark.parametrize("num_threads", [2, 3])
def test_results_do_not_depend_on_thread_count(threads, num_threads):
    # Many rows: several row blocks of weight/bias partials.
    x = make_row_input((4096, 96), torch.float32).requires_grad_()
    weight, bias = (p.requires_grad_() for p in make_row_params((96,), torch.float32))
    dy = make_row_input((4096, 96), torch.float32, seed=4)

    def run():
        out = bn_ext.layer_norm(x, (96,), weight, bias)
        return (out, *torch.autograd.grad(out, (x, weight, bias), dy))

    torch.set_num_threads(1)
    base = run()
    torch.set_num_threads(num_threads)
    for a, b in zip(run(), base):
        assert torch.equal(a, b)


@pytest.mark.parametrize("length", [64, 4096, 65537])
def test_large_mean_small_std_no_worse_than_torch(length):
    x = make_row_input((8, length), torch.float64, mean=1e4, std=1e-2).float()
    exact = F.layer_norm(x.double(), (length,))
    err_ours = (bn_ext.layer_norm(x, (length,)).double() - exact).abs().max().item()
    err_torch = (F.layer_norm(x, (length,)).double() - exact).abs().max().item()
    assert err_ours <= max(err_torch, 1e-4), (err_ours, err_torch)


def test_exact_when_chunks_start_with_outliers():
    # Each 4,096-value chunk of a row is shifted by the mean of its first 16
    # values; outliers there make the one-pass variance lose 8 bits, so such
    # chunks take a second pass (compare the BatchNorm test of the same name).
    x = make_row_input((4, 8192), torch.float64, mean=0.0, std=1e-3)
    x[:, :16] = 1e3
    x[:, 4096:4112] = -1e3
    x = x.float()
    exact = F.layer_norm(x.double(), (8192,))
    err_ours = (bn_ext.layer_norm(x, (8192,)).double() - exact).abs().max().item()
    err_torch = (F.layer_norm(x, (8192,)).double() - exact).abs().max().item()
    assert err_ours <= max(err_torch, 1e-5), (err_ours, err_torch)


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(5, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, 5] = -float("inf")
    w, b = make_row_params((16,), torch.float32)
    ours, ref = bn_ext.layer_norm(x, (16,), w, b), F.layer_norm(x, (16,), w, b)
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours[ref.isfinite()], ref[ref.isfinite()])


def test_empty_rows_and_empty_normalized_dims():
    assert bn_ext.layer_norm(torch.randn(0, 3, 6), (6,)).shape == (0, 3, 6)
    out, mean, rstd = torch.ops.bn_ext.layer_norm_forward(torch.randn(3, 0), [0], None, None, 1e-5)
    ref = torch.native_layer_norm(torch.randn(3, 0), [0], None, None, 1e-5)
    assert out.shape == (3, 0)
    torch.testing.assert_close(mean, ref[1], equal_nan=True)
    torch.testing.assert_close(rstd, ref[2], equal_nan=True)
    x = torch.randn(0, 5, requires_grad=True)
    w = torch.ones(5, requires_grad=True)
    bn_ext.layer_norm(x, (5,), w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leading=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    transpose=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    affine=st.sampled_from(AFFINE),
)
def test_property_random_shapes(leading, normalized, transpose, dtype, affine):
    shape = (*leading, *normalized)
    x = make_row_input(shape, dtype, "transposed" if transpose and len(shape) >= 2 else "contiguous")
    weight, bias = params_for(affine, tuple(normalized), dtype)
    out = bn_ext.layer_norm(x, normalized, weight, bias)
    assert_error_within(out, F.layer_norm(f64(x), normalized, f64(weight), f64(bias)),
                        F.layer_norm(x, normalized, weight, bias))


# --- modules ------------------------------------------------------------------


@pytest.mark.level_independent
def test_module_state_dict_round_trip_and_repr():
    ref = torch.nn.LayerNorm((4, 6), eps=1e-6, elementwise_affine=True, bias=True)
    with torch.no_grad():
        ref.weight.uniform_()
        ref.bias.normal_()
    ours = bn_ext.nn.LayerNorm((4, 6), eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LayerNorm((4, 6), eps=1e-6)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(ours) == repr(ref)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), ref(x))
    assert isinstance(ours, torch.nn.LayerNorm)


@pytest.mark.level_independent
@pytest.mark.parametrize("kwargs", [{"elementwise_affine": False}, {"bias": False}, {"dtype": torch.float64}])
def test_module_constructor_arguments(kwargs):
    ref, ours = torch.nn.LayerNorm(8, **kwargs), bn_ext.nn.LayerNorm(8, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 8, dtype=kwargs.get("dtype", torch.float32))
    torch.testing.assert_close(ours(x), ref(x))


def small_vit():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )


def test_converted_vision_transformer_matches_torch():
    ref = small_vit()
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    assert sum(type(m) is bn_ext.nn.LayerNorm for m in ours.modules()) == 5
    x = torch.randn(4, 3, 32, 32)
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4, msg=name)
    bn_ext.nn.revert(ours)
    assert not any(type(m) is bn_ext.nn.LayerNorm for m in ours.modules())


def test_converted_transformer_encoder_matches_torch():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(32), enable_nested_tensor=False)
    ours = bn_ext.nn.convert(copy.deepcopy(ref))
    x = torch.randn(3, 10, 32, requires_grad=True)
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4)


# --- bad input --------------------------------------------------------------


@pytest.mark.level_independent
def test_normalized_shape_mismatch_names_both():
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[4\], expected input with shape \[\*, 4\], "
                                           r"but got input of size\[2, 3\]"):
        bn_ext.layer_norm(torch.randn(2, 3), [4])


@pytest.mark.level_independent
def test_empty_normalized_shape():
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        bn_ext.layer_norm(torch.randn(2, 3), [])


@pytest.mark.level_independent
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_of_wrong_shape(name):
    kwargs = {name: torch.ones(4)}
    with pytest.raises(RuntimeError, match=rf"expected {name} to be of same shape as normalized_shape, but got "
                                           rf"{name} of shape \[4\] and normalized_shape = \[3\]"):
        bn_ext.layer_norm(torch.randn(2, 3), [3], **kwargs)


@pytest.mark.level_independent
def test_integer_input_is_not_implemented_error():
    with pytest.raises(NotImplementedError, match="layer_norm: input must be float32"):
        bn_ext.layer_norm(torch.ones(2, 3, dtype=torch.int64), [3])


@pytest.mark.level_independent
def test_parameters_on_another_device():
    with pytest.raises(RuntimeError, match="weight must be on the same device as input"):
        bn_ext.layer_norm(torch.randn(2, 3), [3], torch.ones(3, device="meta"))


@pytest.mark.level_independent
def test_parameters_of_wrong_dtype():
    with pytest.raises(RuntimeError, match=r"weight must have the input's dtype \(Float\), got Double"):
        bn_ext.layer_norm(torch.randn(2, 3), [3], torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weight and bias must have the same dtype"):
        bn_ext.layer_norm(torch.randn(2, 3).half(), [3], torch.ones(3), torch.zeros(3).half())


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_larger_than_the_last_level_cache(op, dtype):
    # LayerNorm's and RMSNorm's forward and dx with at least the last-level
    # cache's size of output are written with streaming stores
    # (kernel_utils.h); the values are the same. 1.5 times the cache, at most 192 MB.
    D = 768
    rows = -(-min(int(1.5 * last_level_cache_bytes()), 192 << 20) // (D * dtype.itemsize))
    x = make_row_input((rows, D), dtype).requires_grad_()
    weight, bias = make_row_params((D,), dtype)
    dy = make_row_input((rows, D), dtype, mean=0.0, std=1.0, seed=9)
    x64 = f64(x).requires_grad_()
    if op == "layer_norm":
        out, ref = bn_ext.layer_norm(x, D, weight, bias), F.layer_norm(x64, (D,), f64(weight), f64(bias))
    else:
        out, ref = bn_ext.rms_norm(x, D, weight, 1e-6), F.rms_norm(x64, (D,), f64(weight), 1e-6)
    assert_close(out, ref, dtype)
    (gx,) = torch.autograd.grad(out, x, dy)
    (gx64,) = torch.autograd.grad(ref, x64, f64(dy))
    assert_close(gx, gx64, dtype)
