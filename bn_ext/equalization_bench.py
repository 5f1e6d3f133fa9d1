"""The effect of cross-layer equalization on int8 error, measured on models
with random weights whose BatchNorm statistics are spread per channel as
pruned and fine-tuned models' are (`python -m bn_ext equalization`).

No trained weights or data are here, so the measure is the model's output
error (relative L2 and SQNR) under int8 fake quantization, not accuracy.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_ext
from bn_ext.equalization import equalize, run_with_hooks


def spread_statistics(model: nn.Module, example_inputs: tuple, seed: int = 0) -> nn.Module:
    """Eval `model` with each BatchNorm's statistics measured on the example
    inputs, in forward order (each one sees the BatchNorms before it as set),
    then spread: running_var = measured variance x 10^U(0, 6), gamma ~
    U(0.1, 2), beta = the channel's output scale x N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)

    def calibrate(bn: _BatchNorm, args: tuple) -> None:
        x = args[0].detach().transpose(0, 1).reshape(bn.num_features, -1).double()
        # a constant channel (all zero after a ReLU, say) gets unit variance
        mean, var = x.mean(1), x.var(1, unbiased=False).clamp_min(1e-6)
        inflation = 10 ** (torch.rand(bn.num_features, generator=generator, dtype=torch.float64) * 6)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var * inflation)
        bn.weight.data.uniform_(0.1, 2.0, generator=generator)
        output_scale = bn.weight.data.double() / inflation.sqrt()
        bn.bias.data.copy_(output_scale * torch.randn(bn.num_features, generator=generator, dtype=torch.float64))

    model.eval()
    run_with_hooks(model, example_inputs,
                   [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, _BatchNorm)])
    return model


def depthwise_chain() -> nn.Module:
    """Conv -> BN -> ReLU -> depthwise Conv -> BN -> ReLU -> Conv."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 16, 1))


def _relu_for_relu6(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU(inplace=True))
    return model


def _yolov8n() -> nn.Module:
    with tempfile.TemporaryDirectory() as config_dir, _environment(YOLO_CONFIG_DIR=config_dir, YOLO_OFFLINE="1"):
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", verbose=False)


@contextlib.contextmanager
def _environment(**values: str):
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    import timm
    import torchvision

    return {
        "Conv-BN-ReLU-dwConv-BN-ReLU-Conv": (depthwise_chain, (8, 3, 16, 16)),
        "torchvision mobilenet_v2 (ReLU6)": (torchvision.models.mobilenet_v2, (4, 3, 64, 64)),
        "torchvision mobilenet_v2, ReLU": (lambda: _relu_for_relu6(torchvision.models.mobilenet_v2()), (4, 3, 64, 64)),
        "torchvision mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, (4, 3, 64, 64)),
        "torchvision resnet18": (torchvision.models.resnet18, (4, 3, 64, 64)),
        "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), (4, 3, 64, 64)),
        "ultralytics yolov8n": (_yolov8n, (2, 3, 64, 64)),
    }


def _sqnr(relative: float) -> str:
    return f"{-20 * math.log10(relative):.1f}" if relative > 0 else "inf"


def table(selected: str | None = None) -> str:
    """The markdown table of int8 output errors before and after equalization."""
    rows = ["| model | pairs equalized | per-tensor W8 before -> after | W8A8 before -> after | per-channel W8 "
            "(ceiling) | gain (per-tensor) | with bias absorption: pairs, per-tensor W8 (x per-channel), W8A8 | "
            "equalized vs folded "
            "(float32, float64) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, (build, shape) in models().items():
        if selected and selected not in name:
            continue
        torch.manual_seed(0)
        model = build()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        spread_statistics(model, (x,))
        folded, _ = bn_ext.fold_model(model, (x,), atol=1e-3, rtol=1e-3)  # deep ones amplify rounding 1000x
        _, report = equalize(folded, (x,))
        _, absorbed = equalize(folded, (x,), absorb_bias=True)
        before, after = report.before, report.after
        rows.append(
            f"| {name} | {len(report.equalized)} | {before.per_tensor_weights:.3g} ({_sqnr(before.per_tensor_weights)} dB)"
            f" -> {after.per_tensor_weights:.3g} ({_sqnr(after.per_tensor_weights)} dB) | {before.w8a8:.3g} -> "
            f"{after.w8a8:.3g} | {after.per_channel_weights:.3g} ({_sqnr(after.per_channel_weights)} dB) | "
            f"{before.per_tensor_weights / after.per_tensor_weights:.3g}x | {len(absorbed.absorbed)}, "
            f"{absorbed.after.per_tensor_weights:.3g} "
            f"({absorbed.after.per_tensor_weights / absorbed.after.per_channel_weights:.2g}x), "
            f"{absorbed.after.w8a8:.3g} | {report.float32_error:.1g}, "
            f"{report.float64_error:.1g} |")
    return "\n".join(rows)
