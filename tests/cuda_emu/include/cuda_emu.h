// A CPU emulation of the slice of the CUDA execution model that vlssm's
// kernels use, so csrc/cuda/*.cu can run (slowly) on a machine without a GPU.
//
// Every CUDA thread of a block is an OS thread; the blocks of a grid run one
// after another. Emulated: threadIdx / blockIdx / blockDim / gridDim,
// __syncthreads (a barrier of the block's live threads), full-mask
// __shfl_xor_sync (a barrier of the warp's 32 lanes around an exchange),
// atomicAdd (compare-and-swap), dynamic and static __shared__ memory (fresh
// per block, filled with 0xff bytes: NaN for float / double, so a read of a
// slot no thread wrote poisons the result), the 48 KB dynamic shared-memory
// limit unless cudaFuncSetAttribute raised it, and at most 1024 threads per
// block. A barrier that not every live thread reaches (divergent
// __syncthreads, a shuffle with exited lanes) raises an error naming it
// instead of hanging. Threads really run concurrently, so shared-memory races
// show up as wrong results (not deterministically).
//
// vlssm/testing/cuda_emu.py rewrites the kernel launch syntax (k<<<g, b, s, st>>>)
// and the __shared__ declarations into calls of this header; the fake
// c10/cuda headers next to it stand in for the CUDA runtime.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// CUDA's integer min / max overloads, for device code that calls them unqualified.
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

namespace emu {

// Seconds a barrier waits for the rest of its threads before it calls the
// launch a deadlock.
inline double barrier_timeout_s() {
  const char* s = std::getenv("VLSSM_EMU_BARRIER_TIMEOUT");
  return s ? std::atof(s) : 60.0;
}

struct Broken {};  // thrown in the other threads once one thread failed

class Barrier {
 public:
  explicit Barrier(int n) : live_(n) {}
  // Wait until every live thread arrived. `what` names the barrier in errors.
  // all: every thread must still be live (a full-mask shuffle).
  void wait(const char* what, bool all = false) {
    std::unique_lock<std::mutex> lk(m_);
    if (broken_) throw Broken{};
    if (all && exited_ > 0) {
      throw std::runtime_error(std::string(what) + " with mask 0xffffffff after lanes of the warp exited");
    }
    const uint64_t gen = gen_.load();
    if (++arrived_ == live_) {
      release();
      return;
    }
    lk.unlock();
    for (int i = 0; i < kSpins; ++i) {  // most rounds complete within a few yields
      if (gen_.load() != gen) return;
      std::this_thread::yield();
    }
    lk.lock();
    const auto timeout = std::chrono::duration<double>(barrier_timeout_s());
    ++sleepers_;
    const bool done = cv_.wait_for(lk, timeout, [&] { return gen_.load() != gen || broken_; });
    --sleepers_;
    if (!done) {
      broken_ = true;
      cv_.notify_all();
      throw std::runtime_error(std::string(what) + ": not every thread arrived within " +
                               std::to_string(barrier_timeout_s()) + " s (divergent barrier or deadlock); " +
                               std::to_string(arrived_) + " of " + std::to_string(live_) + " live threads waited");
    }
    if (gen_.load() == gen && broken_) throw Broken{};
  }
  // A thread exited: later barriers wait for one thread fewer (as on sm_70+).
  // Returns whether threads were waiting at the barrier then.
  bool drop() {
    std::lock_guard<std::mutex> lk(m_);
    --live_;
    ++exited_;
    const bool waited = arrived_ > 0;
    if (waited && arrived_ == live_) release();
    return waited;
  }
  void breakdown() {
    std::lock_guard<std::mutex> lk(m_);
    broken_ = true;
    cv_.notify_all();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    if (sleepers_ > 0) cv_.notify_all();
  }
  static constexpr int kSpins = 128;
  std::mutex m_;
  std::condition_variable cv_;
  int live_, arrived_ = 0, exited_ = 0, sleepers_ = 0;
  std::atomic<uint64_t> gen_{0};
  bool broken_ = false;
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes), lanes(lanes) {}
  Barrier bar;
  int lanes;
  // Two exchange buffers used alternately: a lane can be at most one shuffle
  // ahead of the slowest (the barrier holds it), so one barrier per shuffle.
  uint64_t slot[2][32] = {};
  int parity[32] = {};
};

struct Block {
  Block(int nthreads, size_t dyn_bytes) : bar(nthreads), dyn(dyn_bytes, 0xff) {
    for (int w = 0; w * 32 < nthreads; ++w) warps.emplace_back(new Warp(std::min(32, nthreads - w * 32)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dyn;
  std::mutex statics_m;
  std::vector<std::unique_ptr<unsigned char[]>> statics;
};

inline thread_local dim3 tl_threadIdx, tl_blockIdx;
inline thread_local Block* tl_block = nullptr;
inline thread_local size_t tl_static_index = 0;
inline dim3 g_blockDim, g_gridDim;

inline int linear_tid() {
  return static_cast<int>(tl_threadIdx.x + g_blockDim.x * (tl_threadIdx.y + g_blockDim.y * tl_threadIdx.z));
}

inline unsigned char* dynamic_smem() { return tl_block->dyn.empty() ? nullptr : tl_block->dyn.data(); }

// The k-th static __shared__ declaration a thread executes is the k-th array
// of the block (every thread declares them in the same order).
template <typename A>
A& static_smem() {
  Block* b = tl_block;
  const size_t i = tl_static_index++;
  std::lock_guard<std::mutex> lk(b->statics_m);
  if (i == b->statics.size()) {
    b->statics.emplace_back(new unsigned char[sizeof(A)]);
    std::memset(b->statics.back().get(), 0xff, sizeof(A));
  }
  return *reinterpret_cast<A*>(b->statics[i].get());
}

// Dynamic shared memory a kernel may use: 48 KB unless raised.
inline std::mutex g_attr_m;
inline std::map<const void*, int> g_max_dyn_smem;

inline int sm_count() {
  const char* s = std::getenv("VLSSM_EMU_SMS");
  return s ? std::atoi(s) : 1;
}

// A launch the hardware would refuse. On a GPU that is a CUDA error, which
// torch raises as RuntimeError; std::runtime_error is RuntimeError on every
// torch version (std::invalid_argument became ValueError on some versions and
// RuntimeError on others, depending on which layer translated it).
[[noreturn]] inline void refuse(const std::string& what) { throw std::runtime_error(what); }

template <typename K, typename... Args>
void run_grid(K kernel, dim3 grid, dim3 block, size_t smem, const Args&... args) {
  const long nthreads = long(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64)
    ::emu::refuse("launch: invalid block (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
                                ", " + std::to_string(block.z) + ")");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    ::emu::refuse("launch: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                                ", " + std::to_string(grid.z) + ")");
  {
    std::lock_guard<std::mutex> lk(g_attr_m);
    const auto it = g_max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
    const size_t cap = it == g_max_dyn_smem.end() ? 48 * 1024 : size_t(it->second);
    if (smem > cap)
      ::emu::refuse("launch: " + std::to_string(smem) +
                                  " B of dynamic shared memory, the kernel allows " +
                                  std::to_string(cap) + " B (cudaFuncSetAttribute)");
    if (smem > 227 * 1024) ::emu::refuse("launch: dynamic shared memory over 227 KB");
  }
  const long nblocks = long(grid.x) * grid.y * grid.z;
  if (nblocks > 4096) ::emu::refuse("launch: over 4096 blocks, too many to emulate");
  g_gridDim = grid;
  g_blockDim = block;
  // One OS thread per thread of a block, walking the blocks in order; each
  // block has its own barriers and shared memory, so a thread may start the
  // next block while others finish this one.
  std::vector<std::unique_ptr<Block>> blocks;
  for (long i = 0; i < nblocks; ++i) blocks.emplace_back(new Block(static_cast<int>(nthreads), smem));
  std::mutex err_m;
  std::string err;
  std::atomic<bool> failed{false};
  const auto fail = [&](long bi, const std::string& what) {
    std::lock_guard<std::mutex> lk(err_m);
    if (err.empty()) {
      err = "emulated kernel, block (" + std::to_string(bi % grid.x) + ", " + std::to_string((bi / grid.x) % grid.y) +
            ", " + std::to_string(bi / (long(grid.x) * grid.y)) + "): " + what;
    }
    failed = true;
    for (auto& b : blocks) {
      b->bar.breakdown();
      for (auto& w : b->warps) w->bar.breakdown();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (long t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      tl_threadIdx = dim3(unsigned(t % block.x), unsigned((t / block.x) % block.y),
                          unsigned(t / (long(block.x) * block.y)));
      for (long bi = 0; bi < nblocks && !failed; ++bi) {
        Block& blk = *blocks[bi];
        tl_blockIdx = dim3(unsigned(bi % grid.x), unsigned((bi / grid.x) % grid.y),
                           unsigned(bi / (long(grid.x) * grid.y)));
        tl_block = &blk;
        tl_static_index = 0;
        bool returned = false;
        try {
          kernel(args...);
          returned = true;
        } catch (const Broken&) {
        } catch (const std::exception& e) {
          fail(bi, e.what());
        }
        // The warp barrier serves only shuffles: lanes waiting there wait for this lane.
        // A lane leaving through an error (its own, or a barrier broken by
        // another's) is not the fault to report: the error that broke it is.
        if (blk.warps[t / 32]->bar.drop() && returned)
          fail(bi, "thread " + std::to_string(t) + " exited while lanes of its warp wait in a full-mask "
                   "__shfl_xor_sync");
        blk.bar.drop();
        tl_block = nullptr;
      }
    });
  }
  for (auto& th : threads) th.join();
  if (!err.empty()) throw std::runtime_error(err);
}

// k<<<grid, block, smem, stream>>>(args...) is rewritten to
// emu::launch(k, grid, block, smem, stream)(args...): synchronous.
template <typename K>
auto launch(K kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  // Arguments by value, as CUDA passes kernel arguments (arrays decay to pointers).
  return [=](auto... args) { run_grid(kernel, grid, block, smem, args...); };
}

}  // namespace emu

#define threadIdx (::emu::tl_threadIdx)
#define blockIdx (::emu::tl_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

inline void __syncthreads() { ::emu::tl_block->bar.wait("__syncthreads"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a register-sized value");
  const int tid = ::emu::linear_tid();
  ::emu::Warp& w = *::emu::tl_block->warps[tid / 32];
  if (mask != 0xffffffffu || w.lanes != 32 || width != 32)
    throw std::runtime_error("__shfl_xor_sync: the emulation supports full warps with mask 0xffffffff only");
  if (lane_mask < 0 || lane_mask > 31) throw std::runtime_error("__shfl_xor_sync: lane mask out of range");
  const int lane = tid % 32;
  const int par = w.parity[lane];
  w.parity[lane] ^= 1;
  std::memcpy(&w.slot[par][lane], &v, sizeof(T));
  w.bar.wait("__shfl_xor_sync", true);  // a lane that exits later finds this one waiting: also an error
  T r;
  std::memcpy(&r, &w.slot[par][lane ^ lane_mask], sizeof(T));
  return r;
}

template <typename T>
T atomicAdd(T* address, T val) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomicAdd of a 4- or 8-byte value");
  using I = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  I* p = reinterpret_cast<I*>(address);
  I old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  for (;;) {
    T o;
    std::memcpy(&o, &old, sizeof(T));
    const T n = o + val;
    I ni;
    std::memcpy(&ni, &n, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old, ni, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return o;
  }
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The SM count is VLSSM_EMU_SMS (default 1): grid-stride kernels then loop.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) throw std::runtime_error("cudaDeviceGetAttribute: not emulated");
  *value = ::emu::sm_count();
  return cudaSuccess;
}

template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    throw std::runtime_error("cudaFuncSetAttribute: not emulated");
  }
  if (value > 227 * 1024) ::emu::refuse("cudaFuncSetAttribute: over 227 KB of shared memory");
  std::lock_guard<std::mutex> lk(::emu::g_attr_m);
  ::emu::g_max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
