"""The CUDA emulator's own tests (tests/emulator): warp collectives, barriers,
shared memory and atomics under forward, reverse and random thread orders,
and the failures it exists to catch."""

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "emulator"
ORDERS = ["forward", "reverse", "random"]
CASES = ["warp_shuffles", "block_reduction", "dynamic_shared_memory", "atomics", "indices", "half_types"]

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++20 compiler is needed to build the emulator tests"
    binary = tmp_path_factory.mktemp("emulator") / "emulator_selftest"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-g", "-fno-strict-aliasing", "-Wall", "-Werror",
         str(HERE / "emulator_selftest.cpp"), "-o", str(binary)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return binary


def run(binary, order, case):
    return subprocess.run([str(binary), order, case], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASES)
def test_case_passes_in_every_order(selftest, order, case):
    result = run(selftest, order, case)
    assert result.returncode == 0 and f"PASS {case}" in result.stdout, result.stdout + result.stderr


def test_missing_barrier_gives_a_wrong_answer_in_some_order(selftest):
    outcomes = {order: run(selftest, order, "missing_barrier").stdout.strip() for order in ORDERS}
    assert set(outcomes.values()) <= {"RIGHT", "WRONG"}, outcomes
    assert "WRONG" in (outcomes["reverse"], outcomes["random"]), outcomes


def test_divergent_barrier_aborts_naming_both_lines(selftest):
    source = (HERE / "emulator_selftest.cpp").read_text().splitlines()
    kernel = next(i for i, line in enumerate(source) if "divergent_barrier_kernel(int* out)" in line)
    lines = [i + 1 for i in range(kernel, kernel + 10) if "__syncthreads()" in source[i]]
    result = run(selftest, "forward", "divergent_barrier")
    assert result.returncode != 0 and "no abort" not in result.stdout
    assert "divergent __syncthreads" in result.stderr
    for line in lines:
        assert f"emulator_selftest.cpp:{line}" in result.stderr, result.stderr
