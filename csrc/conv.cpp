// Schemas of the conv family (a fragment of the vlssm library; csrc/vlssm.cpp
// holds the library and module init). Kernels: csrc/cpu/conv_cpu.cpp,
// csrc/cuda/conv_cuda.cu and the Triton ops of kernels/conv.py; fake and
// autograd in vlssm/ops/conv.py; shapes and checks in csrc/conv_shapes.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vlssm, m) {
  // Token-major (b, p + s, E) in, (b, p + 2s, E) out.
  m.def("fork_conv1d(Tensor x_prefix, Tensor x_suffix, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "fork_conv1d_backward(Tensor dy, Tensor x_prefix, Tensor x_suffix, Tensor weight, Tensor? bias) "
      "-> Tensor[]");
}
