"""BatchNorm folding: pairwise fusers against the unfolded pair in float64,
whole models, the cases other folders get wrong, and the report."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_ext
from conftest import DTYPES, ROUNDOFF, randomise_batch_norms


def calibrated_bn(bn_cls, channels, affine=True, dtype=torch.float32, seed=0):
    """An eval BatchNorm whose statistics and affine parameters are not the defaults."""
    g = torch.Generator().manual_seed(seed)
    bn = bn_cls(channels, affine=affine)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.2)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=g))
            bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.to(dtype).eval()


CONV_CASES = {
    # name: (module factory, batch norm class, input shape)
    "conv1d": (lambda g, b: nn.Conv1d(4, 6, 3, groups=g, bias=b, padding=1), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d": (lambda g, b: nn.Conv2d(4, 6, 3, groups=g, bias=b, stride=2, dilation=2, padding=2,
                                      padding_mode="reflect"), nn.BatchNorm2d, (2, 4, 11, 9)),
    "conv3d": (lambda g, b: nn.Conv3d(4, 6, 2, groups=g, bias=b), nn.BatchNorm3d, (2, 4, 5, 4, 3)),
    "conv_transpose1d": (lambda g, b: nn.ConvTranspose1d(4, 6, 3, groups=g, bias=b, stride=2), nn.BatchNorm1d,
                         (2, 4, 7)),
    "conv_transpose2d": (lambda g, b: nn.ConvTranspose2d(4, 6, 3, groups=g, bias=b, stride=2, output_padding=1),
                         nn.BatchNorm2d, (2, 4, 5, 6)),
    "conv_transpose3d": (lambda g, b: nn.ConvTranspose3d(4, 6, 2, groups=g, bias=b), nn.BatchNorm3d,
                         (2, 4, 3, 3, 2)),
}


def depthwise(name, bias):
    """Depthwise variant of a case: groups == in == out channels."""
    cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "conv_transpose1d": nn.ConvTranspose1d,
           "conv_transpose2d": nn.ConvTranspose2d, "conv_transpose3d": nn.ConvTranspose3d}[name]
    return cls(4, 4, 3, groups=4, bias=bias)


def reference_pair(layer, bn, x):
    """The unfolded pair evaluated in float64."""
    return bn.double()(layer.double()(x.double()))


def assert_only_rounding_differs(fused, expected, x):
    """The folded layer evaluated in float64 differs from the float64 pair only
    by the rounding of its weight and bias to their dtype: at most
    u * (|W| * |x| + |b|) in each output (u the dtype's unit roundoff), plus
    the float64 arithmetic of both sides. A weight folded along the wrong
    axis, or a bias off by one term, moves outputs by far more."""
    layer = copy.deepcopy(fused).double()
    magnitude = copy.deepcopy(layer)
    with torch.no_grad():
        magnitude.weight.abs_()
        if magnitude.bias is not None:
            magnitude.bias.abs_()
    bound = (ROUNDOFF[fused.weight.dtype] + 16 * ROUNDOFF[torch.float64]) * magnitude(x.double().abs())
    error = (layer(x.double()) - expected).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g} times the rounding bound (largest error {error.max().item():.3g})"


@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fuse_conv_bn_matches_pair(name, groups, bias, affine, dtype):
    factory, bn_cls, shape = CONV_CASES[name]
    torch.manual_seed(0)
    conv = depthwise(name, bias) if groups == "depthwise" else factory(groups, bias)
    out_channels = conv.out_channels
    conv = conv.to(dtype).eval()
    bn = calibrated_bn(bn_cls, out_channels, affine, dtype)
    conv_before = copy.deepcopy(conv.state_dict())
    fused = bn_ext.fuse_conv_bn(conv, bn)
    assert fused.weight.dtype == dtype and fused.bias.dtype == dtype and type(fused) is type(conv)
    for k, v in conv_before.items():
        assert torch.equal(conv.state_dict()[k], v)  # the input module is unchanged
    x = torch.randn(shape).to(dtype)
    expected = reference_pair(copy.deepcopy(conv), copy.deepcopy(bn), x)
    assert_only_rounding_differs(fused, expected, x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_weight_keeps_memory_format_and_device(channels_last):
    conv = nn.Conv2d(8, 8, 3).eval()
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    fused = bn_ext.fuse_conv_bn(conv, calibrated_bn(nn.BatchNorm2d, 8))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert fused.weight.is_contiguous(memory_format=fmt)
    assert fused.weight.device == conv.weight.device


def test_conv_transpose_in_equals_out_with_groups_uses_the_output_axis():
    # in_channels == out_channels: folding along the wrong axis gives the right
    # shapes and a silently wrong result.
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 6, 3, groups=3, stride=2).eval()
    bn = calibrated_bn(nn.BatchNorm2d, 6)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    fused = bn_ext.fuse_conv_bn(deconv, bn).double()
    torch.testing.assert_close(fused(x), reference_pair(deconv, bn, x))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fuse_linear_bn(affine, dtype):
    linear = nn.Linear(5, 7).to(dtype).eval()
    bn = calibrated_bn(nn.BatchNorm1d, 7, affine, dtype)
    fused = bn_ext.fuse_linear_bn(linear, bn)
    x = torch.randn(4, 5).to(dtype)
    expected = reference_pair(linear, bn, x)
    assert_only_rounding_differs(fused, expected, x)


@pytest.mark.parametrize("case", ["valid", "reflect", "groups"])
def test_fuse_bn_conv_exact_cases(case):
    conv = {
        "valid": nn.Conv2d(4, 6, 3),
        "reflect": nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        "groups": nn.Conv2d(4, 6, 3, groups=2, bias=False),
    }[case].double().eval()
    bn = calibrated_bn(nn.BatchNorm2d, 4).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    fused = bn_ext.fuse_bn_conv(bn, conv)
    torch.testing.assert_close(fused(x), conv(bn(x)))


def test_fuse_bn_linear():
    bn = calibrated_bn(nn.BatchNorm1d, 5).double()
    linear = nn.Linear(5, 3).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(bn_ext.fuse_bn_linear(bn, linear)(x), linear(bn(x)))


def test_refusals():
    bn = calibrated_bn(nn.BatchNorm2d, 4)
    with pytest.raises(ValueError, match="zero-pads its input"):
        bn_ext.fuse_bn_conv(bn, nn.Conv2d(4, 4, 3, padding=1).eval())
    with pytest.raises(TypeError, match="ConvTranspose does not fold exactly"):
        bn_ext.fuse_bn_conv(bn, nn.ConvTranspose2d(4, 4, 3).eval())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn_ext.fuse_conv_bn(nn.Conv2d(3, 4, 1).eval(), nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(RuntimeError, match="eval mode"):
        bn_ext.fuse_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).eval())
    with pytest.raises(RuntimeError, match="eval mode"):
        bn_ext.fuse_linear_bn(nn.Linear(3, 4).eval(), nn.BatchNorm1d(4))
    with pytest.raises(RuntimeError, match="BatchNorm has 5 channels but the layer has 4 output channels"):
        bn_ext.fuse_conv_bn(nn.Conv2d(3, 4, 1).eval(), nn.BatchNorm2d(5).eval())


def test_fuse_layer_norm_linear():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    q, k = nn.Linear(8, 4), nn.Linear(8, 6, bias=False)
    plain, (q2, k2) = bn_ext.fuse_layer_norm_linear(ln, [q, k])
    assert not plain.elementwise_affine and type(plain) is nn.LayerNorm
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(q2(plain(x)), q(ln(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2(plain(x)), k(ln(x)), rtol=1e-5, atol=1e-5)


# --- whole models -----------------------------------------------------------


def calibrate(model, shape, steps=3, seed=0):
    """Training-mode passes over random data so BN statistics are not the defaults."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape) * 2 + 0.5)
    return model.eval()


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_unchanged(model, snapshot):
    state, modes = snapshot
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5"]
)
def test_torchvision_models_fold_completely(name):
    import torchvision

    torch.manual_seed(0)
    model = calibrate(getattr(torchvision.models, name)(), (4, 3, 64, 64))
    model.train()  # the caller's mode must survive too
    snapshot = state_snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    folded, report = bn_ext.fold_model(model, x)
    assert_unchanged(model, snapshot)
    assert report.batch_norms_before > 0 and report.batch_norms_after == 0, str(report)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert report.passed, str(report)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_densenet_bn_relu_conv_left_correct_and_explained():
    import torchvision

    model = calibrate(torchvision.models.densenet121(), (2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    folded, report = bn_ext.fold_model(model, x)
    assert report.passed and report.batch_norms_after > 0
    reasons = dict(report.left)
    assert "ReLU" in reasons["features.denseblock1.denselayer1.norm1"]
    assert "no adjacent Conv/Linear" in reasons["features.denseblock1.denselayer1.norm1"]
    assert "features.denseblock1.denselayer1.norm1" in report.frozen
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


class SharedConv(nn.Module):
    """One conv called twice, each output through its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_b(self.conv(self.bn_a(self.conv(x))))


class ConvOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.up2(torch.relu(self.bn1(self.up1(x)))))


class LinearBNNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        return self.bn(self.fc(x))


class BNBeforeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_valid, self.conv_valid = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)
        self.bn_padded, self.conv_padded = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv_valid(self.bn_valid(x))
        return self.conv_padded(self.bn_padded(torch.relu(y)))


class DataDependent(nn.Module):
    """Control flow on tensor values: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if y.sum() > -1e9:
            y = self.bn2(self.conv2(y))
        z = self.shared(y)
        return self.bn3(self.shared(z)) + z


class FunctionalBN(nn.Module):
    """F.batch_norm on module buffers, as hand-written models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))
        self.beta = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)


class Untracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


def fold_and_check(model, x, **kwargs):
    model = calibrate(model, x.shape)
    snapshot = state_snapshot(model)
    folded, report = bn_ext.fold_model(model, x, **kwargs)
    assert_unchanged(model, snapshot)
    assert report.passed, str(report)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    return folded, report


def test_shared_conv_is_never_folded():
    _, report = fold_and_check(SharedConv(), torch.randn(2, 3, 6, 6))
    assert report.folded == []
    assert all("called 2 times" in reason for _, reason in report.left)


def test_conv_output_used_twice_is_not_folded():
    _, report = fold_and_check(ConvOutputUsedTwice(), torch.randn(2, 3, 6, 6))
    assert report.folded == [] and "also used by" in dict(report.left)["bn"]


def test_shared_bn_is_not_folded():
    _, report = fold_and_check(SharedBN(), torch.randn(2, 3, 6, 6))
    assert report.folded == [] and "called 2 times" in dict(report.left)["bn"]


def test_conv_transpose_decoder_folds():
    folded, report = fold_and_check(Decoder(), torch.randn(2, 8, 4, 4))
    assert {(n, layer) for n, layer, _ in report.folded} == {("bn1", "up1"), ("bn2", "up2")}
    assert isinstance(folded.bn1, nn.Identity)


def test_linear_bn_without_affine_folds():
    _, report = fold_and_check(LinearBNNoAffine(), torch.randn(8, 6))
    assert report.folded == [("bn", "fc", "after")]


def test_bn_before_conv_folds_only_without_zero_padding():
    _, report = fold_and_check(BNBeforeConv(), torch.randn(2, 3, 8, 8))
    assert report.folded == [("bn_valid", "conv_valid", "before")]
    assert "zero-padded" in dict(report.left)["bn_padded"]


def test_data_dependent_control_flow_falls_back_safely():
    folded, report = fold_and_check(DataDependent(), torch.randn(2, 3, 6, 6))
    assert report.method.startswith("execution")
    assert {(n, layer) for n, layer, _ in report.folded} == {("bn1", "conv1"), ("bn2", "conv2")}
    assert "called 2 times" in dict(report.left)["bn3"]


def test_functional_batch_norm_on_buffers_is_folded():
    model = FunctionalBN()
    folded, report = fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert len(report.folded) == 1 and report.folded[0][1] == "conv"
    assert isinstance(folded, torch.fx.GraphModule)
    assert not any(n.target is F.batch_norm for n in folded.graph.nodes)


def test_functional_batch_norm_is_left_when_folding_in_place():
    model = calibrate(FunctionalBN(), (2, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    folded, report = bn_ext.fold_model(model, x, inplace=True)
    assert folded is model and report.folded == [] and report.passed
    assert "inplace=False" in report.left[0][1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_untracked_bn_is_left_with_reason():
    _, report = fold_and_check(Untracked(), torch.randn(4, 3, 6, 6))
    assert report.folded == [] and "does not track running statistics" in dict(report.left)["bn"]
    assert report.frozen == []


def test_unfolded_bn_can_be_kept_as_is():
    folded, report = fold_and_check(ConvOutputUsedTwice(), torch.randn(2, 3, 6, 6), freeze_unfolded=False)
    assert report.frozen == [] and isinstance(folded.bn, nn.BatchNorm2d)


def test_inplace_changes_and_returns_the_model():
    model = calibrate(Decoder(), (2, 8, 4, 4))
    folded, report = bn_ext.fold_model(model, torch.randn(2, 8, 4, 4), inplace=True)
    assert folded is model and isinstance(model.bn1, nn.Identity) and report.passed


def test_layer_norm_into_linear():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
            self.ln_out, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.ln(x)
            y = self.q(h) * self.k(h)
            z = self.ln_out(y)
            return self.proj(z) + z  # ln_out also feeds the residual: not foldable

    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        for ln in (model.ln, model.ln_out):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
    folded, report = fold_and_check(model, torch.randn(3, 5, 8), layer_norm=True)
    assert report.layer_norms_folded == [("ln", ["q", "k"])]
    assert not folded.ln.elementwise_affine and folded.ln_out.elementwise_affine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_precision_models_lose_one_rounding_at_most(dtype):
    import torchvision

    model = calibrate(torchvision.models.resnet18(num_classes=10), (4, 3, 32, 32)).to(dtype)
    x = torch.randn(2, 3, 32, 32).to(dtype)
    folded, report = bn_ext.fold_model(model, x)
    assert report.batch_norms_after == 0 and report.passed, str(report)
    assert all(p.dtype == dtype for p in folded.parameters())


def test_report_reads_well():
    _, report = fold_and_check(BNBeforeConv(), torch.randn(2, 3, 8, 8))
    text = str(report)
    assert "BatchNorm folding report" in text and "bn_valid" in text and "ahead of conv_valid" in text
    assert "zero-padded" in text and "PASS" in text


def test_folded_model_exports_to_torch_export_and_onnx(tmp_path):
    import onnxruntime
    import torchvision

    model = calibrate(torchvision.models.mobilenet_v3_small(num_classes=10), (4, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    folded, _ = bn_ext.fold_model(model, x)
    with torch.no_grad():
        expected = folded(x)
    program = torch.export.export(folded, (x,))
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), expected)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (x,), path, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-5)


# --- BatchNorm subclasses (timm's BatchNormAct2d) -------------------------------

TIMM_MODELS = ["efficientnet_b0", "regnetx_002", "mobilenetv3_small_100", "cspresnet50", "ese_vovnet19b_dw",
               "rexnet_100"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_batch_norm_act_models_fold(name):
    # BatchNormAct2d: the BatchNorm folds into its conv, its drop and
    # activation stay; x.ndim in its forward reads no values.
    torch.manual_seed(0)
    model = randomise_batch_norms(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    modules = sum(isinstance(m, _BatchNorm) for m in model.modules())
    folded, report = bn_ext.fold_model(model, x)
    assert report.method == "torch.fx symbolic tracing"
    assert report.batch_norms_before == modules  # per module, not per module and traced call
    assert report.batch_norms_after <= 0.1 * modules, str(report)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4 * model(x).abs().max().item())


class UntraceableBatchNormAct(nn.Module):
    """fx cannot trace the data-dependent branch: the execution-trace fallback runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if y.sum() > 0 else y


def test_trace_fallback_folds_timm_batch_norm_act_keeping_its_activation():
    folded, report = fold_and_check(UntraceableBatchNormAct(), torch.randn(2, 3, 6, 6))
    assert report.method.startswith("execution")
    assert report.folded == [("bn", "conv", "after")]
    assert isinstance(folded.bn, bn_ext.fold.NormThenActivation) and isinstance(folded.bn.act[1], nn.ReLU)


class DoubledBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward the folder does not know."""

    def forward(self, x):
        return super().forward(x) * 2


class UntraceableDoubled(UntraceableBatchNormAct):
    def __init__(self):
        super().__init__()
        self.bn = DoubledBatchNorm(8)


def test_trace_fallback_keeps_a_subclass_with_its_own_forward():
    folded, report = fold_and_check(UntraceableDoubled(), torch.randn(2, 3, 6, 6))
    assert report.method.startswith("execution")
    assert "has a forward of its own" in dict(report.left)["bn"]
    assert type(folded.bn) is DoubledBatchNorm  # neither removed nor frozen without its doubling


# --- bn_ext's BatchNorm + activation (+ residual) modules ----------------------------


class ConvBatchNormAct(nn.Module):
    """conv -> BatchNormAct(+ the block input as residual) -> BatchNormAct after a pool (nothing to fold
    into: frozen) -> conv -> BatchNormAct -> conv (folds only into its producer)."""

    def __init__(self, activation, residual, untraceable=False):
        super().__init__()
        Act = bn_ext.nn.BatchNormAct2d
        self.residual, self.untraceable = residual, untraceable
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = Act(4, activation=activation)
        self.pooled_bn = Act(4, activation=activation)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.bn2 = Act(6, activation=activation)
        self.conv3 = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        y = self.bn(self.conv(x), x if self.residual else None)
        y = self.pooled_bn(F.max_pool2d(y, 2))
        if self.untraceable and y.sum() > 1e30:
            return y
        return self.conv3(self.bn2(self.conv2(y)))


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "trace"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ["relu", "silu", None])
def test_batch_norm_act_folds_into_its_producer_keeping_activation_and_residual(activation, residual, untraceable):
    model = randomise_batch_norms(ConvBatchNormAct(activation, residual, untraceable))
    x = torch.randn(2, 4, 8, 8)
    snapshot = state_snapshot(model)
    folded, report = bn_ext.fold_model(model, x)
    assert_unchanged(model, snapshot)
    assert report.method.startswith("execution" if untraceable else "torch.fx")
    assert sorted(report.folded) == [("bn", "conv", "after"), ("bn2", "conv2", "after")]
    assert report.frozen == ["pooled_bn"] and "pooled_bn" in dict(report.left)
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, None: nn.Identity}
    for name in ("bn", "bn2"):
        tail = getattr(folded, name)
        assert isinstance(tail, bn_ext.fold.NormThenActivation) and isinstance(tail.norm, nn.Identity)
        assert type(tail.act) is acts[activation]
    assert isinstance(folded.pooled_bn.norm, bn_ext.fold.FrozenBatchNorm)
    assert type(folded.pooled_bn.act) is acts[activation]
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
        # Each activation, and the residual, changes the output: the check above would see one dropped.
        for name in ("bn", "pooled_bn", "bn2") if activation else ():
            broken = copy.deepcopy(folded)
            getattr(broken, name).act = nn.Identity()
            assert (broken(x) - expected).abs().max() > 1e-2, name
        if residual:
            broken = copy.deepcopy(folded)
            broken.residual = False
            assert (broken(x) - expected).abs().max() > 1e-2


def test_batch_norm_act_never_folds_into_the_layer_after_it():
    model = calibrate(nn.Sequential(bn_ext.nn.BatchNormAct2d(3), nn.Conv2d(3, 4, 1)), (2, 3, 6, 6))
    folded, report = bn_ext.fold_model(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [] and "activation or residual add stands between it and '1'" in dict(report.left)["0"]
    assert isinstance(folded[0], bn_ext.fold.NormThenActivation) and isinstance(folded[0].act, nn.ReLU)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_resnet_with_fused_activations_folds_completely(channels_last):
    import torchvision

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = randomise_batch_norms(torchvision.models.resnet50(num_classes=10)).to(memory_format=fmt)
    fused = bn_ext.nn.convert(copy.deepcopy(model), fuse_activations=True).eval()
    x = torch.randn(1, 3, 64, 64).to(memory_format=fmt)
    folded, report = bn_ext.fold_model(fused, x)
    assert report.batch_norms_before == 53 and report.batch_norms_after == 0, str(report)
    assert sum(isinstance(m, bn_ext.fold.NormThenActivation) for m in folded.modules()) == 49
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_timm_models_converted_to_bn_ext_fold():
    # convert gives timm's BatchNormAct2d a bn_ext twin, which fx keeps whole.
    torch.manual_seed(0)
    model = randomise_batch_norms(timm.create_model("efficientnet_b0", pretrained=False))
    converted = bn_ext.nn.convert(copy.deepcopy(model)).eval()
    x = torch.randn(1, 3, 64, 64)
    folded, report = bn_ext.fold_model(converted, x)
    assert report.batch_norms_after <= 0.1 * report.batch_norms_before, str(report)
    assert any(isinstance(m, bn_ext.fold.NormThenActivation) for m in folded.modules())
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("activation", ["relu", "silu", None])
def test_exported_bn_ext_modules_fold(activation):
    """torch.export records bn_ext's modules as bn_ext's forward operators; they fold like aten.batch_norm,
    the fused call leaving its residual add and activation as aten ops."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = bn_ext.nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = bn_ext.nn.BatchNormAct2d(4, activation=activation)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn(self.conv(x))), x)

    model = calibrate(Block(), (2, 4, 6, 6))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    folded, report = bn_ext.fold.fold_exported_program(program, (x,))
    assert report.batch_norms_before == 2 and report.batch_norms_after == 0, str(report)
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any("bn_ext" in t for t in targets), targets
    assert "aten.add.Tensor" in targets
    assert (f"aten.{activation}.default" in targets) == (activation is not None)
    torch.testing.assert_close(folded.module()(x), expected, rtol=1e-4, atol=1e-4)


def test_exported_batch_norm_whose_statistics_are_read_is_left():
    class ReadsStatistics(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x, mean, var):
            out, save_mean, _ = torch.ops.bn_ext.batch_norm_forward(self.conv(x), None, None, mean, var, False, 1e-5)
            return out + save_mean.sum()

    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(ReadsStatistics(), (x, torch.zeros(4), torch.ones(4)))
    _, report = bn_ext.fold.fold_exported_program(program)
    assert report.folded == []


def test_a_fold_that_fails_verification_raises_with_the_report():
    model = calibrate(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    # No tolerance at all: the folded weights' rounding fails it.
    with pytest.raises(bn_ext.FoldVerificationError, match="not returned") as caught:
        bn_ext.fold_model(model, x, atol=0.0, rtol=0.0)
    assert not caught.value.report.passed and caught.value.report.max_abs_error > 0
    folded, report = bn_ext.fold_model(model, x, atol=0.0, rtol=0.0, strict=False)
    assert not report.passed and isinstance(folded, nn.Module)
    program = torch.export.export(model.eval(), (x,))
    with pytest.raises(bn_ext.FoldVerificationError):
        bn_ext.fold.fold_exported_program(program, (x,), atol=0.0, rtol=0.0)


def test_sync_batch_norm_conversion_refuses_a_subclass_with_its_own_forward():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="BatchNorm subclass with its own forward"):
        bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plain = bn_ext.nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    assert isinstance(plain[1], bn_ext.nn.SyncBatchNorm)


# --- int8 readiness of the folded weights --------------------------------------


def int8_error(rows, absmax):
    scale = (absmax / 127).clamp_min(1e-300).unsqueeze(1)
    return ((rows - (rows / scale).round().clamp(-127, 127) * scale).norm() / rows.norm()).item()


def tiny_variance_model():
    # One channel with running_var 1e-14 (as torchvision's Inception-v3 has),
    # one with gamma 0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
        model[1].running_var[3] = 1e-14
        model[4].weight[2] = 0.0
    return model.eval()


def test_the_report_states_the_int8_readiness_of_each_folded_layer():
    model = tiny_variance_model()
    folded, report = bn_ext.fold_model(model, torch.randn(2, 3, 16, 16))
    first, second = report.quantization
    assert (first.layer, first.channels, second.layer, second.channels) == ("0", 16, "3", 8)
    for q, layer in ((first, folded[0]), (second, folded[3])):
        rows = layer.weight.detach().double().reshape(q.channels, -1)
        channel_max = rows.abs().amax(1)
        assert q.per_tensor_error == pytest.approx(int8_error(rows, channel_max.max().expand(q.channels)), rel=1e-9)
        assert q.per_channel_error == pytest.approx(int8_error(rows, channel_max), rel=1e-9)
        assert q.per_channel_error < q.per_tensor_error
    # The 1e-14 variance makes channel 3 about 300 times larger than the rest.
    assert first.range_spread > 100 and first.dead_channels >= 1
    assert second.dead_channels >= 1  # gamma = 0: all-zero weights
    assert "per-tensor int8 unsuitable" in str(report)


def test_quantization_runs_the_pt2e_flow_on_the_folded_model():
    _, report = bn_ext.fold_model(tiny_variance_model(), torch.randn(2, 3, 16, 16), quantization=True)
    assert report.pt2e_failure is None and 0 < report.pt2e_error < 0.1, str(report)
    assert "PT2E int8 (X86InductorQuantizer)" in str(report)


def test_example_inputs_the_model_does_not_take_are_a_value_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(ValueError, match=r"fold_model: example_inputs: the model does not run on them \(RuntimeError"):
        bn_ext.fold_model(model, torch.randn(2, 5, 8, 8))


class UntraceableLinearBN(nn.Module):
    """BatchNorm1d over dim 1 (T) of a Linear's (N, T, F) output, T == F: the
    shapes fit, the fold would not. Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return y if y.sum() > -1e9 else -y


def test_trace_fallback_refuses_a_linear_with_a_three_dim_output():
    _, report = fold_and_check(UntraceableLinearBN(), torch.randn(2, 6, 6))
    assert report.method.startswith("execution")
    assert report.folded == [] and "output is 3-D" in dict(report.left)["bn"]


class UntraceableWithNeighbours(nn.Module):
    """The execution-trace fallback applies the fx path's rules: a BatchNorm
    folds into the Conv before it despite reads of that output's shape, and
    into the Linear after it when nothing precedes it to fold into."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn2, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 5)

    def forward(self, x):
        y = self.conv(x)
        assert y.shape[1] == 4 and y.dim() == 4
        y = torch.relu(self.bn1(y)).flatten(1)
        out = self.fc(self.bn2(y))
        return out if out.sum() > -1e9 else -out


def test_trace_fallback_folds_the_same_pairs_as_the_graph_path():
    folded, report = fold_and_check(UntraceableWithNeighbours(), torch.randn(4, 3, 4, 4))
    assert report.method.startswith("execution")
    assert sorted(report.folded) == [("bn1", "conv", "after"), ("bn2", "fc", "before")], str(report)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)


@pytest.mark.parametrize("config", ["yolov5nu.yaml", "yolov8n.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo11n.yaml",
                                    "yolo11n-seg.yaml"])
def test_ultralytics_yolo_models_fold_completely(config, tmp_path, monkeypatch):
    # Built from ultralytics' own model definitions, no weights; fx cannot
    # trace them, so the execution-trace fallback folds them.
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    torch.manual_seed(0)
    model = randomise_batch_norms((SegmentationModel if "seg" in config else DetectionModel)(config, verbose=False))
    x = torch.randn(1, 3, 64, 64)
    modules = sum(isinstance(m, _BatchNorm) for m in model.modules())
    folded, report = bn_ext.fold_model(model, x)
    assert report.batch_norms_before == modules and report.batch_norms_after == 0, str(report)
    assert report.passed and report.max_rel_error < 1e-5, str(report)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())


class ConvInstanceNorm(nn.Module):
    """Style-transfer blocks: InstanceNorm with tracked statistics after a conv,
    one without (instance statistics in eval too), one before a valid conv."""

    def __init__(self, cls=nn.InstanceNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.in1 = cls(4, affine=True, track_running_stats=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.in2 = cls(4, affine=True)
        self.in3 = cls(4, track_running_stats=True)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv3(self.in3(self.in2(self.conv2(self.in1(self.conv1(x))))))


@pytest.mark.parametrize("cls", [nn.InstanceNorm2d, bn_ext.nn.InstanceNorm2d])
def test_instance_norm_with_running_statistics_folds_like_batch_norm(cls):
    model = ConvInstanceNorm(cls)
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)  # moves the tracked running statistics away from (0, 1)
        model.in1.weight.uniform_(0.5, 1.5)
        model.in1.bias.normal_()
    model.eval()
    snapshot = state_snapshot(model)
    folded, report = bn_ext.fold_model(model, x)
    assert_unchanged(model, snapshot)
    assert report.passed, str(report)
    assert {(n, layer) for n, layer, _ in report.folded} == {("in1", "conv1"), ("in3", "conv3")}
    assert "does not track running statistics" in dict(report.left)["in2"]
    assert isinstance(folded.in1, nn.Identity) and isinstance(folded.in3, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    program = torch.export.export(model, (x,))
    folded_program, report = bn_ext.fold.fold_exported_program(program, (x,))
    assert report.passed, str(report)
    assert len(report.folded) == 2 and len(report.left) == 1, str(report)
    assert bn_ext.fold.training_batch_norms(program.graph) == []  # instance statistics are not training mode
    with torch.no_grad():
        torch.testing.assert_close(folded_program.module()(x), model(x), rtol=1e-4, atol=1e-4)


# --- frozen BatchNorms (torchvision's and timm's) -------------------------------------


def _frozen_classes():
    return list(bn_ext.norm_classes.frozen_batch_norm_classes())


def _randomised_frozen(cls, channels, seed):
    frozen = cls(channels)
    g = torch.Generator().manual_seed(seed)
    frozen.weight.copy_(torch.randn(channels, generator=g) * 0.2 + 1)
    frozen.bias.copy_(torch.randn(channels, generator=g) * 0.1)
    frozen.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)
    frozen.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return frozen


class _UntraceableSequential(nn.Sequential):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x + 0.0
        return super().forward(x)


@pytest.mark.level_independent
@pytest.mark.parametrize("path", ["fx", "trace fallback", "converted", "exported"])
@pytest.mark.parametrize("cls", _frozen_classes(), ids=lambda c: f"{c.__module__.split('.')[0]}-{c.__name__}")
def test_frozen_batch_norms_fold_and_are_counted(cls, path):
    torch.manual_seed(0)
    container = _UntraceableSequential if path == "trace fallback" else nn.Sequential
    model = container(nn.Conv2d(3, 8, 3), _randomised_frozen(cls, 8, 1), nn.Conv2d(8, 4, 1)).eval()
    if path == "converted":
        bn_ext.nn.convert(model)
        assert type(model[1]).__module__ == "bn_ext.modules"
    x = torch.randn(2, 3, 9, 9)
    if path == "exported":  # torch.export decomposes it into x * scale + shift
        program, report = bn_ext.fold.fold_exported_program(torch.export.export(model, (x,)), (x,))
        folded = program.module()
        aten = torch.ops.aten
        left = {aten.mul.Tensor, aten.add.Tensor, aten.rsqrt.default, aten.batch_norm.default}
        assert not [n for n in program.graph.nodes if n.target in left], str(program.graph)
    else:
        folded, report = bn_ext.fold_model(model, (x,))
    assert report.batch_norms_before == 1 and report.batch_norms_after == 0, str(report)
    assert report.folded == [("1", "0", "after")] and report.norms == {cls.__name__: 1}, str(report)
    assert not any(isinstance(m, cls) for m in folded.modules())
    if hasattr(model[1], "act") and path != "exported":  # FrozenBatchNormAct2d: its activation stays
        assert any(isinstance(m, nn.ReLU) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _FrozenOfAConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.frozen = nn.Conv2d(3, 8, 3), _randomised_frozen(_frozen_classes()[0], 8, 1)
        self.register_buffer("offset", torch.randn(1, 8, 7, 7))

    def forward(self, x):
        return self.conv(x) + self.frozen(self.offset)


@pytest.mark.level_independent
def test_an_exported_frozen_batch_norm_not_folded_is_counted_and_listed():
    model = _FrozenOfAConstant().eval()
    x = torch.randn(2, 3, 9, 9)
    program, report = bn_ext.fold.fold_exported_program(torch.export.export(model, (x,)), (x,))
    assert report.batch_norms_before == 1 and report.batch_norms_after == 1 and report.passed, str(report)
    assert report.left == [("frozen", "a frozen BatchNorm whose exported ops are not the x * scale + shift (per "
                            "channel) bn_ext reads")], str(report)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


class _Decides(nn.Module):
    """Conv + BatchNorm, then every kind of decision verification replays."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)).flatten(1)
        top = y.topk(5, dim=1)
        ranked = y.sort(dim=1, descending=True, stable=True)
        best = y.max(dim=1)
        median = y.kthvalue(3, 1, keepdim=True)
        keep = (y > 0.1).nonzero()
        return top.values, ranked.indices, best.values, median.values, y.argmax(1), y.argsort(0), keep


def test_verification_replays_each_kind_of_decision():
    model = calibrate(_Decides(), (2, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    folded, report = bn_ext.fold_model(model, x)
    # topk, sort, max.dim, kthvalue, gt, argmax, argsort (a sort)
    assert report.passed and report.decisions == 7 and len(report.folded) == 1, str(report)
    assert "7 decisions" in str(report)
    with torch.no_grad():
        for got, want in zip(folded(x), model(x)):
            assert got.shape == want.shape
