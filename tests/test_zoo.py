"""Folding and converting the models people deploy: torchvision's detectors
(frozen BatchNorm backbones, NMS post-processing) and timm's norm classes.
Built without weights, with randomised norm statistics and parameters."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

import bn_ext
from conftest import randomise_batch_norms

pytestmark = pytest.mark.level_independent


def randomise_frozen_batch_norms(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(generator=g)
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def detector_with_batch_norm_box_head():
    """fasterrcnn_mobilenet_v3_large_fpn with a frozen backbone, as torchvision
    builds it for pretrained backbone weights, and a box head with BatchNorms
    (as fasterrcnn_resnet50_fpn_v2's): folds both before NMS and after it."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, norm_layer=FrozenBatchNorm2d)
    model.roi_heads.box_head = FastRCNNConvFCHead((256, 7, 7), [32, 32], [64], norm_layer=nn.BatchNorm2d)
    model.roi_heads.box_predictor = FastRCNNPredictor(64, 5)
    return randomise_batch_norms(randomise_frozen_batch_norms(model))


DETECTOR_INPUTS = ([torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(3))],)


def test_a_detector_folds_before_and_after_nms_and_verifies_through_it():
    model = detector_with_batch_norm_box_head()
    folded, report = bn_ext.fold_model(model, DETECTOR_INPUTS)
    assert report.passed and report.batch_norms_before == 48 and report.batch_norms_after == 0, str(report)
    assert report.decisions > 0 and report.decision_rel_error < 1e-4, str(report)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())


@pytest.mark.parametrize("where", ["backbone", "box_head"])
def test_a_wrong_fold_in_a_detector_is_refused(where, monkeypatch):
    # One folded weight 0.1% off, before NMS (the backbone's last conv: the
    # RPN's topk sees it) and after it (the box head: the score threshold
    # sees it). The untouched fold agrees at every decision to 5e-6.
    model = detector_with_batch_norm_box_head()
    target = {"backbone": "backbone.body.16.0", "box_head": "roi_heads.box_head.0.0"}[where]
    real = bn_ext.fold._set_layer_weights

    def planted(root, layer, weight, bias):
        real(root, layer, weight * (1 + 1e-3) if layer.name == target else weight, bias)

    monkeypatch.setattr(bn_ext.fold, "_set_layer_weights", planted)
    with pytest.raises(bn_ext.FoldVerificationError, match="its input differs from the original") as caught:
        bn_ext.fold_model(model, DETECTOR_INPUTS)
    report = caught.value.report
    assert not report.passed and (target, "after") in {(layer, side) for _, layer, side in report.folded}
