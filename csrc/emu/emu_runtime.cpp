// The runtime of the emulated CUDA backend (see cuda_emu.h): grids run block by block,
// the threads of a block as fibers that switch at barriers and warp operations.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cbn_ext {
namespace emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xFF;  // NaN for float and double data
// the guards around dynamic shared memory: 0xFFF5A5A5 words, a NaN as float and as double
// (so that a stray read shows), and unlike the poison (so that a stray write shows)
constexpr unsigned char kGuard[4] = {0xA5, 0xA5, 0xF5, 0xFF};
constexpr unsigned kFullMask = 0xffffffffu;

enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  ThreadCoords coords;
  int linear = 0, warp = 0, lane = 0;
  State state = State::kReady;
  unsigned warp_ops = 0;         // warp operations completed
  const char* warp_what = "";    // the pending warp operation
  unsigned mask = kFullMask;
  uint64_t bits_in = 0, bits_out = 0;
  int src = 0;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
};

struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0;
};

// Everything about the launch being run (one at a time: g_mutex).
struct Run {
  std::string name;  // the kernel and where it is launched
  Body body = nullptr;
  const void* closure = nullptr;
  dim3 grid, block;
  size_t smem = 0;
  unsigned char* smem_base = nullptr;  // start of the dynamic shared memory
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  std::string error;
  uint64_t rng = 0;
};

std::mutex g_mutex;
Run* g_run = nullptr;
uint64_t g_seed = 0x9E3779B97F4A7C15ull;
Stats g_stats;
std::map<std::string, uint64_t> g_launched;  // launches per kernel name (launched())
std::unordered_map<const void*, size_t> g_max_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
std::vector<std::pair<void*, size_t>> g_shared;      // static shared variables

// One stack per thread of the largest block, allocated once, each below a guard page (an
// overflow faults instead of corrupting the next stack).
struct Stacks {
  unsigned char* mem = nullptr;
  size_t count = 0, page = 0;
  size_t stride() const { return kStackBytes + page; }
  unsigned char* top(size_t i) { return mem + (i + 1) * stride(); }
  void ensure(size_t n) {
    if (n <= count) return;
    if (page == 0) page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (mem != nullptr) munmap(mem, count * stride());
    void* m = mmap(nullptr, n * stride(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "emulated CUDA: cannot map ", n, " fiber stacks");
    mem = static_cast<unsigned char*>(m);
    for (size_t i = 0; i < n; ++i) mprotect(mem + i * stride(), page, PROT_NONE);
    count = n;
  }
};
Stacks g_stacks;

uint64_t next_random(uint64_t& s) {
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1Dull;
}

// The kernel's name from a launch as written: "foo_kernel<T, KB>, grid, ..." -> "foo_kernel".
std::string kernel_name(const char* what) {
  std::string name;
  for (const char* p = what; *p != 0 && *p != '<' && *p != '(' && *p != ','; ++p)
    if (*p != ' ') name += *p;
  const size_t colon = name.rfind("::");
  return colon == std::string::npos ? name : name.substr(colon + 2);
}

// "name (file:line)" from a launch as written: its text up to the first top-level comma.
std::string launch_name(const char* what, const char* file, int line) {
  std::string name;
  int depth = 0;
  for (const char* p = what; *p != 0; ++p) {
    if (*p == '<' || *p == '(') ++depth;
    if (*p == '>' || *p == ')') --depth;
    if (*p == ',' && depth == 0) break;
    name += *p;
  }
  std::string f = file;
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return name + " (" + f + ":" + std::to_string(line) + ")";
}

}  // namespace
}  // namespace emu
}  // namespace cbn_ext

// ---------------------------------------------------------------------------------------
// Context switches
// ---------------------------------------------------------------------------------------

using cbn_ext::emu::Fiber;

extern "C" void cbn_emu_fiber_entry(Fiber* f);

#if defined(__x86_64__)
// cbn_emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *save and resumes the stack `to`
// (System V ABI: everything else is caller-saved).
extern "C" void cbn_emu_switch(void** save, void* to);
extern "C" void cbn_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl cbn_emu_switch
  .hidden cbn_emu_switch
  .type cbn_emu_switch, @function
cbn_emu_switch:
  .cfi_startproc
  pushq %rbp
  .cfi_adjust_cfa_offset 8
  pushq %rbx
  .cfi_adjust_cfa_offset 8
  pushq %r12
  .cfi_adjust_cfa_offset 8
  pushq %r13
  .cfi_adjust_cfa_offset 8
  pushq %r14
  .cfi_adjust_cfa_offset 8
  pushq %r15
  .cfi_adjust_cfa_offset 8
  subq $8, %rsp
  .cfi_adjust_cfa_offset 8
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  .cfi_adjust_cfa_offset -8
  popq %r15
  .cfi_adjust_cfa_offset -8
  popq %r14
  .cfi_adjust_cfa_offset -8
  popq %r13
  .cfi_adjust_cfa_offset -8
  popq %r12
  .cfi_adjust_cfa_offset -8
  popq %rbx
  .cfi_adjust_cfa_offset -8
  popq %rbp
  .cfi_adjust_cfa_offset -8
  ret
  .cfi_endproc
  .size cbn_emu_switch, .-cbn_emu_switch

  .p2align 4
  .globl cbn_emu_trampoline
  .hidden cbn_emu_trampoline
  .type cbn_emu_trampoline, @function
cbn_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  call cbn_emu_fiber_entry@PLT
  ud2
  .cfi_endproc
  .size cbn_emu_trampoline, .-cbn_emu_trampoline
)");
#endif

namespace cbn_ext {
namespace emu {
namespace {

void prepare_fiber(Fiber& f, unsigned char* top) {
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  sp -= 8;  // control words, r15, r14, r13, r12, rbx, rbp, return address
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  mxcsr &= ~((1u << 15) | (1u << 6));  // no flush-to-zero, no denormals-are-zero: as CUDA
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = sp[2] = sp[3] = 0;
  sp[4] = reinterpret_cast<uint64_t>(&f);  // r12: the trampoline's argument
  sp[5] = sp[6] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&cbn_emu_trampoline);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = top - kStackBytes;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&cbn_emu_fiber_entry), 1, &f);
#endif
}

// From the scheduler into fiber f, until it blocks or finishes.
void resume(Run& r, Fiber& f) {
  r.current = &f;
  ++g_stats.switches;
#if defined(__x86_64__)
  cbn_emu_switch(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched_ctx, &f.ctx);
#endif
  r.current = nullptr;
}

// From the running fiber back to the scheduler.
void yield(Run& r, Fiber& f) {
#if defined(__x86_64__)
  cbn_emu_switch(&f.sp, r.sched_sp);
#else
  swapcontext(&f.ctx, &r.sched_ctx);
#endif
}

Fiber& running() {
  TORCH_CHECK(g_run != nullptr && g_run->current != nullptr,
              "emulated CUDA: a device function was called outside a kernel launch");
  return *g_run->current;
}

// Ids in a varied order: identity, reversed, or shuffled (seed 0: always identity).
void vary(std::vector<Fiber*>& v, uint64_t& rng) {
  if (g_seed == 0 || v.size() < 2) return;
  const uint64_t mode = next_random(rng) % 4;
  if (mode == 0) return;
  if (mode == 1) {
    std::reverse(v.begin(), v.end());
    return;
  }
  for (size_t i = v.size() - 1; i > 0; --i) std::swap(v[i], v[next_random(rng) % (i + 1)]);
}

std::string where(const Fiber& f) {
  std::ostringstream o;
  o << "thread (" << f.coords.thread_idx.x << ", " << f.coords.thread_idx.y << ", "
    << f.coords.thread_idx.z << ")";
  return o.str();
}

void fill_guard(unsigned char* p) {
  for (size_t i = 0; i < kGuardBytes; ++i) p[i] = kGuard[i % 4];
}

void check_guards(Run& r) {
  if (r.smem_base == nullptr) return;
  const unsigned char* lo = r.smem_base - kGuardBytes;
  const unsigned char* hi = r.smem_base + r.smem;
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (lo[i] != kGuard[i % 4] || hi[i] != kGuard[i % 4]) {
      std::ostringstream o;
      o << "dynamic shared memory written out of bounds ("
        << (lo[i] != kGuard[i % 4] ? "before" : "after") << " its " << r.smem << " bytes)";
      if (r.error.empty()) r.error = o.str();
      return;
    }
  }
}

void run_block(Run& r, dim3 bidx) {
  const unsigned nthreads = r.block.x * r.block.y * r.block.z;
  // fresh, poisoned shared memory
  for (const auto& v : g_shared) std::memset(v.first, kPoison, v.second);
  if (r.smem_base != nullptr) std::memset(r.smem_base, kPoison, r.smem);
  r.fibers.assign(nthreads, Fiber{});
  std::vector<Fiber*> ready;
  ready.reserve(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = static_cast<int>(i);
    f.warp = static_cast<int>(i / 32);
    f.lane = static_cast<int>(i % 32);
    f.coords.thread_idx = dim3(i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y));
    f.coords.block_idx = bidx;
    f.coords.block_dim = r.block;
    f.coords.grid_dim = r.grid;
    prepare_fiber(f, g_stacks.top(i));
    ready.push_back(&f);
  }
  vary(ready, r.rng);
  const unsigned nwarps = (nthreads + 31) / 32;
  std::vector<Fiber*> released;
  while (r.error.empty()) {
    for (size_t i = 0; i < ready.size() && r.error.empty(); ++i) resume(r, *ready[i]);
    ready.clear();
    if (!r.error.empty()) break;
    unsigned live = 0, at_barrier = 0, at_warp = 0;
    for (const Fiber& f : r.fibers) {
      live += f.state != State::kDone;
      at_barrier += f.state == State::kBarrier;
      at_warp += f.state == State::kWarp;
    }
    if (live == 0) break;
    // warps whose lanes all wait at the same warp operation: released together, in one
    // varied order across the warps
    released.clear();
    for (unsigned w = 0; w < nwarps && at_warp > 0; ++w) {
      const unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
      bool all = true;
      for (unsigned i = lo; i < hi; ++i) all = all && r.fibers[i].state == State::kWarp;
      if (!all) continue;
      const Fiber& first = r.fibers[lo];
      for (unsigned i = lo; i < hi; ++i) {
        const Fiber& f = r.fibers[i];
        if (f.warp_ops != first.warp_ops || std::strcmp(f.warp_what, first.warp_what) != 0) {
          r.error = "lanes of warp " + std::to_string(w) + " met at different warp operations (" +
                    first.warp_what + " and " + f.warp_what + "): divergent warp code";
          break;
        }
      }
      if (!r.error.empty()) break;
      if (hi - lo != 32) {
        r.error = std::string(first.warp_what) + " with the full mask in a warp of " +
                  std::to_string(hi - lo) + " threads (the block size is not a multiple of 32)";
        break;
      }
      for (unsigned i = lo; i < hi; ++i) {
        Fiber& f = r.fibers[i];
        f.bits_out = r.fibers[lo + static_cast<unsigned>(f.src)].bits_in;
        f.warp_ops += 1;
        f.state = State::kReady;
        released.push_back(&f);
      }
    }
    if (!r.error.empty()) break;
    vary(released, r.rng);
    ready.insert(ready.end(), released.begin(), released.end());
    if (!ready.empty()) continue;
    if (at_barrier == live) {
      if (live != nthreads) {
        r.error = "__syncthreads reached by " + std::to_string(live) + " of " +
                  std::to_string(nthreads) + " threads (the others exited): divergent barrier";
        break;
      }
      for (Fiber& f : r.fibers) {
        f.state = State::kReady;
        ready.push_back(&f);
      }
      vary(ready, r.rng);
      continue;
    }
    // nothing can move on
    std::ostringstream o;
    o << "deadlock: " << at_barrier << " threads wait at __syncthreads, " << at_warp
      << " at a warp operation, " << (nthreads - live) << " exited";
    for (const Fiber& f : r.fibers) {
      if (f.state == State::kWarp) {
        o << " (e.g. " << where(f) << " at " << f.warp_what << ")";
        break;
      }
    }
    r.error = o.str();
  }
  check_guards(r);
  ++g_stats.blocks;
  if (!r.error.empty()) {
    std::ostringstream o;
    o << "emulated CUDA: " << r.name << ", block (" << bidx.x << ", " << bidx.y << ", " << bidx.z
      << "): " << r.error;
    r.error = o.str();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Device-side functions
// ---------------------------------------------------------------------------------------

static DeviceProps& mutable_device_props() {
  static DeviceProps props;
  return props;
}

const DeviceProps& device_props() { return mutable_device_props(); }

const ThreadCoords& coords() { return running().coords; }

int lane_id() { return running().lane; }

void* dynamic_smem() {
  running();
  // no dynamic shared memory in this launch: a pointer to the guard bytes, so that any
  // use is reported
  return g_run->smem_base;
}

void register_shared(void* data, size_t bytes) {
  running();  // first use: inside a launch, under g_mutex
  g_shared.emplace_back(data, bytes);
  std::memset(data, kPoison, bytes);
}

void syncthreads() {
  Fiber& f = running();
  f.state = State::kBarrier;
  yield(*g_run, f);
}

static uint64_t warp_op(Fiber& f, unsigned mask, uint64_t bits, int src, const char* what) {
  if (mask != kFullMask) {
    g_run->error = std::string(what) + " with a partial mask: not emulated";
    f.state = State::kDone;
    yield(*g_run, f);
  }
  f.state = State::kWarp;
  f.warp_what = what;
  f.bits_in = bits;
  f.src = src;
  yield(*g_run, f);
  return f.bits_out;
}

void syncwarp(unsigned mask) { warp_op(running(), mask, 0, 0, "__syncwarp"); }

uint64_t warp_exchange(unsigned mask, uint64_t mine, int src_lane, const char* what) {
  Fiber& f = running();
  return warp_op(f, mask, mine, src_lane & 31, what);
}

namespace {
struct DeviceAssert {
  std::string what;
};
}  // namespace

void device_assert_failed(const char* expr, const char* file, int line) {
  std::ostringstream o;
  o << file << ":" << line << ": device-side assertion `" << expr << "` failed";
  throw DeviceAssert{o.str()};
}

// ---------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(bytes <= device_props().sharedMemPerBlockOptin,
              "emulated CUDA: cudaFuncSetAttribute(MaxDynamicSharedMemorySize = ", bytes,
              "): above the device's ", device_props().sharedMemPerBlockOptin, " bytes");
  g_max_smem[kernel] = bytes;
}

void run_grid(const void* kernel, const char* what, const char* file, int line, dim3 grid,
              dim3 block, size_t smem, Body body, const void* closure) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string name = launch_name(what, file, line);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 &&
                  block.z <= 64,
              "emulated CUDA: launch of ", name, " with a block of (", block.x, ", ", block.y,
              ", ", block.z, ") threads: invalid configuration (at most 1024 threads, z <= 64)");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 &&
                  grid.z >= 1 && grid.z <= 65535,
              "emulated CUDA: launch of ", name, " with a grid of (", grid.x, ", ", grid.y, ", ",
              grid.z, ") blocks: invalid configuration (x < 2^31, y and z <= 65535)");
  size_t limit = device_props().sharedMemPerBlock;
  const auto it = g_max_smem.find(kernel);
  if (it != g_max_smem.end()) limit = std::max(limit, it->second);
  TORCH_CHECK(smem <= limit, "emulated CUDA: launch of ", name, " with ", smem,
              " bytes of dynamic shared memory; this kernel may use ", limit,
              (it == g_max_smem.end()
                   ? " (above 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))"
                   : ""));
  ++g_stats.launches;
  ++g_launched[kernel_name(what)];
  Run r;
  r.name = name;
  r.body = body;
  r.closure = closure;
  r.grid = grid;
  r.block = block;
  r.smem = smem;
  r.rng = g_seed ^ (g_stats.launches * 0x9E3779B97F4A7C15ull) ^ 0x5DEECE66Dull;
  if (r.rng == 0) r.rng = 1;
  std::vector<unsigned char> smem_buf;
  smem_buf.resize(smem + 2 * kGuardBytes + 16);
  unsigned char* aligned = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_buf.data()) + kGuardBytes + 15) & ~uintptr_t(15));
  fill_guard(aligned - kGuardBytes);
  fill_guard(aligned + smem);
  r.smem_base = aligned;
  g_stacks.ensure(threads);
  struct Current {  // g_run points at r while the grid runs, whatever happens
    explicit Current(Run* run) { g_run = run; }
    ~Current() { g_run = nullptr; }
  } current(&r);
  for (unsigned z = 0; z < grid.z && r.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && r.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && r.error.empty(); ++x) run_block(r, dim3(x, y, z));
  TORCH_CHECK(r.error.empty(), r.error);
}

// For the Python module (csrc/emu/operators_emu.cpp).
int set_multiprocessors(int n) {
  TORCH_CHECK(n >= 1 && n <= 1024, "emulated CUDA: multiprocessors must be in [1, 1024], got ", n);
  std::lock_guard<std::mutex> lock(g_mutex);
  const int old = mutable_device_props().multiProcessorCount;
  mutable_device_props().multiProcessorCount = n;
  return old;
}

void set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_seed = seed;
}
uint64_t get_seed() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_seed;
}
std::tuple<uint64_t, uint64_t, uint64_t> stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {g_stats.launches, g_stats.blocks, g_stats.switches};
}
std::map<std::string, uint64_t> launched() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_launched;
}
size_t shared_variables() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_shared.size();
}

}  // namespace emu
}  // namespace cbn_ext

extern "C" __attribute__((visibility("hidden"))) void cbn_emu_fiber_entry(Fiber* f) {
  using namespace cbn_ext::emu;
  Run& r = *g_run;
  try {
    r.body(r.closure);
  } catch (const DeviceAssert& e) {
    if (r.error.empty()) r.error = e.what;
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = std::string("exception in a kernel: ") + e.what();
  } catch (...) {
    if (r.error.empty()) r.error = "unknown exception in a kernel";
  }
  f->state = State::kDone;
  yield(r, *f);
  std::abort();  // a finished fiber is never resumed
}
