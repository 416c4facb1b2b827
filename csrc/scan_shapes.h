// The scan family's shapes (selective_scan, fork_scan): B / C layouts
// (ScanShape), fork segments and checkpoints (ForkLayout), the operands and
// outputs as every compiled backend reads and allocates them, and the argument
// checks of the forward and backward ops (the generic checks: checks.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace vlssm {

// Steps between saved scan states (checkpoints); vlssm/ops/scan.py mirrors it.
constexpr int64_t kCheckpointChunk = 64;

inline int64_t num_checkpoints(int64_t len) { return (len + kCheckpointChunk - 1) / kCheckpointChunk; }

// fork_scan's segments (prefix p, suffix s) and the offsets of a channel's three
// checkpoint groups in the (b, D, nck, N) checkpoints: prefix, forward, reversed.
struct ForkLayout {
  int64_t p, s, nck_p, nck_s, nck;
  ForkLayout(int64_t p_, int64_t s_) : p(p_), s(s_), nck_p(num_checkpoints(p_)), nck_s(num_checkpoints(s_)),
                                        nck(nck_p + 2 * nck_s) {}
};

// Checks of the scan's own operands (the generic ones: checks.h).

// An optional operand made contiguous, or an undefined tensor when absent.
inline at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline void check_checkpoints(const at::Tensor& ck, std::vector<int64_t> shape, at::ScalarType dtype) {
  check_tensor("checkpoints", ck, shape, dtype);
}

// Parameters (A, D, delta_bias, initial_state) are in the accumulation dtype.
inline void check_param(const char* name, const at::Tensor& t, std::vector<int64_t> shape, const at::Tensor& u) {
  check_tensor(name, t, shape, acc_dtype(u.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == u.device(), name, " must be on ", u.device(), ", got ", t.device());
}

inline void check_not_complex(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(!t.is_complex(), name, " is complex (", t.scalar_type(),
                   "): complex A / B / C are not supported, only real float16 / bfloat16 / float32 / float64");
}

// B and C each come in one of mamba_ssm's three layouts:
//   time-varying, one group:  selective_scan (b, N, L),    fork_scan (b, L, N);
//   time-varying, G groups:   selective_scan (b, G, N, L), fork_scan (b, L, G, N):
//                             channel d reads group d / (dim / G);
//   input-independent:        (dim, N) in the accumulation dtype: channel d reads row d at every token.
// Every kernel splits channels into blocks inside one group (a block never
// straddles two), so a block reads one row of B / C per token as before.
struct ScanShape {
  int64_t batch, dim, L, N;
  int64_t G = 1;                  // channel groups of the time-varying B / C (1 when none is grouped)
  bool varB = true, varC = true;  // false: input-independent (dim, N)
  int64_t group_dim() const { return dim / G; }  // channels per group
};

// A time-varying B or C as its 4-D view, no copy: selective_scan (b, G, N, L),
// fork_scan (b, L, G, N); a 3-D operand is one group. Input-independent (2-D)
// operands are returned as they are.
inline at::Tensor grouped_view(const at::Tensor& t, bool token_major) {
  return t.dim() == 3 ? t.unsqueeze(token_major ? 2 : 1) : t;
}

// B and C as every compiled kernel reads them: a time-varying operand as its
// grouped 4-D view (no copy), an input-independent one contiguous (D, N).
struct BCOperands {
  at::Tensor B, C;
  BCOperands(const at::Tensor& B_, const at::Tensor& C_, bool token_major)
      : B(B_.dim() == 2 ? B_.contiguous() : grouped_view(B_, token_major)),
        C(C_.dim() == 2 ? C_.contiguous() : grouped_view(C_, token_major)) {}
};

// The per-channel parameters as every compiled kernel reads them: contiguous,
// D and delta_bias undefined when absent.
struct ScanWeights {
  at::Tensor A, D, bias;
  ScanWeights(const at::Tensor& A_, const c10::optional<at::Tensor>& D_, const c10::optional<at::Tensor>& bias_)
      : A(A_.contiguous()), D(opt_or_empty(D_)), bias(opt_or_empty(bias_)) {}
};

// Outputs of selective_scan, as every compiled backend allocates them:
// out (b, D, L) in u's dtype; last state (b, D, N) and checkpoints (b, D, nck, N)
// in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_outputs(const at::Tensor& u, const ScanShape& sh) {
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  return {at::empty({sh.batch, sh.dim, sh.L}, u.options()), at::empty({sh.batch, sh.dim, sh.N}, acc_opts),
          at::empty({sh.batch, sh.dim, num_checkpoints(sh.L), sh.N}, acc_opts)};
}

// Outputs of fork_scan: out (b, s, E) in u's dtype; ysum (b, s, E) and
// checkpoints (b, E, nck, N) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> fork_scan_outputs(const at::Tensor& u, const ScanShape& sh,
                                                                        const ForkLayout& fl) {
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  return {at::empty({sh.batch, fl.s, sh.dim}, u.options()), at::empty({sh.batch, fl.s, sh.dim}, acc_opts),
          at::empty({sh.batch, sh.dim, fl.nck, sh.N}, acc_opts)};
}

// B or C (see ScanShape): returns its group count, 0 for input-independent.
inline int64_t check_bc(const char* name, const at::Tensor& t, const ScanShape& sh, const at::Tensor& u,
                        bool token_major) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  check_not_complex(name, t);
  const char* layouts = token_major
                            ? " must have shape (batch, seqlen, dstate), (batch, seqlen, groups, dstate) or (dim, dstate), got "
                            : " must have shape (batch, dstate, seqlen), (batch, groups, dstate, seqlen) or (dim, dstate), got ";
  if (t.dim() == 2) {
    check_param(name, t, {sh.dim, sh.N}, u);
    return 0;
  }
  if (t.dim() == 3) {
    check_act(name, t, token_major ? std::vector<int64_t>{sh.batch, sh.L, sh.N} : std::vector<int64_t>{sh.batch, sh.N, sh.L},
              u);
    return 1;
  }
  TORCH_CHECK_VALUE(t.dim() == 4, name, layouts, shape_str(t.sizes()));
  const int64_t G = t.size(token_major ? 2 : 1);
  TORCH_CHECK_VALUE(G > 0 && sh.dim % G == 0, name, " has ", G, " groups, which must divide dim = ", sh.dim);
  check_act(name, t,
            token_major ? std::vector<int64_t>{sh.batch, sh.L, G, sh.N} : std::vector<int64_t>{sh.batch, G, sh.N, sh.L},
            u);
  return G;
}

// B and C together: the group count of the time-varying ones (equal when both vary).
inline void check_bc_pair(const at::Tensor& B, const at::Tensor& C, ScanShape& sh, const at::Tensor& u,
                          bool token_major) {
  const int64_t gB = check_bc("B", B, sh, u, token_major), gC = check_bc("C", C, sh, u, token_major);
  TORCH_CHECK_VALUE(gB == 0 || gC == 0 || gB == gC, "B and C must have the same number of groups, got ", gB,
                    " (B) and ", gC, " (C); a 3-D B / C is one group");
  sh.varB = gB > 0;
  sh.varC = gC > 0;
  sh.G = std::max<int64_t>({gB, gC, int64_t(1)});
}

// selective_scan: u, delta, z (b, D, L); A (D, N); B, C (see ScanShape).
inline ScanShape check_selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                      const c10::optional<at::Tensor>& z,
                                      const c10::optional<at::Tensor>& delta_bias,
                                      const c10::optional<at::Tensor>& initial_state) {
  TORCH_CHECK_VALUE(u.dim() == 3, "u must have shape (batch, dim, seqlen), got ", shape_str(u.sizes()));
  check_floating("u", u);
  check_not_complex("A", A);
  TORCH_CHECK_VALUE(A.dim() == 2, "A must have shape (dim, dstate), got ", shape_str(A.sizes()));
  ScanShape sh{u.size(0), u.size(1), u.size(2), A.size(1)};
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.dim > 0 && sh.L > 0 && sh.N > 0, "empty input: u ", shape_str(u.sizes()),
                    ", A ", shape_str(A.sizes()));
  check_same("delta", delta, u);
  check_param("A", A, {sh.dim, sh.N}, u);
  check_bc_pair(B, C, sh, u, false);
  if (D.has_value()) check_param("D", *D, {sh.dim}, u);
  if (z.has_value()) check_same("z", *z, u);
  if (delta_bias.has_value()) check_param("delta_bias", *delta_bias, {sh.dim}, u);
  if (initial_state.has_value()) check_param("initial_state", *initial_state, {sh.batch, sh.dim, sh.N}, u);
  return sh;
}

// fork_scan: u, delta (b, p + 2s, E); B, C (see ScanShape); z (b, s, E); A (E, N).
inline ScanShape check_fork_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                 int64_t prefix_len) {
  TORCH_CHECK_VALUE(u.dim() == 3, "u must have shape (batch, prefix_len + 2 * suffix_len, dim), got ",
                    shape_str(u.sizes()));
  check_floating("u", u);
  check_not_complex("A", A);
  TORCH_CHECK_VALUE(A.dim() == 2, "A must have shape (dim, dstate), got ", shape_str(A.sizes()));
  ScanShape sh{u.size(0), u.size(2), u.size(1), A.size(1)};
  TORCH_CHECK_VALUE(prefix_len >= 0 && prefix_len < sh.L && (sh.L - prefix_len) % 2 == 0,
                    "prefix_len must be in [0, L) with L - prefix_len = 2 * suffix_len; got prefix_len ",
                    prefix_len, " for L = ", sh.L);
  const int64_t s = (sh.L - prefix_len) / 2;
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.dim > 0 && s > 0 && sh.N > 0, "empty input: u ", shape_str(u.sizes()),
                    ", A ", shape_str(A.sizes()));
  check_same("delta", delta, u);
  check_param("A", A, {sh.dim, sh.N}, u);
  check_bc_pair(B, C, sh, u, true);
  if (D.has_value()) check_param("D", *D, {sh.dim}, u);
  if (z.has_value()) {
    check_act("z", *z, {sh.batch, s, sh.dim}, u);
  }
  if (delta_bias.has_value()) check_param("delta_bias", *delta_bias, {sh.dim}, u);
  return sh;
}

// selective_scan_backward: the forward's checks plus dout (like u),
// dlast_state (b, D, N) and checkpoints (b, D, ceil(L / 64), N) in the
// accumulation dtype.
inline ScanShape check_selective_scan_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_state,
                                               const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                               const at::Tensor& B, const at::Tensor& C,
                                               const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                               const c10::optional<at::Tensor>& delta_bias,
                                               const c10::optional<at::Tensor>& initial_state,
                                               const at::Tensor& checkpoints) {
  const ScanShape sh = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state);
  check_same("dout", dout, u);
  const auto acc_type = acc_dtype(u.scalar_type());
  check_checkpoints(checkpoints, {sh.batch, sh.dim, num_checkpoints(sh.L), sh.N}, acc_type);
  if (dlast_state.has_value()) check_tensor("dlast_state", *dlast_state, {sh.batch, sh.dim, sh.N}, acc_type);
  return sh;
}

// fork_scan_backward: the forward's checks plus dout (b, s, E), ysum (b, s, E)
// and checkpoints (b, E, nck_p + 2 nck_s, N) in the accumulation dtype.
inline ScanShape check_fork_scan_backward(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                                          const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                          const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                          const c10::optional<at::Tensor>& delta_bias, const at::Tensor& ysum,
                                          const at::Tensor& checkpoints, int64_t prefix_len) {
  const ScanShape sh = check_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len);
  const int64_t s = (sh.L - prefix_len) / 2;
  const auto acc_type = acc_dtype(u.scalar_type());
  check_tensor("dout", dout, {sh.batch, s, sh.dim}, u.scalar_type());
  check_tensor("ysum", ysum, {sh.batch, s, sh.dim}, acc_type);
  const int64_t nck = num_checkpoints(prefix_len) + 2 * num_checkpoints(s);
  check_checkpoints(checkpoints, {sh.batch, sh.dim, nck, sh.N}, acc_type);
  return sh;
}

}  // namespace vlssm
