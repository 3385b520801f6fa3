// The Python extension module fastmlp._C. It has no functions of its own:
// importing it loads this shared library, whose static initializers
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) register the ops with the dispatcher.
// Built only by setup.py; the CMake test build links the kernels directly.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "fastmlp's compiled kernels (ops are under torch.ops.fastmlp)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
