// Device helpers and the tile plan shared by the CUDA kernels of cbn_ext.
//
// Determinism: every reduction is done in a fixed order (warp butterflies, each block's
// tiles merged into its row of partials in tile order, the rows merged in a fixed tree);
// there are no floating-point atomics. The order depends on the multiprocessor count
// (partial_rows), so results are bit-identical on one device model, not across models.
//
// These sources are compiled twice: by nvcc for the GPU, and (CBN_CUDA_EMULATION) as host
// C++ against csrc/emu/cuda_emu.h, whose runtime runs the kernels on the CPU for the
// tests. What the sources need of CUDA beyond device code goes through the few helpers
// below, which have both forms: CBN_LAUNCH_KERNEL (every launch), allow_smem, num_sms,
// CBN_STATIC_SMEM and CBN_DYNAMIC_SMEM (shared memory).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#if defined(CBN_CUDA_EMULATION)
#include "../emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../cbn_common.h"
#include "../cbn_math.h"

// The kernel's dynamic shared memory as `type* name`; a static shared variable `name` of
// type `type` (arrays too: CBN_STATIC_SMEM(float[8], buf)).
#if defined(CBN_CUDA_EMULATION)
#define CBN_DYNAMIC_SMEM(type, name) CBN_EMU_DYNAMIC_SMEM(type, name)
#define CBN_STATIC_SMEM(type, name) CBN_EMU_STATIC_SMEM(type, name)
#else
#define CBN_DYNAMIC_SMEM(type, name)                          \
  extern __shared__ __align__(16) unsigned char cbn_smem_[]; \
  type* name = reinterpret_cast<type*>(cbn_smem_)
#define CBN_STATIC_SMEM(type, name) __shared__ ::cbn_ext::cuda::type_identity<type> name
#endif

// Every kernel launch: CBN_LAUNCH_KERNEL(kernel, grid, block, dynamic smem, args...) is
// kernel<<<grid, block, smem, current stream>>>(args...) and the launch check; emulated,
// the grid runs on the CPU after the checks the hardware does.
#define CBN_LAUNCH_KERNEL(...) \
  ::cbn_ext::cuda::launch_kernel(#__VA_ARGS__, __FILE__, __LINE__, __VA_ARGS__)

namespace cbn_ext {
namespace cuda {

namespace math = ::cbn_ext::math;

template <typename T>
using type_identity = T;

// CBN_LAUNCH_KERNEL's function; `what`, `file`, `line`: the launch as written, for errors.
template <typename... KArgs, typename... Args>
void launch_kernel(const char* what, const char* file, int line, void (*kernel)(KArgs...),
                   dim3 grid, dim3 block, size_t smem, Args&&... args) {
#if defined(CBN_CUDA_EMULATION)
  ::cbn_ext::emu::launch(what, file, line, kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  (void)what;
  kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  c10::cuda::c10_cuda_check_implementation(static_cast<int32_t>(cudaGetLastError()), file,
                                           "CBN_LAUNCH_KERNEL", static_cast<uint32_t>(line),
                                           true);
#endif
}

// Multiprocessors of the current device.
inline int num_sms() {
#if defined(CBN_CUDA_EMULATION)
  return ::cbn_ext::emu::device_props().multiProcessorCount;
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

inline size_t max_smem_optin() {
#if defined(CBN_CUDA_EMULATION)
  return ::cbn_ext::emu::device_props().sharedMemPerBlockOptin;
#else
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
#endif
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Components held per position in registers by the fused tile kernels (dispatch_kb) when
// K <= 4: 4 in float accumulation; 2 in float64, whose values take two registers each (K = 3
// and 4 then take two passes over the blocks of components). 8 when K > 4.
template <typename acc_t>
constexpr int kSmallKB = sizeof(acc_t) == 4 ? 4 : 2;
// The fused tile kernels for K <= 4 (KB = kSmallKB): at least 4 blocks of kThreads per
// multiprocessor, i.e. at most 64 registers a thread (occupancy 50 %); the instantiations
// for K > 4 keep the compiler's choice.
template <typename acc_t, int KB>
constexpr int kMinBlocks = KB <= kSmallKB<acc_t> ? 4 : 1;
// Blocked sums (SPEC "Accuracy"): a thread summing over channels adds kChannelBlock terms
// at a time into a partial sum, then the partial sums, so that the rounding error grows
// with the block plus the number of blocks, not with C.
constexpr int kChannelBlock = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the same sum (a + b == b + a exactly)
}

// Sum over a block of kThreads threads, in a fixed order; every thread gets the result.
// buf: kWarps values of shared memory.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T t = lane < kWarps ? buf[lane] : T(0);
  return warp_sum(t);
}

struct DevExp {
  template <typename T>
  __host__ __device__ __forceinline__ T operator()(T x) const {
    using std::exp;
    return exp(x);
  }
};

// ---------------------------------------------------------------------------------------
// 16-byte vectors: V values of T, loaded and stored in one instruction where the layout
// allows (the row length a multiple of V, the pointers 16-byte aligned), else V = 1.
// ---------------------------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// A misaligned vector access faults on a GPU but not on x86: the emulated build checks it.
#if defined(CBN_CUDA_EMULATION)
#define CBN_CHECK_PACK_ALIGNED(p, T, V) \
  CUDA_KERNEL_ASSERT(reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, V>) == 0 && "misaligned vector access")
#else
#define CBN_CHECK_PACK_ALIGNED(p, T, V)
#endif

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  CBN_CHECK_PACK_ALIGNED(p, T, V);
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  CBN_CHECK_PACK_ALIGNED(p, T, V);
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Value v of the V consecutive shared-memory values at p (p a multiple of V values from a
// 16-byte aligned base), read as 16-byte vectors: a warp whose lanes take V consecutive
// values each then reads whole vectors instead of hitting each bank V times. Called for
// v = 0 .. V-1 in an unrolled loop, the identical vector loads are merged.
template <int V, typename T>
__device__ __forceinline__ T smem_vec_value(const T* p, int v) {
  constexpr int W = (V * sizeof(T) <= 16) ? V : static_cast<int>(16 / sizeof(T));
  return load_pack<W>(p + (v / W) * W).v[v % W];
}

// Quotient and remainder of non-negative indices, in 32 bits when both fit (`narrow`, the
// same for every thread): a 64-bit division is a long software routine on the GPU, and a
// call, whose calling convention costs registers wherever it appears, even on a path never
// taken. The tile kernels therefore never divide 64-bit integers: their indices within a
// tile fit in 32 bits (plan_tiles), and the rest use divmod_wide.
struct DivMod {
  int64_t q, r;
};

// a / b and a % b for 0 <= a < 2^53 and 1 <= b < 2^53 (any index of a tensor), inline, no
// call: an approximate float reciprocal of b, refined twice in double (Newton), gives a
// quotient within a few units of a / b; a second estimate from the remainder leaves it
// within one, and the exact integer remainder corrects that.
__device__ __forceinline__ DivMod divmod_wide(int64_t a, int64_t b) {
  const double bd = static_cast<double>(b);
#if defined(__CUDA_ARCH__)
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
#else
  double r = static_cast<double>(1.0f / static_cast<float>(b));
#endif
  r = r + r * (1.0 - bd * r);
  r = r + r * (1.0 - bd * r);
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * r);
  q += static_cast<int64_t>(static_cast<double>(a - q * b) * r);
  int64_t m = a - q * b;
  if (m < 0) {
    --q;
    m += b;
  } else if (m >= b) {
    ++q;
    m -= b;
  }
  return DivMod{q, m};
}

__device__ __forceinline__ DivMod divmod(int64_t a, int64_t b, bool narrow) {
  if (narrow) {
    const uint32_t ua = static_cast<uint32_t>(a), ub = static_cast<uint32_t>(b);
    return DivMod{static_cast<int64_t>(ua / ub), static_cast<int64_t>(ua % ub)};
  }
  return DivMod{a / b, a % b};
}

// Indices within one tile (plan_tiles keeps them below 2^31): in 32 bits.
__device__ __forceinline__ DivMod tile_divmod(int64_t a, int64_t b) { return divmod(a, b, true); }

// Indices below `total` fit in 32 bits.
__device__ __forceinline__ bool narrow_indices(int64_t total) {
  return total <= static_cast<int64_t>(UINT32_MAX);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------
// Tiles of positions, each handled by one block (grid-stride: a grid of at most 2^30
// blocks walks more tiles) and giving one partial result per (k, c). Interleaved
// (channels innermost): tile t holds positions [t len, (t+1) len). Planar (NCHW): tile t
// holds positions [s0, s0 + len) of sample n = t / chunks, with s0 = (t % chunks) len.
// Sized for at least two blocks per multiprocessor.
// ---------------------------------------------------------------------------------------

struct Tiles {
  int64_t num;
  int64_t len;
  int64_t chunks;
};

// Bytes of re-read inputs per tile (see plan_tiles).
constexpr int64_t kTileBytes = 48 * 1024;

// elem_bytes: bytes per element that the tile kernels re-read (x; x and the gradient; 0
// for a kernel that reads its tile once). partials: the kernel merges each tile into a
// row of per-(k, c) partial results (partial_rows).
inline Tiles plan_tiles(const Shape& s, int64_t K, int64_t acc_size, int64_t elem_bytes,
                        bool partials) {
  Tiles t{0, 1, 1};
  const int64_t M = s.M();
  if (M == 0) return t;
  const int64_t target = 2 * num_sms();
  // the tile's responsibilities and their gradients (2 x len x K) stay in 32 KiB of shared
  // memory; a whole number of 32 positions (of vectors) when it can
  int64_t max_len = std::max<int64_t>(1, std::min<int64_t>(512, 16384 / (K * acc_size)));
  if (max_len >= 32) max_len = max_len / 32 * 32;
  // The tile kernels sweep their tile two or three times, the later sweeps from the cache:
  // the tiles of all resident blocks (up to 4 per multiprocessor for K <= 4, kMinBlocks;
  // 528 on an H100) should fit in L2 (40 MB on an A100, 50 on an H100) with room to
  // spare, so a tile holds at most kTileBytes of the inputs they re-read (x, or x and
  // the gradient). A kernel with partials reads and writes its row once per tile,
  // 4 K C acc_size bytes, that is 4 K acc_size / (len x element size) of the tile's x:
  // the cap never takes a tile below the length where that is half of x (the second read
  // of x it saves), nor below 16 (interleaved) or 32 (planar) positions (the 32-bit index
  // cap below aside, for C above 2^22). Not yet measured on a GPU.
  const int64_t row_bytes = s.C * elem_bytes;
  const int64_t partial_floor =
      partials && elem_bytes > 0 ? (8 * K * acc_size + elem_bytes - 1) / elem_bytes : 1;
  const int64_t cache_len =
      row_bytes > 0 ? std::max<int64_t>({1, kTileBytes / row_bytes, partial_floor}) : M;
  // The tile kernels index channels and the elements of a tile in 32 bits (int, and
  // tile_divmod): C <= 2^30 and len x C < 2^31. (Evaluation with one component per
  // position and the normalize operator do not tile and accept more channels.)
  constexpr int64_t kTileElems = int64_t(1) << 31;
  TORCH_CHECK(s.C <= (int64_t(1) << 30),
              "compound_batch_norm (CUDA): at most 2^30 channels, got ", s.C);
  max_len = std::min(max_len, (kTileElems - 1) / s.C);
  if (s.interleaved) {
    int64_t len = (M + target - 1) / target;
    len = std::max<int64_t>(16, std::min<int64_t>({len, 256, cache_len}));
    len = std::min(len, max_len);
    t.len = len;
    t.num = (M + len - 1) / len;
    return t;
  }
  int64_t chunks = std::max<int64_t>(1, (target + s.N - 1) / s.N);
  int64_t len = (s.S + chunks - 1) / chunks;
  len = std::min<int64_t>(s.S, (len + 31) / 32 * 32);
  len = std::min(len, std::max<int64_t>(32, cache_len / 32 * 32));
  len = std::max<int64_t>(1, std::min(len, max_len));
  t.len = len;
  t.chunks = (s.S + len - 1) / len;
  t.num = s.N * t.chunks;
  // tile_geo divides tile indices in 32 bits unless every sample is one tile
  TORCH_CHECK(t.chunks == 1 || t.num <= static_cast<int64_t>(UINT32_MAX),
              "compound_batch_norm (CUDA): input too large for the tile plan (", t.num,
              " tiles)");
  return t;
}

// What a tiled kernel needs of the input's geometry and the tile plan.
struct TileParams {
  int64_t N, C, S, K;
  int64_t len, chunks, num;
  bool interleaved;
};

inline TileParams tile_params(const Shape& s, int64_t K, const Tiles& t) {
  return TileParams{s.N, s.C, s.S, K, t.len, t.chunks, t.num, s.interleaved};
}

// Blocks of a tile kernel that writes per-(k, c) partials: at most the blocks that can be
// resident (4 per multiprocessor), block b walking tiles b, b + rows, ... and accumulating
// their partials in its row b, in tile order. The partials then cost rows x K x C values
// whatever the number of tiles (a few percent of x for large inputs), and stay in L2
// between a block's updates. Deterministic for a given device (rows depends on its
// multiprocessor count, as the tile plan does).
inline int64_t partial_rows(int64_t tiles) {
  return std::min<int64_t>(tiles, 4 * static_cast<int64_t>(num_sms()));
}

// Geometry of one tile, on the device.
struct TileGeo {
  int64_t p0;  // interleaved: first position
  int64_t n;   // planar: sample
  int64_t s0;  // planar: first spatial index
  int P;       // positions in the tile
};

__device__ __forceinline__ TileGeo tile_geo(const TileParams& g, int64_t t) {
  TileGeo r;
  if (g.interleaved) {
    const int64_t M = g.N * g.S;
    r.p0 = t * g.len;
    r.n = 0;
    r.s0 = 0;
    r.P = static_cast<int>(g.len < M - r.p0 ? g.len : M - r.p0);
  } else {
    // one tile per sample, or fewer than 2^32 tiles (plan_tiles)
    const DivMod nc = g.chunks == 1 ? DivMod{t, 0} : divmod(t, g.chunks, true);
    r.p0 = 0;
    r.n = nc.q;
    r.s0 = nc.r * g.len;
    r.P = static_cast<int>(g.len < g.S - r.s0 ? g.len : g.S - r.s0);
  }
  return r;
}

// The tile's responsibilities (and gradients) in shared memory: [j][k] for interleaved
// tiles (a warp handles a position), [k][j] for planar ones (lanes take consecutive
// positions).
__device__ __forceinline__ int tau_index(bool interleaved, int j, int k, int K, int len) {
  return interleaved ? j * K + k : k * len + j;
}

// The tile's responsibilities from tau (global, the layout of x with C -> K) into
// shared memory, coalesced.
template <typename acc_t>
__device__ __forceinline__ void load_tile_tau(const acc_t* tau, const TileParams& g,
                                              const TileGeo& tg, acc_t* ts) {
  const int K = static_cast<int>(g.K), len = static_cast<int>(g.len);
  if (g.interleaved) {
    const acc_t* in = tau + tg.p0 * K;
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) ts[i] = in[i];
  } else {
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) {
      const int k = i / tg.P, j = i % tg.P;
      ts[k * len + j] = tau[(tg.n * K + k) * g.S + tg.s0 + j];
    }
  }
}

// Planar tiles: the block's threads as L position lanes (a multiple of 32, enough for the
// tile's positions when it can) times G channel groups: thread (j, q) = (threadIdx.x % L,
// threadIdx.x / L) takes positions j, j + L, ... and the channels [q C / G, (q+1) C / G),
// so that a short tile (7x7 feature maps) still keeps every thread busy on its sums over
// channels.
struct PositionLanes {
  int L, G, j, q;
  int c0, c1;
};

__device__ __forceinline__ PositionLanes position_lanes(int P, int64_t C) {
  PositionLanes r;
  int L = (P + 31) / 32 * 32;
  L = L < 32 ? 32 : (L > kThreads ? kThreads : L);
  while (kThreads % L != 0) L += 32;  // 96, 160, 192, 224: the next divisor of kThreads
  int shift = 0;  // L is 32, 64, 128 or 256: G = kThreads / L = 2^shift
  for (int l = L; l < kThreads; l *= 2) ++shift;
  r.L = L;
  r.G = 1 << shift;
  r.j = threadIdx.x % L;
  r.q = threadIdx.x / L;
  r.c0 = static_cast<int>((C * r.q) >> shift);  // C q / G, without a 64-bit division
  r.c1 = static_cast<int>((C * (r.q + 1)) >> shift);
  return r;
}

// Blocked sums over channels [c0, c1) (every step-th), kChannelBlock terms at a time into
// a partial sum, then the partial sums (SPEC "Accuracy"): add(c, acc) adds channel c's
// terms of KB components into acc[0..KB). Used by the E-step and by dtau.
template <typename acc_t, int KB, typename Add>
__device__ __forceinline__ void blocked_channel_sums(int c0, int c1, int step,
                                                     acc_t* tot, Add add) {
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) tot[kk] = acc_t(0);
  for (int cb = c0; cb < c1; cb += kChannelBlock * step) {
    const int ce = cb + kChannelBlock * step < c1 ? cb + kChannelBlock * step : c1;
    acc_t acc[KB];
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
    for (int c = cb; c < ce; c += step) add(c, acc);
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) tot[kk] += acc[kk];
  }
}

// Position lanes times channel groups: each thread's KB channel sums of its position
// (acc; zero where the lane holds no position) through red (KB x kThreads), added in
// group order by the position's group-0 thread, which calls out(kk, total) for the
// components k0 + kk < K. Every thread of the block calls it (two barriers).
template <typename acc_t, int KB, typename Out>
__device__ __forceinline__ void combine_channel_groups(const PositionLanes& pl, bool has_pos,
                                                       int K, int k0, const acc_t* acc,
                                                       acc_t* red, Out out) {
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) red[kk * kThreads + threadIdx.x] = acc[kk];
  __syncthreads();
  if (pl.q == 0 && has_pos) {
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      if (k0 + kk < K) {
        acc_t total = 0;
        for (int q = 0; q < pl.G; ++q) total += red[kk * kThreads + q * pl.L + pl.j];
        out(kk, total);
      }
    }
  }
  __syncthreads();
}

// Interleaved tiles, reduced per channel: the block's threads as cc channels (a chunk
// of the C channels) times G groups that split the tile's positions; thread
// (ci, g) = threadIdx.x % cc, threadIdx.x / cc. Threads past G * cc idle: up to half the
// block for C just above a divisor of 256 (127 of 256 for C = 129); and for C above 256
// the last chunk of channels may be short (C = 320: a chunk of 64 takes a full chunk's time).
struct ChannelGroups {
  int cc, G, ci, g;
};

__device__ __forceinline__ ChannelGroups channel_groups(int64_t C) {
  ChannelGroups r;
  r.cc = static_cast<int>(C < kThreads ? C : kThreads);
  r.G = kThreads / r.cc;
  r.ci = threadIdx.x % r.cc;
  r.g = threadIdx.x / r.cc;
  return r;
}

// Sum over the G groups, in group order, of value `slot` of channel ci; red holds slot s
// of thread t at red[s * kThreads + t] (consecutive threads, consecutive banks).
template <typename T>
__device__ __forceinline__ T sum_groups(const T* red, const ChannelGroups& cg, int slot) {
  T s = 0;
  for (int gg = 0; gg < cg.G; ++gg) s += red[slot * kThreads + gg * cg.cc + cg.ci];
  return s;
}

inline dim3 grid_1d(int64_t blocks) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 30))));
}

// Blocks for a grid-stride loop over n work items, kThreads per block: enough to fill the
// device several times over, not more.
inline dim3 grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return grid_1d(std::min<int64_t>(blocks, 32 * static_cast<int64_t>(num_sms())));
}

// Rows of partials (partial_rows) reduced in a fixed-order tree: kReduceRows rows of a
// block walk the partial rows of one of `groups` chunks, the rows are combined pairwise in shared
// memory, and the consumer combines the groups' results sequentially, in group order.
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;

inline int64_t reduce_groups(int64_t tiles, int64_t entries) {
  // about 64 tiles per block, and no more groups than needed to fill the device
  const int64_t cols = (entries + kReduceCols - 1) / kReduceCols;
  int64_t g = std::max<int64_t>(1, std::min<int64_t>(32, (tiles + 63) / 64));
  while (g > 1 && cols * (g / 2) >= 4 * static_cast<int64_t>(num_sms())) g /= 2;
  return g;
}

inline bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Kernels keeping per-position values of K components do so in blocks of KB registers:
// kSmallKB<acc_t> when K <= 4, else 8 (in several passes when K > KB).
template <typename acc_t, typename F>
void dispatch_kb(int64_t K, F&& f) {
  if (K <= 4)
    f(std::integral_constant<int, kSmallKB<acc_t>>{});
  else
    f(std::integral_constant<int, 8>{});
}

// Dynamic shared memory beyond the default 48 KiB needs the kernel's consent.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  const size_t max_smem = max_smem_optin();
  TORCH_CHECK(smem <= max_smem, "compound_batch_norm: ", smem,
              " bytes of shared memory needed per block (too many components); the device has ",
              max_smem);
#if defined(CBN_CUDA_EMULATION)
  ::cbn_ext::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
#else
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
#endif
}

// float32 / float64 / float16 / bfloat16 inputs; acc_t: float, or double for double.
#define CBN_DISPATCH_INPUT_TYPES(TYPE, NAME, ...)                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__();                                                            \
  })

}  // namespace cuda
}  // namespace cbn_ext
