"""How well a folded model's weights survive int8: per-layer weight
quantization error (per-tensor and per-channel) and the PT2E quantized
model's output error."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.utils import _pytree


@dataclasses.dataclass
class WeightQuantization:
    """How the int8 weights of one folded layer would fare. Folding multiplies
    each output channel by gamma / sqrt(var + eps): a channel with a tiny
    running_var or gamma gets huge or vanishing weights, which per-tensor int8
    cannot hold and per-channel int8 holds at some cost."""

    layer: str
    channels: int
    range_spread: float  # largest over smallest non-zero per-channel max |w|
    dead_channels: int  # channels per-tensor int8 rounds to all zeros
    per_tensor_error: float  # ||W - Q(W)|| / ||W||, symmetric int8, one scale
    per_channel_error: float  # the same with one scale per output channel

    def __str__(self) -> str:
        flag = "  <- per-tensor int8 unsuitable" if self.dead_channels or self.range_spread > 100 else ""
        return (f"{self.layer:<40} {self.channels} channels, range spread {self.range_spread:.3g}x, "
                f"{self.dead_channels} dead per-tensor; int8 weight error per-tensor {self.per_tensor_error:.2e}, "
                f"per-channel {self.per_channel_error:.2e}{flag}")


def _int8_error(w: Tensor, absmax: Tensor) -> float:
    """Relative error of symmetric int8 quantization of the rows of w with the given per-row max |w|."""
    scale = (absmax / 127).clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    q = (w / scale).round().clamp(-127, 127) * scale
    return ((w - q).norm() / w.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def weight_quantization(layer: str, weight: Tensor, kind: str = "conv", groups: int = 1) -> WeightQuantization:
    """The int8 readiness of a layer's weight (output channels: dim 0, or for a
    ConvTranspose weight (in, out / groups, *k) the second dim within groups)."""
    w = weight.detach().double()
    if kind == "conv_transpose":
        # (in, out / groups, *k) -> (groups, out / groups, in / groups, k): a row per output channel
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)
        rows = w.reshape(groups * w.shape[1], -1)
    else:
        rows = w.reshape(w.shape[0], -1)
    channel_max = rows.abs().amax(1)
    largest = channel_max.max()
    nonzero = channel_max[channel_max > 0]
    spread = (largest / nonzero.min()).item() if nonzero.numel() else float("inf")
    dead = int((channel_max * 127 < 0.5 * largest).sum().item()) if largest > 0 else rows.shape[0]
    return WeightQuantization(layer, rows.shape[0], spread, dead, _int8_error(rows, largest.expand(rows.shape[0])),
                              _int8_error(rows, channel_max))


def _pt2e_error(model: nn.Module, example_inputs: tuple) -> float:
    """Output error, relative to the output scale, of `model` quantized to int8
    by the PT2E flow with the X86 Inductor quantizer, calibrated on the inputs."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise ImportError("fold_model(quantization=True) needs torchao (pip install torchao)") from error
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example_inputs).module(), quantizer)
    with torch.no_grad():
        prepared(*example_inputs)
        quantized = convert_pt2e(prepared)
        expected, actual = _outputs(model, example_inputs), _outputs(quantized, example_inputs)
    scale = max(e.double().abs().max().item() for e in expected)
    error = max((a.double() - e.double()).abs().max().item() for a, e in zip(actual, expected))
    return error / scale if scale > 0 else error


def _outputs(model: nn.Module, example_inputs: tuple) -> list[Tensor]:
    with torch.no_grad():
        return [t for t in _pytree.tree_leaves(model(*example_inputs)) if isinstance(t, Tensor)]
