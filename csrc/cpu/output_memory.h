// Output tensors of the CPU kernels. A large fresh output is written through
// page faults first, and the OS zeroes every page it hands out: that first
// touch, not the kernel, bounds a large normalisation (a fresh 75 MB output
// takes 40-80 ms to touch on a virtual machine here, an existing one 3 ms).
// glibc returns large blocks to the system when they are freed, so every
// call of torch's pays it again. bn_ext's large outputs come from a bounded
// cache of the memory of its freed outputs (bn_ext::cpu_output_cache_stats
// and friends, bn_ext.h): repeated calls of the same sizes stop faulting,
// and a miss takes its memory exactly as torch would.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>

namespace bn_ext::cpu {

// Outputs from this size on come from the cache.
constexpr int64_t kLargeOutputBytes = int64_t(4) << 20;

// An uninitialised tensor shaped like x: with x's strides when `format` is
// Preserve and x is dense, in `format` otherwise.
at::Tensor empty_output_like(const at::Tensor& x, at::MemoryFormat format);

// Holds the cache's lock for `duration`: for the test of forking while
// another thread holds it (tests/test_output_memory.py).
void hold_output_cache_lock(std::chrono::milliseconds duration);

}  // namespace bn_ext::cpu
