// Normalises a batch with bn_ext from a project that declares C++17.
#include <ATen/ATen.h>
#include <bn_ext/bn_ext.h>

#include <cstdio>

int main() {
  const at::Tensor x = at::arange(12, at::kFloat).reshape({4, 3});
  const at::Tensor y = bn_ext::batch_norm(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  // Each column of 0..11 has mean 0 after normalisation.
  const double largest_mean = y.mean(0).abs().max().item<double>();
  std::printf("C++ standard %ld, largest column mean %g\n", static_cast<long>(__cplusplus), largest_mean);
  return largest_mean < 1e-6 && __cplusplus >= 202002L ? 0 : 1;
}
