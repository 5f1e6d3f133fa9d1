// The C++ API against libtorch's native functions (float64 references).
#include <bn_ext/bn_ext.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>

namespace {

int failures = 0;

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double tol, const char* what) {
  const double err = (actual.to(torch::kDouble) - expected.to(torch::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, expected.to(torch::kDouble).abs().max().item<double>());
  const bool ok = actual.sizes() == expected.sizes() && err <= tol * scale;
  std::printf("%s %s: max error %.3g (tolerance %.3g)\n", ok ? "ok  " : "FAIL", what, err, tol * scale);
  failures += !ok;
}

void expect(bool condition, const char* what) {
  std::printf("%s %s\n", condition ? "ok  " : "FAIL", what);
  failures += !condition;
}

torch::Tensor randn(at::IntArrayRef shape) { return torch::randn(shape, torch::kFloat); }

void batch_norm_train() {
  auto x = randn({8, 5, 6, 7}) * 3 + 1;
  auto w = torch::rand({5}) + 0.5, b = torch::randn({5});
  auto rm = torch::zeros({5}), rv = torch::ones({5});
  auto rm_ref = rm.to(torch::kDouble), rv_ref = rv.to(torch::kDouble);
  auto out = bn_ext::batch_norm(x, rm, rv, w, b, /*training=*/true, 0.1, 1e-5);
  auto expected = at::batch_norm(x.to(torch::kDouble), w.to(torch::kDouble), b.to(torch::kDouble), rm_ref, rv_ref,
                                 true, 0.1, 1e-5, false);
  expect_close(out, expected, 1e-5, "batch_norm training output");
  expect_close(rm, rm_ref, 1e-6, "running_mean update");
  expect_close(rv, rv_ref, 1e-6, "running_var update (unbiased)");
  auto cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto out_cl = bn_ext::batch_norm(cl, std::nullopt, std::nullopt, w, b, true);
  expect(out_cl.is_contiguous(at::MemoryFormat::ChannelsLast), "channels_last output keeps its format");
  expect_close(out_cl, at::batch_norm(cl, w, b, {}, {}, true, 0.1, 1e-5, false), 1e-5, "channels_last output");
}

void batch_norm_eval() {
  auto x = randn({4, 3, 10});
  auto w = torch::rand({3}) + 0.5, b = torch::randn({3});
  auto rm = torch::randn({3}), rv = torch::rand({3}) + 0.5;
  expect_close(bn_ext::batch_norm(x, rm, rv, w, b, false), at::batch_norm(x, w, b, rm, rv, false, 0.1, 1e-5, false),
               1e-5, "batch_norm eval output");
  auto xh = x.to(torch::kBFloat16);
  expect_close(bn_ext::batch_norm(xh, rm, rv, w, b, false),
               at::batch_norm(x, w, b, rm, rv, false, 0.1, 1e-5, false), 3e-2, "bfloat16 input, float32 params");
}

void batch_norm_backward() {
  auto x = randn({6, 4, 5, 5}).to(torch::kDouble).requires_grad_();
  auto w = (torch::rand({4}, torch::kDouble) + 0.5).requires_grad_();
  auto b = torch::randn({4}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({6, 4, 5, 5}, torch::kDouble);
  auto y = at::batch_norm(x, w, b, {}, {}, true, 0.1, 1e-5, false);
  auto grads = torch::autograd::grad({y}, {x, w, b}, {dy});
  auto [out, mean, invstd] = bn_ext::batch_norm_forward(x.detach(), w.detach(), b.detach(), {}, {}, true, 1e-5);
  auto [gx, gw, gb] = bn_ext::batch_norm_backward(dy, x.detach(), w.detach(), mean, invstd, true, 1e-5);
  expect_close(gx, grads[0], 1e-10, "batch_norm grad_input");
  expect_close(gw, grads[1], 1e-10, "batch_norm grad_weight");
  expect_close(gb, grads[2], 1e-10, "batch_norm grad_bias");
}

void layer_norm() {
  auto x = randn({4, 7, 768});
  auto w = torch::rand({768}) + 0.5, b = torch::randn({768});
  expect_close(bn_ext::layer_norm(x, {768}, w, b, 1e-5), at::layer_norm(x, {768}, w, b, 1e-5), 1e-5,
               "layer_norm output");
  expect_close(bn_ext::layer_norm(x, {7, 768}), at::layer_norm(x, {7, 768}), 1e-5, "layer_norm over two dims");
}

void rms_norm() {
  auto x = randn({4, 7, 64});
  auto w = torch::rand({64}) + 0.5;
  expect_close(bn_ext::rms_norm(x, {64}, w), at::rms_norm(x, {64}, w, std::nullopt), 1e-5, "rms_norm output");
  expect_close(bn_ext::rms_norm(x, {64}, w, 1e-3), at::rms_norm(x, {64}, w, 1e-3), 1e-5, "rms_norm eps=1e-3");
}

void row_backward() {
  auto x = torch::randn({5, 33}, torch::kDouble).requires_grad_();
  auto w = (torch::rand({33}, torch::kDouble) + 0.5).requires_grad_();
  auto b = torch::randn({33}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({5, 33}, torch::kDouble);
  auto ref = torch::autograd::grad({at::layer_norm(x, {33}, w, b)}, {x, w, b}, {dy});
  auto [y, mean, rstd] = bn_ext::layer_norm_forward(x.detach(), {33}, w.detach(), b.detach(), 1e-5);
  auto [gx, gw, gb] = bn_ext::layer_norm_backward(dy, x.detach(), {33}, mean, rstd, w.detach(), b.detach(), 1e-5);
  expect_close(gx, ref[0], 1e-10, "layer_norm grad_input");
  expect_close(gw, ref[1], 1e-10, "layer_norm grad_weight");
  expect_close(gb, ref[2], 1e-10, "layer_norm grad_bias");
  auto rref = torch::autograd::grad({at::rms_norm(x, {33}, w, std::nullopt)}, {x, w}, {dy});
  auto [ry, rstd2] = bn_ext::rms_norm_forward(x.detach(), {33}, w.detach(), std::nullopt);
  auto [rgx, rgw] = bn_ext::rms_norm_backward(dy, x.detach(), {33}, rstd2, w.detach(), std::nullopt);
  expect_close(rgx, rref[0], 1e-10, "rms_norm grad_input");
  expect_close(rgw, rref[1], 1e-10, "rms_norm grad_weight");
}

// The forward ops are differentiable with libtorch's autograd.
void autograd() {
  auto x = torch::randn({6, 4, 5}, torch::kDouble).requires_grad_();
  auto w = (torch::rand({4}, torch::kDouble) + 0.5).requires_grad_();
  auto b = torch::randn({4}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({6, 4, 5}, torch::kDouble);
  auto ours = torch::autograd::grad({bn_ext::batch_norm(x, std::nullopt, std::nullopt, w, b, true)}, {x, w, b}, {dy});
  auto ref = torch::autograd::grad({at::batch_norm(x, w, b, {}, {}, true, 0.1, 1e-5, false)}, {x, w, b}, {dy});
  for (int i = 0; i < 3; ++i) expect_close(ours[i], ref[i], 1e-10, "batch_norm autograd gradient");
  auto lw = (torch::rand({5}, torch::kDouble) + 0.5).requires_grad_();
  auto lo = torch::autograd::grad({bn_ext::layer_norm(x, {5}, lw)}, {x, lw}, {dy});
  auto lr = torch::autograd::grad({at::layer_norm(x, {5}, lw)}, {x, lw}, {dy});
  for (int i = 0; i < 2; ++i) expect_close(lo[i], lr[i], 1e-10, "layer_norm autograd gradient");
  auto ro = torch::autograd::grad({bn_ext::rms_norm(x, {5}, lw)}, {x, lw}, {dy});
  auto rr = torch::autograd::grad({at::rms_norm(x, {5}, lw, std::nullopt)}, {x, lw}, {dy});
  for (int i = 0; i < 2; ++i) expect_close(ro[i], rr[i], 1e-10, "rms_norm autograd gradient");
}

torch::nn::BatchNorm2d calibrated_bn(int64_t channels) {
  torch::nn::BatchNorm2d bn(channels);
  torch::NoGradGuard no_grad;
  bn->running_mean.copy_(torch::randn({channels}));
  bn->running_var.copy_(torch::rand({channels}) + 0.3);
  bn->weight.copy_(torch::randn({channels}));
  bn->bias.copy_(torch::randn({channels}));
  bn->eval();
  return bn;
}

void fold_conv() {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(4, 6, 3).groups(2).padding(1));
  conv->eval();
  auto bn = calibrated_bn(6);
  auto [w, b] = bn_ext::fuse_conv_bn_weights(conv->weight, conv->bias, bn->running_mean, bn->running_var, 1e-5,
                                             bn->weight, bn->bias, false, 2);
  torch::NoGradGuard no_grad;
  auto x = randn({2, 4, 9, 9});
  auto expected = bn->forward(conv->forward(x));
  auto folded = torch::conv2d(x, w, b, 1, 1, 1, 2);
  expect_close(folded, expected, 1e-5, "conv + bn folded");
}

void fold_conv_transpose() {
  torch::nn::ConvTranspose2d deconv(torch::nn::ConvTranspose2dOptions(6, 6, 3).groups(3).stride(2));
  deconv->eval();
  auto bn = calibrated_bn(6);
  auto [w, b] = bn_ext::fuse_conv_bn_weights(deconv->weight, deconv->bias, bn->running_mean, bn->running_var, 1e-5,
                                             bn->weight, bn->bias, true, 3);
  torch::NoGradGuard no_grad;
  auto x = randn({2, 6, 5, 5});
  auto expected = bn->forward(deconv->forward(x));
  auto folded = torch::conv_transpose2d(x, w, b, 2, 0, 0, 3);
  expect_close(folded, expected, 1e-5, "conv_transpose (in == out, groups 3) + bn folded");
}

void fold_linear() {
  torch::nn::Linear linear(5, 7);
  torch::nn::BatchNorm1d bn(7);
  {
    torch::NoGradGuard no_grad;
    bn->running_mean.copy_(torch::randn({7}));
    bn->running_var.copy_(torch::rand({7}) + 0.3);
  }
  bn->eval();
  auto [w, b] = bn_ext::fuse_linear_bn_weights(linear->weight, linear->bias, bn->running_mean, bn->running_var,
                                               1e-5, bn->weight, bn->bias);
  torch::NoGradGuard no_grad;
  auto x = randn({3, 5});
  expect_close(torch::linear(x, w, b), bn->forward(linear->forward(x)), 1e-5, "linear + bn folded");
}

template <typename Exception>
void expect_error(const std::function<void()>& f, const std::string& fragment, const char* what) {
  try {
    f();
  } catch (const Exception& e) {
    const bool ok = std::string(e.what()).find(fragment) != std::string::npos;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
    return;
  }
  std::printf("FAIL %s: no error\n", what);
  ++failures;
}

void errors() {
  expect_error<c10::ValueError>([] { bn_ext::batch_norm(randn({1, 4}), std::nullopt, std::nullopt, {}, {}, true); },
                                "Expected more than 1 value per channel", "one value per channel: ValueError");
  expect_error<c10::Error>(
      [] { bn_ext::batch_norm(randn({2, 4}), torch::zeros({3}), torch::ones({3}), {}, {}, true); },
      "running_mean should contain 4 elements", "channel mismatch names both sizes");
  expect_error<c10::NotImplementedError>(
      [] { bn_ext::layer_norm(torch::ones({2, 3}, torch::kLong), {3}); }, "input must be float32",
      "integer input: NotImplementedError");
  expect_error<c10::Error>([] { bn_ext::rms_norm(randn({2, 3}), {4}); }, "expected input with shape [*, 4]",
                           "normalized_shape mismatch");
}

// GroupNorm (fused SiLU too), InstanceNorm with running statistics and
// LayerNorm over channels against libtorch, both layouts, with autograd.
void batch_norm_act() {
  auto x = randn({4, 6, 5, 5}) * 2 + 1, r = randn({4, 6, 5, 5});
  auto w = torch::rand({6}) + 0.5, b = torch::randn({6});
  auto rm = torch::zeros({6}), rv = torch::ones({6}), rm_ref = rm.clone(), rv_ref = rv.clone();
  auto ours = bn_ext::batch_norm_act(x, rm, rv, w, b, true, 0.1, 1e-5, "relu", r);
  auto unfused = at::relu(bn_ext::batch_norm(x, rm_ref, rv_ref, w, b, true, 0.1, 1e-5) + r);
  expect(at::equal(ours, unfused), "batch_norm_act equals batch_norm + add + relu");
  expect(at::equal(rm, rm_ref) && at::equal(rv, rv_ref), "batch_norm_act updates the running statistics");
  auto xg = x.clone().requires_grad_(), rg = r.clone().requires_grad_();
  auto grads = torch::autograd::grad({bn_ext::batch_norm_act(xg, std::nullopt, std::nullopt, w, b, true, 0.1, 1e-5,
                                                             "silu", rg)}, {xg, rg}, {torch::ones_like(x)});
  auto xr = x.clone().requires_grad_(), rr = r.clone().requires_grad_();
  auto ref = torch::autograd::grad({at::silu(at::batch_norm(xr, w, b, {}, {}, true, 0.1, 1e-5, false) + rr)}, {xr, rr},
                                   {torch::ones_like(x)});
  expect_close(grads[0], ref[0], 1e-4, "batch_norm_act + silu autograd: grad_input");
  expect_close(grads[1], ref[1], 1e-5, "batch_norm_act + silu autograd: grad_residual");
}

// Batch Renormalization against its equations in float64, r and d clipped.
void batch_renorm() {
  auto x = torch::randn({6, 3, 4, 5}, torch::kDouble) * 2 + 1;
  auto w = torch::rand({3}, torch::kDouble) + 0.5, b = torch::randn({3}, torch::kDouble);
  auto rm = torch::full({3}, 4.0, torch::kDouble), rv = torch::full({3}, 0.01, torch::kDouble);
  const double eps = 1e-3;
  auto mu = x.mean({0, 2, 3}), sigma_b = (x.var({0, 2, 3}, false) + eps).sqrt(), sigma = (rv + eps).sqrt();
  auto r = (sigma_b / sigma).clamp(1.0 / 3.0, 3.0), d = ((mu - rm) / sigma).clamp(-5.0, 5.0);
  auto view = [](const torch::Tensor& t) { return t.view({1, -1, 1, 1}); };
  auto expected = view(w) * ((x - view(mu)) / view(sigma_b) * view(r) + view(d)) + view(b);
  auto new_var = (sigma + 0.01 * (sigma_b - sigma)).square() - eps;
  auto new_mean = rm + 0.01 * (mu - rm);
  auto out = bn_ext::batch_renorm(x, rm, rv, w, b, true);
  expect_close(out, expected, 1e-10, "batch_renorm training output");
  expect_close(rm, new_mean, 1e-12, "batch_renorm running_mean");
  expect_close(rv, new_var, 1e-12, "batch_renorm running_var (sigma^2 - eps)");
  expect_close(bn_ext::batch_renorm(x, rm, rv, w, b, false), at::batch_norm(x, w, b, rm, rv, false, 0.0, eps, false),
               1e-10, "batch_renorm eval is batch_norm");
  // An empty batch: BatchNorm's empty output, the running statistics unchanged
  // (as bn_ext.batch_renorm in Python).
  auto kept_mean = rm.clone(), kept_var = rv.clone();
  auto empty = bn_ext::batch_renorm(x.narrow(0, 0, 0), rm, rv, w, b, true);
  expect(empty.sizes() == x.narrow(0, 0, 0).sizes(), "batch_renorm of an empty batch keeps its shape");
  expect_close(rm, kept_mean, 0.0, "batch_renorm of an empty batch leaves running_mean");
  expect_close(rv, kept_var, 0.0, "batch_renorm of an empty batch leaves running_var");
  // r and d in the parameters' dtype: the bias's without a weight.
  auto x32 = x.to(torch::kFloat);
  auto b32 = b.to(torch::kFloat);
  auto expected32 = (x32 - x32.mean({0, 2, 3}, true)) / (x32.var({0, 2, 3}, false, true) + eps).sqrt() * view(r) +
                    view(d) + view(b32);
  try {
    auto out32 = bn_ext::batch_renorm(x32, torch::full({3}, 4.0, torch::kDouble), torch::full({3}, 0.01, torch::kDouble),
                                      std::nullopt, b32, true);
    expect(out32.scalar_type() == torch::kFloat, "batch_renorm with a float bias: a float output");
    expect_close(out32, expected32, 1e-4, "batch_renorm with a float bias and float64 running statistics");
  } catch (const c10::Error& e) {
    expect(false, "batch_renorm with a float bias and float64 running statistics raised");
  }
}

void group_norm_family() {
  auto x = randn({3, 8, 5, 6}) * 2 + 1;
  auto w = torch::rand({8}) + 0.5, b = torch::randn({8});
  auto x64 = x.to(torch::kDouble), w64 = w.to(torch::kDouble), b64 = b.to(torch::kDouble);
  for (auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    auto xf = x.contiguous(format);
    auto out = bn_ext::group_norm(xf, 4, w, b);
    expect(out.is_contiguous(format), "group_norm keeps the memory format");
    expect_close(out, at::group_norm(x64, 4, w64, b64), 1e-5, "group_norm output");
    expect_close(bn_ext::group_norm(xf, 4, w, b, 1e-5, "silu"), at::silu(at::group_norm(x64, 4, w64, b64)), 1e-5,
                 "group_norm + silu output");
    auto permuted = at::layer_norm(x64.permute({0, 2, 3, 1}), {8}, w64, b64, 1e-6).permute({0, 3, 1, 2});
    expect_close(bn_ext::layer_norm_channels(xf, w, b), permuted, 1e-5, "layer_norm_channels output");
  }
  auto rm = torch::zeros({8}), rv = torch::ones({8});
  auto rm_ref = rm.clone(), rv_ref = rv.clone();
  expect_close(bn_ext::instance_norm(x, rm, rv, w, b, true, 0.1, 1e-5),
               at::instance_norm(x, w, b, rm_ref, rv_ref, true, 0.1, 1e-5, false), 1e-5, "instance_norm output");
  expect_close(rm, rm_ref, 1e-6, "instance_norm running_mean");
  expect_close(rv, rv_ref, 1e-6, "instance_norm running_var");
  expect_close(bn_ext::instance_norm(x, rm, rv, w, b, false), at::instance_norm(x, w, b, rm, rv, false, 0.1, 1e-5, false),
               1e-5, "instance_norm with the running statistics");
  auto xg = x64.clone().requires_grad_(), wg = w64.clone().requires_grad_(), bg = b64.clone().requires_grad_();
  auto dy = torch::randn({3, 8, 5, 6}, torch::kDouble);
  auto ours = torch::autograd::grad({bn_ext::group_norm(xg, 4, wg, bg, 1e-5, "relu")}, {xg, wg, bg}, {dy});
  auto ref = torch::autograd::grad({at::relu(at::group_norm(xg, 4, wg, bg))}, {xg, wg, bg}, {dy});
  for (int i = 0; i < 3; ++i) expect_close(ours[i], ref[i], 1e-10, "group_norm + relu autograd gradient");
  ours = torch::autograd::grad({bn_ext::layer_norm_channels(xg, wg, bg)}, {xg, wg, bg}, {dy});
  ref = torch::autograd::grad({at::layer_norm(xg.permute({0, 2, 3, 1}), {8}, wg, bg, 1e-6).permute({0, 3, 1, 2})},
                              {xg, wg, bg}, {dy});
  for (int i = 0; i < 3; ++i) expect_close(ours[i], ref[i], 1e-10, "layer_norm_channels autograd gradient");
  expect_error<c10::Error>([] { bn_ext::group_norm(randn({2, 6, 3}), 4); }, "divisible by num_groups",
                           "group_norm: groups must divide the channels");
}

// The level of the CPU kernels: BN_EXT_CPU_CAPABILITY's when set (ctest runs
// this case at DEFAULT too), else the best this build and CPU have; the
// kernels at that level against libtorch.
void cpu_capability() {
  const auto levels = bn_ext::cpu_capabilities();
  const std::string chosen = bn_ext::cpu_capability();
  expect(!levels.empty() && levels.front() == "DEFAULT", "DEFAULT is always available");
  const char* asked = std::getenv("BN_EXT_CPU_CAPABILITY");
  const std::string expected = asked != nullptr && *asked != '\0' ? asked : levels.back();
  std::printf("CPU kernels at %s\n", chosen.c_str());
  expect(chosen == expected, "the level asked for, or the best one");
  batch_norm_train();
  layer_norm();
}

}  // namespace

int main(int argc, char** argv) {
  torch::manual_seed(0);
  const std::map<std::string, std::function<void()>> cases = {
      {"batch_norm_train", batch_norm_train}, {"batch_norm_eval", batch_norm_eval},
      {"batch_norm_backward", batch_norm_backward}, {"layer_norm", layer_norm},
      {"rms_norm", rms_norm}, {"row_backward", row_backward},
      {"fold_conv", fold_conv}, {"fold_conv_transpose", fold_conv_transpose},
      {"fold_linear", fold_linear}, {"errors", errors}, {"autograd", autograd},
      {"group_norm_family", group_norm_family}, {"batch_norm_act", batch_norm_act},
      {"batch_renorm", batch_renorm}, {"cpu_capability", cpu_capability}};
  for (int i = 1; i < argc; ++i) {
    auto it = cases.find(argv[i]);
    if (it == cases.end()) {
      std::printf("unknown case %s\n", argv[i]);
      return 2;
    }
    it->second();
  }
  return failures == 0 ? 0 : 1;
}
