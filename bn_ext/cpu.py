"""The SIMD level of bn_ext's CPU kernels.

Every level the build holds (DEFAULT, and on x86-64 AVX2, AVX512 and
AVX512_BF16) is compiled into the one extension; the best one this CPU runs
is chosen when bn_ext loads. The environment variable BN_EXT_CPU_CAPABILITY
(read at load) lowers it, as ATen's ATEN_CPU_CAPABILITY does for torch's own
kernels (and that one lowers bn_ext's too).
"""

from __future__ import annotations

import bn_ext._C as _C


def cpu_capability() -> str:
    """The level of the CPU kernels in use: "DEFAULT", "AVX2", "AVX512" or "AVX512_BF16"."""
    return _C.cpu_capability()


def cpu_capabilities() -> list[str]:
    """The levels this build holds and this CPU runs, lowest first."""
    return _C.cpu_capabilities()


# Chosen now, so a bad BN_EXT_CPU_CAPABILITY fails the import with its message
# rather than the first operator call.
cpu_capability()
