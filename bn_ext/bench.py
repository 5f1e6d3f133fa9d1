"""`python -m bn_ext bench`: bn_ext against torch's native kernels, side by side.

Each case times both implementations interleaved in one process (warm-up,
then alternating repetitions) and reports medians, the ratio torch / bn_ext,
and the effective bandwidth of bn_ext counting the minimal traffic (each input
read once, each output written once) against a copy bandwidth measured in the
same run. Results go to a table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import bn_ext

_ops = torch.ops.bn_ext
_aten = torch.ops.aten

# ResNet-50's BatchNorm shapes at batch 32 (C, H·W side), and at batch 256 for
# the 14x14 and 7x7 stages.
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
RESNET50_BN_N256 = [(256, 14), (1024, 14), (512, 7), (2048, 7)]
ROW_LENGTHS = [(64, 65536), (768, 16384), (1024, 16384), (4096, 4096), (16384, 4096)]


@dataclasses.dataclass
class Case:
    group: str
    name: str
    make: Callable[[], tuple[Callable[[], object], Callable[[], object], int]]  # -> (torch, bn_ext, bytes)


@dataclasses.dataclass
class Result:
    group: str
    name: str
    torch_ms: float
    bn_ext_ms: float
    bytes: int
    # bn_ext's peak tensor allocation beyond what the call returns (the profiler
    # sees tensor allocations only, not the kernels' own O(C x stripes) partials).
    extra_bytes: int | None = None
    # On a GPU, torch with cuDNN (BatchNorm cases); torch_ms is then torch's native kernel.
    cudnn_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.bn_ext_ms

    @property
    def gbps(self) -> float:
        return self.bytes / (self.bn_ext_ms * 1e-3) / 1e9


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bn_cases(shapes, fmt_name, dtype) -> list[Case]:
    cases = []
    fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    dname = str(dtype).removeprefix("torch.")
    for n, c, s in shapes:
        def inputs(n=n, c=c, s=s):
            torch.manual_seed(0)
            x = torch.randn(n, c, s, s, dtype=dtype).to(memory_format=fmt)
            w, b = torch.rand(c) + 0.5, torch.randn(c)
            rm, rv = torch.randn(c), torch.rand(c) + 0.5
            return x, w, b, rm, rv

        tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"

        def train(inputs=inputs):
            x, w, b, _, _ = inputs()
            return (lambda: F.batch_norm(x, None, None, w, b, True),
                    lambda: bn_ext.batch_norm(x, None, None, w, b, True), 2 * _nbytes(x))

        def eval_(inputs=inputs):
            x, w, b, rm, rv = inputs()
            return (lambda: F.batch_norm(x, rm, rv, w, b, False),
                    lambda: bn_ext.batch_norm(x, rm, rv, w, b, False), 2 * _nbytes(x))

        def backward(inputs=inputs):
            x, w, b, rm, rv = inputs()
            dy = torch.randn_like(x)
            _, mean_t, invstd_t = _aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
            _, mean_o, invstd_o = _ops.batch_norm_forward(x, w, b, None, None, True, 1e-5)
            mask = [True, True, True]
            return (lambda: _aten.native_batch_norm_backward(dy, x, w, rm, rv, mean_t, invstd_t, True, 1e-5, mask),
                    lambda: _ops.batch_norm_backward(dy, x, w, mean_o, invstd_o, True, 1e-5, mask), 3 * _nbytes(x))

        cases += [Case("BatchNorm2d train forward", tag, train), Case("BatchNorm2d backward", tag, backward),
                  Case("BatchNorm2d eval forward", tag, eval_)]
    return cases


def _row_cases(op: str, dtype, quick) -> list[Case]:
    cases = []
    dname = str(dtype).removeprefix("torch.")
    lengths = ROW_LENGTHS[1:3] if quick else ROW_LENGTHS
    for d, rows in lengths:
        def inputs(d=d, rows=rows):
            torch.manual_seed(0)
            return torch.randn(rows, d, dtype=dtype), torch.rand(d, dtype=dtype) + 0.5, torch.randn(d, dtype=dtype)

        tag = f"{rows}x{d} {dname}"
        if op == "LayerNorm":
            def forward(inputs=inputs, d=d):
                x, w, b = inputs()
                return (lambda: F.layer_norm(x, (d,), w, b), lambda: bn_ext.layer_norm(x, (d,), w, b),
                        2 * _nbytes(x))

            def backward(inputs=inputs, d=d):
                x, w, b = inputs()
                dy = torch.randn_like(x)
                _, mt, rt = _aten.native_layer_norm(x, [d], w, b, 1e-5)
                _, mo, ro = _ops.layer_norm_forward(x, [d], w, b, 1e-5)
                mask = [True, True, True]
                return (lambda: _aten.native_layer_norm_backward(dy, x, [d], mt, rt, w, b, mask),
                        lambda: _ops.layer_norm_backward(dy, x, [d], mo, ro, w, b, 1e-5, mask), 3 * _nbytes(x))
        else:
            def forward(inputs=inputs, d=d):
                x, w, _ = inputs()
                return (lambda: F.rms_norm(x, (d,), w), lambda: bn_ext.rms_norm(x, (d,), w), 2 * _nbytes(x))

            def backward(inputs=inputs, d=d):
                # torch has no CPU RMSNorm backward kernel: time both through autograd.
                x, w, _ = inputs()
                x.requires_grad_()
                w.requires_grad_()
                dy = torch.randn_like(x)
                y_torch, y_ours = F.rms_norm(x, (d,), w), bn_ext.rms_norm(x, (d,), w)
                return (lambda: torch.autograd.grad(y_torch, (x, w), dy, retain_graph=True),
                        lambda: torch.autograd.grad(y_ours, (x, w), dy, retain_graph=True), 3 * _nbytes(x))

        cases += [Case(f"{op} forward", tag, forward), Case(f"{op} backward", tag, backward)]
    return cases


def _module_cases() -> list[Case]:
    """Tiny inputs through the modules: per-call overhead."""

    def module_pair(torch_cls, ours_cls, args, shape):
        def make():
            torch.manual_seed(0)
            ref, ours = torch_cls(*args), ours_cls(*args)
            x = torch.randn(shape)
            return (lambda: ref(x), lambda: ours(x), 2 * _nbytes(x))
        return make

    return [
        Case("small inputs (modules)", "BatchNorm1d train 8x16",
             module_pair(torch.nn.BatchNorm1d, bn_ext.nn.BatchNorm1d, (16,), (8, 16))),
        Case("small inputs (modules)", "BatchNorm2d train 2x8x4x4",
             module_pair(torch.nn.BatchNorm2d, bn_ext.nn.BatchNorm2d, (8,), (2, 8, 4, 4))),
        Case("small inputs (modules)", "LayerNorm 8x16",
             module_pair(torch.nn.LayerNorm, bn_ext.nn.LayerNorm, (16,), (8, 16))),
        Case("small inputs (modules)", "RMSNorm 8x16",
             module_pair(torch.nn.RMSNorm, bn_ext.nn.RMSNorm, (16,), (8, 16))),
    ]


def _bn1d_cases(quick) -> list[Case]:
    cases = []
    for shape in [(4096, 512), (256, 64, 1024)][: 1 if quick else 2]:
        def train(shape=shape):
            torch.manual_seed(0)
            x = torch.randn(shape)
            w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
            return (lambda: F.batch_norm(x, None, None, w, b, True),
                    lambda: bn_ext.batch_norm(x, None, None, w, b, True), 2 * _nbytes(x))
        cases.append(Case("BatchNorm1d train forward", "x".join(map(str, shape)), train))
    return cases


def _large_cases() -> list[Case]:
    """Inputs larger than the last-level cache (over 200 MB)."""
    def bn():
        x = torch.randn(256, 1024, 14, 14)
        w, b = torch.rand(1024) + 0.5, torch.randn(1024)
        return (lambda: F.batch_norm(x, None, None, w, b, True),
                lambda: bn_ext.batch_norm(x, None, None, w, b, True), 2 * _nbytes(x))

    def ln():
        x = torch.randn(16384, 4096)
        w, b = torch.rand(4096) + 0.5, torch.randn(4096)
        return lambda: F.layer_norm(x, (4096,), w, b), lambda: bn_ext.layer_norm(x, (4096,), w, b), 2 * _nbytes(x)

    def rms():
        x = torch.randn(16384, 4096)
        w = torch.rand(4096) + 0.5
        return lambda: F.rms_norm(x, (4096,), w), lambda: bn_ext.rms_norm(x, (4096,), w), 2 * _nbytes(x)

    return [Case("larger than L3", "BatchNorm2d train 256x1024x14x14 float32", bn),
            Case("larger than L3", "LayerNorm 16384x4096 float32", ln),
            Case("larger than L3", "RMSNorm 16384x4096 float32", rms)]


def suite(quick: bool) -> list[Case]:
    shapes = [(32, c, s) for c, s in RESNET50_BN] + [(256, c, s) for c, s in RESNET50_BN_N256]
    if quick:
        shapes = [(32, 256, 56), (32, 1024, 14)]
    cases: list[Case] = []
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in ("contiguous", "channels_last"):
            cases += _bn_cases(shapes, fmt, dtype)
    cases += _bn1d_cases(quick)
    for dtype in (torch.float32, torch.bfloat16):
        cases += _row_cases("LayerNorm", dtype, quick) + _row_cases("RMSNorm", dtype, quick)
    cases += _module_cases()
    if not quick:
        cases += _large_cases()
    return cases


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
    """GB/s of a large tensor copy, read + write counted."""
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


def time_interleaved(fns, repeats: int, min_seconds: float, device: str = "cpu") -> list[float]:
    """Interleaved timing of several functions after warm-up; medians in milliseconds."""
    elapsed = _timer(device)
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < repeats or (time.perf_counter() - start < min_seconds and len(times[0]) < 10 * repeats):
        for fn, sink in zip(fns, times):
            sink.append(elapsed(fn))
    return [statistics.median(t) * 1e3 for t in times]


def _with_cudnn(fn, enabled: bool):
    def call():
        with torch.backends.cudnn.flags(enabled=enabled):
            return fn()
    return call


def run(quick: bool = False, pattern: str | None = None, threads: int | None = None,
        output: Path = Path("bench_results"), device: str = "cpu") -> list[Result]:
    """On "cuda", torch's time is its native kernel (cuDNN off) and, for
    BatchNorm, cuDNN's time is reported beside it."""
    if device == "cuda" and not (has_cuda_kernels() and torch.cuda.is_available()):
        raise SystemExit("bench --device cuda needs a CUDA build of bn_ext and a CUDA device; "
                         f"CUDA kernels built: {has_cuda_kernels()}, device present: {torch.cuda.is_available()}")
    from tqdm import tqdm

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cases = [c for c in suite(quick) if not pattern or pattern.lower() in f"{c.group} {c.name}".lower()]
        bandwidth = copy_bandwidth(device)
        results = []
        repeats, min_seconds = (5, 0.05) if quick else (15, 0.3)
        for case in tqdm(cases, desc="bench", unit="case"):
            with torch.device(device):
                torch_fn, ours_fn, nbytes = case.make()
            fns = [torch_fn, ours_fn]
            if device == "cuda":
                fns = [_with_cudnn(torch_fn, False), ours_fn]
                if case.group.startswith("BatchNorm"):
                    fns.append(_with_cudnn(torch_fn, True))
            medians = time_interleaved(fns, repeats, min_seconds, device)
            cudnn_ms = medians[2] if len(medians) > 2 else None
            results.append(Result(case.group, case.name, medians[0], medians[1], nbytes,
                                  peak_extra_bytes(ours_fn, device), cudnn_ms))
            del torch_fn, ours_fn, fns
        report(results, bandwidth, torch.get_num_threads(), output, device)
    finally:
        torch.set_num_threads(threads_before)
    return results


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def report(results: list[Result], bandwidth: float, threads: int, output: Path, device: str = "cpu") -> None:
    if device == "cpu":
        machine = f"{_cpu_name()}, {threads} threads, torch {torch.__version__}"
    else:
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"\nbn_ext {bn_ext.__version__} vs torch native, {machine}; copy bandwidth {bandwidth:.1f} GB/s\n")
    cudnn = any(r.cudnn_ms is not None for r in results)
    print(f"{'group':<28} {'case':<44} {'torch ms':>9} {'bn_ext ms':>9} {'ratio':>6} {'GB/s':>6} {'% copy':>6} "
          f"{'extra KB':>9}" + (f" {'cuDNN ms':>9} {'vs cuDNN':>8}" if cudnn else ""))
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
        extra = "-" if r.extra_bytes is None else f"{r.extra_bytes / 1024:.1f}"
        vs_cudnn = "" if r.cudnn_ms is None else f" {r.cudnn_ms:>9.3f} {r.cudnn_ms / r.bn_ext_ms:>8.2f}"
        print(f"{r.group:<28} {r.name:<44} {r.torch_ms:>9.3f} {r.bn_ext_ms:>9.3f} {r.ratio:>6.2f} "
              f"{r.gbps:>6.1f} {100 * r.gbps / bandwidth:>5.0f}% {extra:>9}{vs_cudnn}")
    print(f"\n{'group':<28} {'geomean ratio':>13} {'min ratio':>9}")
    for group, rs in groups.items():
        print(f"{group:<28} {geomean([r.ratio for r in rs]):>13.2f} {min(r.ratio for r in rs):>9.2f}")
    output.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine,
        "copy_bandwidth_gbps": bandwidth,
        "results": [dataclasses.asdict(r) | {"ratio": r.ratio, "gbps": r.gbps} for r in results],
        "geomean": {g: geomean([r.ratio for r in rs]) for g, rs in groups.items()},
    }
    (output / "bench.json").write_text(json.dumps(data, indent=2))
    _plot(groups, output / "bench.png", machine)
    print(f"\nwrote {output / 'bench.json'} and {output / 'bench.png'}")


def _plot(groups: dict[str, list[Result]], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    for i, g in enumerate(names):
        ratios = [r.ratio for r in groups[g]]
        ax.scatter(ratios, [i] * len(ratios), alpha=0.6, s=18)
        ax.scatter([geomean(ratios)], [i], marker="|", s=400, color="black")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over torch (torch time / bn_ext time); bar = geometric mean")
    ax.set_title(f"bn_ext vs torch native ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
