// Host-side helpers of the CUDA launchers: device guard, current stream,
// launch checks, the device's SM count, and the mapping from ATen dtypes to
// device types. With BN_EXT_CUDA_EMULATOR the same launchers run against the
// test emulator on CPU tensors (guard and stream become no-ops).
#pragma once

#include "cuda/kernels/device_common.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#ifndef BN_EXT_CUDA_EMULATOR
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <vector>
#endif

namespace bn_ext::cuda {

#ifdef BN_EXT_CUDA_EMULATOR
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#define BN_EXT_LAUNCH_CHECK() ((void)0)
// A small device, so that modest test shapes already split reductions.
inline int sm_count() { return 4; }
#else
// Kernels run on the input's device, whichever device is current.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::OptionalCUDAGuard guard;
};
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#define BN_EXT_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
// Of the current device (the guard has set it); asked once per device.
inline int sm_count() {
  static std::mutex mutex;
  static std::vector<int> counts;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(counts.size()) <= device) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}
#endif

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<device type>) for a floating input dtype.
template <typename F>
void dispatch_device_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kDouble: return f(TypeTag<double>{});
    case at::kHalf: return f(TypeTag<__half>{});
    case at::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: TORCH_CHECK_NOT_IMPLEMENTED(false, "bn_ext CUDA kernels: unsupported dtype ", dtype);
  }
}

// f(index type): 32-bit indices when every index (and a grid stride past the
// end) fits, 64-bit otherwise. The emulated tests lower the limit so that
// their small shapes reach the 64-bit kernels too.
#ifndef BN_EXT_INDEX32_LIMIT
#define BN_EXT_INDEX32_LIMIT (std::numeric_limits<int32_t>::max() / 2)
#endif
template <typename F>
void dispatch_index_type(int64_t numel, const F& f) {
  if (numel <= BN_EXT_INDEX32_LIMIT) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

template <typename T>
const T* device_data(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* device_data_mut(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}
template <typename T>
const T* device_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? device_data<T>(*t) : nullptr;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A parameter (weight, bias, running statistic) as a contiguous op-math
// tensor the kernels read; an O(C) cast, done on the stream.
inline std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(acc).contiguous();
}

// Blocks in flight per SM that a grid aims for.
constexpr int kBlocksPerSm = 4;

}  // namespace bn_ext::cuda
