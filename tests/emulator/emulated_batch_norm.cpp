// BatchNorm and BatchNorm + activation (csrc/cuda/batch_norm.cu), emulated.
#include "cuda/batch_norm.cu"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bn_ext_emulated, m) {
  using namespace bn_ext::cuda;
  // The emulated device's SM count, which every family's launchers size their grids for.
  m.def("sm_count", []() -> int64_t { return sm_count(); });
  m.def("batch_norm_forward", &batch_norm_forward_cuda);
  m.def("batch_norm_backward", &batch_norm_backward_cuda);
  m.def("batch_norm_act_forward", &batch_norm_act_forward_cuda);
  m.def("batch_norm_act_backward", &batch_norm_act_backward_cuda);
  m.def("batch_norm_update_stats", &batch_norm_update_stats_cuda);
  m.def("batch_norm_stats", &batch_norm_stats_cuda);
}
