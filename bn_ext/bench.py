"""`python -m bn_ext bench`: bn_ext against torch, kernel against kernel.

Each case times the implementations interleaved in one process (warm-up,
then alternating repetitions) and reports medians. On the CPU three figures
come out per case:

- kernel: torch / bn_ext with both libraries' outputs in reused memory. A
  child process runs with glibc told to keep freed memory
  (GLIBC_TUNABLES mmap and trim thresholds raised), so neither pays page
  faults for its outputs; torch.compile (Inductor) of the same op is timed
  there too, as a second peer. This is the headline ratio.
- as shipped: the same in this process, with the default allocator (glibc
  returns large blocks to the system, so torch's large outputs fault anew on
  every call) and bn_ext's output cache.
- limit: the case's minimal traffic (inputs read once, outputs written once)
  at the copy speed into existing memory measured in the same run, and the
  share of it bn_ext's kernel reaches.

First-call cases time one call in fresh processes (nothing cached, nothing
faulted); changing-size cases give every call a size not seen before.
Results go to a table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
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

_ops = torch.ops.bn_ext
_aten = torch.ops.aten

# ResNet-50's BatchNorm shapes at batch 32 (C, H·W side), and at batch 256 for
# the 14x14 and 7x7 stages.
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
RESNET50_BN_N256 = [(256, 14), (1024, 14), (512, 7), (2048, 7)]
ROW_LENGTHS = [(64, 65536), (768, 16384), (1024, 16384), (4096, 4096), (16384, 4096)]
# GroupNorm (32 groups): Stable Diffusion U-Net blocks at batch 2 (N, C, side),
# and ResNet-50-GN's stages at batch 16.
GROUP_NORM_SHAPES = [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (16, 256, 56), (16, 512, 28), (16, 1024, 14),
                     (16, 2048, 7)]
# InstanceNorm: style-transfer networks (N, C, side).
INSTANCE_NORM_SHAPES = [(1, 32, 256), (4, 64, 128), (4, 128, 64)]
# LayerNorm2d: ConvNeXt-T's stages at batch 32.
LAYER_NORM_2D_SHAPES = [(32, 96, 56), (32, 192, 28), (32, 384, 14), (32, 768, 7)]

# The child process of the kernel timings: glibc keeps freed memory, so
# outputs of every size come from memory already faulted in.
KERNEL_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"}

Fn = Callable[[], object]


@dataclasses.dataclass
class Calls:
    """What a case times: torch, bn_ext, and optionally torch.compile of the
    torch call (None where Inductor has no counterpart)."""

    torch: Fn
    bn_ext: Fn
    bytes: int
    compiled: Fn | None = None
    # A fused op's unfused bn_ext counterpart (plain BatchNorm), for the fusion's cost.
    plain: Fn | None = None
    # What the algorithm must read a second time beyond `bytes`: a reduction
    # over a whole tensor (BatchNorm's statistics, its backward's sums) reads
    # it again for the output once it is larger than the last-level cache.
    reread: int = 0


@dataclasses.dataclass
class Case:
    group: str
    name: str
    make: Callable[[], Calls]
    # Timed in fresh processes (first call) rather than by repetition.
    first_call: bool = False


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

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.bn_ext_ms

    @property
    def compiled_ratio(self) -> float | None:
        return None if self.compiled_ms is None else self.compiled_ms / self.bn_ext_ms

    @property
    def shipped_ratio(self) -> float | None:
        if self.shipped_torch_ms is None or self.shipped_bn_ext_ms is None:
            return None
        return self.shipped_torch_ms / self.shipped_bn_ext_ms

    @property
    def limit_share(self) -> float | None:
        return None if self.limit_ms is None else self.limit_ms / self.bn_ext_ms

    @property
    def algorithm_share(self) -> float | None:
        return None if self.algorithm_limit_ms is None else self.algorithm_limit_ms / self.bn_ext_ms


def _random_images(n: int, c: int, s: int, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """(n, c, s, s) standard normal values, generated in memory order: a
    channels-last tensor as a view of an (n, s, s, c) one (converting a
    200 MB tensor to channels-last took 2-3 s, its generation 0.6 s)."""
    if memory_format == torch.channels_last:
        return torch.randn(n, s, s, c, dtype=dtype).permute(0, 3, 1, 2)
    return torch.randn(n, c, s, s, dtype=dtype)


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest cache Linux lists for cpu0 (sysfs), as the CPU kernels
    read it; 32 MiB where unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 1024**2)


def _reread(*tensors: torch.Tensor) -> int:
    """Bytes a whole-tensor reduction reads again: all of them once they
    outgrow the last-level cache, none while they stay in it."""
    total = _nbytes(*tensors)
    return total if total > last_level_cache_bytes() else 0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with dynamic shapes, one per function: the cases of
    one op share its compilations (a new dtype or layout recompiles)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _bn_train(x, w, b):
    return F.batch_norm(x, None, None, w, b, True)


def _bn_eval(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, False)


def _bn_backward(dy, x, w, rm, rv, mean, invstd):
    return _aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5, [True, True, True])


def _layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def _layer_norm_backward(dy, x, mean, rstd, w, b):
    return _aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, b, [True, True, True])


def _rms_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w)


def _group_norm(x, w, b):
    return F.group_norm(x, 32, w, b)


def _group_norm_silu(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b))


def _group_norm_backward(dy, x, mean, rstd, w):
    n, c = x.shape[:2]
    return _aten.native_group_norm_backward(dy, x, mean, rstd, w, n, c, x.numel() // (n * c), 32, [True, True, True])


def _instance_norm(x, w, b):
    return F.instance_norm(x, weight=w, bias=b)


def _permute_layer_norm(x, w, b):
    """ConvNeXt's LayerNorm2d as timm and torchvision write it."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-6).permute(0, 3, 1, 2)


def _autograd_backward(torch_fn, ours_fn, x, params):
    """Backward of both through autograd (torch has no kernel of its own for
    the op's backward, or runs it as several). The gradient comes in the
    input's memory format, as the layers around the op would give it (torch's
    channels-last InstanceNorm and permuted LayerNorm2d outputs have other
    layouts, which the same gradient would make either library copy)."""
    x.requires_grad_()
    for p in params:
        p.requires_grad_()
    y_torch, y_ours = torch_fn(), ours_fn()
    dy = torch.randn_like(x)
    inputs = (x, *params)
    return (lambda: torch.autograd.grad(y_torch, inputs, dy, retain_graph=True),
            lambda: torch.autograd.grad(y_ours, inputs, dy, retain_graph=True))


def _group_norm_family_cases(quick) -> list[Case]:
    cases = []
    gn_shapes = GROUP_NORM_SHAPES[::3] if quick else GROUP_NORM_SHAPES
    in_shapes = INSTANCE_NORM_SHAPES[1:2] if quick else INSTANCE_NORM_SHAPES
    ln_shapes = LAYER_NORM_2D_SHAPES[::2] if quick else LAYER_NORM_2D_SHAPES
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            def inputs(n, c, s, fmt=fmt, dtype=dtype):
                torch.manual_seed(0)
                x = _random_images(n, c, s, dtype, fmt)
                return x, torch.rand(c) + 0.5, torch.randn(c)

            for n, c, s in gn_shapes:
                tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"

                def forward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    compiled = _compiled(_group_norm)
                    return Calls(lambda: _group_norm(x, w, b), lambda: bn_ext.group_norm(x, 32, w, b),
                                 2 * _nbytes(x), lambda: compiled(x, w, b))

                def forward_silu(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    compiled = _compiled(_group_norm_silu)
                    return Calls(lambda: _group_norm_silu(x, w, b),
                                 lambda: bn_ext.group_norm(x, 32, w, b, activation="silu"), 2 * _nbytes(x),
                                 lambda: compiled(x, w, b))

                def backward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    dy = torch.randn_like(x)
                    _, mt, rt = _aten.native_group_norm(x, w, b, shape[0], shape[1], shape[2] ** 2, 32, 1e-5)
                    _, mo, ro = _ops.group_norm_forward(x, 32, w, b, 1e-5, None)
                    mask = [True, True, True]
                    compiled = _compiled(_group_norm_backward)
                    return Calls(lambda: _group_norm_backward(dy, x, mt, rt, w),
                                 lambda: _ops.group_norm_backward(dy, x, 32, mo, ro, w, b, 1e-5, None, mask),
                                 3 * _nbytes(x), lambda: compiled(dy, x, mt, rt, w))

                cases += [Case("GroupNorm forward", tag, forward), Case("GroupNorm backward", tag, backward)]
                if n == 2:
                    cases.append(Case("GroupNorm + SiLU forward", tag, forward_silu))
            for n, c, s in in_shapes:
                tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"

                def in_forward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    compiled = _compiled(_instance_norm)
                    return Calls(lambda: _instance_norm(x, w, b), lambda: bn_ext.instance_norm(x, weight=w, bias=b),
                                 2 * _nbytes(x), lambda: compiled(x, w, b))

                def in_backward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    torch_call, ours_call = _autograd_backward(
                        lambda: _instance_norm(x, w, b), lambda: bn_ext.instance_norm(x, weight=w, bias=b), x, (w, b))
                    return Calls(torch_call, ours_call, 3 * _nbytes(x))

                cases += [Case("InstanceNorm2d forward", tag, in_forward),
                          Case("InstanceNorm2d backward", tag, in_backward)]
            for n, c, s in ln_shapes:
                tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"

                def ln_forward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    compiled = _compiled(_permute_layer_norm)
                    return Calls(lambda: _permute_layer_norm(x, w, b), lambda: bn_ext.layer_norm_channels(x, w, b),
                                 2 * _nbytes(x), lambda: compiled(x, w, b))

                def ln_backward(shape=(n, c, s), inputs=inputs):
                    x, w, b = inputs(*shape)
                    torch_call, ours_call = _autograd_backward(
                        lambda: _permute_layer_norm(x, w, b), lambda: bn_ext.layer_norm_channels(x, w, b), x, (w, b))
                    return Calls(torch_call, ours_call, 3 * _nbytes(x))

                cases += [Case("LayerNorm2d forward", tag, ln_forward),
                          Case("LayerNorm2d backward", tag, ln_backward)]
    return cases


def _bn_cases(shapes, fmt_name, dtype) -> list[Case]:
    cases = []
    fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    dname = str(dtype).removeprefix("torch.")
    for n, c, s in shapes:
        def inputs(n=n, c=c, s=s):
            torch.manual_seed(0)
            x = _random_images(n, c, s, dtype, fmt)
            w, b = torch.rand(c) + 0.5, torch.randn(c)
            rm, rv = torch.randn(c), torch.rand(c) + 0.5
            return x, w, b, rm, rv

        tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"

        def train(inputs=inputs):
            x, w, b, _, _ = inputs()
            compiled = _compiled(_bn_train)
            return Calls(lambda: _bn_train(x, w, b), lambda: bn_ext.batch_norm(x, None, None, w, b, True),
                         2 * _nbytes(x), lambda: compiled(x, w, b), reread=_reread(x))

        def eval_(inputs=inputs):
            x, w, b, rm, rv = inputs()
            compiled = _compiled(_bn_eval)
            return Calls(lambda: _bn_eval(x, rm, rv, w, b), lambda: bn_ext.batch_norm(x, rm, rv, w, b, False),
                         2 * _nbytes(x), lambda: compiled(x, rm, rv, w, b))

        def backward(inputs=inputs):
            x, w, b, rm, rv = inputs()
            dy = torch.randn_like(x)
            _, mean_t, invstd_t = _aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
            _, mean_o, invstd_o = _ops.batch_norm_forward(x, w, b, None, None, True, 1e-5)
            mask = [True, True, True]
            compiled = _compiled(_bn_backward)
            return Calls(lambda: _bn_backward(dy, x, w, rm, rv, mean_t, invstd_t),
                         lambda: _ops.batch_norm_backward(dy, x, w, mean_o, invstd_o, True, 1e-5, mask),
                         3 * _nbytes(x), lambda: compiled(dy, x, w, rm, rv, mean_t, invstd_t), reread=_reread(x, dy))

        cases += [Case("BatchNorm2d train forward", tag, train), Case("BatchNorm2d backward", tag, backward),
                  Case("BatchNorm2d eval forward", tag, eval_)]
    return cases


# Fused BatchNorm + ReLU (+ residual add): ResNet-50's shapes at batch 32.
FUSED_BN_SHAPES = [(32, 64, 56), (32, 256, 56), (32, 256, 28), (32, 512, 28), (32, 1024, 14), (32, 2048, 7)]


def _bn_relu(x, w, b):
    return torch.relu(F.batch_norm(x, None, None, w, b, True))


def _bn_add_relu(x, r, w, b):
    return torch.relu(F.batch_norm(x, None, None, w, b, True) + r)


def _bn_relu_backward(dy, out, x, w, rm, rv, mean, invstd):
    dz = _aten.threshold_backward(dy, out, 0)
    return _aten.native_batch_norm_backward(dz, x, w, rm, rv, mean, invstd, True, 1e-5, [True, True, True]), dz


def _fused_cases(quick) -> list[Case]:
    """bn_ext.batch_norm_act against torch's unfused ops (BatchNorm, add, ReLU),
    against torch.compile of them (Inductor fuses the elementwise ops), and
    against bn_ext's plain BatchNorm (the fusion's own cost)."""
    cases = []
    shapes = FUSED_BN_SHAPES[2:3] if quick else FUSED_BN_SHAPES
    layouts = [("contiguous", torch.float32), ("channels_last", torch.float32), ("channels_last", torch.bfloat16)]
    for fmt_name, dtype in layouts[:1] if quick else layouts:
        fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
        dname = str(dtype).removeprefix("torch.")
        for n, c, s in shapes:
            def inputs(n=n, c=c, s=s, fmt=fmt, dtype=dtype):
                torch.manual_seed(0)
                x = _random_images(n, c, s, dtype, fmt)
                r = _random_images(n, c, s, dtype, fmt)
                return x, r, torch.rand(c) + 0.5, torch.randn(c)

            tag = f"N{n} C{c} {s}x{s} {fmt_name} {dname}"
            for residual in (False, True):
                name = "BN + add + ReLU" if residual else "BN + ReLU"

                def forward(inputs=inputs, residual=residual):
                    x, r, w, b = inputs()
                    plain = lambda: bn_ext.batch_norm(x, None, None, w, b, True)  # noqa: E731
                    if residual:
                        compiled = _compiled(_bn_add_relu)
                        return Calls(lambda: _bn_add_relu(x, r, w, b),
                                     lambda: bn_ext.batch_norm_act(x, None, None, w, b, True, residual=r),
                                     3 * _nbytes(x), lambda: compiled(x, r, w, b), plain, reread=_reread(x))
                    compiled = _compiled(_bn_relu)
                    return Calls(lambda: _bn_relu(x, w, b), lambda: bn_ext.batch_norm_act(x, None, None, w, b, True),
                                 2 * _nbytes(x), lambda: compiled(x, w, b), plain, reread=_reread(x))

                def backward(inputs=inputs, residual=residual):
                    x, r, w, b = inputs()
                    dy = torch.randn_like(x)
                    res = r if residual else None
                    out_t, mean_t, invstd_t = _aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
                    out_t = torch.relu(out_t + r if residual else out_t)
                    _, mean_o, invstd_o = _ops.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "relu", res)
                    mask = [True, True, True, residual]
                    compiled = _compiled(_bn_relu_backward)
                    return Calls(
                        lambda: _bn_relu_backward(dy, out_t, x, w, None, None, mean_t, invstd_t),
                        lambda: _ops.batch_norm_act_backward(dy, x, res, w, b, mean_o, invstd_o, True, 1e-5, "relu",
                                                             mask),
                        (4 if residual else 3) * _nbytes(x),
                        lambda: compiled(dy, out_t, x, w, None, None, mean_t, invstd_t),
                        lambda: _ops.batch_norm_backward(dy, x, w, mean_o, invstd_o, True, 1e-5, mask[:3]),
                        reread=_reread(x, dy, *([r] if residual else [])))

                cases += [Case(f"{name} forward", tag, forward), Case(f"{name} backward", tag, backward)]
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
                compiled = _compiled(_layer_norm)
                return Calls(lambda: _layer_norm(x, w, b), lambda: bn_ext.layer_norm(x, (d,), w, b), 2 * _nbytes(x),
                             lambda: compiled(x, w, b))

            def backward(inputs=inputs, d=d):
                x, w, b = inputs()
                dy = torch.randn_like(x)
                _, mt, rt = _aten.native_layer_norm(x, [d], w, b, 1e-5)
                _, mo, ro = _ops.layer_norm_forward(x, [d], w, b, 1e-5)
                mask = [True, True, True]
                compiled = _compiled(_layer_norm_backward)
                return Calls(lambda: _layer_norm_backward(dy, x, mt, rt, w, b),
                             lambda: _ops.layer_norm_backward(dy, x, [d], mo, ro, w, b, 1e-5, mask), 3 * _nbytes(x),
                             lambda: compiled(dy, x, mt, rt, w, b))
        else:
            def forward(inputs=inputs, d=d):
                x, w, _ = inputs()
                compiled = _compiled(_rms_norm)
                return Calls(lambda: _rms_norm(x, w), lambda: bn_ext.rms_norm(x, (d,), w), 2 * _nbytes(x),
                             lambda: compiled(x, w))

            def backward(inputs=inputs, d=d):
                # torch has no CPU RMSNorm backward kernel: time both through
                # autograd (Inductor would need the whole training graph).
                x, w, _ = inputs()
                x.requires_grad_()
                w.requires_grad_()
                dy = torch.randn_like(x)
                y_torch, y_ours = F.rms_norm(x, (d,), w), bn_ext.rms_norm(x, (d,), w)
                return Calls(lambda: torch.autograd.grad(y_torch, (x, w), dy, retain_graph=True),
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
            return Calls(lambda: ref(x), lambda: ours(x), 2 * _nbytes(x))
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
            compiled = _compiled(_bn_train)
            return Calls(lambda: _bn_train(x, w, b), lambda: bn_ext.batch_norm(x, None, None, w, b, True),
                         2 * _nbytes(x), lambda: compiled(x, w, b), reread=_reread(x))
        cases.append(Case("BatchNorm1d train forward", "x".join(map(str, shape)), train))
    return cases


def _large_cases() -> list[Case]:
    """Inputs larger than the last-level cache (over 200 MB)."""
    def bn():
        x = torch.randn(256, 1024, 14, 14)
        w, b = torch.rand(1024) + 0.5, torch.randn(1024)
        compiled = _compiled(_bn_train)
        return Calls(lambda: _bn_train(x, w, b), lambda: bn_ext.batch_norm(x, None, None, w, b, True),
                     2 * _nbytes(x), lambda: compiled(x, w, b), reread=_reread(x))

    def ln():
        x = torch.randn(16384, 4096)
        w, b = torch.rand(4096) + 0.5, torch.randn(4096)
        compiled = _compiled(_layer_norm)
        return Calls(lambda: _layer_norm(x, w, b), lambda: bn_ext.layer_norm(x, (4096,), w, b), 2 * _nbytes(x),
                     lambda: compiled(x, w, b))

    def rms():
        x = torch.randn(16384, 4096)
        w = torch.rand(4096) + 0.5
        compiled = _compiled(_rms_norm)
        return Calls(lambda: _rms_norm(x, w), lambda: bn_ext.rms_norm(x, (4096,), w), 2 * _nbytes(x),
                     lambda: compiled(x, w))

    return [Case("larger than L3", "BatchNorm2d train 256x1024x14x14 float32", bn),
            Case("larger than L3", "LayerNorm 16384x4096 float32", ln),
            Case("larger than L3", "RMSNorm 16384x4096 float32", rms)]


def _changing_size_cases() -> list[Case]:
    """Every call a size not seen before (rows of a larger input), so no
    cache holds memory of exactly that size."""

    def sized(make_call, full_rows):
        # Both libraries walk the same sizes, each from its own counter.
        def make():
            torch.manual_seed(0)
            torch_call, ours_call, x = make_call()
            counters = {"torch": 0, "bn_ext": 0}

            def step(name, call):
                counters[name] += 1
                return call(x[: full_rows - counters[name] % (full_rows // 2)])

            return Calls(lambda: step("torch", torch_call), lambda: step("bn_ext", ours_call), 2 * _nbytes(x))
        return make

    def bn_eval():
        x = torch.randn(48 * 256, 784).view(48, 256, 28, 28)
        w, b, rm, rv = torch.rand(256) + 0.5, torch.randn(256), torch.randn(256), torch.rand(256) + 0.5
        return (lambda v: _bn_eval(v, rm, rv, w, b), lambda v: bn_ext.batch_norm(v, rm, rv, w, b, False), x)

    def ln():
        x = torch.randn(16384, 768)
        w, b = torch.rand(768) + 0.5, torch.randn(768)
        return (lambda v: _layer_norm(v, w, b), lambda v: bn_ext.layer_norm(v, (768,), w, b), x)

    return [Case("changing sizes", "BatchNorm2d eval N<=48 C256 28x28 float32", sized(bn_eval, 48)),
            Case("changing sizes", "LayerNorm <=16384x768 float32", sized(ln, 16384))]


# First calls in fresh processes: a small call first (code paths, threads),
# then the timed one on a large input. (statement, input bytes)
FIRST_CALL = {
    "BatchNorm2d eval N32 C256 48x48 float32": (
        "x = torch.randn(32, 256, 48, 48); w, b, rm, rv = (torch.rand(256) + 0.5 for _ in range(4))\n"
        "f = lambda v: {bn}(v, rm, rv, w, b, False)", 32 * 256 * 48 * 48 * 4),
    "LayerNorm 16384x768 float32": (
        "x = torch.randn(16384, 768); w, b = torch.rand(768), torch.randn(768)\n"
        "f = lambda v: {ln}(v, (768,), w, b)", 16384 * 768 * 4),
}
FIRST_CALL_IMPL = {"torch": {"bn": "F.batch_norm", "ln": "F.layer_norm"},
                   "bn_ext": {"bn": "bn_ext.batch_norm", "ln": "bn_ext.layer_norm"}}


def _first_call_ms(setup: str, impl: str) -> float:
    program = (
        "import time, torch, torch.nn.functional as F, bn_ext\n"
        + setup.format(**FIRST_CALL_IMPL[impl]) + "\n"
        "f(x[:2].clone())\n"
        "start = time.perf_counter(); f(x); print((time.perf_counter() - start) * 1e3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _first_call_cases(quick: bool) -> list[Case]:
    processes = 1 if quick else 2

    def make(setup, nbytes):
        def timed():
            # Alternating processes, medians.
            times = {"torch": [], "bn_ext": []}
            for _ in range(processes):
                for impl in times:
                    times[impl].append(_first_call_ms(setup, impl))
            medians = {impl: statistics.median(t) for impl, t in times.items()}
            return Calls(lambda: medians["torch"], lambda: medians["bn_ext"], 2 * nbytes)
        return timed

    return [Case("first call", name, make(setup, nbytes), first_call=True)
            for name, (setup, nbytes) in FIRST_CALL.items()]


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
    cases += _group_norm_family_cases(quick)
    cases += _fused_cases(quick)
    cases += _module_cases()
    if not quick:
        cases += _large_cases()
    cases += _changing_size_cases() + _first_call_cases(quick)
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
