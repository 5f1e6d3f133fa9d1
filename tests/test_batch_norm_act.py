"""Fused BatchNorm + activation (+ residual) on the CPU.

Two references: the unfused ops (bn_ext.batch_norm, then + residual, then
torch's ReLU / SiLU), which the fused op must equal bitwise for ReLU and
no activation, outputs and all four gradients; and a float64 composite of
torch ops, which bounds SiLU's error (its exp differs from torch's by ulps)
and checks the unfused chain itself.
"""

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from conftest import DTYPES, assert_error_within, param_dtype
from test_batch_norm import SHAPE_LAYOUTS, expected_memory_format, make_input, make_params

ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "silu": F.silu}


def unfused(x, rm, rv, w, b, training, activation, residual, momentum=0.1, eps=1e-5):
    y = bn_ext.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation](y)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run(fn, x, w, b, residual, dy):
    """fn's output and the gradients of (x, w, b, residual) for upstream dy."""
    x, w, b, r = leaves(x, w, b, residual)
    out = fn(x, w, b, r)
    wanted = [t for t in (x, w, b, r) if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, dy))
    return out, [next(grads) if t is not None else None for t in (x, w, b, r)]


def case(shape, dtype, layout, with_residual):
    x = make_input(shape, dtype, layout)
    w, b, rm, rv = make_params(shape[1], dtype)
    residual = make_input(shape, dtype, layout, mean=-0.3, std=1.5, seed=5) if with_residual else None
    dy = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=7)
    return x, w, b, rm, rv, residual, dy


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_equals_unfused_bitwise(shape, dtype, layout, training, activation, with_residual):
    x, w, b, rm, rv, residual, dy = case(shape, dtype, layout, with_residual)
    rm_fused, rv_fused, rm_ref, rv_ref = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    x_before = x.clone()
    out, grads = run(lambda x_, w_, b_, r_: bn_ext.batch_norm_act(
        x_, rm_fused, rv_fused, w_, b_, training, activation=activation, residual=r_), x, w, b, residual, dy)
    ref, ref_grads = run(lambda x_, w_, b_, r_: unfused(x_, rm_ref, rv_ref, w_, b_, training, activation, r_),
                         x, w, b, residual, dy)
    assert out.dtype == dtype and out.is_contiguous(memory_format=expected_memory_format(x))
    assert torch.equal(out, ref)
    for name, g, e in zip(("input", "weight", "bias", "residual"), grads, ref_grads):
        if e is None:
            assert g is None
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), name
    assert torch.equal(rm_fused, rm_ref) and torch.equal(rv_fused, rv_ref)
    assert torch.equal(x, x_before)


def reference64(x, w, b, rm, rv, training, activation, residual):
    d = [None if t is None else t.double() for t in (x, w, b, rm, rv, residual)]
    y = F.batch_norm(d[0], d[3], d[4], d[1], d[2], training)
    return ACTIVATIONS[activation](y if residual is None else y + d[5])


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_silu_against_float64(shape, dtype, layout, training, with_residual):
    x, w, b, rm, rv, residual, dy = case(shape, dtype, layout, with_residual)
    out, grads = run(lambda x_, w_, b_, r_: bn_ext.batch_norm_act(
        x_, rm.clone(), rv.clone(), w_, b_, training, activation="silu", residual=r_), x, w, b, residual, dy)
    ref, ref_grads = run(lambda x_, w_, b_, r_: reference64(x_, w_, b_, rm, rv, training, "silu", r_),
                         x, w, b, residual, dy.double())
    # torch's unfused chain on the same rounded inputs sets the error bar.
    peer, peer_grads = run(lambda x_, w_, b_, r_: F.silu(
        F.batch_norm(x_, rm.clone(), rv.clone(), w_, b_, training) + (0 if r_ is None else r_)), x, w, b, residual, dy)
    assert_error_within(out, ref, peer, msg="out")
    # The parameter gradients are sums that cancel: no float32 sum is more
    # exact than a rounding of its largest term, dz * x_hat or dz (|silu'| < 1.1).
    reduced = [d for d in range(x.dim()) if d != 1]
    if training:
        var, mean = torch.var_mean(x.double(), reduced, unbiased=False, keepdim=True)
    else:
        mean, var = (t.double().view(1, -1, *[1] * (x.dim() - 2)) for t in (rm, rv))
    x_hat = (x.double() - mean) / (var + 1e-5).sqrt()
    dz_max = 1.1 * dy.double().abs().max()
    # grad_input cancels too: (2, 1) has two values a channel, whose outputs
    # are +-1 whatever x, so its exact gradient is ~0 from terms of dz * w * invstd.
    input_term = dz_max * w.double().abs().max() * (var + 1e-5).rsqrt().max()
    terms = [input_term, dz_max * x_hat.abs().max(), dz_max, None]
    # dz is rounded to the input's dtype (as the unfused chain stores it), so
    # the float32 parameter gradients of half inputs carry its roundings.
    for name, g, e, p, m in zip(("input", "weight", "bias", "residual"), grads, ref_grads, peer_grads, terms):
        if e is not None:
            assert_error_within(g, e, p, msg=name, magnitude=m, dtype=dtype)


@pytest.mark.parametrize("activation", ["relu", "silu", "none"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward(activation, with_residual, training):
    shape = (3, 2, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64, generator=g), torch.rand(2, dtype=torch.float64, generator=g) + 0.5

    def fn(x, w, b, r):
        return bn_ext.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                                     residual=r if with_residual else None)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True), (True, True, True, True)])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_backward_output_mask(mask, activation):
    x, w, b, rm, rv, residual, dy = case((4, 3, 5, 5), torch.float32, "contiguous", True)
    ops = torch.ops.bn_ext
    _, mean, invstd = ops.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, activation, residual)
    args = (dy, x, residual, w, b, mean, invstd, True, 1e-5, activation)
    full = ops.batch_norm_act_backward(*args, [True] * 4)
    part = ops.batch_norm_act_backward(*args, list(mask))
    for asked, f, p in zip(mask, full, part):
        if asked:
            assert torch.equal(p, f)
        else:
            assert p.numel() == 0


def test_relu_mask_is_recomputed_from_saved_statistics():
    """Values whose pre-activation lies within a rounding of 0: the backward's
    recomputed mask must be the forward's (a mask from unrounded statistics
    would flip some)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, 33, generator=g) * 3 + 1
    # Values equal to their channel's mean as saved (rounded to float32):
    # normalised with the saved statistics they are exactly 0, with the
    # unrounded mean a tiny value of either sign. Setting them moves the
    # mean, so until it settles.
    for _ in range(30):
        mean = torch.ops.bn_ext.batch_norm_stats(x)[0]
        x[:, :, 0] = mean.float().view(1, -1)
    mean = torch.ops.bn_ext.batch_norm_stats(x)[0]
    assert torch.equal(mean.float(), x[0, :, 0]) and not torch.equal(mean, x[0, :, 0].double())
    out, grads = run(lambda x_, w_, b_, r_: bn_ext.batch_norm_act(x_, None, None, w_, b_, True), x,
                     torch.ones(8), torch.zeros(8), None, torch.ones_like(x))
    ref, ref_grads = run(lambda x_, w_, b_, r_: unfused(x_, None, None, w_, b_, True, "relu", None), x,
                         torch.ones(8), torch.zeros(8), None, torch.ones_like(x))
    assert torch.equal(out, ref)
    assert all(torch.equal(a, e) for a, e in zip(grads[:3], ref_grads[:3]))


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 1e-7), (torch.bfloat16, 1e-38)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_relu_mask_of_values_that_round_to_zero(dtype, scale, with_residual):
    """Normalised values so small that many round to zero in the input's
    dtype (float16 below 2^-25, bfloat16 below 2^-134): the unfused ReLU sees
    those zeros, so the fused backward must mask them too."""
    x = make_input((8, 3, 9, 9), dtype, "contiguous")
    w, b = torch.full((3,), scale), torch.zeros(3)
    residual = torch.zeros_like(x) if with_residual else None
    dy = torch.ones_like(x)
    out, grads = run(lambda x_, w_, b_, r_: bn_ext.batch_norm_act(x_, None, None, w_, b_, True, residual=r_), x, w, b,
                     residual, dy)
    ref, ref_grads = run(lambda x_, w_, b_, r_: unfused(x_, None, None, w_, b_, True, "relu", r_), x, w, b, residual,
                         dy)
    zeros = (ref == 0).sum().item()
    assert 0 < zeros - (x <= x.double().mean((0, 2, 3), keepdim=True)).sum().item()  # some positives rounded to 0
    assert torch.equal(out, ref)
    assert all(g is None and e is None or torch.equal(g, e) for g, e in zip(grads, ref_grads))


@pytest.mark.level_independent
def test_momentum_none_and_num_batches_tracked():
    x, w, b, rm, rv, residual, _ = case((4, 3, 5, 5), torch.float32, "contiguous", True)
    tracked = torch.tensor(3)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    bn_ext.batch_norm_act(x, rm, rv, w, b, True, None, residual=residual, num_batches_tracked=tracked)
    torch.ops.bn_ext.batch_norm_forward(x, w, b, None, None, True, 1e-5)
    expected_rm = rm_ref * (2 / 3) + x.double().mean((0, 2, 3)).float() / 3
    torch.testing.assert_close(rm, expected_rm)
    assert not torch.equal(rv, rv_ref)


@pytest.mark.level_independent
def test_bad_arguments():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="activation must be"):
        bn_ext.batch_norm_act(x, None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.bn_ext.batch_norm_act_forward(x, None, None, None, None, True, 1e-5, "tanh", None)
    with pytest.raises(RuntimeError, match=r"residual must have the input's size \[4, 3, 5\], got \[4, 3, 4\]"):
        bn_ext.batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, 4))
    with pytest.raises(RuntimeError, match="residual must have the input's dtype Float, got Double"):
        bn_ext.batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined in evaluation mode"):
        bn_ext.batch_norm_act(x, None, None, training=False)


def test_residual_with_another_layout_is_read_correctly():
    x = make_input((4, 6, 5, 7), torch.float32, "channels_last")
    residual = make_input((4, 6, 5, 7), torch.float32, "contiguous", seed=9)
    out = bn_ext.batch_norm_act(x, None, None, training=True, residual=residual)
    ref = unfused(x, None, None, None, None, True, "relu", residual)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_half_params_of_a_mixed_precision_model():
    x = make_input((4, 6, 5, 5), torch.bfloat16, "contiguous")
    w, b, rm, rv = make_params(6, torch.bfloat16)
    assert w.dtype == param_dtype(torch.bfloat16)
    out = bn_ext.batch_norm_act(x, rm, rv, w, b, False, activation="silu")
    ref = reference64(x, w, b, rm, rv, False, "silu", None)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=2e-2)


# --- Modules and conversion ---------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "silu", None])
def test_module_matches_unfused_train_and_eval(dims, activation):
    shape = [(6, 4), (3, 4, 5, 6), (2, 4, 3, 4, 5)][dims - 1]
    fused = getattr(bn_ext.nn, f"BatchNormAct{dims}d")(4, momentum=None, activation=activation)
    plain = getattr(bn_ext.nn, f"BatchNorm{dims}d")(4, momentum=None)
    assert set(fused.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    assert f"activation={activation!r}" in repr(fused)
    g = torch.Generator().manual_seed(0)
    for training in (True, True, False):
        fused.train(training)
        plain.train(training)
        x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        out, expected = fused(x, r), ACTIVATIONS[activation or "none"](plain(x) + r)
        # SiLU's exp differs from torch's by ulps; the rest is bitwise.
        torch.testing.assert_close(out, expected, rtol=0, atol=0 if activation != "silu" else 1e-6)
        assert torch.equal(fused.running_mean, plain.running_mean)
        assert torch.equal(fused.num_batches_tracked, plain.num_batches_tracked)


@pytest.mark.level_independent
def test_module_residual_that_broadcasts_takes_the_unfused_ops():
    m = bn_ext.nn.BatchNormAct2d(3)
    x, r = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1)
    assert torch.equal(m(x, r), F.relu(bn_ext.batch_norm(x, None, None, m.weight, m.bias, True) + r))
    with pytest.raises(ValueError, match="activation must be"):
        bn_ext.nn.BatchNormAct2d(3, activation="gelu")


def _train_step(model, x):
    out = model(x)
    out.square().sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_fuse_activations_in_torchvision_resnets_is_bitwise(name, channels_last):
    import copy

    import torchvision

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = bn_ext.nn.convert(getattr(torchvision.models, name)(num_classes=10)).to(memory_format=fmt)
    reference = copy.deepcopy(model)
    fused = bn_ext.nn.convert(model, fuse_activations=True)
    blocks = {"resnet18": 8, "resnet50": 16}[name]
    per_block = {"resnet18": 2, "resnet50": 3}[name]
    acts = [m for m in fused.modules() if isinstance(m, bn_ext.nn.BatchNormAct2d)]
    assert len(acts) == 1 + blocks * per_block
    assert not any(isinstance(m, bn_ext.nn.BatchNormAct2d) for m in model.modules())
    # Parameters are shared, not copied: an optimizer of `model` steps the fused model.
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(2, 3, 64, 64).to(memory_format=fmt)
    _assert_steps_equal(fused, reference, x)
    # revert unfuses: BatchNorm, add and relu again, on torch.nn's modules.
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    bn_ext.nn.revert(fused)
    bn_ext.nn.revert(reference)
    assert not any(type(m).__module__.startswith("bn_ext") for m in fused.modules())
    assert sum(type(m) is torch.nn.BatchNorm2d for m in fused.modules()) == norms
    _assert_steps_equal(fused, reference, x)


def _assert_steps_equal(model, reference, x):
    """A training step and an eval step: outputs, gradients and state bitwise equal."""
    for training in (True, False):
        model.train(training)
        reference.train(training)
        for p in list(model.parameters()) + list(reference.parameters()):
            p.grad = None
        out, grads = _train_step(model, x)
        ref, ref_grads = _train_step(reference, x)
        assert torch.equal(out, ref)
        assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
        for (key, value), (ref_key, ref_value) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert key == ref_key and torch.equal(value, ref_value)


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow at the top, a fusable block below."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.bn = torch.nn.BatchNorm2d(4)  # read twice: not fusable

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        z = self.bn(y)
        return F.relu(z) + z


@pytest.mark.level_independent
def test_fuse_activations_inside_untraceable_models_and_only_where_safe():
    model = bn_ext.nn.convert(_Untraceable())
    fused = bn_ext.nn.convert(model, fuse_activations=True)
    assert isinstance(fused.block, torch.fx.GraphModule) and fused.block is not model.block
    assert isinstance(fused.block[1] if hasattr(fused.block, "__getitem__") else fused.block.get_submodule("1"),
                      bn_ext.nn.BatchNormAct2d)
    assert type(fused.bn) is bn_ext.nn.BatchNorm2d and type(model.block[1]) is bn_ext.nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fused(x), model(x))
    bn_ext.nn.revert(fused)
    assert type(fused.block.get_submodule("1")) is torch.nn.BatchNorm2d
    assert torch.equal(fused(x), bn_ext.nn.revert(model)(x))


@pytest.mark.level_independent
def test_fuse_activations_leaves_a_reused_module_alone():
    class Reused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return torch.relu(self.bn(x)) + self.bn(x * 2)

    model = bn_ext.nn.convert(Reused())
    assert bn_ext.nn.convert(model, fuse_activations=True) is model


@pytest.mark.level_independent
def test_convert_timm_batch_norm_act_runs_fused_and_reverts():
    import timm
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    reference = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    reference.load_state_dict(model.state_dict())
    bn_ext.nn.convert(model)
    norms = [m for m in model.modules() if isinstance(m, TimmBatchNormAct2d)]
    assert norms and all(type(m).__module__ == "bn_ext.modules" for m in norms)
    assert {bn_ext.modules._fusable_activation(m.act) for m in norms} <= {"silu", "none"}
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    bn_ext.nn.revert(model)
    assert all(type(m) is TimmBatchNormAct2d for m in norms)


# --- The operator contract ----------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = bn_ext.nn.BatchNormAct2d(4)
        self.bn2 = bn_ext.nn.BatchNormAct2d(4, activation="silu", momentum=None)

    def forward(self, x):
        return self.bn2(self.bn(self.conv(x), x), x)


@pytest.mark.level_independent
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_and_export_match_eager(training):
    torch.manual_seed(0)
    eager, compiled_model = _Block().train(training), _Block().train(training)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 4, 6, 6, requires_grad=True)
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e)
        (ge,) = torch.autograd.grad(out_e.square().sum(), x)
        (gc,) = torch.autograd.grad(out_c.square().sum(), x)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    x = torch.randn(2, 4, 6, 6)
    program = torch.export.export(_Block().train(training), (x,))
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "bn_ext.batch_norm_act.default" in names  # the composite operator, kept whole
    decomposed = program.run_decompositions()
    assert "bn_ext.batch_norm_act_forward.default" in {str(n.target) for n in decomposed.graph.nodes}
    reference = _Block().train(training)
    reference.load_state_dict(program.module().state_dict())
    torch.testing.assert_close(program.module()(x), reference(x))
