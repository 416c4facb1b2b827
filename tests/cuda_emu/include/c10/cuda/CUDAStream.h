// Emulation stand-in (tests/cuda_emu): launches are synchronous, one stream.
#pragma once
#include "../../cuda_emu.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int8_t = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
