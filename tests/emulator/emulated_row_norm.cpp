// LayerNorm and RMSNorm (csrc/cuda/row_norm.cu), emulated.
#include "cuda/row_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  bn_ext::cuda::RowNormCudaOps::bind([&](const char* name, auto function) { m.def(name, function); });
}
