"""Checks of the compiled CUDA kernels in the built library (libbn_ext) (no GPU needed):
they are registered, built for the requested architectures, spill nothing to
local memory, and the float32 elementwise and row paths load 128 bits at a time.

Skipped only for a CPU-only build (BN_EXT_WITH_CUDA=0), which has no device code."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import LIBRARY_PATH
from bn_ext.bench import has_cuda_kernels

pytestmark = pytest.mark.skipif(not has_cuda_kernels(), reason="CPU-only build: no device code to check")

OPS = ["batch_norm_forward", "batch_norm_backward", "batch_norm_update_stats", "batch_norm_stats",
       "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward", "group_norm_forward",
       "group_norm_backward", "layer_norm_channels_forward", "layer_norm_channels_backward", "batch_norm_act_forward",
       "batch_norm_act_backward"]


def cuda_tool(name):
    """A CUDA binary tool: from the pip package requirements.txt installs, else the toolkit."""
    try:
        import nvidia.cu13

        candidate = Path(list(nvidia.cu13.__path__)[0]) / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    assert found, f"{name} not found: install the pinned requirements (nvidia-cuda-{name})"
    return found


def cuobjdump(*args):
    env = dict(os.environ)
    env["PATH"] = str(Path(cuda_tool("nvdisasm")).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([cuda_tool("cuobjdump"), *args, LIBRARY_PATH], check=True, capture_output=True,
                          text=True, env=env, timeout=600).stdout


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@pytest.fixture(scope="module")
def resource_usage():
    """{(arch, kernel): {"REG": n, "STACK": n, "LOCAL": n, ...}} from cuobjdump -res-usage."""
    usage, arch = {}, None
    lines = cuobjdump("-res-usage").splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"arch = (sm_\d+)", line.strip()):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            usage[(arch, m.group(1))] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[i + 1])}
    names = demangle(sorted({name for _, name in usage}))
    return {(arch, names[name]): u for (arch, name), u in usage.items()}


@pytest.fixture(scope="module")
def sass():
    """{(arch, kernel): SASS text} from cuobjdump -sass."""
    functions, arch = {}, None
    current = None
    for line in cuobjdump("-sass").splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            current = (arch, m.group(1))
            functions[current] = []
        elif current:
            functions[current].append(line)
    names = demangle(sorted({name for _, name in functions}))
    return {(arch, names[name]): "\n".join(text) for (arch, name), text in functions.items()}


def test_every_operator_has_a_cuda_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bn_ext::{op}", "CUDA"), op


def test_built_for_the_requested_architectures(resource_usage):
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    expected = {"sm_" + a.strip().replace(".", "").removesuffix("+PTX") for a in re.split(r"[;\s]+", requested) if a}
    assert {arch for arch, _ in resource_usage} == expected


def test_no_kernel_spills_or_uses_a_stack(resource_usage):
    kernels = [k for k in resource_usage if "bn_ext::cuda::" in k[1]]
    assert len(kernels) > 100  # every template instantiation, per architecture
    offenders = {k: u for k, u in resource_usage.items() if u.get("STACK", 0) or u.get("LOCAL", 0)}
    assert not offenders, offenders


# Float32 kernels whose vectorised instantiation must load (and, for the
# elementwise ones, store) 16 bytes per instruction.
VECTOR_KERNELS = [
    # forward / eval
    ("channel_affine<float, int, 4, bn_ext::cuda::ActivatedAffine<float, bn_ext::cuda::NoActivation, false> >", True),
    ("channel_affine<float, int, 4, bn_ext::cuda::Affine<true, true> >", True),    # training backward dx
    ("channel_affine<float, int, 4, bn_ext::cuda::Affine<true, false> >", True),   # eval backward dx
    # GroupNorm + SiLU
    ("channel_affine<float, int, 4, bn_ext::cuda::ActivatedAffine<float, bn_ext::cuda::Silu, false> >", True),
    ("channel_affine<float, int, 4, bn_ext::cuda::ActivationGradient<float, bn_ext::cuda::Silu> >", True),
    # BatchNorm + add + ReLU: three inputs
    ("channel_affine<float, int, 4, bn_ext::cuda::ActivatedAffine<float, bn_ext::cuda::Relu, true> >", True),
    # BatchNorm + ReLU backward: dx recomputes dz = dy * relu'(z) (with and without the residual)
    ("channel_affine<float, int, 4, bn_ext::cuda::AffineThroughActivation<float, bn_ext::cuda::Relu, false> >", True),
    ("channel_affine<float, int, 4, bn_ext::cuda::AffineThroughActivation<float, bn_ext::cuda::Relu, true> >", True),
    ("channels_first_partials<bn_ext::cuda::MomentsReduction<float, bn_ext::cuda::ChannelShift<float> >, int, 4>", False),
    ("channels_last_partials<bn_ext::cuda::GradSumsReduction<float, bn_ext::cuda::PerChannel<float>, "
     "bn_ext::cuda::PlainGradient>, int, 4>", False),
    # ... and its sums, storing dz as the residual's gradient
    ("channels_last_partials<bn_ext::cuda::GradSumsReduction<float, bn_ext::cuda::PerChannel<float>, "
     "bn_ext::cuda::GradientThrough<float, bn_ext::cuda::Relu, true> >, int, 4>", False),
    ("channels_first_partials<bn_ext::cuda::GradSumsReduction<float, bn_ext::cuda::PerChannel<float>, "
     "bn_ext::cuda::GradientThrough<float, bn_ext::cuda::Relu, false> >, int, 4>", False),
    # GroupNorm channels-last: per-(n, c) states about the group's first value
    ("channels_last_partials<bn_ext::cuda::MomentsReduction<float, bn_ext::cuda::DomainGroupShift<float> >, int, 4>",
     False),
    ("channels_last_partials<bn_ext::cuda::GradSumsReduction<float, bn_ext::cuda::PerGroup<float>, "
     "bn_ext::cuda::PlainGradient>, int, 4>", False),
    ("row_norm_forward<float, false, true>", True),           # LayerNorm, warp per row
    ("row_norm_forward<float, false, false>", True),          # LayerNorm, block per row
    ("row_norm_forward<float, true, true>", True),            # RMSNorm
    ("row_norm_backward_input<float, false, true>", True),
    ("row_norm_backward_input<float, true, false>", True),
]


@pytest.mark.parametrize("kernel,stores", VECTOR_KERNELS, ids=[k for k, _ in VECTOR_KERNELS])
def test_float32_paths_load_128_bits(sass, kernel, stores):
    bodies = {arch: text for (arch, name), text in sass.items() if f"bn_ext::cuda::{kernel}(" in name}
    assert bodies, f"{kernel} is not in the binary"
    for arch, text in bodies.items():
        assert "LDG.E.128" in text, f"{kernel} on {arch}: no 128-bit load"
        if stores:
            assert "STG.E.128" in text, f"{kernel} on {arch}: no 128-bit store"
