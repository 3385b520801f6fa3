// The Python extension module fastmlp._C. Importing it loads this shared
// library, whose static initializers (TORCH_LIBRARY / TORCH_LIBRARY_IMPL)
// register the ops with the dispatcher. Its one function,
// _activation_names(), gives Python the C++ list of activations
// (activation_kinds.h), in enum order, to check its own against.
// Built only by setup.py; the CMake test build links the kernels directly.
#include <Python.h>

#include "activation_kinds.h"

namespace {

// fastmlp._C._activation_names() -> list[str].
PyObject* activation_names(PyObject* /*module*/, PyObject* /*args*/) {
  PyObject* names = PyList_New(fastmlp::kActivationCount);
  if (names == nullptr) return nullptr;
  for (size_t i = 0; i < fastmlp::kActivationCount; ++i) {
    PyObject* name = PyUnicode_FromString(fastmlp::kActivationNameList[i]);
    if (name == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyList_SET_ITEM(names, i, name);  // the list takes the reference
  }
  return names;
}

PyMethodDef module_methods[] = {
    {"_activation_names", activation_names, METH_NOARGS,
     "The whole-MLP ops' activation names, in the order of C++'s enum."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "fastmlp's compiled kernels (ops are under torch.ops.fastmlp)", -1,
      module_methods};
  return PyModule_Create(&module_def);
}
}
