// The emulator's own tests: warp collectives against CUDA's documented
// semantics, barriers, shared memory, atomics, and the failures it must catch.
//
//   emulator_selftest <forward|reverse|random> <case>
// prints "PASS <case>" or "FAIL <case>: ..." and exits 0 / 1; the case
// `divergent_barrier` must abort, naming both barrier lines.
#include "cuda_emulator.h"

#include <cmath>
#include <cstring>
#include <string>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

// out[t] = value lane (t % 32) received; sources follow CUDA's programming guide.
__global__ void shuffle_kernel(int* out, int mode) {
  const int t = static_cast<int>(threadIdx.x);
  const int v = 100 + t;
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(0xffffffffu, v, 5); break;             // broadcast lane 5
    case 1: r = __shfl_down_sync(0xffffffffu, v, 3); break;        // from lane + 3, own past the end
    case 2: r = __shfl_up_sync(0xffffffffu, v, 3); break;          // from lane - 3, own before the start
    case 3: r = __shfl_xor_sync(0xffffffffu, v, 6); break;         // from lane ^ 6
    case 4: r = __shfl_down_sync(0xffffffffu, v, 2, 8); break;     // within segments of 8
    case 5: r = __shfl_sync(0xffffffffu, v, 3, 16); break;         // lane 3 of each half
    case 6: r = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0)); break;
  }
  out[t] = r;
}

int expected_shuffle(int mode, int t) {
  const int lane = t % 32, base = t - lane;
  switch (mode) {
    case 0: return 100 + base + 5;
    case 1: return 100 + (lane + 3 < 32 ? t + 3 : t);
    case 2: return 100 + (lane >= 3 ? t - 3 : t);
    case 3: return 100 + base + (lane ^ 6);
    case 4: return 100 + ((lane % 8) + 2 < 8 ? t + 2 : t);
    case 5: return 100 + base + (lane / 16) * 16 + 3;
    case 6: {
      unsigned m = 0;
      for (int l = 0; l < 32; ++l) m |= ((base + l) % 3 == 0 ? 1u : 0u) << l;
      return static_cast<int>(m);
    }
  }
  return -1;
}

void warp_shuffles() {
  for (int mode = 0; mode <= 6; ++mode) {
    std::vector<int> out(64, -1);
    BN_EXT_LAUNCH(shuffle_kernel, dim3(1), dim3(64), 0, 0, out.data(), mode);
    for (int t = 0; t < 64; ++t) {
      if (out[t] != expected_shuffle(mode, t)) {
        std::printf("FAIL shuffle mode %d thread %d: got %d expected %d\n", mode, t, out[t], expected_shuffle(mode, t));
        ++failures;
        break;
      }
    }
  }
}

// Tree reduction of a warp with shfl_down, then across warps through shared
// memory: the pattern the kernels use.
__global__ void block_sum_kernel(const float* in, float* out, int n) {
  __shared__ float warp_sums[32];
  const int t = static_cast<int>(threadIdx.x);
  float v = 0;
  for (int i = t + static_cast<int>(blockIdx.x * blockDim.x); i < n; i += static_cast<int>(blockDim.x * gridDim.x)) {
    v += in[i];
  }
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (t % 32 == 0) warp_sums[t / 32] = v;
  __syncthreads();
  if (t < 32) {
    v = t < static_cast<int>(blockDim.x / 32) ? warp_sums[t] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (t == 0) out[blockIdx.x] = v;
  }
}

void block_reduction() {
  std::vector<float> in(5000);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7);
  std::vector<float> out(3, 0);
  BN_EXT_LAUNCH(block_sum_kernel, dim3(3), dim3(256), 0, 0, in.data(), out.data(), static_cast<int>(in.size()));
  const float total = out[0] + out[1] + out[2];
  check(std::fabs(total - std::accumulate(in.begin(), in.end(), 0.0f)) < 1e-3f, "block reduction");
}

// The same reduction with the barrier left out: threads of warp 0 may read
// warp_sums before other warps wrote them.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float warp_sums[32];
  const int t = static_cast<int>(threadIdx.x);
  if (blockIdx.x == 0 && t < 32) warp_sums[t] = -1.0f;  // stale contents from "before"
  __syncthreads();
  float v = 1.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (t % 32 == 0) warp_sums[t / 32] = v;
  if (t < 32) {  // missing __syncthreads() above
    v = t < static_cast<int>(blockDim.x / 32) ? warp_sums[t] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (t == 0) out[0] = v;
  }
}

// Returns whether the planted race produced the right sum (256).
bool missing_barrier_gives_right_answer() {
  float out = 0;
  BN_EXT_LAUNCH(missing_barrier_kernel, dim3(1), dim3(256), 0, 0, &out);
  return out == 256.0f;
}

__global__ void dynamic_shared_kernel(int* out) {
  BN_EXT_DYNAMIC_SHARED(int, scratch);
  const int t = static_cast<int>(threadIdx.x);
  scratch[t] = t * t;
  __syncthreads();
  out[t] = scratch[blockDim.x - 1 - t];
}

void dynamic_shared_memory() {
  std::vector<int> out(1024);
  BN_EXT_LAUNCH(dynamic_shared_kernel, dim3(1), dim3(1024), 1024 * sizeof(int), 0, out.data());
  bool ok = true;
  for (int t = 0; t < 1024; ++t) ok &= out[t] == (1023 - t) * (1023 - t);
  check(ok, "dynamic shared memory, 1024-thread block");
  check(reinterpret_cast<std::uintptr_t>(out.data()) % alignof(int) == 0, "alignment");
}

__global__ void atomic_kernel(int* counter, float* sum) {
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5f);
}

void atomics() {
  int counter = 0;
  float sum = 0;
  BN_EXT_LAUNCH(atomic_kernel, dim3(4, 2), dim3(8, 4), 0, 0, &counter, &sum);
  check(counter == 256 && sum == 128.0f, "atomics over a 2-D grid of 2-D blocks");
}

__global__ void index_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int b = static_cast<int>(blockIdx.x + gridDim.x * blockIdx.y);
  out[b * 24 + t] = static_cast<int>(threadIdx.x * 100 + threadIdx.y * 10 + threadIdx.z);
}

void indices() {
  std::vector<int> out(24 * 6, -1);
  BN_EXT_LAUNCH(index_kernel, dim3(3, 2), dim3(4, 3, 2), 0, 0, out.data());
  bool ok = true;
  for (int b = 0; b < 6; ++b) {
    for (int z = 0; z < 2; ++z)
      for (int y = 0; y < 3; ++y)
        for (int x = 0; x < 4; ++x) ok &= out[b * 24 + x + 4 * (y + 3 * z)] == x * 100 + y * 10 + z;
  }
  check(ok, "threadIdx/blockIdx/blockDim/gridDim in 3-D");
}

// Half types cross warp shuffles and round to nearest even, as on the device.
__global__ void half_types_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  const __half h = __shfl_xor_sync(0xffffffffu, __float2half(static_cast<float>(t) + 0.5f), 1);
  const __nv_bfloat16 b = __shfl_xor_sync(0xffffffffu, __float2bfloat16(static_cast<float>(t) * 3.0f), 1);
  out[2 * t] = __half2float(h);
  out[2 * t + 1] = __bfloat162float(b);
}

void half_types() {
  std::vector<float> out(64);
  BN_EXT_LAUNCH(half_types_kernel, dim3(1), dim3(32), 0, 0, out.data());
  bool ok = true;
  for (int t = 0; t < 32; ++t) ok &= out[2 * t] == static_cast<float>(t ^ 1) + 0.5f && out[2 * t + 1] == (t ^ 1) * 3.0f;
  check(ok, "half and bfloat16 values through warp shuffles");
  // Ties round to even: 1 + 2^-11 is halfway between two halves, 1 + 2^-8 between two bfloat16s.
  check(__half2float(__float2half(1.0f + 0x1p-11f)) == 1.0f, "half ties to even (down)");
  check(__half2float(__float2half(1.0f + 3 * 0x1p-11f)) == 1.0f + 0x1p-9f, "half ties to even (up)");
  check(__bfloat162float(__float2bfloat16(1.0f + 0x1p-8f)) == 1.0f, "bfloat16 ties to even (down)");
  check(__bfloat162float(__float2bfloat16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f, "bfloat16 ties to even (up)");
  check(__bfloat162float(__float2bfloat16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f, "bfloat16 above a tie");
  check(std::isinf(__half2float(__float2half(70000.0f))), "half overflow to infinity");
  const float nan = __bfloat162float(__float2bfloat16(std::nanf("")));
  check(nan != nan, "bfloat16 keeps NaN");
  float4 f{1, 2, 3, 4};
  float2 g{5, 6};
  check(alignof(float4) == 16 && alignof(float2) == 8 && f.w + g.y == 10.0f, "float2 / float4");
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
    out[0] = 1;
  } else {
    __syncthreads();
    out[1] = 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::printf("usage: emulator_selftest <forward|reverse|random> <case>\n");
    return 2;
  }
  const std::string order = argv[1], name = argv[2];
  bn_emu::set_order(order == "reverse" ? bn_emu::Order::Reverse
                    : order == "random" ? bn_emu::Order::Random
                                        : bn_emu::Order::Forward,
                    7);
  if (name == "warp_shuffles") warp_shuffles();
  else if (name == "block_reduction") block_reduction();
  else if (name == "dynamic_shared_memory") dynamic_shared_memory();
  else if (name == "atomics") atomics();
  else if (name == "indices") indices();
  else if (name == "half_types") half_types();
  else if (name == "missing_barrier") {
    // Prints the outcome; the test decides which orders must expose the race.
    std::printf("%s\n", missing_barrier_gives_right_answer() ? "RIGHT" : "WRONG");
    return 0;
  } else if (name == "divergent_barrier") {
    int out[2] = {0, 0};
    BN_EXT_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(64), 0, 0, out);
    std::printf("no abort\n");
    return 0;
  } else {
    std::printf("unknown case %s\n", name.c_str());
    return 2;
  }
  if (failures == 0) std::printf("PASS %s\n", name.c_str());
  return failures == 0 ? 0 : 1;
}
