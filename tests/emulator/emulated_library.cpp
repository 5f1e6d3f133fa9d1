// The emulated CUDA operators: csrc/cuda's launchers and kernels compiled for
// the CPU against the emulator, registered as torch.ops.bn_ext_emulated.*
// (functions of CPU tensors that run the device code with CUDA semantics).
// One translation unit per op family (emulated_<family>.cpp), so a change to
// one family's device code recompiles that family only; this one, with no
// device code, defines the library and the emulator's thread order.
// tests/test_cuda_emulated.py builds them with BN_EXT_CUDA_EMULATOR and a
// low 32-bit index limit defined.
#include "cuda_emulator.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string_view>

namespace {

void set_order(std::string_view order, int64_t seed) {
  bn_emu::Order chosen = bn_emu::Order::Forward;
  if (order == "reverse") {
    chosen = bn_emu::Order::Reverse;
  } else if (order == "random") {
    chosen = bn_emu::Order::Random;
  } else {
    TORCH_CHECK_VALUE(order == "forward", "order must be 'forward', 'reverse' or 'random', got '", order, "'");
  }
  bn_emu::set_order(chosen, static_cast<unsigned>(seed));
}

}  // namespace

TORCH_LIBRARY(bn_ext_emulated, m) {
  // The thread order between synchronisation points.
  m.def("set_order(str order, int seed=12345) -> ()", &set_order);
}
