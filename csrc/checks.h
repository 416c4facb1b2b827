// Argument checks shared by every op family's compiled kernels (CPU and CUDA),
// and acc_dtype, the accumulation-dtype rule.
// They raise ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE)
// naming the argument and the expected shape, so a bad direct call of
// torch.ops.vlssm.* never reads out of bounds. The public Python API checks
// first with the same rules and friendlier wording (vlssm/ops/_checks.py).
// Each family's own shape checks: scan_shapes.h, conv_shapes.h,
// attention_shapes.h, ifm_shapes.h.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace vlssm {

// State / parameter dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

inline void check_tensor(const char* name, const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_VALUE(t.sizes().vec() == shape, name, " must have shape ", shape_str(shape), ", got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), name, ": unsupported device ", t.device());
}

// An activation operand: given shape, u's dtype and device.
inline void check_act(const char* name, const at::Tensor& t, std::vector<int64_t> shape, const at::Tensor& u) {
  check_tensor(name, t, shape, u.scalar_type());
  TORCH_CHECK_VALUE(t.device() == u.device(), name, " must be on ", u.device(), ", got ", t.device());
}

inline void check_same(const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_act(name, t, like.sizes().vec(), like);
}

inline void check_floating(const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
                   " must be float16, bfloat16, float32 or float64, got ", s);
}

}  // namespace vlssm
