// Schemas of the Interaction and Fusion Module ops of MVLR (a fragment of the
// vlssm library; csrc/vlssm.cpp holds the library and module init). Kernels: csrc/cpu/ifm_cpu.cpp
// and kernels/ifm.py (backend="triton"); fake / autograd: vlssm/ops/ifm.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vlssm, m) {
  // (alpha * m_ka + (1 - alpha) * m_ca) @ t_ca without the (B, C, C) mixed map.
  // m_ka (C, C) or (B, C, C), m_ca (B, C, C), t_ca (B, C, d), alpha 0-dim. Returns (B, C, d).
  m.def("relation_aggregate(Tensor m_ka, Tensor m_ca, Tensor t_ca, Tensor alpha) -> Tensor");
  // Returns (dm_ka (m_ka's shape), dm_ca, dt_ca, dalpha (0-dim, alpha's dtype)).
  m.def("relation_aggregate_backward(Tensor grad, Tensor m_ka, Tensor m_ca, Tensor t_ca, Tensor alpha) -> Tensor[]");
  // mean over the rows of the broadcast (..., C) of 1 - cos(t_ka row, t_ca row).
  // Returns (loss 0-dim (float32 for half inputs), stats (..., C, 3) = (dot, |t_ka|, |t_ca|)
  // per row in the accumulation dtype).
  m.def("kcr_loss(Tensor t_ka, Tensor t_ca, float eps) -> (Tensor loss, Tensor stats)");
  // Returns (dt_ka, dt_ca) in the inputs' own shapes (broadcast gradients summed).
  m.def("kcr_loss_backward(Tensor grad, Tensor t_ka, Tensor t_ca, Tensor stats, float eps) -> Tensor[]");
}
