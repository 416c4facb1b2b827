// CUDA kernels of vlssm::fork_conv1d (forward and backward): depthwise causal
// conv (width K, bias) + SiLU over [P, S] and [P, rev S] at once, token-major
// (b, L, E) operands; y (b, p + 2s, E) = [prefix | forward suffix | reversed
// suffix], tap map fork_tap_source (csrc/conv_shapes.h, shared with the CPU
// kernel csrc/cpu/conv_cpu.cpp).
//
// Forward: one thread per output element (b, o, e), grid-stride, e fastest
// (coalesced loads of x rows and stores of y); K taps read straight from
// x_prefix / x_suffix through element strides (no [P, S] concatenation; stride-0
// batch broadcast works). Bytes per output token: K reads of 2E bytes (bf16)
// mostly L1/L2 hits, so the floor is read (p + s) E + write (p + 2s) E elements.
//
// Backward, two kernels:
//  - dx: one thread per input element (b, q, e): for each tap k, the (at most
//    two) outputs o that read q through tap k (one in [P, S] order, one in the
//    reversed suffix), each checked with fork_tap_source; a(o) = dy(o) *
//    silu'(pre(o)) is recomputed (K taps) instead of stored: no scratch.
//  - dweight / dbias: block (32 channels x 8 token rows), grid (ceil(E/32), b);
//    each thread sums a(o) * x(tap) over its tokens in registers (KMAX-sized
//    array, constant indices), the 8 rows are reduced in shared memory and one
//    atomicAdd per (e, k) per block goes into a zeroed Acc (fp32 / fp64)
//    buffer, cast to the weight dtype afterwards. Float atomics: dweight and
//    dbias are not bitwise deterministic run to run; dx and y are. Under
//    torch.use_deterministic_algorithms(True) each block stores its sums into
//    per-batch partials (b, E, K) / (b, E) instead, summed over b by at::sum:
//    bitwise repeatable, b x E x (K + 1) Acc of scratch.
// K <= 64 on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../conv_shapes.h"
#include "plumbing.cuh"

namespace vlssm {
namespace cuda {
namespace {

template <typename T>
struct ConvIn {
  V3<const T> xp, xs;  // (b, e, token) views of x_prefix, x_suffix
  const T* w;          // weight (E, K) with strides
  int64_t ws0, ws1;
  const T* bias;       // (E) with stride, or null
  int64_t bs;
  int64_t batch, p, s, E, K;
  __device__ __forceinline__ T x(int64_t b, int64_t e, int64_t q) const {
    return q < p ? xp(b, e, q) : xs(b, e, q - p);
  }
  __device__ __forceinline__ T wt(int64_t e, int64_t k) const { return w[e * ws0 + k * ws1]; }
  __device__ __forceinline__ int64_t src(int64_t o, int64_t k) const { return fork_tap_source(o, k, p, s, K); }
};

// Pre-activation conv output of (b, o, e).
template <typename T, typename Acc>
__device__ __forceinline__ Acc conv_pre(const ConvIn<T>& c, int64_t b, int64_t o, int64_t e) {
  Acc a = c.bias ? static_cast<Acc>(c.bias[e * c.bs]) : Acc(0);
  for (int64_t k = 0; k < c.K; ++k) {
    const int64_t q = c.src(o, k);
    if (q >= 0) a += static_cast<Acc>(c.wt(e, k)) * static_cast<Acc>(c.x(b, e, q));
  }
  return a;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(256) conv_fwd_kernel(const ConvIn<T> c, T* __restrict__ y) {
  const int64_t Lout = c.p + 2 * c.s, total = c.batch * Lout * c.E;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx % c.E, bo = idx / c.E, o = bo % Lout, b = bo / Lout;
    y[idx] = static_cast<T>(vsilu(conv_pre<T, Acc>(c, b, o, e)));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc conv_adj(const ConvIn<T>& c, V3<const T> dy, int64_t b, int64_t o, int64_t e) {
  return static_cast<Acc>(dy(b, e, o)) * vsilu_grad(conv_pre<T, Acc>(c, b, o, e));
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(256) conv_bwd_dx_kernel(const ConvIn<T> c, const V3<const T> dy,
                                                          T* __restrict__ dxp, T* __restrict__ dxs) {
  const int64_t Lin = c.p + c.s, total = c.batch * Lin * c.E, K = c.K, p = c.p, s = c.s;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx % c.E, bq = idx / c.E, q = bq % Lin, b = bq / Lin;
    Acc acc = Acc(0);
    for (int64_t k = 0; k < K; ++k) {
      const Acc wk = static_cast<Acc>(c.wt(e, k));
      const int64_t o1 = q + (K - 1 - k);  // prefix / forward suffix output
      if (o1 < p + s && c.src(o1, k) == q) acc += conv_adj<T, Acc>(c, dy, b, o1, e) * wk;
      const int64_t i = q >= p ? (q - p) - (K - 1 - k) : p + s - 1 - (K - 1) + k - q;  // reversed suffix
      if (i >= 0 && i < s) {
        const int64_t o2 = p + s + i;
        if (c.src(o2, k) == q) acc += conv_adj<T, Acc>(c, dy, b, o2, e) * wk;
      }
    }
    if (q < p) {
      dxp[(b * p + q) * c.E + e] = static_cast<T>(acc);
    } else {
      dxs[(b * s + q - p) * c.E + e] = static_cast<T>(acc);
    }
  }
}

constexpr int kWCh = 32;    // channels per block (one warp along x)
constexpr int kWRows = 8;   // token rows per block

// det: dw / db are per-batch partials (b, E, K) / (b, E), stored without
// atomics (summed over b in a fixed order afterwards); else (E, K) / (E)
// zeroed accumulators.
template <typename T, typename Acc, int KMAX>
__global__ void __launch_bounds__(kWCh * kWRows) conv_bwd_dw_kernel(const ConvIn<T> c, const V3<const T> dy,
                                                                    Acc* __restrict__ dw, Acc* __restrict__ db,
                                                                    bool det) {
  __shared__ Acc red[kWRows][kWCh];
  const int64_t e = int64_t(blockIdx.x) * kWCh + threadIdx.x;
  const int64_t b = blockIdx.y;
  const bool valid = e < c.E;
  const int64_t Lout = c.p + 2 * c.s;
  Acc aw[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) aw[k] = Acc(0);
  Acc ab = Acc(0);
  if (valid) {
    for (int64_t o = threadIdx.y; o < Lout; o += kWRows) {
      Acc xv[KMAX];
      Acc pre = c.bias ? static_cast<Acc>(c.bias[e * c.bs]) : Acc(0);
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        xv[k] = Acc(0);
        if (k < c.K) {
          const int64_t q = c.src(o, k);
          if (q >= 0) xv[k] = static_cast<Acc>(c.x(b, e, q));
          pre += static_cast<Acc>(c.wt(e, k)) * xv[k];
        }
      }
      const Acc a = static_cast<Acc>(dy(b, e, o)) * vsilu_grad(pre);
      ab += a;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) aw[k] += a * xv[k];
    }
  }
  // Reduce the token rows in shared memory; one atomic (or, det, one store)
  // per (e, k) per block.
#pragma unroll
  for (int k = 0; k <= KMAX; ++k) {
    if (k < KMAX && k >= c.K) continue;  // block-uniform
    red[threadIdx.y][threadIdx.x] = k < KMAX ? aw[k] : ab;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
      Acc sum = Acc(0);
#pragma unroll
      for (int r = 0; r < kWRows; ++r) sum += red[r][threadIdx.x];
      if (det) {
        if (k < KMAX) {
          dw[(b * c.E + e) * c.K + k] = sum;
        } else if (db != nullptr) {
          db[b * c.E + e] = sum;
        }
      } else if (k < KMAX) {
        atomicAdd(&dw[e * c.K + k], sum);
      } else if (db != nullptr) {
        atomicAdd(&db[e], sum);
      }
    }
    __syncthreads();
  }
}

template <typename T>
ConvIn<T> conv_in(const at::Tensor& xp, const at::Tensor& xs, const at::Tensor& w,
                  const c10::optional<at::Tensor>& bias, const ConvShape& sh) {
  ConvIn<T> c;
  c.xp = view3<const T>(xp, 0, 2, 1);
  c.xs = view3<const T>(xs, 0, 2, 1);
  c.w = w.data_ptr<T>();
  c.ws0 = w.stride(0);
  c.ws1 = w.stride(1);
  c.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  c.bs = bias.has_value() ? bias->stride(0) : 0;
  c.batch = sh.batch;
  c.p = sh.p;
  c.s = sh.s;
  c.E = sh.E;
  c.K = sh.K;
  return c;
}

// Grid of a grid-stride elementwise kernel: enough blocks to fill the GPU.
dim3 elementwise_grid(int64_t total, int threads) {
  const int64_t want = (total + threads - 1) / threads;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = int64_t(sms) * 32;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap))));
}

void check_conv_cuda(const at::Tensor& xp, const at::Tensor& xs, const at::Tensor& w,
                     const c10::optional<at::Tensor>& bias, const at::Tensor* dy, const ConvShape& sh) {
  check_cuda_device({{"x_prefix", &xp}, {"x_suffix", &xs}, {"weight", &w}, {"bias", opt_ptr(bias)}, {"dy", dy}});
  TORCH_CHECK_VALUE(sh.K <= 64, "the CUDA fork_conv1d supports d_conv <= 64, got ", sh.K);
  TORCH_CHECK_VALUE(sh.batch <= 65535, "the CUDA fork_conv1d supports batch <= 65535, got ", sh.batch);
}

at::Tensor fork_conv1d_cuda(const at::Tensor& x_prefix, const at::Tensor& x_suffix, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  const ConvShape sh = check_fork_conv1d(x_prefix, x_suffix, weight, bias);
  check_conv_cuda(x_prefix, x_suffix, weight, bias, nullptr, sh);
  const c10::cuda::CUDAGuard guard(x_prefix.device());
  const int64_t Lout = sh.p + 2 * sh.s;
  at::Tensor y = at::empty({sh.batch, Lout, sh.E}, x_prefix.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto c = conv_in<T>(x_prefix, x_suffix, weight, bias, sh);
    conv_fwd_kernel<T, Acc><<<elementwise_grid(sh.batch * Lout * sh.E, 256), 256, 0,
                              current_stream()>>>(c, y.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Returns (dx_prefix, dx_suffix, dweight, dbias); dbias is empty without bias.
std::vector<at::Tensor> fork_conv1d_backward_cuda(const at::Tensor& dy, const at::Tensor& x_prefix,
                                                  const at::Tensor& x_suffix, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias) {
  const ConvShape sh = check_fork_conv1d(x_prefix, x_suffix, weight, bias);
  const int64_t Lout = sh.p + 2 * sh.s, Lin = sh.p + sh.s;
  check_act("dy", dy, {sh.batch, Lout, sh.E}, x_prefix);
  check_conv_cuda(x_prefix, x_suffix, weight, bias, &dy, sh);
  const c10::cuda::CUDAGuard guard(x_prefix.device());
  const auto acc = acc_dtype(x_prefix.scalar_type());
  at::Tensor dxp = at::empty({sh.batch, sh.p, sh.E}, x_prefix.options());
  at::Tensor dxs = at::empty({sh.batch, sh.s, sh.E}, x_prefix.options());
  // torch.use_deterministic_algorithms(True): per-batch partials summed by
  // at::sum (fixed order) instead of atomics into one accumulator.
  const bool det = at::globalContext().deterministicAlgorithms();
  const auto acc_opts = x_prefix.options().dtype(acc);
  at::Tensor dw_acc = det ? at::empty({sh.batch, sh.E, sh.K}, acc_opts) : at::zeros({sh.E, sh.K}, acc_opts);
  at::Tensor db_acc = bias.has_value() ? (det ? at::empty({sh.batch, sh.E}, acc_opts) : at::zeros({sh.E}, acc_opts))
                                       : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_bwd_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto c = conv_in<T>(x_prefix, x_suffix, weight, bias, sh);
    const auto dyv = view3<const T>(dy, 0, 2, 1);
    const auto stream = current_stream();
    conv_bwd_dx_kernel<T, Acc><<<elementwise_grid(sh.batch * Lin * sh.E, 256), 256, 0, stream>>>(
        c, dyv, dxp.data_ptr<T>(), dxs.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid((sh.E + kWCh - 1) / kWCh, sh.batch);
    const dim3 block(kWCh, kWRows);
    Acc* dbp = bias.has_value() ? db_acc.data_ptr<Acc>() : nullptr;
    if (sh.K <= 4) {
      conv_bwd_dw_kernel<T, Acc, 4><<<grid, block, 0, stream>>>(c, dyv, dw_acc.data_ptr<Acc>(), dbp, det);
    } else if (sh.K <= 16) {
      conv_bwd_dw_kernel<T, Acc, 16><<<grid, block, 0, stream>>>(c, dyv, dw_acc.data_ptr<Acc>(), dbp, det);
    } else {
      conv_bwd_dw_kernel<T, Acc, 64><<<grid, block, 0, stream>>>(c, dyv, dw_acc.data_ptr<Acc>(), dbp, det);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (det) {
    dw_acc = dw_acc.sum(0);
    if (bias.has_value()) db_acc = db_acc.sum(0);
  }
  return {dxp, dxs, dw_acc.to(x_prefix.scalar_type()), db_acc.to(x_prefix.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CUDA, m) {
  m.impl("fork_conv1d", &fork_conv1d_cuda);
  m.impl("fork_conv1d_backward", &fork_conv1d_backward_cuda);
}

}  // namespace cuda
}  // namespace vlssm
