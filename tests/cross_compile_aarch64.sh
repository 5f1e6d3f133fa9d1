#!/usr/bin/env bash
# Compiles every CPU source for aarch64 (the DEFAULT level, ATen's NEON
# vectors) with Debian's cross compiler against this venv's torch headers:
# nothing x86-only may sit outside the guarded level code. Compiles only;
# nothing is linked or run. `make check-aarch64` installs the compiler first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
TORCH_INCLUDE=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INCLUDE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
OUT=build/aarch64
mkdir -p "$OUT"
for source in csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/kernels/*_kernel.cpp; do
  # shellcheck disable=SC2086
  "$CXX" -std=c++20 -O2 -fopenmp -Wno-psabi -Icsrc -Icsrc/include $TORCH_INCLUDE -I"$PY_INCLUDE" \
    -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT -DBN_EXT_HAVE_DEFAULT \
    -c "$source" -o "$OUT/$(basename "$source").o"
  echo "aarch64: compiled $source"
done
