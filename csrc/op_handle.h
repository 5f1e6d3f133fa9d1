// Typed handles of bn_ext's operators, for C++ that calls them through the
// dispatcher (the autograd nodes, the C++ API).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace bn_ext {

// The typed handle of operator `name` ("bn_ext::<op>"); callers keep it in a
// function-local static, so the schema is looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace bn_ext
