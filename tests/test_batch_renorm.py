"""Batch Renormalization against a float64 reference written from the
paper's equations (Ioffe 2017, Algorithm 1), with Keras's running_var =
sigma^2 - eps."""

import copy

import pytest
import torch

import bn_ext
from conftest import assert_close, param_dtype
from test_batch_norm import make_input

EPS = 1e-3


def reference_step(x, w, b, running_mean, running_var, rmax, dmax, momentum=0.01, eps=EPS):
    """One training step in float64: (y, new running_mean, new running_var); r, d constants."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    sigma_b = (x.var(dims, correction=0) + eps).sqrt()
    sigma = (running_var.double() + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu - running_mean.double()) / sigma).clamp(-dmax, dmax).detach()
    x_hat = (x - mu.view(shape)) / sigma_b.view(shape)
    y = w.double().view(shape) * (x_hat * r.view(shape) + d.view(shape)) + b.double().view(shape)
    new_mean = running_mean.double() + momentum * (mu.detach() - running_mean.double())
    new_sigma = sigma + momentum * (sigma_b.detach() - sigma)
    return y, new_mean, new_sigma.square() - eps, r, d


def renorm_case(shape, dtype, layout, stats):
    x = make_input(shape, dtype, layout, mean=0.5, std=2.0)
    C = shape[1]
    g = torch.Generator().manual_seed(4)
    p = param_dtype(dtype)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(p)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(p)
    if stats == "near":  # r and d inside their bounds
        rm = (torch.full((C,), 0.5, dtype=torch.float64) + 0.1 * torch.randn(C, generator=g)).to(p)
        rv = (torch.full((C,), 4.0, dtype=torch.float64) * (1 + 0.2 * torch.rand(C, generator=g))).to(p)
    else:  # far: r clipped at rmax (running sigma small) and d at -dmax (running mean large)
        rm, rv = torch.full((C,), 40.0, dtype=p), torch.full((C,), 0.01, dtype=p)
    return x, w, b, rm, rv


@pytest.mark.parametrize("shape,layout", [((8, 3), "contiguous"), ((4, 5, 6, 7), "contiguous"),
                                          ((4, 5, 6, 7), "channels_last"), ((2, 3, 3, 4, 5), "contiguous"),
                                          ((4, 3, 10), "strided")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stats", ["near", "far"])
def test_training_step_against_the_paper(shape, dtype, layout, stats):
    x, w, b, rm, rv = renorm_case(shape, dtype, layout, stats)
    x = x.requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm_ours, rv_ours = rm.clone(), rv.clone()
    y = bn_ext.batch_renorm(x, rm_ours, rv_ours, wg, bg, True, 0.01, EPS, 3.0, 5.0)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, new_mean, new_var, r, d = reference_step(x64, w64, b64, rm, rv, 3.0, 5.0)
    if stats == "far":
        assert torch.all(r == 3.0) and torch.all(d == -5.0)  # both clipped: the boundary cases
    else:
        assert torch.all((r > 1 / 3) & (r < 3)) and torch.all(d.abs() < 5)
    assert_close(y, ref, dtype, atol_scale=ref.abs().max().item())
    assert_close(rm_ours, new_mean, param_dtype(dtype))
    assert_close(rv_ours, new_var, param_dtype(dtype))
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, wg, bg), dy.to(y.dtype))
    expected = torch.autograd.grad(ref, (x64, w64, b64), dy.to(y.dtype).double())
    for name, g, e in zip(("input", "weight", "bias"), grads, expected):
        assert_close(g, e, dtype, atol_scale=e.abs().max().item() + 1, msg=name)


@pytest.mark.parametrize("value", [3.0, 1 / 3])
def test_clipping_boundary_is_exact(value):
    # sigma_B / sigma exactly at a bound: r is the bound, the output the
    # batch-normalised input scaled by it.
    x = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # sigma_B = sqrt(1 + eps)
    sigma_b = (1 + EPS) ** 0.5
    running_var = torch.tensor([(sigma_b / value) ** 2 - EPS], dtype=torch.float64)
    y = bn_ext.batch_renorm(x, torch.zeros(1, dtype=torch.float64), running_var, None, None, True)
    torch.testing.assert_close(y, x / sigma_b * value, rtol=1e-12, atol=1e-12)


def test_eval_is_batch_norm_with_the_running_statistics_and_folds():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn_ext.nn.BatchRenorm2d(4))
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        model(x)
    model.eval()
    bn = model[1]
    expected = torch.nn.functional.batch_norm(model[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                              False, 0.0, bn.eps)
    torch.testing.assert_close(model(x), expected)
    folded, report = bn_ext.fold_model(copy.deepcopy(model), (x,))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_warmup_ramps_the_clipping_from_batch_norm():
    m = bn_ext.nn.BatchRenorm1d(3, warmup_steps=4)
    assert m.clipping(0) == (1.0, 0.0) or tuple(float(v) for v in m.clipping(0)) == (1.0, 0.0)
    assert tuple(float(v) for v in m.clipping(2)) == (2.0, 2.5)
    assert tuple(float(v) for v in m.clipping(10)) == (3.0, 5.0)
    # Step 0: r_max = 1, d_max = 0: exactly BatchNorm's batch normalisation.
    torch.manual_seed(0)
    with torch.no_grad():
        m.running_mean.fill_(5.0)
        m.running_var.fill_(0.1)
    x = torch.randn(16, 3)
    expected = torch.nn.functional.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    torch.testing.assert_close(m(x), expected)
    assert m.num_batches_tracked.item() == 1
    # Step 2 of 4: the reference with the ramped bounds.
    m.num_batches_tracked.fill_(2)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    ref = reference_step(x, m.weight.detach(), m.bias.detach(), rm, rv, 2.0, 2.5)[0]
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_module_state_dict_repr_and_errors():
    m = bn_ext.nn.BatchRenorm2d(4, rmax=2.0, dmax=1.0, warmup_steps=100)
    assert set(m.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    assert "rmax=2.0, dmax=1.0, warmup_steps=100" in repr(m)
    assert m.eps == 1e-3 and m.momentum == 0.01
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        bn_ext.nn.BatchRenorm2d(4, rmax=0.5)
    with pytest.raises(ValueError, match="momentum must be a number"):
        bn_ext.nn.BatchRenorm2d(4, momentum=None)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4))


def test_double_backward():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    # Running statistics far from the batch's: r and d sit at their bounds,
    # constant near x, so finite differences see the same function as autograd.
    rm, rv = torch.full((3,), 10.0, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64)

    def fn(x, w, b):
        return bn_ext.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.01, EPS, 1.5, 0.5)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_compiles_without_graph_breaks():
    m = bn_ext.nn.BatchRenorm2d(4, warmup_steps=10)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(m.running_var, eager.running_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_matches_eager(training):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn_ext.nn.BatchRenorm2d(4, warmup_steps=3)).train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    exported = program.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x), reference(x))
    torch.testing.assert_close(exported.state_dict()["1.running_var"], reference[1].running_var)


def test_bounds_checked_by_the_operator():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rmax must be >= 1 and dmax >= 0"):
        bn_ext.batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, rmax=0.5)
    with pytest.raises(ValueError, match="rmax must be >= 1 and dmax >= 0"):
        torch.ops.bn_ext.batch_renorm(x, torch.zeros(3), torch.ones(3), None, None, True, 0.1, EPS, 3.0, -1.0)
