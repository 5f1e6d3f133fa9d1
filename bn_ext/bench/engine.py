"""The timing engine of `python -m bn_ext bench`: interleaved rounds, their
thirds, the copy bandwidth, peak extra memory, the kernel timings in a
child process with glibc keeping freed memory, the run itself, and the
training-step workloads."""


from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bn_ext
from bn_ext.bench.catalogue import KERNEL_ENV, Case, Fn, _nbytes, suite
from bn_ext.bench.report import Result, _cpu_name, _machine, report, write_json



def has_cuda_kernels() -> bool:
    """Whether this build of bn_ext registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bn_ext::batch_norm_forward", "CUDA")


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: wall clock on the CPU, CUDA events on a GPU."""
    if device == "cpu":
        def elapsed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    else:
        def elapsed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
    return elapsed


def copy_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 10) -> float:
    """GB/s of a large tensor copy into existing memory, read + write counted."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    elapsed = _timer(device)
    times = [elapsed(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * _nbytes(src) / statistics.median(times) / 1e9


def peak_extra_bytes(fn, device: str = "cpu") -> int | None:
    """Bytes a call allocates at its peak beyond what is still alive when it
    returns (its outputs): workspaces, partials, statistics it drops.
    From the CUDA caching allocator's peak on a GPU, from torch.profiler's
    memory timeline on the CPU; None where that is unavailable."""
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        del result
        return extra
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            result = fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        del result
    except Exception:  # noqa: BLE001  (a private profiler API: report nothing rather than fail)
        return None
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[-1] if totals else 0


def time_interleaved(fns, repeats: int, min_seconds: float, device: str = "cpu",
                     max_seconds: float = math.inf) -> list[float]:
    """Interleaved timing of several functions after warm-up; medians in
    milliseconds (interleaved_samples' rounds)."""
    return [statistics.median(t) for t in interleaved_samples(fns, repeats, min_seconds, device, max_seconds)]


def thirds(samples: list[float]) -> list[float]:
    """The medians of a timing's first, second and last third of rounds:
    three repeats of the measurement, interleaved with the peers' as the
    whole is, to tell a ratio from noise."""
    size = len(samples)
    bounds = [0, size // 3, 2 * size // 3, size]
    return [statistics.median(samples[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def interleaved_samples(fns, repeats: int, min_seconds: float, device: str = "cpu",
                        max_seconds: float = math.inf) -> list[list[float]]:
    """Interleaved timing of several functions after warm-up: each one's
    times in milliseconds, round by round. Rounds: `repeats`, more (up to ten
    times as many) while they take under `min_seconds`, fewer (not under
    MIN_ROUNDS) where they take over `max_seconds`: a slow case's rounds vary
    less."""
    elapsed = _timer(device)
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        rounds, spent = len(times[0]), time.perf_counter() - start
        if (rounds >= 10 * repeats or (rounds >= repeats and spent >= min_seconds)
                or (rounds >= min(repeats, MIN_ROUNDS) and spent >= max_seconds)):
            break
        for fn, sink in zip(fns, times):
            sink.append(elapsed(fn) * 1e3)
    return times


def _with_cudnn(fn, enabled: bool):
    def call():
        with torch.backends.cudnn.flags(enabled=enabled):
            return fn()
    return call


# A case's timing rounds: fewer, down to MIN_ROUNDS (two per third), once
# they take over MAX_CASE_SECONDS.
MIN_ROUNDS = 6


MAX_CASE_SECONDS = 1.0


def _repetitions(quick: bool) -> tuple[int, float]:
    """Rounds and least seconds of a case's kernel timings."""
    return (6, 0.05) if quick else (15, 0.3)


# The as-shipped figures (second to the kernel ratio) take the quick run's
# rounds in a full run too.
SHIPPED_REPETITIONS = (5, 0.05)


def _selected(quick: bool, pattern: str | None) -> list[Case]:
    return [c for c in suite(quick) if not pattern or pattern.lower() in f"{c.group} {c.name}".lower()]


def kernel_timings(quick: bool, pattern: str | None, compile_peer: bool, path: Path) -> None:
    """The child's part: kernel-against-kernel medians of every repeated case
    (torch, bn_ext, torch.compile), written to `path` as JSON."""
    from tqdm import tqdm

    repeats, min_seconds = _repetitions(quick)
    timings = {}
    path.write_text("{}")  # a filter that selects no case still leaves a file
    for case in tqdm([c for c in _selected(quick, pattern) if not c.first_call], desc="kernels", unit="case"):
        calls = case.make()
        fns = [calls.torch, calls.bn_ext]
        if calls.plain is not None:
            fns.append(calls.plain)
        if compile_peer and calls.compiled is not None:
            fns.append(calls.compiled)
        samples = interleaved_samples(fns, repeats, min_seconds, max_seconds=MAX_CASE_SECONDS)
        medians = [statistics.median(t) for t in samples]
        compiled = len(fns) > 2 + (calls.plain is not None)
        timings[f"{case.group}|{case.name}"] = {
            "torch": medians[0], "bn_ext": medians[1],
            "plain": medians[2] if calls.plain is not None else None,
            "compiled": medians[-1] if compiled else None,
            "torch_thirds": thirds(samples[0]), "bn_ext_thirds": thirds(samples[1]),
            "compiled_thirds": thirds(samples[-1]) if compiled else None,
        }
        del calls, fns
        # After every case: an interrupted run leaves the medians it has.
        path.write_text(json.dumps(timings, indent=1))


def _ratios(peer: list[float] | None, ours: list[float] | None) -> list[float] | None:
    return None if peer is None or ours is None else [p / o for p, o in zip(peer, ours)]


def _kernel_timings_in_child(quick, pattern, threads, compile_peer, path: Path) -> dict[str, list[float]]:
    """The kernel medians, timed in a child process (KERNEL_ENV) that writes
    them to `path` (output/kernels.json) case by case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bn_ext", "bench", "--kernel-timings", str(path)]
    command += ["--quick"] if quick else []
    command += ["--filter", pattern] if pattern else []
    command += ["--threads", str(threads)] if threads else []
    command += [] if compile_peer else ["--no-compile"]
    subprocess.run(command, env={**os.environ, **KERNEL_ENV}, check=True)
    return json.loads(path.read_text())


def run(quick: bool = False, pattern: str | None = None, threads: int | None = None,
        output: Path = Path("bench_results"), device: str = "cpu", compile_peer: bool = True) -> list[Result]:
    """On the CPU: kernel timings in a child process, as-shipped timings and
    the limit here. On "cuda": one process (the caching allocator reuses
    memory), torch's time is its native kernel (cuDNN off) and, for
    BatchNorm, cuDNN's time is reported beside it."""
    if device == "cuda" and not (has_cuda_kernels() and torch.cuda.is_available()):
        raise SystemExit("bench --device cuda needs a CUDA build of bn_ext and a CUDA device; "
                         f"CUDA kernels built: {has_cuda_kernels()}, device present: {torch.cuda.is_available()}")
    from tqdm import tqdm

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cases = _selected(quick, pattern)
        kernels = (_kernel_timings_in_child(quick, pattern, threads, compile_peer, output / "kernels.json")
                   if device == "cpu" else {})
        bandwidth = copy_bandwidth(device)
        results = []
        repeats, min_seconds = SHIPPED_REPETITIONS if device == "cpu" else _repetitions(quick)
        for case in tqdm(cases, desc="as shipped" if device == "cpu" else "bench", unit="case"):
            with torch.device(device):
                calls = case.make()
            if case.first_call:
                medians = [calls.torch(), calls.bn_ext()]
            else:
                fns = [calls.torch, calls.bn_ext]
                if device == "cuda":
                    fns = [_with_cudnn(calls.torch, False), calls.bn_ext]
                    if case.group.startswith("BatchNorm"):
                        fns.append(_with_cudnn(calls.torch, True))
                medians = time_interleaved(fns, repeats, min_seconds, device, MAX_CASE_SECONDS)
            limit_ms = calls.bytes / (bandwidth * 1e9) * 1e3
            algorithm_limit_ms = (calls.bytes + calls.reread) / (bandwidth * 1e9) * 1e3
            extra = None if case.first_call else peak_extra_bytes(calls.bn_ext, device)
            if device == "cuda":
                result = Result(case.group, case.name, medians[0], medians[1], calls.bytes, limit_ms=limit_ms,
                                extra_bytes=extra, cudnn_ms=medians[2] if len(medians) > 2 else None,
                                algorithm_limit_ms=algorithm_limit_ms)
            else:
                kernel = ({"torch": medians[0], "bn_ext": medians[1]} if case.first_call
                          else kernels[f"{case.group}|{case.name}"])
                ours = kernel.get("bn_ext_thirds")
                result = Result(case.group, case.name, kernel["torch"], kernel["bn_ext"], calls.bytes,
                                compiled_ms=kernel.get("compiled"), shipped_torch_ms=medians[0],
                                shipped_bn_ext_ms=medians[1], limit_ms=limit_ms, extra_bytes=extra,
                                plain_ms=kernel.get("plain"), algorithm_limit_ms=algorithm_limit_ms,
                                ratio_thirds=_ratios(kernel.get("torch_thirds"), ours),
                                compiled_ratio_thirds=_ratios(kernel.get("compiled_thirds"), ours))
            results.append(result)
            del calls
            write_json(results, bandwidth, _machine(device, torch.get_num_threads()), output, complete=False)
        report(results, bandwidth, torch.get_num_threads(), output, device)
    finally:
        torch.set_num_threads(threads_before)
    return results


# The ops a training step's norm + elementwise share counts (self time), by
# the prefix of their profiler names: the normalisation, and the activations
# and residual adds around it.
_NORM_OPS = ("bn_ext::", "aten::native_batch_norm", "aten::batch_norm", "aten::_batch_norm",
             "aten::cudnn_batch_norm", "aten::_native_batch_norm", "aten::native_group_norm", "aten::group_norm")


_ELEMENTWISE_OPS = ("aten::relu", "aten::threshold_backward", "aten::add", "aten::add_", "aten::clamp_min",
                    "aten::silu", "aten::silu_backward")


def _step_share(step: Fn) -> tuple[float, float]:
    """(norm share, elementwise share) of one step's CPU time, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    norm = sum(e.self_cpu_time_total for e in events if e.key.startswith(_NORM_OPS))
    elementwise = sum(e.self_cpu_time_total for e in events if e.key.startswith(_ELEMENTWISE_OPS))
    return norm / total, elementwise / total


class UNetBlock(nn.Module):
    """A Stable Diffusion U-Net residual block: (GroupNorm -> SiLU -> 3x3
    conv) twice, plus its input. fused: bn_ext's GroupNorm with the SiLU in
    its kernel (same parameters)."""

    def __init__(self, channels: int, fused: bool = False):
        super().__init__()
        norm = (lambda: bn_ext.nn.GroupNorm(32, channels, activation="silu")) if fused else (
            lambda: nn.GroupNorm(32, channels))
        act = nn.Identity if fused else nn.SiLU
        self.norm1, self.act1, self.conv1 = norm(), act(), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.act2, self.conv2 = norm(), act(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))


def _step_rows(models: dict[str, nn.Module], x: torch.Tensor, loss: Callable, steps: int, layout: str,
               workload: str) -> list[dict]:
    """Interleaved training steps (forward, loss, backward, SGD step) of
    models computing the same function: medians, the ratio to the first
    model's, and the share of each step in norm and elementwise ops."""
    step_fns = []
    for model in models.values():
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss(model(x)).backward()
            optimizer.step()

        step_fns.append(step)
    medians = time_interleaved(step_fns, steps, 0.0)
    rows = []
    for (name, _), fn, ms in zip(models.items(), step_fns, medians):
        norm, elementwise = _step_share(fn)
        rows.append({"workload": workload, "layout": layout, "model": name, "step_ms": ms,
                     "speedup": medians[0] / ms, "norm_share": norm, "elementwise_share": elementwise})
    return rows


# The U-Net block's shapes: Stable Diffusion's C320 at 64x64 and C640 at 32x32, batch 2.
UNET_SHAPES = [(2, 320, 64), (2, 640, 32)]


def training_step_report(steps: int = 5, batch: int = 16, side: int = 128) -> list[dict]:
    """Training steps on the CPU, both layouts, torch eager against bn_ext:
    a torchvision ResNet-50 (bn_ext.nn.convert, and convert with
    fuse_activations=True) and a Stable Diffusion U-Net block (GroupNorm +
    SiLU; converted, and with the SiLU fused into bn_ext's GroupNorm);
    interleaved medians and the share of each step left in norm and
    elementwise ops."""
    import copy

    import torchvision

    rows = []
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        base = torchvision.models.resnet50(num_classes=100).to(memory_format=fmt)
        models = {"torch": base, "bn_ext": bn_ext.nn.convert(copy.deepcopy(base))}
        models["bn_ext fused"] = bn_ext.nn.convert(copy.deepcopy(base), fuse_activations=True)
        x = torch.randn(batch, 3, side, side).to(memory_format=fmt)
        target = torch.randint(0, 100, (batch,))
        rows += _step_rows(models, x, lambda out: F.cross_entropy(out, target), steps, fmt_name,
                           f"ResNet-50, batch {batch}, {side}x{side}")
        for n, c, s in UNET_SHAPES:
            torch.manual_seed(0)
            block = UNetBlock(c).to(memory_format=fmt)
            fused = UNetBlock(c, fused=True).to(memory_format=fmt)
            fused.load_state_dict(block.state_dict())
            models = {"torch": block, "bn_ext": bn_ext.nn.convert(copy.deepcopy(block)), "bn_ext fused": fused}
            x = torch.randn(n, c, s, s).to(memory_format=fmt)
            rows += _step_rows(models, x, lambda out: out.square().mean(), steps, fmt_name,
                               f"U-Net block N{n} C{c} {s}x{s}")
    print(f"\nTraining steps, {_cpu_name()}, {torch.get_num_threads()} threads, CPU kernels {bn_ext.cpu_capability()}")
    print(f"{'workload':<28} {'layout':<14} {'model':<14} {'step ms':>9} {'vs torch':>8} {'norm %':>7} "
          f"{'elementwise %':>13}")
    for r in rows:
        print(f"{r['workload']:<28} {r['layout']:<14} {r['model']:<14} {r['step_ms']:>9.1f} {r['speedup']:>8.2f} "
              f"{100 * r['norm_share']:>7.1f} {100 * r['elementwise_share']:>13.1f}")
    return rows
