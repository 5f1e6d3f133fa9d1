"""The installed package: imports from any folder, refuses another torch with
both versions named, and describes its build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bn_ext
from bn_ext import _build_info

ROOT = Path(__file__).resolve().parent.parent


def python(code, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_a_script_in_another_folder_imports_this_checkout(tmp_path):
    # `make` installs the checkout into the venv (editable).
    done = python("import bn_ext, torch; print(bn_ext.__file__); "
                  "print(bn_ext.batch_norm(torch.ones(2, 3), None, None, training=True).abs().sum().item())", tmp_path)
    assert done.returncode == 0, done.stderr
    path, total = done.stdout.split()
    assert Path(path) == ROOT / "bn_ext" / "__init__.py"
    assert float(total) == 0.0


def test_another_torch_is_refused_naming_both_versions(tmp_path):
    done = python("import torch; torch.__version__ = '2.0.0'; import bn_ext", tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: bn_ext was built against torch " + _build_info.TORCH_VERSION), last
    assert "but torch 2.0.0 is installed" in last


def test_info_describes_the_build(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bn_ext", "info"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "BN_EXT_CPU_CAPABILITY": "DEFAULT", "BN_EXT_OUTPUT_CACHE_BYTES": "4096"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"bn_ext {bn_ext.__version__} at {ROOT / 'bn_ext'}"
    import torch

    assert lines[1] == f"torch {torch.__version__} (built against {_build_info.TORCH_VERSION})"
    # Every level built, whether or not this CPU runs it (an AVX2-only CPU
    # still holds the AVX-512 levels).
    assert lines[2] == "CPU levels compiled: " + ", ".join(_build_info.CPU_LEVELS)
    assert set(bn_ext.cpu_capabilities()) <= set(_build_info.CPU_LEVELS)
    assert lines[3] == "CPU level in use: DEFAULT (BN_EXT_CPU_CAPABILITY=DEFAULT)"
    assert lines[4].startswith("CUDA kernels: ")
    assert lines[5].startswith("emulated CUDA operators (tests): ")
    assert lines[6].startswith("CPU output cache: limit 4096 bytes (BN_EXT_OUTPUT_CACHE_BYTES=4096)")


def test_the_package_loads_the_library_cmake_built_last():
    # `make` rebuilds libbn_ext in build/cmake; a package copy left behind
    # would run every test against the kernels of an earlier build.
    built = ROOT / "build" / "cmake" / _build_info.LIBRARY
    if not built.exists():
        pytest.skip("built without this checkout's CMake tree (a package install)")
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = {Path(line.split()[-1]) for line in maps if line.endswith("/" + _build_info.LIBRARY)}
    assert loaded == {ROOT / "bn_ext" / _build_info.LIBRARY}, loaded
    assert (ROOT / "bn_ext" / _build_info.LIBRARY).read_bytes() == built.read_bytes()
