#!/usr/bin/env bash
# Builds and installs libbn_ext into a fresh prefix, builds the consumer tests
# and the C++ example against the installed package only, and runs them with ctest.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TORCH_PREFIX=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
PREFIX=build/cpp-prefix
# cmake and ninja from the venv (requirements.txt pins a cmake that knows
# nvcc's C++20 dialect, which torch's CUDA targets ask for).
export PATH="$PWD/.venv/bin:$PATH"
GENERATOR=()
if command -v ninja >/dev/null; then
  GENERATOR=(-G Ninja)
fi
rm -rf "$PREFIX"
cmake -S . -B build/cmake "${GENERATOR[@]}" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j "${MAX_JOBS:-2}"
cmake --install build/cmake --prefix "$PREFIX" >/dev/null
cmake -S tests/cpp -B build/cpp-consumer "${GENERATOR[@]}" \
  -DCMAKE_PREFIX_PATH="$PWD/$PREFIX;$TORCH_PREFIX" -DBN_EXT_TEST_PYTHON="$("$PY" -c 'import sys; print(sys.executable)')" \
  >build/cpp-consumer-configure.log 2>&1 \
  || { cat build/cpp-consumer-configure.log; exit 1; }
cmake --build build/cpp-consumer -j "${MAX_JOBS:-2}"
ctest --test-dir build/cpp-consumer --output-on-failure
