// Finds every bn_ext operator through the dispatcher without referencing any
// bn_ext symbol (the names are a constant of the header), as a program that
// only runs saved models would.
#include <ATen/core/dispatch/Dispatcher.h>
#include <bn_ext/bn_ext.h>

#include <cstdio>

int main() {
  for (const char* name : bn_ext::kOperatorNames) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!handle.has_value()) {
      std::printf("operator %s not registered\n", name);
      return 1;
    }
    std::printf("found %s\n", name);
  }
  return 0;
}
