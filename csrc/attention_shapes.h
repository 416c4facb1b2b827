// Argument checks of the attention ops, shared by every backend (see
// checks.h for the conventions: ValueError / TypeError naming the argument).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace vlssm {

struct AttnShape {
  int64_t batch, Lq, Lk, d, dv;
};

// q (n, Lq, d), k (n, Lk, d), v (n, Lk, dv): one dtype and device, nothing empty.
inline AttnShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK_VALUE(q.defined() && q.dim() == 3, "q must have shape (batch, Lq, d), got ",
                    q.defined() ? shape_str(q.sizes()) : std::string("undefined"));
  check_floating("q", q);
  TORCH_CHECK_VALUE(q.device().is_cpu() || q.device().is_cuda(), "q: unsupported device ", q.device());
  TORCH_CHECK_VALUE(k.defined() && k.dim() == 3, "k must have shape (batch, Lk, d), got ",
                    k.defined() ? shape_str(k.sizes()) : std::string("undefined"));
  TORCH_CHECK_VALUE(v.defined() && v.dim() == 3, "v must have shape (batch, Lk, dv), got ",
                    v.defined() ? shape_str(v.sizes()) : std::string("undefined"));
  const AttnShape sh{q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.Lq > 0 && sh.d > 0, "q must not be empty, got shape ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(sh.Lk > 0, "k must not be empty, got shape ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(sh.dv > 0, "v must not be empty, got shape ", shape_str(v.sizes()));
  check_act("k", k, {sh.batch, sh.Lk, sh.d}, q);
  check_act("v", v, {sh.batch, sh.Lk, sh.dv}, q);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  return sh;
}

inline AttnShape check_attention_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dprobs,
                                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& probs, double scale) {
  const AttnShape sh = check_attention(q, k, v, scale);
  check_act("dout", dout, {sh.batch, sh.Lq, sh.dv}, q);
  if (dprobs.has_value()) check_act("dprobs", *dprobs, {sh.batch, sh.Lq, sh.Lk}, q);
  check_act("probs", probs, {sh.batch, sh.Lq, sh.Lk}, q);
  return sh;
}

}  // namespace vlssm
