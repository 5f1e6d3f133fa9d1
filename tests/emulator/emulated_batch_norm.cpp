// BatchNorm and BatchNorm + activation (csrc/cuda/batch_norm.cu), emulated.
#include "cuda/batch_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  using namespace bn_ext::cuda;
  // The emulated device's SM count, which every family's launchers size their grids for.
  m.def("sm_count", []() -> int64_t { return sm_count(); });
  bn_ext::BatchNormOps<BatchNormDevice>::bind([&](const char* name, auto function) { m.def(name, function); });
}
