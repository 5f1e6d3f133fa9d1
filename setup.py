"""Builds bn_ext: the CMake library libbn_ext (every operator and kernel) and
the Python module bn_ext._C on top of it, with torch.utils.cpp_extension.

The operators are compiled once, by CMake, into build/cmake -- the same build
tree that tests/cpp/run.sh installs for C++ consumers -- and the library is
copied into the package beside _C, which holds only the Python bindings
(csrc/python_module.cpp) and finds the library through its run path ($ORIGIN).
Editing one kernel file rebuilds that file's SIMD levels and relinks the
library; editing a Python file rebuilds nothing.

Environment switches:
  BN_EXT_WITH_CUDA=1|0        force the CUDA kernels in or out (default: in when
                              a CUDA toolkit is found and torch is a CUDA build;
                              a GPU is never required to build).
  CUDA_HOME                   the CUDA toolkit root, when it cannot be found
                              from nvcc on PATH.
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0").
  BN_EXT_CPU_LEVELS           the SIMD levels to compile, e.g. "DEFAULT;AVX2"
                              (default: every level the compiler has; a
                              shorter list builds faster and runs on fewer CPUs).
  BN_EXT_KERNEL_OPTIMIZATION  the CPU kernel files' optimisation flag (default
                              -O3; tests/mutants.py builds its copy at -O0).
  MAX_JOBS                    parallel compile jobs.

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
CMAKE_BUILD = os.path.join(ROOT, "build", "cmake")
# The soname CMakeLists.txt gives libbn_ext (its major version): the file _C
# loads from its own folder.
LIBRARY = "libbn_ext.so.0"


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


def want_cuda(cuda_home, torch):
    forced = os.environ.get("BN_EXT_WITH_CUDA")
    if forced is not None and forced not in ("0", "1"):
        raise SystemExit(f"BN_EXT_WITH_CUDA must be 0 or 1, got {forced!r}")
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    available = cuda_home is not None and torch.version.cuda is not None and bool(sources)
    if forced == "1" and not available:
        raise SystemExit(
            "BN_EXT_WITH_CUDA=1 but no CUDA build is possible: "
            f"toolkit root={cuda_home!r}, torch.version.cuda={torch.version.cuda!r}, CUDA sources={len(sources)}"
        )
    return available if forced is None else forced == "1"


def tool_path():
    """PATH with this Python's scripts folder first: the ninja that
    requirements.txt (or the build's own requirements) installed beside it."""
    return os.pathsep.join([sysconfig.get_path("scripts"), os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def cmake_executable():
    """The cmake of the pip package (requirements.txt and pyproject.toml pin
    it: a system CMake may be too old for the CUDA kernels), else PATH's."""
    try:
        # (Without the package, `cmake` may name this checkout's cmake/ folder.)
        from cmake import CMAKE_BIN_DIR

        return os.path.join(CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake", path=tool_path())


def cmake_library(torch, with_cuda, levels):
    """Configures and builds libbn_ext in build/cmake; returns the path of the
    shared library."""
    path = tool_path()
    cmake = cmake_executable()
    if cmake is None:
        raise SystemExit("bn_ext needs CMake 3.25 or newer to build: pip install cmake (requirements.txt pins it)")
    env = dict(os.environ, PATH=path)
    configure = [cmake, "-S", ROOT, "-B", CMAKE_BUILD, "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path,
                 "-DBUILD_SHARED_LIBS=ON", f"-DBN_EXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}", "-DBN_EXT_CPU_LEVELS=" + ";".join(levels),
                 "-DBN_EXT_KERNEL_OPTIMIZATION=" + os.environ.get("BN_EXT_KERNEL_OPTIMIZATION", "-O3")]
    if not os.path.exists(os.path.join(CMAKE_BUILD, "CMakeCache.txt")):
        if shutil.which("ninja", path=path) is None:
            raise SystemExit("bn_ext's build needs ninja: pip install ninja")
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, env=env, stdout=subprocess.DEVNULL)
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
    subprocess.run([cmake, "--build", CMAKE_BUILD, "--target", "bn_ext", "-j", jobs], check=True, env=env)
    namelink = os.path.join(CMAKE_BUILD, "libbn_ext.so")
    if os.readlink(namelink) != LIBRARY:
        raise SystemExit(f"libbn_ext's soname is {os.readlink(namelink)}, setup.py expects {LIBRARY}")
    return os.path.realpath(namelink)


def replace_file(src, dst):
    """Copies src to dst unless they are equal, through a new file: a process
    that has the old library mapped keeps it intact."""
    if os.path.exists(dst) and open(src, "rb").read() == open(dst, "rb").read():
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def cmake_build_ext(base, torch, with_cuda, levels):
    """build_ext that builds libbn_ext with CMake first and puts it beside _C."""

    class BuildWithCMake(base):
        def finalize_options(self):
            super().finalize_options()
            # build_ext --inplace (and pip's editable install) builds _C in
            # build/lib and then copies it into the package: the library has
            # to land there too, every build, or _C loads a stale one.
            in_package = self.inplace or getattr(self, "editable_mode", False)
            self.library_folders = {os.path.join(ROOT, "bn_ext")} if in_package else set()
            if getattr(self, "editable_mode", False):
                # pip's editable install builds in a fresh temporary folder:
                # build where `build_ext --inplace` does instead, so its
                # objects are reused and only what changed is compiled.
                self.build_temp = os.path.join("build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

        def build_extension(self, ext):
            library = cmake_library(torch, with_cuda, levels)
            for folder in {os.path.dirname(self.get_ext_fullpath(ext.name))} | self.library_folders:
                replace_file(library, os.path.join(folder, LIBRARY))
            super().build_extension(ext)

    return BuildWithCMake


def compiler_accepts(flags):
    cxx = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([cxx, *flags, "-x", "c++", "-c", os.devnull, "-o", os.devnull], capture_output=True)
    except OSError:
        return False
    return result.returncode == 0


def cpu_levels():
    """The SIMD levels to compile, lowest first: BN_EXT_CPU_LEVELS, else what
    CMakeLists.txt would choose on its own (every x86-64 level the compiler
    has). Passed to CMake, so _build_info names what was built."""
    if os.environ.get("BN_EXT_CPU_LEVELS"):
        return os.environ["BN_EXT_CPU_LEVELS"].split(";")
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["DEFAULT"]
    return ["DEFAULT", "AVX2", "AVX512"] + (["AVX512_BF16"] if compiler_accepts(["-mavx512bf16"]) else [])


def write_build_info(torch, levels, cuda_archs, library):
    """bn_ext/_build_info.py: what `import bn_ext` checks before it loads the
    extension (the torch it was built against) and `python -m bn_ext info`
    prints. Rewritten only when it changes."""
    text = (
        '"""Written by setup.py when bn_ext is built."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CPU_LEVELS = {tuple(levels)!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if cuda_archs else None!r}\n"
        f"CUDA_ARCHS = {cuda_archs!r}\n"
        f"LIBRARY = {library!r}\n"
    )
    path = os.path.join(ROOT, "bn_ext", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch's CMake config (through bn_extTorchHints.cmake) reads CUDA_HOME.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(cuda_home, torch)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    levels = cpu_levels()
    write_build_info(torch, levels, os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None, LIBRARY)
    extension = cpp_extension.CppExtension(
        name="bn_ext._C",
        sources=["csrc/python_module.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"]},
        library_dirs=[CMAKE_BUILD],
        libraries=["bn_ext"],
        extra_link_args=["-Wl,-rpath,$ORIGIN"],
        # _C is rebuilt only when one of these is newer than it; the library
        # under it is CMake's to keep up to date.
        depends=["csrc/include/bn_ext/bn_ext.h"],
    )
    return [extension], cmake_build_ext(cpp_extension.BuildExtension, torch, with_cuda, levels)


ext_modules, build_ext = extensions()

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
