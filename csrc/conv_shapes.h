// The conv family's shapes (fork_conv1d): ConvShape and its argument checks,
// and the fork tap map shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "fast_math.h"

namespace vlssm {

// fork_conv1d: x_prefix (b, p, E), x_suffix (b, s, E), weight (E, K), bias (E),
// all in x_prefix's dtype.
struct ConvShape {
  int64_t batch, p, s, E, K;
};

inline ConvShape check_fork_conv1d(const at::Tensor& xp, const at::Tensor& xs, const at::Tensor& w,
                                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(xp.dim() == 3, "x_prefix must have shape (batch, prefix_len, dim), got ", shape_str(xp.sizes()));
  TORCH_CHECK_VALUE(xs.dim() == 3, "x_suffix must have shape (batch, suffix_len, dim), got ", shape_str(xs.sizes()));
  check_floating("x_prefix", xp);
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must have shape (dim, d_conv), got ", shape_str(w.sizes()));
  const ConvShape sh{xp.size(0), xp.size(1), xs.size(1), xp.size(2), w.size(1)};
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.s > 0 && sh.E > 0 && sh.K > 0, "empty input: x_prefix ",
                    shape_str(xp.sizes()), ", x_suffix ", shape_str(xs.sizes()), ", weight ", shape_str(w.sizes()));
  check_act("x_suffix", xs, {sh.batch, sh.s, sh.E}, xp);
  check_act("weight", w, {sh.E, sh.K}, xp);
  if (bias.has_value()) check_act("bias", *bias, {sh.E}, xp);
  return sh;
}

// fork_conv1d tap map (see csrc/cpu/conv_cpu.cpp): the combined [P, S]
// input position (0 .. p+s-1) read by tap k (k = K-1 is the current token) of
// output o of [prefix | forward suffix | reversed suffix], or -1 for padding.
VLSSM_HD int64_t fork_tap_source(int64_t o, int64_t k, int64_t p, int64_t s, int64_t K) {
  if (o < p + s) {
    const int64_t q = o - (K - 1) + k;
    return q >= 0 ? q : -1;
  }
  const int64_t i = o - p - s;
  const int64_t q = p + (s - 1 - i) - (K - 1) + k;
  if (q >= p) return p + i + (K - 1 - k);
  return q >= 0 ? q : -1;
}

}  // namespace vlssm
