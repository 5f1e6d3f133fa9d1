"""Builds bn_ext._C with torch.utils.cpp_extension.

Environment switches:
  BN_EXT_WITH_CUDA=1|0        force the CUDA kernels in or out (default: in when
                              a CUDA toolkit is found and torch is a CUDA build;
                              a GPU is never required to build).
  CUDA_HOME                   the CUDA toolkit root, when it cannot be found
                              from nvcc on PATH.
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0").

The CPU kernel files (csrc/cpu/kernels/*_kernel.cpp) are compiled once per
SIMD level -- DEFAULT, and on x86-64 AVX2, AVX512 and AVX512_BF16 (where the
compiler has it) -- and the level is chosen at run time (csrc/cpu/dispatch.h),
so a build made on any machine runs on any other. Every other file is built
for the baseline CPU.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

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


KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*_kernel.cpp"))

_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
# Per level: the compiler flags and ATen's vector level (whose macros select
# Vectorized's implementation). CPU_CAPABILITY itself names the level: it is
# the namespace of the level's code, ATen's inline vector code included.
CPU_LEVELS = {
    "DEFAULT": ([], "DEFAULT"),
    "AVX2": (["-mavx2", "-mfma", "-mf16c"], "AVX2"),
    "AVX512": (_AVX512, "AVX512"),
    # ATen's AVX512 vectors, plus the bfloat16 conversion instructions.
    "AVX512_BF16": (_AVX512 + ["-mavx512bf16", "-DCPU_CAPABILITY_AVX512_BF16"], "AVX512"),
}


def compiler_accepts(flags):
    cxx = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([cxx, *flags, "-x", "c++", "-c", os.devnull, "-o", os.devnull], capture_output=True)
    except OSError:
        return False
    return result.returncode == 0


def cpu_levels():
    """The levels this compiler builds for this architecture, lowest first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["DEFAULT"]
    return [level for level, (flags, _) in CPU_LEVELS.items() if compiler_accepts(flags)]


def level_flags(level):
    flags, aten_level = CPU_LEVELS[level]
    return flags + [f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{aten_level}"]


def kernel_build_ext(base):
    """build_ext that compiles the kernel files once per level and links them in."""

    class BuildWithCpuLevels(base):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # pip's editable install builds in a fresh temporary folder:
                # build where `build_ext --inplace` does instead, so its
                # objects are reused and only what changed is compiled.
                self.build_temp = os.path.join("build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

        def build_extension(self, ext):
            # The extension's own C++ flags at this point hold everything torch
            # adds (C++ standard, ABI); each level adds its own.
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            objects = []
            # Ascending order: an inline function shared by several levels'
            # objects (from c10, say) resolves to the lowest level's copy,
            # which every CPU that runs a caller of it can execute.
            for level in ext.cpu_levels:
                objects += self.compiler.compile(
                    KERNEL_SOURCES,
                    output_dir=os.path.join(self.build_temp, "cpu_levels", level),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": cxx + level_flags(level), "nvcc": []},
                    depends=ext.depends,
                )
            ext.extra_objects = objects
            super().build_extension(ext)

    return BuildWithCpuLevels


def write_build_info(torch, levels, cuda_archs):
    """bn_ext/_build_info.py: what `import bn_ext` checks before it loads the
    extension (the torch it was built against) and `python -m bn_ext info`
    prints. Rewritten only when it changes."""
    text = (
        '"""Written by setup.py when bn_ext is built."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CPU_LEVELS = {tuple(levels)!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if cuda_archs else None!r}\n"
        f"CUDA_ARCHS = {cuda_archs!r}\n"
    )
    path = os.path.join(ROOT, "bn_ext", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(cuda_home)
    openmp = "OpenMP" in torch.__config__.parallel_info()
    levels = cpu_levels()
    cxx = ["-O3", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", *[f"-DBN_EXT_HAVE_{level}" for level in levels]]
    cxx += ["-fopenmp"] if openmp else []
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
        extension = cpp_extension.CUDAExtension(**kwargs)
    else:
        extension = cpp_extension.CppExtension(**kwargs)
    extension.cpu_levels = levels
    write_build_info(torch, levels, os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None)
    # setup.py rebuilds the extension only when one of these is newer than it.
    extension.depends = KERNEL_SOURCES + sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    return [extension], kernel_build_ext(cpp_extension.BuildExtension)


ext_modules, build_ext = extensions()

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
