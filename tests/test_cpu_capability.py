"""Run-time choice of the CPU kernel level: the levels the build holds and the
CPU runs, BN_EXT_CPU_CAPABILITY and ATEN_CPU_CAPABILITY lowering it, and SIMD
instructions only in the per-level kernel code. (The operator tests run at
every level through `make test`, which repeats them with BN_EXT_CPU_CAPABILITY.)"""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import bn_ext
from conftest import LIBRARY_PATH

X86 = platform.machine() in ("x86_64", "AMD64")


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


def expected_levels():
    """The levels this CPU runs, read from /proc/cpuinfo, not from bn_ext or ATen."""
    if not X86:
        return ["DEFAULT"]
    flags = cpu_flags()
    levels = ["DEFAULT"]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            levels.append("AVX512")
            if "avx512_bf16" in flags:
                levels.append("AVX512_BF16")
    return levels


def level_in_subprocess(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("BN_EXT_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    result = subprocess.run(
        [sys.executable, "-c", "import bn_ext; print(bn_ext.cpu_capability())"],
        env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )
    return result


def test_levels_are_those_the_cpu_runs():
    assert bn_ext.cpu_capabilities() == expected_levels()


def test_best_level_is_chosen_by_default():
    result = level_in_subprocess()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_levels()[-1]


@pytest.mark.parametrize("level", expected_levels())
def test_environment_variable_lowers_the_level(level):
    result = level_in_subprocess(BN_EXT_CPU_CAPABILITY=level.lower())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == level


@pytest.mark.skipif(not X86, reason="ATen's x86 levels")
def test_aten_capability_caps_the_level():
    # A level above ATen's is not taken even when asked for.
    result = level_in_subprocess(ATEN_CPU_CAPABILITY="default", BN_EXT_CPU_CAPABILITY="AVX512")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DEFAULT"


def test_bad_level_fails_the_import_with_its_name():
    result = level_in_subprocess(BN_EXT_CPU_CAPABILITY="SSE9")
    assert result.returncode != 0
    assert "ValueError: BN_EXT_CPU_CAPABILITY must be DEFAULT, AVX2, AVX512 or AVX512_BF16, got 'SSE9'" in result.stderr


# A function's name holds its level's namespace: bn_ext::cpu::<level> for
# bn_ext's kernels, at::vec::<level> for ATen's inline vector code (mangled:
# "4AVX2", "6AVX512", "11AVX512_BF16").
LEVEL_NAME = re.compile(r"(::|\d)(AVX2|AVX512|AVX512_BF16)(::|_GLOBAL|\d|[A-Z])")
AVX512_NAME = re.compile(r"(::|\d)(AVX512|AVX512_BF16)(::|_GLOBAL|\d|[A-Z])")


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
def test_simd_instructions_only_in_level_code():
    # Glue built with SIMD flags would die with SIGILL on an older CPU: any
    # VEX/EVEX instruction (AVX and later, all mnemonics starting with v)
    # must sit in a function of a level namespace, and 512-bit registers in
    # one of the AVX512 levels.
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is part of the build toolchain"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-j", ".text", LIBRARY_PATH],
                          capture_output=True, text=True, check=True).stdout
    function, simd, wide = None, {}, {}
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2:
            continue
        if parts[1].startswith("v"):
            simd[function] = line
        if "%zmm" in line:
            wide[function] = line
    assert simd, "the kernels use SIMD instructions at the AVX2 level and above"
    # GCC's clones (a constant-propagated std::vector constructor, say) are
    # local to their object file: one holding SIMD code was built at a level
    # and is called from that level's code only, never chosen by the linker
    # for other callers, as an inline function of global linkage could be.
    symbols = subprocess.run(["nm", LIBRARY_PATH], capture_output=True, text=True, check=True).stdout
    local_clones = {line.split()[-1] for line in symbols.splitlines()
                    if line.split()[1:2] == ["t"] and re.search(r"\.(constprop|isra|part)\.\d+$", line)}
    simd = {f: i for f, i in simd.items() if f not in local_clones}
    wide = {f: i for f, i in wide.items() if f not in local_clones}
    outside = {f: i for f, i in simd.items() if not LEVEL_NAME.search(f)}
    assert not outside, list(outside.items())[:5]
    wide_outside = {f: i for f, i in wide.items() if not AVX512_NAME.search(f)}
    assert not wide_outside, list(wide_outside.items())[:5]
