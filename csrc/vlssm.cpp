// The vlssm operator library: schemas of every op, and the Python module
// `vlssm._C` whose import registers them with the dispatcher. Kernels are
// registered per backend in csrc/cpu/ (and csrc/cuda/ when built with CUDA);
// fake (meta) implementations and autograd live in vlssm/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vlssm._C` only needs to load this shared library: the
// TORCH_LIBRARY blocks below register the ops as a side effect.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vlssm compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vlssm, m) {
  // Channel-major (b, D, L) selective scan, mamba_ssm semantics + reverse and
  // initial_state. Returns (out, last_state, checkpoints).
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus, bool reverse) -> (Tensor, Tensor, Tensor)");
  // Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); the
  // gradient of an absent optional input is an empty tensor.
  m.def(
      "selective_scan_backward(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor checkpoints, "
      "bool delta_softplus, bool reverse) -> Tensor[]");
  // Token-major (b, p + s, E) in, (b, p + 2s, E) out.
  m.def("fork_conv1d(Tensor x_prefix, Tensor x_suffix, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "fork_conv1d_backward(Tensor dy, Tensor x_prefix, Tensor x_suffix, Tensor weight, Tensor? bias) "
      "-> Tensor[]");
  // Token-major fork scan. Returns (out, pre-gate sum, checkpoints).
  m.def(
      "fork_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "int prefix_len, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fork_scan_backward(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, Tensor ysum, Tensor checkpoints, int prefix_len, bool delta_softplus) "
      "-> Tensor[]");
}
