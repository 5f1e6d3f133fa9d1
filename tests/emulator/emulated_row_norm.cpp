// LayerNorm and RMSNorm (csrc/cuda/row_norm.cu), emulated.
#include "cuda/row_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  using namespace bn_ext::cuda;
  m.def("layer_norm_forward", &layer_norm_forward_cuda);
  m.def("layer_norm_backward", &layer_norm_backward_cuda);
  m.def("rms_norm_forward", &rms_norm_forward_cuda);
  m.def("rms_norm_backward", &rms_norm_backward_cuda);
}
