"""The cases of `python -m bn_ext bench`: shapes, the torch and bn_ext calls
of each case (with its torch.compile peer and traffic), the first-call and
changing-size cases, and the suite."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import subprocess
import sys
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


