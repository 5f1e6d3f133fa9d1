"""The cache of CPU output memory.

Large CPU outputs of bn_ext (4 MB and more) take their memory from a cache of
the memory of freed bn_ext outputs. A fresh allocation is written through page
faults, and the OS zeroes every page it hands out: that costs more than the
normalisation itself (a fresh 75 MB output takes 40-80 ms to touch on a
virtual machine here, an existing one 3 ms), and glibc hands large blocks back
to the system when they are freed. A training loop allocates the same sizes
every step, so after its first step its outputs stop faulting. An output that
finds nothing to reuse takes its memory exactly as torch's would.

The cache keeps at most a limit of freed memory (1 GiB by default, or the
environment variable BN_EXT_OUTPUT_CACHE_BYTES read at start); the memory of
live outputs does not count against it. ``set_cpu_output_cache_limit(0)``
turns the cache off.
"""

from __future__ import annotations

from typing import NamedTuple

import bn_ext._C as _C


class CpuOutputCacheStats(NamedTuple):
    limit_bytes: int  # the most freed memory the cache keeps
    cached_bytes: int  # freed memory it keeps now
    in_use_bytes: int  # memory of live outputs it handed out
    hits: int  # outputs served from kept memory
    misses: int  # outputs that took new memory


def cpu_output_cache_stats() -> CpuOutputCacheStats:
    """The cache's limit, contents and counters."""
    return CpuOutputCacheStats(*_C.cpu_output_cache_stats())


def set_cpu_output_cache_limit(nbytes: int) -> None:
    """Keeps at most ``nbytes`` of freed output memory, releasing what is kept
    beyond it now; 0 keeps nothing."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _C.set_cpu_output_cache_limit(nbytes)


def empty_cpu_output_cache() -> None:
    """Releases all kept memory to the system; the limit stays."""
    _C.empty_cpu_output_cache()
