// Emulation stand-in (tests/cuda_emu): errors surface as C++ exceptions.
#pragma once
#include "../../cuda_emu.h"

#define C10_CUDA_CHECK(expr) \
  do {                       \
    (void)(expr);            \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
