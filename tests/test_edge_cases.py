"""NaN and Inf inputs, empty tensors, aliased statistics and mistaken
arguments: bn_ext against torch. The same values (NaN where torch's are NaN),
the same exception type, or one of the differences the README lists under
"Where bn_ext differs from torch"."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import bn_ext.functional as B
import bn_ext.nn as bnn
from conftest import assert_close

NAN, INF = float("nan"), float("inf")
ops = torch.ops.bn_ext


def with_grads(fn, x, params, seed=0):
    """fn(x, *params) and the gradients of x and params for a seeded grad_out."""
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    out = fn(x, *params)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, [x, *params], g))


def assert_same_values(ours, theirs, dtype, what):
    """Equal within the dtype's tolerance, NaN where the other is NaN, the
    same infinities."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a.isnan() == b.isnan()).all(), f"{what}[{i}]: NaN at different places"
        assert_close(a, b, dtype, msg=f"{what}[{i}]")


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --- ReLU's gradient at NaN ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_relu_gradient_passes_at_nan_batch_norm_act(dtype, channels_last, residual):
    # torch.relu's backward zeroes the gradient where its output is <= 0 and
    # passes it elsewhere, NaN included: channel 0's bias gradient is the sum
    # of its grad_out, not 0.
    torch.manual_seed(0)
    x = layout(torch.randn(4, 3, 5, 6).to(dtype), channels_last)
    x[0, 0, 0, 0] = NAN
    r = layout(torch.randn(4, 3, 5, 6).to(dtype), channels_last)
    w, b = torch.randn(3), torch.randn(3)

    def ours(x, w, b):
        return B.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "relu", r if residual else None)

    def theirs(x, w, b):
        y = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        return torch.relu(y + r if residual else y)

    got, want = with_grads(ours, x, [w, b]), with_grads(theirs, x, [w, b])
    assert want[3][0].isfinite() and got[3][0] == pytest.approx(want[3][0].item(), rel=1e-4)
    assert_same_values(got, want, dtype, "relu(batch_norm) at NaN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_gradient_passes_at_nan_group_norm(dtype, channels_last):
    torch.manual_seed(1)
    x = layout(torch.randn(2, 8, 5, 6).to(dtype), channels_last)
    x[1, 0, 2, 2] = NAN
    w, b = torch.randn(8), torch.randn(8)
    got = with_grads(lambda x, w, b: B.group_norm(x, 4, w, b, 1e-5, "relu"), x, [w, b])
    want = with_grads(lambda x, w, b: torch.relu(F.group_norm(x, 4, w, b, 1e-5)), x, [w, b])
    assert want[3][0].isfinite()
    assert_same_values(got, want, dtype, "relu(group_norm) at NaN")


# --- Inf among a channel's first values -----------------------------------------


@pytest.mark.parametrize("shape,channels_last", [((2, 6), False), ((4, 3, 5, 5), False), ((4, 3, 5, 5), True),
                                                 ((2, 3, 4000), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("values", [(INF,), (-INF,), (INF, -INF), (NAN,)])
def test_infinite_first_values_reach_the_statistics(shape, channels_last, dtype, values):
    # The moments are taken about a shift from the first values: an infinite
    # one made the mean NaN (Inf - Inf) where torch's is +-Inf.
    torch.manual_seed(2)
    x = layout(torch.randn(shape, dtype=dtype), channels_last)
    for i, v in enumerate(values):
        x[i, 1] = v  # a channel's first values (the whole sample row of it)
    stats = [torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)]
    theirs = [s.clone() for s in stats]
    out = B.batch_norm(x, *stats, training=True)
    want = F.batch_norm(x, *theirs, training=True)
    assert_same_values([out, *stats], [want, *theirs], dtype, f"batch_norm with {values}")
    expected_mean = values[0] if len(values) == 1 else NAN
    assert stats[0][1].item() == expected_mean or (expected_mean != expected_mean and stats[0][1].isnan())

    act_stats = [torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)]
    B.batch_norm_act(x, *act_stats, training=True, activation="relu")
    assert_same_values(act_stats, theirs, dtype, f"batch_norm_act running statistics with {values}")

    renorm_mean = torch.zeros(shape[1], dtype=dtype)
    B.batch_renorm(x, renorm_mean, torch.ones(shape[1], dtype=dtype), training=True)
    assert renorm_mean[1].item() == expected_mean or (expected_mean != expected_mean and renorm_mean[1].isnan())
    assert renorm_mean[[0, 2]].isfinite().all()

    if len(shape) > 2:
        in_stats = [torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)]
        in_theirs = [s.clone() for s in in_stats]
        got = B.instance_norm(x, *in_stats)
        assert_same_values([got, *in_stats], [F.instance_norm(x, *in_theirs), *in_theirs], dtype,
                           f"instance_norm with {values}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_infinite_values_reach_group_and_layer_norm_means(dtype, channels_last):
    # Outputs as torch's (NaN over the set); the saved mean is the infinity,
    # as BatchNorm's is in both libraries, where torch's GroupNorm and
    # LayerNorm kernels (Welford) save NaN (a documented difference).
    torch.manual_seed(3)
    x = layout(torch.randn(2, 4, 6, 6, dtype=dtype), channels_last)
    x[0, 0, 0, 0] = INF
    out, mean, _ = ops.group_norm_forward(x, 2, None, None, 1e-5, None)
    assert_same_values([out], [F.group_norm(x, 2)], dtype, "group_norm")
    assert mean[0, 0].item() == INF and mean.view(-1)[1:].isfinite().all()
    rows = torch.randn(3, 40, dtype=dtype)
    rows[1, 0] = -INF
    out, mean, _ = ops.layer_norm_forward(rows, [40], None, None, 1e-5)
    assert_same_values([out], [F.layer_norm(rows, [40])], dtype, "layer_norm")
    assert mean[1, 0].item() == -INF and mean[[0, 2]].isfinite().all()


# --- empty tensors -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (4, 0), (2, 0, 3, 3)])
def test_batch_renorm_of_an_empty_batch_leaves_the_statistics(shape):
    C = shape[1]
    mean, var = torch.full((C,), 0.5), torch.full((C,), 2.0)
    x = torch.randn(shape)
    out = B.batch_renorm(x, mean, var, training=True)
    want_mean, want_var = mean.clone(), var.clone()
    want = F.batch_norm(x, want_mean, want_var, training=True)
    assert out.shape == want.shape and torch.equal(mean, want_mean) and torch.equal(var, want_var)
    assert torch.equal(mean, torch.full((C,), 0.5)) and torch.equal(var, torch.full((C,), 2.0))


def test_layer_norm_channels_without_channels_has_a_backward():
    # C = 0: the forward saves one mean and rstd per position (LayerNorm's of
    # an empty row: 0 and NaN), and the backward takes them.
    x = torch.randn(2, 0, 3, 3, requires_grad=True)
    out = B.layer_norm_channels(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    _, mean, rstd = ops.layer_norm_channels_forward(x.detach(), None, None, 1e-6)
    _, want_mean, want_rstd = torch.native_layer_norm(x.detach().permute(0, 2, 3, 1), [0], None, None, 1e-6)
    assert mean.shape == (2, 1, 3, 3)
    assert_same_values([mean.flatten(), rstd.flatten()], [want_mean.flatten(), want_rstd.flatten()], torch.float32,
                       "layer_norm_channels statistics, C = 0")
    module = bnn.LayerNorm2d(0)
    module(torch.randn(2, 0, 4, 4, requires_grad=True)).sum().backward()


# --- LayerNorm of one value per row ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_layer_norm_of_one_value_has_a_zero_input_gradient(dtype):
    # The output is the bias whatever x is: the exact gradient is 0, and
    # rstd = 1/sqrt(eps) magnified the kernels' rounding to 1e-4.
    torch.manual_seed(4)
    x = (torch.randn(64, 1) * 30 + 7).to(dtype)
    w, b = torch.randn(1, dtype=dtype), torch.randn(1, dtype=dtype)
    _, dx, dw, db = with_grads(lambda x, w, b: B.layer_norm(x, (1,), w, b), x, [w, b])
    assert torch.equal(dx, torch.zeros_like(dx))
    _, _, want_dw, want_db = with_grads(lambda x, w, b: F.layer_norm(x, (1,), w, b), x, [w, b])
    assert_close(db, want_db, dtype)
    x4 = (torch.randn(3, 1, 5, 5) * 30).to(dtype)
    for fmt in (torch.contiguous_format, torch.channels_last):
        _, dx4, _, _ = with_grads(lambda x, w, b: B.layer_norm_channels(x, w, b, 1e-5),
                                  x4.contiguous(memory_format=fmt), [w, b])
        assert torch.equal(dx4, torch.zeros_like(dx4))


# --- exception types ------------------------------------------------------------------


def _bn_stats():
    return torch.zeros(3), torch.ones(3)


# (id, bn_ext call, torch call): the same mistake, the same exception type.
SAME_EXCEPTION = [
    ("batch_norm momentum None", lambda: B.batch_norm(torch.randn(4, 3), *_bn_stats(), training=True, momentum=None),
     lambda: F.batch_norm(torch.randn(4, 3), *_bn_stats(), training=True, momentum=None)),
    ("batch_norm eval without running_var", lambda: B.batch_norm(torch.randn(4, 3), torch.zeros(3), None),
     lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None)),
    ("batch_norm eval without running_mean", lambda: B.batch_norm(torch.randn(4, 3), None, torch.ones(3)),
     lambda: F.batch_norm(torch.randn(4, 3), None, torch.ones(3))),
    ("batch_norm training with one statistic",
     lambda: B.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True),
     lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)),
    ("rms_norm 0-d", lambda: B.rms_norm(torch.tensor(1.0), (1,)), lambda: F.rms_norm(torch.tensor(1.0), (1,))),
    ("group_norm C = 0", lambda: B.group_norm(torch.randn(2, 0, 3), 1), lambda: F.group_norm(torch.randn(2, 0, 3), 1)),
    ("group_norm HxW = 0", lambda: B.group_norm(torch.randn(2, 4, 0), 2),
     lambda: F.group_norm(torch.randn(2, 4, 0), 2)),
    ("instance_norm 0-d", lambda: B.instance_norm(torch.tensor(1.0)), lambda: F.instance_norm(torch.tensor(1.0))),
    ("instance_norm 1-d", lambda: B.instance_norm(torch.randn(3)), lambda: F.instance_norm(torch.randn(3))),
    ("instance_norm one statistic", lambda: B.instance_norm(torch.randn(2, 2, 3, 3), torch.zeros(2), None),
     lambda: F.instance_norm(torch.randn(2, 2, 3, 3), torch.zeros(2), None)),
    ("instance_norm eval without statistics",
     lambda: B.instance_norm(torch.randn(2, 2, 3, 3), torch.zeros(2), None, use_input_stats=False),
     lambda: F.instance_norm(torch.randn(2, 2, 3, 3), torch.zeros(2), None, use_input_stats=False)),
    ("instance_norm statistics of another length",
     lambda: B.instance_norm(torch.randn(2, 1, 3, 3), torch.zeros(2), torch.ones(2)),
     lambda: F.instance_norm(torch.randn(2, 1, 3, 3), torch.zeros(2), torch.ones(2))),
]


@pytest.mark.level_independent
@pytest.mark.parametrize("ours,theirs", [c[1:] for c in SAME_EXCEPTION], ids=[c[0] for c in SAME_EXCEPTION])
def test_the_same_mistake_raises_torchs_exception_type(ours, theirs):
    with pytest.raises(Exception) as torch_error:
        theirs()
    with pytest.raises(type(torch_error.value)):
        ours()


@pytest.mark.level_independent
def test_instance_norm_refuses_statistics_of_another_length_untouched():
    mean, var = torch.zeros(2), torch.ones(2)
    with pytest.raises(RuntimeError, match="running_mean"):
        B.instance_norm(torch.randn(2, 1, 3, 3) + 5, mean, var)
    assert torch.equal(mean, torch.zeros(2)) and torch.equal(var, torch.ones(2))


@pytest.mark.parametrize("shape", [(1, 0, 3, 3), (0, 2, 3, 3), (2, 3, 0), (2, 0, 3)])
def test_instance_norm_of_an_empty_input(shape):
    C = shape[1]
    stats, theirs = [torch.zeros(C), torch.ones(C)], [torch.zeros(C), torch.ones(C)]
    out = B.instance_norm(torch.randn(shape), *stats)
    want = F.instance_norm(torch.randn(shape), *theirs)
    assert out.shape == want.shape
    # Left alone; torch's become NaN for a batch of no sample (a documented difference).
    assert torch.equal(stats[0], torch.zeros(C)) and torch.equal(stats[1], torch.ones(C))
    if shape[0] > 0:
        assert all(torch.equal(a, b) for a, b in zip(stats, theirs))


# --- statistics that share memory -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 4)])
def test_statistics_sharing_the_input_are_refused_in_training(dtype, shape):
    # Written while the input is read: refused (torch's result depends on its
    # order of reads and writes), the input and statistics left as they were.
    x = torch.rand(shape, dtype=dtype) + 0.5
    before = x.clone()
    flat = x.view(-1)
    for stats in ((flat[:3], flat[3:6]), (flat[:3], torch.ones(3, dtype=dtype))):
        with pytest.raises(RuntimeError, match="share memory"):
            B.batch_norm(x, *stats, training=True)
        with pytest.raises(RuntimeError, match="share memory"):
            B.batch_norm_act(x, *stats, training=True)
        assert torch.equal(x, before)
    shared = torch.ones(3, dtype=dtype)
    with pytest.raises(RuntimeError, match="each other"):
        B.batch_norm(x, shared, shared, training=True)
    # Evaluation only reads them: the result of unshared copies.
    got = B.batch_norm(x, flat[:3], flat[3:6])
    assert torch.equal(got, B.batch_norm(before, before.view(-1)[:3].clone(), before.view(-1)[3:6].clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renorm_and_instance_norm_with_shared_statistics_compute_as_unshared(dtype):
    # They read every statistic before they write one.
    x = torch.rand(2, 3, 4, 4, dtype=dtype) + 0.5
    copy = x.clone()
    got = B.batch_renorm(x, x.view(-1)[:3], x.view(-1)[3:6], training=True, momentum=0.5)
    want = B.batch_renorm(copy.clone(), copy.view(-1)[:3].clone(), copy.view(-1)[3:6].clone(), training=True,
                          momentum=0.5)
    assert torch.equal(got, want)
    x = copy.clone()
    got = B.instance_norm(x, x.view(-1)[:3], x.view(-1)[3:6])
    assert torch.equal(got, B.instance_norm(copy.clone(), copy.view(-1)[:3].clone(), copy.view(-1)[3:6].clone()))


# --- drop-in signatures ---------------------------------------------------------------


def _modules_with_torch_twins():
    for name in dir(bnn):
        ours = getattr(bnn, name)
        if inspect.isclass(ours) and issubclass(ours, torch.nn.Module) and hasattr(torch.nn, name):
            yield name, ours, getattr(torch.nn, name)


@pytest.mark.level_independent
def test_every_drop_in_module_is_compared():
    assert {name for name, *_ in _modules_with_torch_twins()} == {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "LayerNorm", "RMSNorm", "SyncBatchNorm"}


@pytest.mark.level_independent
@pytest.mark.parametrize("name,ours,theirs", list(_modules_with_torch_twins()),
                         ids=[n for n, *_ in _modules_with_torch_twins()])
def test_modules_take_every_argument_of_their_torch_twin(name, ours, theirs):
    for method in ("__init__", "forward"):
        want = inspect.signature(getattr(theirs, method)).parameters
        got = inspect.signature(getattr(ours, method)).parameters
        for param in want.values():
            assert param.name in got, f"{name}.{method} lacks torch's {param.name}"
            mine = got[param.name]
            assert mine.kind == param.kind, f"{name}.{method}({param.name}): {mine.kind} vs torch's {param.kind}"
            assert mine.default == param.default, f"{name}.{method}({param.name}): {mine.default} vs {param.default}"


@pytest.mark.level_independent
@pytest.mark.parametrize("cls", [bnn.GroupNorm, bnn.SyncBatchNorm])
def test_bias_false_drops_the_bias_as_torchs(cls):
    args = (2, 4) if cls is bnn.GroupNorm else (4,)
    ours, theirs = cls(*args, bias=False), getattr(torch.nn, cls.__name__)(*args, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 4, 5, 5)
    ours.load_state_dict(theirs.state_dict())
    assert_close(ours(x), theirs(x), torch.float32)


# --- parameters of other shapes, eps -------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameters_and_statistics_of_shape_1_by_c(dtype, training):
    # Any shape of C elements is read (and written) in its own order: a
    # (1, C) weight was read with its first stride, C elements apart.
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5, dtype=dtype)
    pdtype = torch.float32
    w, b = torch.randn(1, 3, dtype=pdtype), torch.randn(1, 3, dtype=pdtype)
    stats = [torch.randn(1, 3, dtype=pdtype), torch.rand(1, 3, dtype=pdtype) + 0.5]
    flat = [s.clone().view(-1) for s in stats]
    out = B.batch_norm(x, *stats, w, b, training)
    want = F.batch_norm(x, *flat, w.view(-1), b.view(-1), training)
    assert_same_values([out, stats[0].view(-1), stats[1].view(-1)], [want, *flat], dtype, "(1, C) parameters")


@pytest.mark.level_independent
@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -1.0, 0.0])
def test_training_eps_must_be_positive_and_finite(eps):
    # running_var is kept from 1 / invstd^2 - eps: NaN for eps = Inf (torch
    # computes one; a documented difference). torch refuses eps <= 0 too.
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps"):
        B.batch_norm(torch.randn(4, 3), mean, var, training=True, eps=eps)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
