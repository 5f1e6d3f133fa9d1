"""Folding and converting the models people deploy: torchvision's detectors
(frozen BatchNorm backbones, NMS post-processing) and timm's norm classes.
Built without weights, their BatchNorm statistics calibrated on random inputs."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

import bn_ext
from bn_ext.fold_verification import ReferenceRun

pytestmark = pytest.mark.level_independent


def calibrate_batch_norms(model, run, seed=2):
    """Random affine parameters and running statistics measured on random
    inputs (momentum None: the average of the batches) in every BatchNorm, as
    a user calibrates them; `run` runs the model once. Returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(0, 0.2, generator=g)
            bn.reset_running_stats()
            bn.momentum = None
        model.eval()
        for bn in norms:
            bn.train()
        for _ in range(2):
            run()
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def freeze_batch_norms(module):
    """Every BatchNorm2d of `module` made a FrozenBatchNorm2d holding its
    statistics: a backbone as torchvision builds it for pretrained weights."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child)
    return module


def detector_images(seed=3):
    return [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(seed))]


def calibrated_detector(model, frozen_backbone=True):
    calibrate_batch_norms(model, lambda: model(detector_images(seed=4) + detector_images(seed=5)))
    if frozen_backbone:
        freeze_batch_norms(model.backbone.body)
    return model


DETECTION = torchvision.models.detection
SMALL = {"weights": None, "weights_backbone": None, "num_classes": 5, "min_size": 160, "max_size": 160}


def detector_with_batch_norm_box_head():
    """fasterrcnn_mobilenet_v3_large_fpn with a frozen backbone, as torchvision
    builds it for pretrained backbone weights, and a box head with BatchNorms
    (as fasterrcnn_resnet50_fpn_v2's): folds both before NMS and after it."""
    torch.manual_seed(0)
    model = DETECTION.fasterrcnn_mobilenet_v3_large_fpn(**SMALL)
    model.roi_heads.box_head = FastRCNNConvFCHead((256, 7, 7), [32, 32], [64], norm_layer=nn.BatchNorm2d)
    model.roi_heads.box_predictor = FastRCNNPredictor(64, 5)
    return calibrated_detector(model)


DETECTOR_INPUTS = (detector_images(),)


def test_a_detector_folds_before_and_after_nms_and_verifies_through_it():
    model = detector_with_batch_norm_box_head()
    folded, report = bn_ext.fold_model(model, DETECTOR_INPUTS)
    assert report.passed and report.batch_norms_before == 48 and report.batch_norms_after == 0, str(report)
    assert report.decisions > 0 and report.decision_rel_error < 1e-4, str(report)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())


@pytest.mark.parametrize("where", ["backbone", "box_head"])
def test_a_wrong_fold_in_a_detector_is_refused(where, monkeypatch):
    # One folded weight 0.1% off, before NMS (the backbone's first conv: the
    # RPN's topk sees it) and after it (the box head: the score threshold
    # sees it). The untouched fold agrees at every decision to 2e-5.
    model = detector_with_batch_norm_box_head()
    target = {"backbone": "backbone.body.0.0", "box_head": "roi_heads.box_head.0.0"}[where]
    real = bn_ext.fold._set_layer_weights

    def planted(root, layer, weight, bias):
        real(root, layer, weight * (1 + 1e-3) if layer.name == target else weight, bias)

    monkeypatch.setattr(bn_ext.fold, "_set_layer_weights", planted)
    with pytest.raises(bn_ext.FoldVerificationError, match="its input differs from the original") as caught:
        bn_ext.fold_model(model, DETECTOR_INPUTS)
    report = caught.value.report
    assert not report.passed and (target, "after") in {(layer, side) for _, layer, side in report.folded}


# --- the zoo table: fold, convert, one training step -----------------------------


def timm_classifier(name):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return calibrate_batch_norms(model, lambda: model(torch.randn(2, 3, 96, 96)))


# name -> (builder, example inputs, BatchNorms to fold, the norm census)
ZOO = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: calibrated_detector(DETECTION.fasterrcnn_mobilenet_v3_large_fpn(**SMALL)), "detector", 46,
        {"FrozenBatchNorm2d": 46}),
    "retinanet_resnet50_fpn": (
        lambda: calibrated_detector(DETECTION.retinanet_resnet50_fpn(**SMALL)), "detector", 53,
        {"FrozenBatchNorm2d": 53}),
    "ssdlite320_mobilenet_v3_large": (
        lambda: calibrated_detector(DETECTION.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                            num_classes=5), frozen_backbone=False),
        "detector", 70, {"BatchNorm2d": 70}),
    "maskrcnn_resnet50_fpn": (
        lambda: calibrated_detector(DETECTION.maskrcnn_resnet50_fpn(**SMALL)), "detector", 53,
        {"FrozenBatchNorm2d": 53}),
    "resnetv2_50x1_bit": (lambda: timm_classifier("resnetv2_50x1_bit"), "classifier", 0, {"GroupNormAct": 49}),
    "efficientnet_b0_gn": (lambda: timm_classifier("efficientnet_b0_gn"), "classifier", 0, {"GroupNormAct": 49}),
    "resnet50_gn": (lambda: timm_classifier("resnet50_gn"), "classifier", 0, {"GroupNorm": 53}),
    "mobilevitv2_050": (lambda: timm_classifier("mobilevitv2_050"), "classifier", 25,
                        {"BatchNormAct2d": 25, "GroupNorm1": 21}),
}


def example_inputs(kind):
    if kind == "detector":
        return (detector_images(),)
    return (torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)),)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_folds_completely_and_exactly(name):
    build, kind, batch_norms, census = ZOO[name]
    model = build()
    folded, report = bn_ext.fold_model(model, example_inputs(kind))
    assert report.passed, str(report)
    assert report.norms == census, str(report)
    assert (report.batch_norms_before, len(report.folded), report.batch_norms_after) == (batch_norms, batch_norms, 0)
    assert report.left == [] and report.frozen == [], str(report)
    if not batch_norms:
        assert "nothing folded: the model holds no BatchNorm" in str(report)
    assert not any(isinstance(m, bn_ext.norm_classes.frozen_batch_norm_classes() + (nn.BatchNorm2d,))
                   for m in folded.modules())


def detection_targets():
    boxes = torch.tensor([[20.0, 30.0, 90.0, 120.0], [60.0, 10.0, 150.0, 70.0]])
    masks = torch.zeros(2, 160, 160, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return [{"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks}]


def training_step(model, kind, decisions=None):
    """One float64 training step: the loss (a detector's losses, a fixed
    projection of a classifier's output), the parameter gradients and the
    buffers after it. With `decisions` (recorded by an earlier step), the step
    takes the decisions recorded there (anchor matching, proposal topk, NMS),
    so ties break as they did."""
    from bn_ext.fold_verification import _decision_ops, _Recorder, _Replayer

    model.double().train()
    torch.manual_seed(0)  # the detectors' samplers choose at random
    mode = _Recorder(_decision_ops()) if decisions is None else _Replayer(_decision_ops(), decisions, (1e-9, 1e-9))
    with mode:
        if kind == "detector":
            # two images: a batch of one leaves 1x1 feature maps in SSDlite's extra layers, which
            # BatchNorm cannot train on
            images = detector_images(seed=3) + detector_images(seed=6)
            losses = model([image.double() for image in images], detection_targets() * 2)
        else:
            out = model(example_inputs(kind)[0].double())
            losses = {"projection": (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()}
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, dict(model.named_buffers()), getattr(mode, "decisions", None)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_converts_completely_and_trains_as_torch(name):
    build, kind, _, census = ZOO[name]
    model = build()
    inputs = example_inputs(kind)
    converted, report = bn_ext.nn.convert(copy.deepcopy(model), report=True)
    assert report.left == [] and len(report.swapped) == sum(census.values()), str(report)
    swapped_classes = {type(m) for m in converted.modules() if type(m).__module__ == "bn_ext.modules"}
    assert {cls.__name__ for cls in swapped_classes} >= set(census), str(report)
    # float32 eval: the same outputs, ties broken as the original broke them
    check = ReferenceRun(model, inputs).verify(converted, None, None)
    assert check.passed, check.failure
    # One training step in float64, where rounding cannot move a value across
    # a ReLU or max-pool kink (in float32, either model's gradients move by
    # 1e-2 where one does; the kernels' float32 error is the kernel tests').
    losses, grads, buffers, decisions = training_step(model, kind)
    our_losses, our_grads, our_buffers, _ = training_step(converted, kind, decisions)
    for key, loss in losses.items():
        torch.testing.assert_close(our_losses[key], loss, rtol=1e-10, atol=1e-12, msg=key)
    assert our_grads.keys() == grads.keys()
    for key, grad in grads.items():
        # atol: a gradient that cancels to 0 (a bias before a norm) is 1e-16 noise in both
        torch.testing.assert_close(our_grads[key], grad, rtol=1e-8, atol=1e-13, msg=key)
    for key, buffer in buffers.items():
        torch.testing.assert_close(our_buffers[key], buffer, rtol=1e-10, atol=1e-12, msg=key)
    bn_ext.nn.revert(converted)
    assert [type(m) for m in converted.modules()] == [type(m) for m in model.modules()]


# --- convert on each zoo norm class ---------------------------------------------


def _zoo_modules():
    import timm.layers as tl
    from timm.layers.norm_act import FrozenBatchNormAct2d

    return {
        "GroupNormAct relu": (lambda: tl.GroupNormAct(16, 4), "activation fused"),
        "GroupNormAct silu": (lambda: tl.GroupNormAct(16, 4, act_layer=nn.SiLU), "activation fused"),
        "GroupNormAct gelu": (lambda: tl.GroupNormAct(16, 4, act_layer=nn.GELU), "GELU run after the kernel, unfused"),
        "GroupNormAct drop": (lambda: tl.GroupNormAct(16, 4, drop_layer=lambda: nn.Dropout(0.0)),
                              "Dropout and ReLU run after the kernel, unfused"),
        "GroupNorm1Act": (lambda: tl.GroupNorm1Act(16, act_layer=nn.SiLU), "activation fused"),
        "GroupNorm": (lambda: tl.GroupNorm(16, 4), ""),
        "GroupNorm1": (lambda: tl.GroupNorm1(16), ""),
        "LayerNorm2d": (lambda: tl.LayerNorm2d(16), ""),
        "LayerNormAct2d": (lambda: tl.LayerNormAct2d(16), "ReLU run after the kernel, unfused"),
        "BatchNormAct2d": (lambda: tl.BatchNormAct2d(16), "activation fused"),
        "FrozenBatchNorm2d": (lambda: FrozenBatchNorm2d(16), ""),
        "FrozenBatchNormAct2d": (lambda: FrozenBatchNormAct2d(16), "activation fused"),
        "FrozenBatchNormAct2d gelu": (lambda: FrozenBatchNormAct2d(16, act_layer=nn.GELU),
                                      "GELU run after the kernel, unfused"),
        "torchvision LayerNorm2d": (lambda: torchvision.models.convnext.LayerNorm2d(16), ""),
    }


@pytest.mark.parametrize("case", list(_zoo_modules()))
def test_convert_swaps_each_zoo_norm_class_and_matches_it(case):
    build, note = _zoo_modules()[case]
    torch.manual_seed(0)
    reference = build()
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_()
    module = copy.deepcopy(reference)
    model, report = bn_ext.nn.convert(nn.Sequential(module), report=True)
    assert report.swapped == [("0", type(reference).__name__, note)] and report.left == [], str(report)
    assert type(module).__module__ == "bn_ext.modules" and isinstance(module, type(reference))
    for training in (True, False):
        reference.train(training)
        module.train(training)
        x = torch.randn(2, 16, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
        params = [p for p in reference.parameters()]
        want = reference.double()(x)
        got = module.double()(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(want)
        expected = torch.autograd.grad(want, [x, *params], g)
        actual = torch.autograd.grad(got, [x, *module.parameters()], g)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        for (name, b), (_, ours) in zip(reference.named_buffers(), module.named_buffers()):
            torch.testing.assert_close(ours, b, msg=name)
    bn_ext.nn.revert(model)
    assert type(module) is type(reference)


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _StatisticsHolder(nn.Module):
    """A norm of its own, unknown to bn_ext: running statistics, a manual forward."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return (x - self.running_mean[:, None, None]) * self.running_var[:, None, None].rsqrt()


def test_convert_report_lists_what_it_leaves_and_why():
    import timm.layers as tl

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.LocalResponseNorm(2), _OwnForward(8), nn.SyncBatchNorm(8),
                          tl.RmsNorm2d(8), _StatisticsHolder(8), nn.BatchNorm2d(8),
                          torchvision.ops.misc.Conv2dNormActivation(8, 8, norm_layer=None))
    model, report = bn_ext.nn.convert(model, report=True)
    reasons = {name: (cls, why) for name, cls, why in report.left}
    assert set(reasons) == {"1", "2", "3", "4", "5"}, str(report)
    assert "no bn_ext twin" in reasons["1"][1] and "LocalResponseNorm" in reasons["1"][1]
    assert "a subclass of torch.nn.modules.batchnorm.BatchNorm2d" in reasons["2"][1]
    assert "convert_sync_batchnorm" in reasons["3"][1]
    assert reasons["4"][0] == "RmsNorm2d" and reasons["5"][0] == "_StatisticsHolder"
    assert report.swapped == [("6", "BatchNorm2d", "")]
    text = str(report)
    assert "1 norm modules swapped, 5 left" in text and "_OwnForward" in text


class _Untraceable(nn.Sequential):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1.0
        return super().forward(x)


@pytest.mark.parametrize("container", [nn.Sequential, _Untraceable])
def test_fold_census_counts_and_lists_an_unrecognised_norm(container):
    torch.manual_seed(0)
    model = container(nn.Conv2d(3, 8, 3), _StatisticsHolder(8), nn.GroupNorm(2, 8)).eval()
    _, report = bn_ext.fold_model(model, torch.randn(2, 3, 8, 8))
    assert report.method.startswith("execution" if container is _Untraceable else "torch.fx"), report.method
    assert report.batch_norms_before == 1 and report.batch_norms_after == 1, str(report)
    assert report.norms == {"_StatisticsHolder": 1, "GroupNorm": 1}
    (name, why), = report.left
    assert name == "1" and "_StatisticsHolder holds running statistics, but is no norm class" in why
    assert "nothing folded: every BatchNorm is left" in str(report)


def test_an_exported_frozen_detector_backbone_folds_completely():
    # torch.export decomposes each FrozenBatchNorm2d into x * scale + shift
    model = ZOO["fasterrcnn_mobilenet_v3_large_fpn"][0]().backbone
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    program, report = bn_ext.fold.fold_exported_program(torch.export.export(model, (x,)), (x,))
    assert report.passed and report.norms == {"FrozenBatchNorm2d": 46}, str(report)
    assert (report.batch_norms_before, len(report.folded), report.batch_norms_after) == (46, 46, 0), str(report)
