// GroupNorm and LayerNorm over channels (csrc/cuda/group_norm.cu), emulated.
#include "cuda/group_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  using namespace bn_ext::cuda;
  m.def("group_norm_forward", &group_norm_forward_cuda);
  m.def("group_norm_backward", &group_norm_backward_cuda);
  m.def("layer_norm_channels_forward", &layer_norm_channels_forward_cuda);
  m.def("layer_norm_channels_backward", &layer_norm_channels_backward_cuda);
}
