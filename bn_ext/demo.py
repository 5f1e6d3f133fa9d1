"""The built-in example (`python -m bn_ext demo`):

1. a small conv net trained side by side with torch.nn's BatchNorm and with
   bn_ext's, which must agree step for step;
2. torchvision ResNet-18 (random weights, BatchNorm statistics calibrated by a
   few training-mode passes) folded for deployment: the report, torch.export
   and ONNX exports checked against the folded model, and eval latency before
   and after folding.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bn_ext


def _small_convnet() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )


def train_side_by_side(steps: int) -> bool:
    torch.manual_seed(0)
    reference = _small_convnet()
    ours = bn_ext.nn.convert(copy.deepcopy(reference))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, ours)]
    data = torch.randn(steps, 32, 3, 32, 32)
    labels = torch.randint(0, 10, (steps, 32))
    print("1. Training a small conv net with torch.nn and with bn_ext BatchNorm\n")
    print(f"{'step':>4}  {'loss torch':>11}  {'loss bn_ext':>11}  {'max |Δ output|':>15}")
    worst = 0.0
    for step in range(steps):
        results = []
        for model, optimizer in zip((reference, ours), optimizers):
            out = model(data[step])
            loss = torch.nn.functional.cross_entropy(out, labels[step])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results.append((out.detach(), loss.item()))
        diff = (results[0][0] - results[1][0]).abs().max().item()
        worst = max(worst, diff)
        print(f"{step:>4}  {results[0][1]:>11.5f}  {results[1][1]:>11.5f}  {diff:>15.2e}")
    stats = max(
        (a - b).abs().max().item()
        for a, b in zip(reference.state_dict().values(), ours.state_dict().values())
        if a.is_floating_point()
    )
    ok = worst < 1e-3 and stats < 1e-3
    print(f"max parameter/running-stat difference after {steps} steps: {stats:.2e} -> {'OK' if ok else 'MISMATCH'}\n")
    return ok


def median_latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fold_resnet18(image_size: int, repeats: int) -> bool:
    import onnxruntime
    import torchvision

    print("2. Folding the BatchNorms of torchvision ResNet-18 for deployment\n")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    with torch.no_grad():  # calibrate the BN statistics so they are not the defaults
        for _ in range(3):
            model(torch.randn(8, 3, image_size, image_size) * 2 + 0.5)
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    folded, report = bn_ext.fold_model(model, x)
    print(report, "\n")

    with torch.no_grad():
        expected = folded(x)
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.export.export(folded, (x,))
        torch.export.save(program, Path(tmp) / "resnet18_folded.pt2")
        export_error = (torch.export.load(Path(tmp) / "resnet18_folded.pt2").module()(x) - expected).abs().max()
        onnx_path = Path(tmp) / "resnet18_folded.onnx"
        torch.onnx.export(folded, (x,), onnx_path, dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        onnx_error = (torch.from_numpy(onnx_out) - expected).abs().max()
    print(f"torch.export (.pt2) round trip vs folded model: max |Δ| {export_error.item():.2e}")
    print(f"ONNX Runtime vs folded model:                  max |Δ| {onnx_error.item():.2e}\n")

    before = median_latency_ms(model, x, repeats)
    after = median_latency_ms(folded, x, repeats)
    print(f"eval latency, batch 1, {image_size}x{image_size}, median of {repeats} runs:")
    print(f"  {'model':<12} {'ms':>8}")
    print(f"  {'unfolded':<12} {before:>8.2f}")
    print(f"  {'folded':<12} {after:>8.2f}   ({before / after:.2f}x)")
    return report.passed and onnx_error.item() < 1e-3 and export_error.item() < 1e-4


def run_demo(steps: int = 5, image_size: int = 224, repeats: int = 20) -> int:
    print(f"bn_ext {bn_ext.__version__} demo\n")
    trained_ok = train_side_by_side(steps)
    folded_ok = fold_resnet18(image_size, repeats)
    print("\nresult:", "OK" if trained_ok and folded_ok else "MISMATCH")
    return 0 if trained_ok and folded_ok else 1
