// A conv -> BN -> ReLU network built with libtorch's torch::nn, put in eval
// mode, its BatchNorms folded into the convolutions with bn_ext, then both
// versions run: prints the largest difference and each one's latency.
//
//   fold_inference [repeats]
#include <bn_ext/bn_ext.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

struct Block {
  torch::nn::Conv2d conv;
  torch::nn::BatchNorm2d bn;
};

double median_ms(const std::function<torch::Tensor()>& run, int repeats) {
  std::vector<double> times;
  run();
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 20;
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  std::vector<Block> blocks;
  const int64_t widths[] = {3, 32, 64, 64, 128};
  for (int i = 0; i + 1 < 5; ++i) {
    Block block{torch::nn::Conv2d(torch::nn::Conv2dOptions(widths[i], widths[i + 1], 3).padding(1).bias(false)),
                torch::nn::BatchNorm2d(widths[i + 1])};
    // Statistics as training would leave them.
    block.bn->running_mean.copy_(torch::randn({widths[i + 1]}) * 0.1);
    block.bn->running_var.copy_(torch::rand({widths[i + 1]}) + 0.5);
    block.bn->weight.copy_(torch::rand({widths[i + 1]}) + 0.5);
    block.bn->bias.copy_(torch::randn({widths[i + 1]}) * 0.1);
    block.conv->eval();
    block.bn->eval();
    blocks.push_back(block);
  }

  // Fold: one (weight, bias) per conv.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> folded;
  for (auto& block : blocks) {
    auto [w, b] = bn_ext::fuse_conv_bn_weights(block.conv->weight, std::nullopt, block.bn->running_mean,
                                               block.bn->running_var, block.bn->options.eps(), block.bn->weight,
                                               block.bn->bias);
    folded.emplace_back(w, b);
  }

  const auto x = torch::randn({1, 3, 112, 112});
  auto run_unfolded = [&] {
    auto h = x;
    for (auto& block : blocks) h = torch::relu(block.bn->forward(block.conv->forward(h)));
    return h;
  };
  auto run_folded = [&] {
    auto h = x;
    for (auto& [w, b] : folded) h = torch::relu(torch::conv2d(h, w, b, 1, 1));
    return h;
  };
  const double diff = (run_unfolded() - run_folded()).abs().max().item<double>();
  const double scale = run_unfolded().abs().max().item<double>();
  const double t_unfolded = median_ms(run_unfolded, repeats);
  const double t_folded = median_ms(run_folded, repeats);
  std::printf("conv -> BN -> ReLU x4, input 1x3x112x112\n");
  std::printf("max |unfolded - folded| = %.3g (output scale %.3g)\n", diff, scale);
  std::printf("latency (median of %d): unfolded %.3f ms, folded %.3f ms\n", repeats, t_unfolded, t_folded);
  return diff <= 1e-4 * std::max(1.0, scale) ? 0 : 1;
}
