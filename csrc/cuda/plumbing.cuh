// Shared plumbing of the vlssm CUDA kernels: strided views, argument checks
// (same device), launch helpers. Elementwise math lives in ../fast_math.h, generic
// checks in ../checks.h, each family's shapes in ../<family>_shapes.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <utility>

#include "../checks.h"
#include "../fast_math.h"

namespace vlssm {
namespace cuda {

// (b, x, l) view through element strides (x = channel or state, l = token).
// A stride may be 0 (batch broadcast). p == nullptr means "absent".
template <typename P>
struct V3 {
  P* p = nullptr;
  int64_t sb = 0, sx = 0, sl = 0;
  V3() = default;
  V3(P* p_, int64_t sb_, int64_t sx_, int64_t sl_) : p(p_), sb(sb_), sx(sx_), sl(sl_) {}
  __device__ __forceinline__ P& operator()(int64_t b, int64_t x, int64_t l) const {
    return p[b * sb + x * sx + l * sl];
  }
};

// View of tensor t with dims (dim_b, dim_x, dim_l) as (b, x, l).
template <typename P>
V3<P> view3(const at::Tensor& t, int dim_b, int dim_x, int dim_l) {
  return V3<P>(const_cast<P*>(t.data_ptr<std::remove_const_t<P>>()), t.stride(dim_b), t.stride(dim_x),
               t.stride(dim_l));
}

// All defined tensors on the same CUDA device as the first one.
inline void check_cuda_device(std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor* first = nullptr;
  for (const auto& nt : ts) {
    if (nt.second == nullptr || !nt.second->defined()) continue;
    TORCH_CHECK_VALUE(nt.second->is_cuda(), nt.first, " must be a CUDA tensor, got ", nt.second->device());
    if (first == nullptr) first = nt.second;
    TORCH_CHECK_VALUE(nt.second->device() == first->device(), nt.first, " must be on ", first->device(), ", got ",
                      nt.second->device());
  }
}

inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

template <typename Acc>
inline const Acc* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<Acc>() : nullptr;
}

// Set the dynamic shared memory limit of `kernel` when it needs more than the
// default 48 KB (must precede the launch; cheap, no sync).
template <typename K>
inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// The current stream of the current device (c10 only: ATen/cuda/CUDAContext.h
// would pull in cuSPARSE / cuBLAS headers, absent from some toolkits).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Device conversions to / from the storage dtype.
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}

}  // namespace cuda
}  // namespace vlssm
