// Makes the shared library importable as sparse_t5._C; importing it runs the TORCH_LIBRARY
// registrations. Kept apart from the ops so CMake builds them without Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sparse_t5 C++ ops, registered under torch.ops.sparse_t5", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
