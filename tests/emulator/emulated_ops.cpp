// The CUDA launchers and kernels of csrc/cuda, compiled for the CPU against
// the emulator: a Python module whose functions take CPU tensors and run the
// device code with CUDA semantics. tests/test_cuda_emulated.py builds it.
#define BN_EXT_CUDA_EMULATOR
// Tensors above 1000 elements take the 64-bit index kernels, so the test
// shapes cover both index types (the device build switches at 2^30).
#define BN_EXT_INDEX32_LIMIT 1000

#include <torch/extension.h>

#include "cuda/batch_norm.cu"
#include "cuda/group_norm.cu"
#include "cuda/row_norm.cu"

#include <string>

namespace {

void set_order(const std::string& order, unsigned seed) {
  if (order == "forward") {
    bn_emu::set_order(bn_emu::Order::Forward, seed);
  } else if (order == "reverse") {
    bn_emu::set_order(bn_emu::Order::Reverse, seed);
  } else if (order == "random") {
    bn_emu::set_order(bn_emu::Order::Random, seed);
  } else {
    TORCH_CHECK_VALUE(false, "order must be 'forward', 'reverse' or 'random', got '", order, "'");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_order", &set_order, "thread order between synchronisation points", pybind11::arg("order"),
        pybind11::arg("seed") = 12345u);
  m.def("sm_count", &bn_ext::cuda::sm_count);
  m.def("batch_norm_forward", &bn_ext::cuda::batch_norm_forward_cuda);
  m.def("batch_norm_backward", &bn_ext::cuda::batch_norm_backward_cuda);
  m.def("batch_norm_act_forward", &bn_ext::cuda::batch_norm_act_forward_cuda);
  m.def("batch_norm_act_backward", &bn_ext::cuda::batch_norm_act_backward_cuda);
  m.def("batch_norm_update_stats", &bn_ext::cuda::batch_norm_update_stats_cuda);
  m.def("batch_norm_stats", &bn_ext::cuda::batch_norm_stats_cuda);
  m.def("group_norm_forward", &bn_ext::cuda::group_norm_forward_cuda);
  m.def("group_norm_backward", &bn_ext::cuda::group_norm_backward_cuda);
  m.def("layer_norm_channels_forward", &bn_ext::cuda::layer_norm_channels_forward_cuda);
  m.def("layer_norm_channels_backward", &bn_ext::cuda::layer_norm_channels_backward_cuda);
  m.def("layer_norm_forward", &bn_ext::cuda::layer_norm_forward_cuda);
  m.def("layer_norm_backward", &bn_ext::cuda::layer_norm_backward_cuda);
  m.def("rms_norm_forward", &bn_ext::cuda::rms_norm_forward_cuda);
  m.def("rms_norm_backward", &bn_ext::cuda::rms_norm_backward_cuda);
}
