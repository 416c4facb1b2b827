// Schemas of the attention family (a fragment of the vlssm library; csrc/vlssm.cpp
// holds the library and module init). Kernels: csrc/cpu/attention_cpu.cpp and the
// Triton ops of kernels/attention.py; fake and autograd in vlssm/ops/attention.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vlssm, m) {
  // q (n, Lq, d), k (n, Lk, d), v (n, Lk, dv), any strides (stride-0 batch
  // included). Returns (out (n, Lq, dv), probs (n, Lq, Lk)) with
  // probs = softmax(scale * q k^T) over the last dim and out = probs v.
  m.def("attention_with_probs(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Both outputs are differentiable: dprobs (None when probs was not used) is
  // added to dout v^T. Returns (dq, dk, dv) in the shapes of q, k, v.
  m.def(
      "attention_with_probs_backward(Tensor dout, Tensor? dprobs, Tensor q, Tensor k, Tensor v, Tensor probs, "
      "float scale) -> Tensor[]");
}
