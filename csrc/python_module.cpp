// The Python extension module bn_ext._C. Importing it runs the static
// operator registrations. It also exposes direct bindings of the functional
// calls: calling an operator through torch.ops parses its arguments against
// the schema, about 2.5 us per call here (torch's own aten ops pay the same
// through torch.ops), which dominates small inputs. These bindings call the
// same operators through the dispatcher (autograd, autocast and dispatch modes
// all apply); bn_ext/functional.py uses them only outside torch.compile and
// when no __torch_function__ override is active.
#include "bn_ext/bn_ext.h"
#include "cpu/output_memory.h"

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <chrono>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// Argument conversions; each raises TypeError naming the argument.
Tensor tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(c10::str(name, " must be a Tensor, got ", Py_TYPE(obj)->tp_name));
  }
  return THPVariable_Unpack(obj);
}

std::optional<Tensor> optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj, name);
}

double float_arg(PyObject* obj, const char* name) {
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw torch::TypeError(c10::str(name, " must be a number, got ", Py_TYPE(obj)->tp_name));
  }
  return v;
}

std::optional<double> optional_float_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return float_arg(obj, name);
}

std::vector<int64_t> shape_arg(PyObject* obj, const char* name) {
  PyObject* seq = PySequence_Fast(obj, "");
  if (seq == nullptr) {
    PyErr_Clear();
    throw torch::TypeError(c10::str(name, " must be a sequence of ints, got ", Py_TYPE(obj)->tp_name));
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  std::vector<int64_t> shape(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    shape[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));  // any __index__ object
    if (shape[i] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      Py_DECREF(seq);
      throw torch::TypeError(c10::str(name, " must be a sequence of ints"));
    }
  }
  Py_DECREF(seq);
  return shape;
}

void check_arg_count(Py_ssize_t given, Py_ssize_t expected, const char* function) {
  if (given != expected) {
    throw torch::TypeError(
        c10::str(function, "() takes ", expected, " positional arguments but ", given, " were given"));
  }
}

// Runs `call` (returning a Tensor) with the GIL released and wraps its result.
template <typename Call>
PyObject* call_without_gil(const Call& call) {
  Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = call();
  }
  return THPVariable_Wrap(std::move(out));
}

// A Python argument as the C++ parameter type P (a shape as the vector an
// IntArrayRef views).
template <typename P>
auto from_python(PyObject* obj, const char* name) {
  if constexpr (std::is_same_v<P, Tensor>) {
    return tensor_arg(obj, name);
  } else if constexpr (std::is_same_v<P, std::optional<Tensor>>) {
    return optional_tensor_arg(obj, name);
  } else if constexpr (std::is_same_v<P, double>) {
    return float_arg(obj, name);
  } else if constexpr (std::is_same_v<P, std::optional<double>>) {
    return optional_float_arg(obj, name);
  } else if constexpr (std::is_same_v<P, bool>) {
    return PyObject_IsTrue(obj) == 1;
  } else {
    static_assert(std::is_same_v<P, at::IntArrayRef>, "no conversion for this parameter type");
    return shape_arg(obj, name);
  }
}

// The direct binding of `function`: its Python arguments converted in order
// (names[0] is the function's name, then its parameters'), then the call.
template <typename... P, size_t... I>
PyObject* call_direct(Tensor (*function)(P...), const char* const* names, PyObject* const* args, Py_ssize_t nargs,
                      std::index_sequence<I...>) {
  check_arg_count(nargs, sizeof...(P), names[0]);
  // Braces: converted left to right, so the first bad argument is the one named.
  const std::tuple<decltype(from_python<std::decay_t<P>>(nullptr, nullptr))...> values{
      from_python<std::decay_t<P>>(args[I], names[I + 1])...};
  return call_without_gil([&] { return function(std::get<I>(values)...); });
}

template <typename R, typename... P>
constexpr size_t arity(R (*)(P...)) {
  return sizeof...(P);
}

template <auto function, const char* const* names>
PyObject* direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return call_direct(function, names, args, nargs, std::make_index_sequence<arity(function)>());
  END_HANDLE_TH_ERRORS
}

// The bound functions: bn_ext.batch_norm's form with torch.nn's options
// (momentum None: a cumulative average; training updates the running
// statistics), layer_norm, rms_norm.
using BatchNorm = Tensor (*)(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                             const std::optional<Tensor>&, const std::optional<Tensor>&, bool, std::optional<double>,
                             double, const std::optional<Tensor>&);
constexpr BatchNorm kBatchNorm = &bn_ext::batch_norm;
constexpr const char* kBatchNormNames[] = {
    "batch_norm", "input",    "running_mean", "running_var", "weight",
    "bias",       "training", "momentum",     "eps",         "num_batches_tracked"};
constexpr const char* kLayerNormNames[] = {"layer_norm", "input", "normalized_shape", "weight", "bias", "eps"};
constexpr const char* kRmsNormNames[] = {"rms_norm", "input", "normalized_shape", "weight", "eps"};

// cpu_output_cache_stats() -> (limit, cached, in use, hits, misses)
PyObject* cpu_output_cache_stats(PyObject*, PyObject*) {
  const auto s = bn_ext::cpu_output_cache_stats();
  using ull = unsigned long long;
  return Py_BuildValue("(KKKKK)", ull(s.limit_bytes), ull(s.cached_bytes), ull(s.in_use_bytes), ull(s.hits),
                       ull(s.misses));
}

// set_cpu_output_cache_limit(nbytes); bn_ext/memory.py checks the argument.
PyObject* set_cpu_output_cache_limit(PyObject*, PyObject* nbytes) {
  HANDLE_TH_ERRORS
  const unsigned long long bytes = PyLong_AsUnsignedLongLong(nbytes);
  if (PyErr_Occurred()) return nullptr;
  bn_ext::set_cpu_output_cache_limit(static_cast<size_t>(bytes));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* empty_cpu_output_cache(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  bn_ext::empty_cpu_output_cache();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _hold_output_cache_lock(seconds): the lock held, the GIL released.
PyObject* hold_output_cache_lock(PyObject*, PyObject* seconds) {
  HANDLE_TH_ERRORS
  const double s = PyFloat_AsDouble(seconds);
  if (PyErr_Occurred()) return nullptr;
  const auto duration = std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
  {
    pybind11::gil_scoped_release no_gil;
    bn_ext::cpu::hold_output_cache_lock(duration);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(bn_ext::cpu_capability().c_str());
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_capabilities(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  const auto levels = bn_ext::cpu_capabilities();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(levels.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < levels.size(); ++i) {
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(levels[i].c_str()));
  }
  return list;
  END_HANDLE_TH_ERRORS
}

// A METH_FASTCALL function as the PyCFunction its table entry holds.
PyCFunction fastcall(PyObject* (*function)(PyObject*, PyObject* const*, Py_ssize_t)) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function));
}

PyMethodDef methods[] = {
    {"batch_norm", fastcall(direct<kBatchNorm, kBatchNormNames>), METH_FASTCALL,
     "bn_ext.batch_norm's direct binding (training updates the running statistics)"},
    {"layer_norm", fastcall(direct<&bn_ext::layer_norm, kLayerNormNames>), METH_FASTCALL,
     "bn_ext.layer_norm's direct binding"},
    {"rms_norm", fastcall(direct<&bn_ext::rms_norm, kRmsNormNames>), METH_FASTCALL, "bn_ext.rms_norm's direct binding"},
    {"cpu_output_cache_stats", cpu_output_cache_stats, METH_NOARGS, "bn_ext.cpu_output_cache_stats's binding"},
    {"set_cpu_output_cache_limit", set_cpu_output_cache_limit, METH_O, "bn_ext.set_cpu_output_cache_limit's binding"},
    {"empty_cpu_output_cache", empty_cpu_output_cache, METH_NOARGS, "bn_ext.empty_cpu_output_cache's binding"},
    {"_hold_output_cache_lock", hold_output_cache_lock, METH_O, "holds the output cache's lock (a test of fork)"},
    {"cpu_capability", cpu_capability, METH_NOARGS, "bn_ext.cpu_capability's binding"},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS, "bn_ext.cpu_capabilities's binding"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "bn_ext operator library", -1, methods};
  return PyModule_Create(&module_def);
}
