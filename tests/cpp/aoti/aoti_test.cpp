// Runs the AOTInductor package that make_package.py wrote, from a program
// that links libbn_ext and libtorch only (no Python), and compares its output
// with the Python result saved beside it. The package calls bn_ext's
// operators through the dispatcher, where libbn_ext registered them.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FOLDER (holding model.pt2 and io.pt from make_package.py)\n", argv[0]);
    return 2;
  }
  const std::string folder = argv[1];
  std::ifstream file(folder + "/io.pt", std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::List<c10::IValue> io = torch::pickle_load(bytes).toList();
  const at::Tensor input = io.get(0).toTensor(), expected = io.get(1).toTensor();

  torch::inductor::AOTIModelPackageLoader loader(folder + "/model.pt2");
  const std::vector<at::Tensor> outputs = loader.run({input});
  if (outputs.size() != 1 || !outputs[0].sizes().equals(expected.sizes())) {
    std::printf("unexpected outputs: %zu\n", outputs.size());
    return 1;
  }
  const double error = (outputs[0] - expected).abs().max().item<double>();
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  std::printf("AOTInductor package from C++: largest difference from Python %.3g (outputs up to %.3g)\n", error,
              scale);
  return error <= 1e-5 * scale ? 0 : 1;
}
