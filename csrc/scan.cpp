// Schemas of the scan family (a fragment of the vlssm library; csrc/vlssm.cpp
// holds the library and module init). Kernels: csrc/cpu/scan_cpu.cpp,
// csrc/cuda/scan_cuda.cu and the Triton ops of kernels/scan.py; fake and
// autograd in vlssm/ops/scan.py; shapes and checks in csrc/scan_shapes.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vlssm, m) {
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
  // Token-major fork scan. Returns (out, pre-gate sum, checkpoints).
  m.def(
      "fork_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "int prefix_len, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fork_scan_backward(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, Tensor ysum, Tensor checkpoints, int prefix_len, bool delta_softplus) "
      "-> Tensor[]");
}
