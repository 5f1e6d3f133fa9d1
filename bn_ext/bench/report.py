"""The report of `python -m bn_ext bench`: each case's result and its
ratios, the table, the JSON file and the plot."""


from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path

import torch

import bn_ext
from bn_ext.bench.catalogue import last_level_cache_bytes



@dataclasses.dataclass
class Result:
    group: str
    name: str
    torch_ms: float  # kernel against kernel: both libraries' outputs in reused memory
    bn_ext_ms: float
    bytes: int
    compiled_ms: float | None = None  # torch.compile (Inductor) of the same op, reused memory
    shipped_torch_ms: float | None = None  # default allocator, bn_ext's output cache
    shipped_bn_ext_ms: float | None = None
    limit_ms: float | None = None  # minimal traffic at the copy speed into existing memory
    # the algorithm's own traffic (limit_ms's plus what it must read again) at that speed
    algorithm_limit_ms: float | None = None
    # bn_ext's peak tensor allocation beyond what the call returns (the profiler
    # sees tensor allocations only, not the kernels' own O(C x stripes) partials).
    extra_bytes: int | None = None
    # On a GPU, torch with cuDNN (BatchNorm cases); torch_ms is then torch's native kernel.
    cudnn_ms: float | None = None
    plain_ms: float | None = None  # bn_ext's plain BatchNorm beside a fused case, reused memory
    # The kernel ratios of the first, second and last third of the rounds
    # (three repeats): a case is slower than its peer only where all three are below 1.
    ratio_thirds: list[float] | None = None
    compiled_ratio_thirds: list[float] | None = None

    @property
    def slower(self) -> bool:
        """Slower than torch eager or torch.compile in each of the three repeats."""
        return any(thirds is not None and max(thirds) < 1.0
                   for thirds in (self.ratio_thirds, self.compiled_ratio_thirds))

    @property
    def noise(self) -> bool:
        """A ratio below 1 that a repeat does not confirm."""
        return not self.slower and (self.ratio < 1.0 or (self.compiled_ratio or math.inf) < 1.0)

    @property
    def fused_cost(self) -> float | None:
        """A fused case's time over plain bn_ext BatchNorm's."""
        return None if self.plain_ms is None else self.bn_ext_ms / self.plain_ms

    def _over_ours(self, ms: float | None) -> float | None:
        """A time over bn_ext's kernel time; None where it was not measured."""
        return None if ms is None else ms / self.bn_ext_ms

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.bn_ext_ms

    @property
    def compiled_ratio(self) -> float | None:
        return self._over_ours(self.compiled_ms)

    @property
    def shipped_ratio(self) -> float | None:
        if self.shipped_torch_ms is None or self.shipped_bn_ext_ms is None:
            return None
        return self.shipped_torch_ms / self.shipped_bn_ext_ms

    @property
    def limit_share(self) -> float | None:
        return self._over_ours(self.limit_ms)

    @property
    def algorithm_share(self) -> float | None:
        return self._over_ours(self.algorithm_limit_ms)

def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _machine(device: str, threads: int) -> str:
    if device == "cpu":
        return (f"{_cpu_name()}, {threads} threads, CPU kernels {bn_ext.cpu_capability()}, "
                f"torch {torch.__version__} (kernels {torch.backends.cpu.get_cpu_capability()})")
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def write_json(results: list[Result], bandwidth: float, machine: str, output: Path, complete: bool) -> None:
    """output/bench.json: rewritten after every case (complete: false) and
    at the end, so an interrupted run leaves the cases it finished."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    data = {
        "machine": machine,
        "complete": complete,
        "cpu_capability": bn_ext.cpu_capability(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "copy_bandwidth_gbps": bandwidth,
        "last_level_cache_bytes": last_level_cache_bytes(),
        "results": [dataclasses.asdict(r) | {"ratio": r.ratio, "compiled_ratio": r.compiled_ratio,
                                             "shipped_ratio": r.shipped_ratio, "limit_share": r.limit_share,
                                             "fused_cost": r.fused_cost, "slower": r.slower, "noise": r.noise,
                                             "algorithm_share": r.algorithm_share}
                    for r in results],
        "geomean": {g: geomean([r.ratio for r in rs]) for g, rs in groups.items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(data, indent=2))


def report(results: list[Result], bandwidth: float, threads: int, output: Path, device: str = "cpu") -> None:
    machine = _machine(device, threads)
    print(f"\nbn_ext {bn_ext.__version__} vs torch, {machine}; copy bandwidth {bandwidth:.1f} GB/s")
    if device == "cpu":
        print("ratio: torch / bn_ext, kernel against kernel (outputs in reused memory); compile: torch.compile / "
              "bn_ext;\nshipped: torch / bn_ext with the default allocator; limit: minimal traffic at the copy "
              "speed, and bn_ext's share of it;\n% alg: the share of the algorithm's own traffic (a whole-tensor "
              "reduction larger than the last-level cache reads its input twice)\n")
    cudnn = any(r.cudnn_ms is not None for r in results)
    fused = any(r.plain_ms is not None for r in results)
    if fused:
        print("fused cases: torch is its unfused ops; vs plain: bn_ext fused / bn_ext plain BatchNorm\n")
    print("repeats: the lowest and highest ratio over the three thirds of the rounds; SLOWER: below 1.0 in all "
          "three (against torch or torch.compile); noise: a ratio below 1.0 a repeat does not confirm\n")
    print(f"{'group':<28} {'case':<44} {'torch ms':>9} {'bn_ext ms':>9} {'ratio':>6} {'repeats':>11} {'compile':>7} "
          f"{'shipped':>7} {'limit ms':>9} {'% limit':>7} {'% alg':>6} {'extra KB':>9}"
          + (f" {'cuDNN ms':>9} {'vs cuDNN':>8}" if cudnn else "") + (f" {'vs plain':>8}" if fused else ""))
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
        extra = "-" if r.extra_bytes is None else f"{r.extra_bytes / 1024:.1f}"
        vs_cudnn = "" if r.cudnn_ms is None else f" {r.cudnn_ms:>9.3f} {r.cudnn_ms / r.bn_ext_ms:>8.2f}"
        share = None if r.limit_share is None else 100 * r.limit_share
        repeats = "-" if r.ratio_thirds is None else f"{min(r.ratio_thirds):.2f}-{max(r.ratio_thirds):.2f}"
        flag = "  SLOWER" if r.slower else "  noise" if r.noise else ""
        print(f"{r.group:<28} {r.name:<44} {r.torch_ms:>9.3f} {r.bn_ext_ms:>9.3f} {r.ratio:>6.2f} {repeats:>11} "
              f"{_figure(r.compiled_ratio, '.2f'):>7} {_figure(r.shipped_ratio, '.2f'):>7} "
              f"{_figure(r.limit_ms, '.3f'):>9} {_figure(share, '.0f'):>6}% "
              f"{_figure(None if r.algorithm_share is None else 100 * r.algorithm_share, '.0f'):>5}% "
              f"{extra:>9}{vs_cudnn}"
              + (f" {_figure(r.fused_cost, '.2f'):>8}" if fused else "") + flag)
    print(f"\n{'group':<28} {'geomean':>8} {'min':>6} {'compile geomean':>15} {'compile min':>11} "
          f"{'shipped geomean':>15}")
    for group, rs in groups.items():
        compiled = [r.compiled_ratio for r in rs if r.compiled_ratio is not None]
        shipped = [r.shipped_ratio for r in rs if r.shipped_ratio is not None]
        print(f"{group:<28} {geomean([r.ratio for r in rs]):>8.2f} {min(r.ratio for r in rs):>6.2f} "
              f"{_figure(geomean(compiled) if compiled else None, '.2f'):>15} "
              f"{_figure(min(compiled) if compiled else None, '.2f'):>11} "
              f"{_figure(geomean(shipped) if shipped else None, '.2f'):>15}")
    slower = [r for r in results if r.slower]
    print(f"\ncases slower than torch eager or torch.compile in all three repeats: {len(slower)}"
          + "".join(f"\n  {r.group}: {r.name}" for r in slower))
    write_json(results, bandwidth, machine, output, complete=True)
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
    ax.set_xlabel("speed-up over torch, kernel against kernel (torch time / bn_ext time); bar = geometric mean")
    ax.set_title(f"bn_ext vs torch ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
