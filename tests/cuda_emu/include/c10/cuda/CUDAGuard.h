// Emulation stand-in (tests/cuda_emu): one device, nothing to guard.
#pragma once
#include <c10/core/Device.h>

#include "../../cuda_emu.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
