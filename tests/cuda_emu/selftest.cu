// Kernels that exercise the CUDA emulation itself (cuda_emu.h): each op
// checks one emulated behaviour, so tests/cuda_emu can show the emulator
// computes shuffles, atomics and shared memory as a GPU does and reports
// deadlocks and misuse instead of hanging. Built only into the emulation
// library, through the same rewrite as csrc/cuda (so written in CUDA syntax).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

namespace {

// Butterfly sum over each warp: every lane ends with sum(0..31) + 32 * 32 * warp.
__global__ void shfl_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

at::Tensor shfl_sum(int64_t blocks, int64_t threads) {
  at::Tensor out = at::empty({blocks * threads}, at::kFloat);
  shfl_sum_kernel<<<dim3(blocks), dim3(threads), 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      out.data_ptr<float>());
  return out;
}

__global__ void atomic_kernel(double* acc, float* accf, int reps) {
  for (int i = 0; i < reps; ++i) {
    atomicAdd(acc, 1.0);
    atomicAdd(accf, 1.0f);
  }
}

// (double total, float total) of blocks * threads * reps concurrent atomicAdd(1).
std::tuple<double, double> atomic_count(int64_t blocks, int64_t threads, int64_t reps) {
  double acc = 0;
  float accf = 0;
  atomic_kernel<<<dim3(blocks), dim3(threads)>>>(&acc, &accf, static_cast<int>(reps));
  return {acc, accf};
}

// Static shared memory: out[block, 0, t] = buf[t] before any write (poison),
// out[block, 1, t] = the value thread (t + 1) % n wrote after a barrier.
__global__ void smem_kernel(float* out, int n) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  out[(blockIdx.x * 2 + 0) * n + t] = buf[t];
  __syncthreads();
  buf[t] = static_cast<float>(blockIdx.x * 1000 + t);
  __syncthreads();
  out[(blockIdx.x * 2 + 1) * n + t] = buf[(t + 1) % n];
}

at::Tensor smem_exchange(int64_t blocks, int64_t threads) {
  TORCH_CHECK(threads <= 256);
  at::Tensor out = at::empty({blocks, 2, threads}, at::kFloat);
  smem_kernel<<<dim3(blocks), dim3(threads)>>>(out.data_ptr<float>(), static_cast<int>(threads));
  return out;
}

template <int Tag>  // one kernel per test: the raised limit is a kernel attribute and persists
__global__ void dyn_smem_kernel(int* out, int bytes) {
  extern __shared__ __align__(16) unsigned char raw[];
  if (threadIdx.x == 0) {
    raw[bytes - 1] = 7;
    *out = raw[bytes - 1];
  }
}

// A launch with `bytes` of dynamic shared memory, after raising the kernel's
// limit to `limit` (0: a kernel left at the 48 KB default).
int64_t dyn_smem(int64_t bytes, int64_t limit) {
  int out = 0;
  if (limit > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(dyn_smem_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(limit)));
    dyn_smem_kernel<1><<<1, 32, bytes>>>(&out, static_cast<int>(bytes));
  } else {
    dyn_smem_kernel<0><<<1, 32, bytes>>>(&out, static_cast<int>(bytes));
  }
  return out;
}

// Lane 0 waits at __syncthreads while lanes 1..31 of its warp wait for it in
// a shuffle: a deadlock on a GPU; the emulation must raise.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

void deadlock() { deadlock_kernel<<<1, 32>>>(); }

// Lane 5 returns before a full-mask shuffle of its warp: undefined on a GPU.
__global__ void shfl_after_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

void shfl_after_exit() {
  float out[32];
  shfl_after_exit_kernel<<<1, 32>>>(out);
}

// Not an emulator check: test plumbing that sees the C++ warnings (TORCH_WARN,
// alertNotDeterministic under warn_only) that torch leaves in C++. torch <= 2.14
// installs no Python warning handler around a torch.ops.* call, so a warning
// raised inside one goes to c10's global handler (printed to stderr) instead of
// becoming a Python warning as it does from 2.15 on (and through autograd's
// backward on every version). While capturing, the global handler collects them.
class Collector : public c10::WarningHandler {
 public:
  void process(const c10::Warning& w) override {
    std::lock_guard<std::mutex> lk(m_);
    msgs_.push_back(w.msg());
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lk(m_);
    return std::move(msgs_);
  }

 private:
  std::mutex m_;
  std::vector<std::string> msgs_;
};

Collector g_collector;

// on: make the collector this thread's warning handler; off: back to c10's
// default handler, returning what was collected since (in order). Call both
// from the thread that raises the warnings (handlers are thread-local). From
// 2.15 on torch's own Python handler wraps every torch.ops call (this one too)
// and restores its predecessor afterwards, so nothing reaches the collector
// there: those warnings arrive as Python warnings instead.
std::vector<std::string> capture_cpp_warnings(bool on) {
  if (on) {
    g_collector.take();
    c10::WarningUtils::set_warning_handler(&g_collector);
    return {};
  }
  c10::WarningUtils::set_warning_handler(nullptr);  // nullptr: the default handler
  return g_collector.take();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlssm_cuda_emu_selftest, m) {
  m.def("shfl_sum", &shfl_sum);
  m.def("atomic_count", &atomic_count);
  m.def("smem_exchange", &smem_exchange);
  m.def("dyn_smem", &dyn_smem);
  m.def("deadlock", &deadlock);
  m.def("shfl_after_exit", &shfl_after_exit);
  m.def("capture_cpp_warnings", &capture_cpp_warnings);
}
