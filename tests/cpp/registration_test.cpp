// Finds every bn_ext operator through the dispatcher without referencing any
// bn_ext symbol, as a program that only runs saved models would.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  const char* names[] = {"bn_ext::batch_norm_forward", "bn_ext::batch_norm_update_stats",
                         "bn_ext::batch_norm_backward", "bn_ext::layer_norm_forward",
                         "bn_ext::layer_norm_backward", "bn_ext::rms_norm_forward",
                         "bn_ext::rms_norm_backward",  "bn_ext::fuse_conv_bn_weights",
                         "bn_ext::fuse_bn_conv_weights"};
  for (const char* name : names) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!handle.has_value()) {
      std::printf("operator %s not registered\n", name);
      return 1;
    }
    std::printf("found %s\n", name);
  }
  return 0;
}
