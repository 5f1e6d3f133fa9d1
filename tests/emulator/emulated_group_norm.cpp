// GroupNorm and LayerNorm over channels (csrc/cuda/group_norm.cu), emulated.
#include "cuda/group_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  bn_ext::GroupNormOps<bn_ext::cuda::GroupNormDevice>::bind(
      [&](const char* name, auto function) { m.def(name, function); });
}
