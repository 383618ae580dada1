// The emulated CUDA backend: what the kernels in csrc/cuda/ use of CUDA, for compiling
// those very sources as host C++ (CBN_CUDA_EMULATION) and running them on the CPU.
//
// Execution model. A launch runs its blocks one after another. The threads of a block are
// fibers on one OS thread (csrc/emu/emu_runtime.cpp): each runs until it reaches a
// barrier (__syncthreads) or a warp operation (__syncwarp, the __shfl_*_sync family) and
// then switches to the next; a barrier is released when every thread of the block has
// reached it, a warp operation when the 32 lanes of the warp have. After each release the
// threads resume in a varied order (identity, reversed or shuffled, from a seed), so that a
// missing __syncthreads or a shared-memory race changes the result instead of passing
// silently. Divergent barriers (some threads exited or waiting elsewhere) and warp
// operations that not all 32 lanes reach are errors, as is a launch configuration the
// hardware would refuse (more than 1024 threads, grid limits, dynamic shared memory above
// 48 KiB without the opt-in attribute, or above the device's 227 KiB).
//
// Shared memory: static shared variables (CBN_STATIC_SMEM in the sources) register
// themselves with the runtime, which fills them with 0xFF bytes (NaN for floating-point
// data) before every block; dynamic shared memory is a buffer of exactly the launch's
// size, filled the same way, with guard bytes on both sides (a NaN pattern, so that a
// stray read shows) checked after every block (an out-of-bounds write is reported). The
// bare __shared__ qualifier is not available: it could not be poisoned.
//
// The device the host code sees is an emulated H100/H200 profile (132 multiprocessors,
// 227 KiB of opt-in shared memory per block), so tile plans are the real ones.
//
// Emulated exactly: the thread/block indices and dimensions, barrier and warp
// semantics for full warps (only the full mask 0xffffffff), shuffles of any trivially
// copyable type of at most 8 bytes (with CUDA's `width` rules), integer atomics (trivially:
// one fiber runs at a time), __threadfence (a no-op here), expf/logf/sqrtf and friends
// returning subnormals as CUDA's default build does (IEEE division and no flush-to-zero:
// each fiber starts with FTZ/DAZ cleared, whatever the caller's setting), isfinite,
// c10::Half / c10::BFloat16 conversions (the same c10 code on both sides). Not emulated:
// the last-bit rounding of CUDA's math functions (expf and logf are within 2 ulp on the
// device, glibc's within 1), nvcc's choice of fused multiply-adds, the memory model beyond
// barriers (no reordering of global or shared accesses between barriers), __launch_bounds__
// (a launch above a kernel's bound passes here), warp scheduling and timing.
#pragma once

#if !defined(CBN_CUDA_EMULATION)
#error "cuda_emu.h is for the emulated build only"
#endif

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// static shared memory goes through CBN_STATIC_SMEM, which the runtime can poison
#define __shared__ cbn_emu_use_CBN_STATIC_SMEM_not___shared__
#define CBN_EMU_STATIC_SMEM(type, name)                  \
  static ::cbn_ext::emu::SharedSlot<type> name##_slot_; \
  auto& name = name##_slot_.data
#define CBN_EMU_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::cbn_ext::emu::dynamic_smem())

namespace cbn_ext {
namespace emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The emulated device (an H100/H200 class GPU).
struct DeviceProps {
  int multiProcessorCount = 132;
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 227 * 1024;
  int maxThreadsPerBlock = 1024;
  int warpSize = 32;
};
const DeviceProps& device_props();

// The calling thread's coordinates (fiber-local).
struct ThreadCoords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadCoords& coords();

// Barriers and warp exchanges: block the calling fiber until its block / warp arrives.
void syncthreads();
void syncwarp(unsigned mask);
// Lane `src_lane`'s value of the 8 bytes each lane of the warp contributes.
uint64_t warp_exchange(unsigned mask, uint64_t mine, int src_lane, const char* what);
int lane_id();

void* dynamic_smem();

// A static shared variable: one copy, registered once, poisoned before every block.
void register_shared(void* data, size_t bytes);
template <typename T>
struct SharedSlot {
  static_assert(std::is_trivially_default_constructible<T>::value &&
                    std::is_trivially_destructible<T>::value,
                "shared memory holds trivial types");
  alignas(16) T data;
  SharedSlot() { register_shared(&data, sizeof(T)); }
};

// Fails the running launch (a device-side assert): the launch raises after the block.
[[noreturn]] void device_assert_failed(const char* expr, const char* file, int line);

// Launch machinery. `what`: the launch as written in the source (kernel name first) and
// where, for messages.
using Body = void (*)(const void* closure);
void run_grid(const void* kernel, const char* what, const char* file, int line, dim3 grid,
              dim3 block, size_t dynamic_smem_bytes, Body body, const void* closure);
void set_max_dynamic_smem(const void* kernel, size_t bytes);

template <typename Closure>
void invoke_closure(const void* c) {
  (*static_cast<const Closure*>(c))();
}

// kernel(args...) on every thread of every block of the grid.
template <typename... KArgs, typename... Args>
void launch(const char* what, const char* file, int line, void (*kernel)(KArgs...), dim3 grid,
            dim3 block, size_t smem, Args&&... args) {
  auto closure = [kernel, tup = std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)]() {
    std::apply([kernel](const auto&... a) { kernel(a...); }, tup);
  };
  using Closure = decltype(closure);
  run_grid(reinterpret_cast<const void*>(kernel), what, file, line, grid, block, smem,
           &invoke_closure<Closure>, &closure);
}

template <typename T>
T shfl(unsigned mask, T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "emulated shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, src_lane, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu
}  // namespace cbn_ext

using cbn_ext::emu::dim3;

#define threadIdx (::cbn_ext::emu::coords().thread_idx)
#define blockIdx (::cbn_ext::emu::coords().block_idx)
#define blockDim (::cbn_ext::emu::coords().block_dim)
#define gridDim (::cbn_ext::emu::coords().grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::cbn_ext::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cbn_ext::emu::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::cbn_ext::emu::lane_id();
  const int base = lane & ~(width - 1);
  return ::cbn_ext::emu::shfl(mask, v, base + (src & (width - 1)), "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cbn_ext::emu::lane_id();
  const int src = lane ^ lane_mask;
  // as on the device: a source beyond the end of the lane's segment of `width` gives the
  // lane's own value (earlier segments may be read)
  const bool inside = src <= (lane | (width - 1));
  return ::cbn_ext::emu::shfl(mask, v, inside ? src : lane, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cbn_ext::emu::lane_id();
  const int src = lane + static_cast<int>(delta);
  const bool inside = (src & ~(width - 1)) == (lane & ~(width - 1));
  return ::cbn_ext::emu::shfl(mask, v, inside ? src : lane, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cbn_ext::emu::lane_id();
  const int src = lane - static_cast<int>(delta);
  const bool inside = src >= 0 && (src & ~(width - 1)) == (lane & ~(width - 1));
  return ::cbn_ext::emu::shfl(mask, v, inside ? src : lane, "__shfl_up_sync");
}

// Integer atomics: one fiber runs at a time, so plain read-modify-writes are atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// Math with CUDA's (default, IEEE, no flush-to-zero) semantics: the C library's.
using std::isfinite;
using std::isnan;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

// 16-byte vector types of CUDA's vector_types.h.
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                   \
  do {                                                                             \
    if (!(cond)) ::cbn_ext::emu::device_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)
