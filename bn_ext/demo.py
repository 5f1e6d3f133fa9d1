"""The built-in example: a small conv net trained side by side with torch.nn
BatchNorm and with bn_ext's, which must agree step for step."""

from __future__ import annotations

import copy
import time

import torch

import bn_ext


def _small_convnet() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )


def run_demo(steps: int = 5) -> int:
    torch.manual_seed(0)
    reference = _small_convnet()
    ours = bn_ext.nn.convert(copy.deepcopy(reference))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, ours)]
    data = torch.randn(steps, 32, 3, 32, 32)
    labels = torch.randint(0, 10, (steps, 32))
    print(f"bn_ext {bn_ext.__version__}: training a small conv net with torch.nn and bn_ext BatchNorm\n")
    print(f"{'step':>4}  {'loss torch':>11}  {'loss bn_ext':>11}  {'max |Δ output|':>15}  {'ms torch':>9}  {'ms bn_ext':>9}")
    worst = 0.0
    for step in range(steps):
        results = []
        for model, optimizer in zip((reference, ours), optimizers):
            start = time.perf_counter()
            out = model(data[step])
            loss = torch.nn.functional.cross_entropy(out, labels[step])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results.append((out.detach(), loss.item(), (time.perf_counter() - start) * 1e3))
        diff = (results[0][0] - results[1][0]).abs().max().item()
        worst = max(worst, diff)
        print(f"{step:>4}  {results[0][1]:>11.5f}  {results[1][1]:>11.5f}  {diff:>15.2e}  "
              f"{results[0][2]:>9.2f}  {results[1][2]:>9.2f}")
    stats = max(
        (a - b).abs().max().item()
        for a, b in zip(reference.state_dict().values(), ours.state_dict().values())
        if a.is_floating_point()
    )
    ok = worst < 1e-3 and stats < 1e-3
    print(f"\nmax parameter/running-stat difference after {steps} steps: {stats:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
