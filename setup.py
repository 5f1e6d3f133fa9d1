"""Builds bn_ext._C with torch.utils.cpp_extension.

Environment switches:
  BN_EXT_WITH_CUDA=1|0        force the CUDA kernels in or out (default: in when
                              a CUDA toolkit is found and torch is a CUDA build;
                              a GPU is never required to build).
  BN_EXT_CPU_CAPABILITY=...   SIMD level of the CPU kernels on x86-64:
                              AVX512_BF16 (AVX512 with the bfloat16 conversion
                              instructions), AVX512, AVX2 or DEFAULT (no SIMD
                              flags). Default: the
                              best the building machine supports; set AVX2 for
                              a build that runs on any x86-64 CPU of the last decade.
  CUDA_HOME                   the CUDA toolkit root, when it cannot be found
                              from nvcc on PATH.
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0").
"""

import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path):
    return bool(path) and bool(glob.glob(os.path.join(path, "lib64", "libcudart.so*")))


def find_cuda_home():
    """The CUDA toolkit root: the folder whose lib64 holds libcudart.

    nvcc on PATH may be a wrapper script, whose own folder is not the toolkit;
    nvcc's dry run names the real one (TOP=...).
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if _is_toolkit_root(env) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True, timeout=60)
        candidates += [os.path.realpath(m) for m in re.findall(r"TOP=(\S+)", dry.stdout + dry.stderr)]
    except (OSError, subprocess.SubprocessError):
        pass
    return next((c for c in candidates if _is_toolkit_root(c)), None)


def cuda_sources():
    return sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))


def want_cuda(cuda_home):
    forced = os.environ.get("BN_EXT_WITH_CUDA")
    import torch

    if forced is not None and forced not in ("0", "1"):
        raise SystemExit(f"BN_EXT_WITH_CUDA must be 0 or 1, got {forced!r}")
    available = cuda_home is not None and torch.version.cuda is not None and bool(cuda_sources())
    if forced == "1" and not available:
        raise SystemExit(
            "BN_EXT_WITH_CUDA=1 but no CUDA build is possible: "
            f"toolkit root={cuda_home!r}, torch.version.cuda={torch.version.cuda!r}, "
            f"CUDA sources={len(cuda_sources())}"
        )
    return available if forced is None else forced == "1"


def best_cpu_capability():
    """The widest SIMD level this machine runs: its kernels are built for it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "AVX2"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags:
        return "AVX512_BF16"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def cpu_simd_flags():
    level = os.environ.get("BN_EXT_CPU_CAPABILITY", "").upper() or best_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or level == "DEFAULT":
        return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    flags = {
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
        "AVX512": avx512,
        # ATen's AVX512 vectors, plus the bfloat16 conversion instructions.
        "AVX512_BF16": avx512 + ["-mavx512bf16", "-DBN_EXT_AVX512_BF16"],
    }
    if level not in flags:
        raise SystemExit(f"BN_EXT_CPU_CAPABILITY must be DEFAULT, AVX2, AVX512 or AVX512_BF16, got {level!r}")
    aten_level = level.removesuffix("_BF16")
    return flags[level] + [f"-DCPU_CAPABILITY={aten_level}", f"-DCPU_CAPABILITY_{aten_level}"]


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(cuda_home)
    openmp = "OpenMP" in torch.__config__.parallel_info()
    cxx = ["-O3", "-fno-strict-aliasing", "-Wno-unknown-pragmas", *cpu_simd_flags()] + (["-fopenmp"] if openmp else [])
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="bn_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if openmp else [],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["sources"] += cuda_sources()
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DBN_EXT_WITH_CUDA"]
        kwargs["extra_compile_args"]["cxx"].append("-DBN_EXT_WITH_CUDA")
        return [cpp_extension.CUDAExtension(**kwargs)], cpp_extension.BuildExtension
    return [cpp_extension.CppExtension(**kwargs)], cpp_extension.BuildExtension


ext_modules, build_ext = extensions()

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
