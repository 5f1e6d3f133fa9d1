// The Python extension module bn_ext._C. Importing it runs the static
// operator registrations; it exposes no Python functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "bn_ext operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
