// The vlssm operator library and the Python module `vlssm._C`, whose import
// registers every op with the dispatcher. Each op family declares its schemas
// in a fragment of its own, csrc/<family>.cpp (scan, conv, attention, ifm); its
// kernels are registered per backend in csrc/cpu/<family>_cpu.cpp (and
// csrc/cuda/<family>_cuda.cu when built with CUDA); fake (meta) implementations
// and autograd live in vlssm/ops/<family>.py. README "Where things live".
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vlssm._C` only needs to load this shared library: the library's
// TORCH_LIBRARY blocks (below and in csrc/<family>.cpp) register the ops as a side effect.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vlssm compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The library itself; its ops are defined by the families' fragments.
TORCH_LIBRARY(vlssm, m) {}
