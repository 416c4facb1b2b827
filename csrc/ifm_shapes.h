// Argument checks of the Interaction and Fusion Module ops (relation_aggregate,
// kcr_loss), shared by every backend. Same rules as csrc/checks.h:
// ValueError / TypeError naming the argument and the expected shape.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace vlssm {

struct RelAggShape {
  int64_t batch, labels, dim;
  bool shared_ka;  // m_ka is (C, C), shared by the batch
};

inline void check_alpha(const at::Tensor& alpha, const at::Tensor& like) {
  TORCH_CHECK_VALUE(alpha.defined(), "alpha is undefined");
  TORCH_CHECK_VALUE(alpha.dim() == 0, "alpha must be a 0-dim tensor, got shape ", shape_str(alpha.sizes()));
  check_floating("alpha", alpha);
  TORCH_CHECK_VALUE(alpha.device() == like.device(), "alpha must be on ", like.device(), ", got ", alpha.device());
}

// relation_aggregate: m_ka (C, C) or (B, C, C); m_ca (B, C, C); t_ca (B, C, d); alpha 0-dim.
inline RelAggShape check_relation_aggregate(const at::Tensor& m_ka, const at::Tensor& m_ca, const at::Tensor& t_ca,
                                            const at::Tensor& alpha) {
  TORCH_CHECK_VALUE(t_ca.defined() && t_ca.dim() == 3, "t_ca must have shape (batch, labels, dim), got ",
                    t_ca.defined() ? shape_str(t_ca.sizes()) : std::string("undefined"));
  check_floating("t_ca", t_ca);
  const RelAggShape sh{t_ca.size(0), t_ca.size(1), t_ca.size(2), m_ka.defined() && m_ka.dim() == 2};
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.labels > 0 && sh.dim > 0, "empty input: t_ca ", shape_str(t_ca.sizes()));
  TORCH_CHECK_VALUE(m_ka.defined() && (m_ka.dim() == 2 || m_ka.dim() == 3),
                    "m_ka must have shape (labels, labels) or (batch, labels, labels), got ",
                    m_ka.defined() ? shape_str(m_ka.sizes()) : std::string("undefined"));
  if (sh.shared_ka)
    check_act("m_ka", m_ka, {sh.labels, sh.labels}, t_ca);
  else
    check_act("m_ka", m_ka, {sh.batch, sh.labels, sh.labels}, t_ca);
  check_act("m_ca", m_ca, {sh.batch, sh.labels, sh.labels}, t_ca);
  check_alpha(alpha, t_ca);
  return sh;
}

struct KcrShape {
  std::vector<int64_t> rows;  // broadcast leading shape (..., C)
  int64_t nrows, dim;
};

// kcr_loss: t_ka, t_ca (..., C, d), leading dims broadcastable, same dtype and device.
inline KcrShape check_kcr_loss(const at::Tensor& t_ka, const at::Tensor& t_ca, double eps) {
  TORCH_CHECK_VALUE(t_ka.defined() && t_ka.dim() >= 2, "t_ka must have shape (..., labels, dim), got ",
                    t_ka.defined() ? shape_str(t_ka.sizes()) : std::string("undefined"));
  TORCH_CHECK_VALUE(t_ca.defined() && t_ca.dim() >= 2, "t_ca must have shape (..., labels, dim), got ",
                    t_ca.defined() ? shape_str(t_ca.sizes()) : std::string("undefined"));
  check_floating("t_ka", t_ka);
  TORCH_CHECK_TYPE(t_ca.scalar_type() == t_ka.scalar_type(), "t_ca must have dtype ", t_ka.scalar_type(),
                   " like t_ka, got ", t_ca.scalar_type());
  TORCH_CHECK_VALUE(t_ca.device() == t_ka.device(), "t_ca must be on ", t_ka.device(), " like t_ka, got ",
                    t_ca.device());
  TORCH_CHECK_VALUE(t_ka.device().is_cpu() || t_ka.device().is_cuda(), "t_ka: unsupported device ", t_ka.device());
  TORCH_CHECK_VALUE(t_ca.size(-1) == t_ka.size(-1), "t_ca must have the last dim (dim) of t_ka = ", t_ka.size(-1),
                    ", got shape ", shape_str(t_ca.sizes()));
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  const auto lead_ka = t_ka.sizes().slice(0, t_ka.dim() - 1), lead_ca = t_ca.sizes().slice(0, t_ca.dim() - 1);
  const int64_t n = std::max<int64_t>(lead_ka.size(), lead_ca.size());
  KcrShape sh{std::vector<int64_t>(n, 1), 1, t_ka.size(-1)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ik = i - (n - static_cast<int64_t>(lead_ka.size()));
    const int64_t ic = i - (n - static_cast<int64_t>(lead_ca.size()));
    const int64_t a = ik >= 0 ? lead_ka[ik] : 1, b = ic >= 0 ? lead_ca[ic] : 1;
    TORCH_CHECK_VALUE(a == b || a == 1 || b == 1, "t_ca of shape ", shape_str(t_ca.sizes()),
                      " must broadcast with t_ka of shape ", shape_str(t_ka.sizes()),
                      " in its leading dims (..., labels)");
    sh.rows[i] = a == 1 ? b : a;
  }
  for (auto n : sh.rows) sh.nrows *= n;
  TORCH_CHECK_VALUE(sh.nrows > 0 && sh.dim > 0, "empty input: t_ka ", shape_str(t_ka.sizes()), ", t_ca ",
                    shape_str(t_ca.sizes()));
  return sh;
}

}  // namespace vlssm
