// Output tensors of the CPU kernels. A large fresh output is written through
// page faults first, and the OS zeroes every page it hands out: on Linux with
// 4 KB pages that first touch, not the kernel, bounds a large normalisation
// (x * 2 into a new 100 MB tensor moves 6.5 GB/s here, into existing memory
// 24 GB/s). Two remedies, for large outputs only:
//  - their memory is advised for transparent huge pages (where the system
//    leaves them to madvise), which cuts the faults 512-fold;
//  - it comes from a bounded cache of the memory of bn_ext's freed outputs
//    (bn_ext::cpu_output_cache_stats and friends, bn_ext.h), so repeated
//    calls of the same sizes stop faulting at all.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bn_ext::cpu {

// Outputs from this size on come from the cache, advised for huge pages.
constexpr int64_t kLargeOutputBytes = int64_t(4) << 20;

// An uninitialised tensor shaped like x: with x's strides when `format` is
// Preserve and x is dense, in `format` otherwise.
at::Tensor empty_output_like(const at::Tensor& x, at::MemoryFormat format);

}  // namespace bn_ext::cpu
