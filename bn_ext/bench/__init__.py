"""`python -m bn_ext bench`: bn_ext against torch, kernel against kernel.

Each case times the implementations interleaved in one process (warm-up,
then alternating repetitions) and reports medians. On the CPU three figures
come out per case:

- kernel: torch / bn_ext with both libraries' outputs in reused memory. A
  child process runs with glibc told to keep freed memory
  (GLIBC_TUNABLES mmap and trim thresholds raised), so neither pays page
  faults for its outputs; torch.compile (Inductor) of the same op is timed
  there too, as a second peer. This is the headline ratio.
- as shipped: the same in this process, with the default allocator (glibc
  returns large blocks to the system, so torch's large outputs fault anew on
  every call) and bn_ext's output cache.
- limit: the case's minimal traffic (inputs read once, outputs written once)
  at the copy speed into existing memory measured in the same run, and the
  share of it bn_ext's kernel reaches.

First-call cases time one call in fresh processes (nothing cached, nothing
faulted); changing-size cases give every call a size not seen before.
Results go to a table, a JSON file and a PNG plot.

The package: `catalogue` (the cases), `engine` (timing and the run),
`report` (results, table, JSON, plot).
"""

from bn_ext.bench.catalogue import Case, last_level_cache_bytes, suite
from bn_ext.bench.engine import (
    MIN_ROUNDS,
    has_cuda_kernels,
    kernel_timings,
    run,
    thirds,
    time_interleaved,
    training_step_report,
    UNetBlock,
)
from bn_ext.bench.report import Result

__all__ = ["MIN_ROUNDS", "Case", "Result", "UNetBlock", "has_cuda_kernels", "kernel_timings", "last_level_cache_bytes",
           "run", "suite", "thirds", "time_interleaved", "training_step_report"]
