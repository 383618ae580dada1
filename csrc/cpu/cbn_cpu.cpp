// The CPU backend of the cbn_ext operators (composed in csrc/cbn_ops.h): the small
// per-(k, c) steps (E-step coefficients, merging per-tile partials, affine and gradient
// coefficients, running update) and the calls into the fused kernels of the instruction
// set this processor supports.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include "../cbn_common.h"
#include "../cbn_math.h"
#include "../cbn_ops.h"
#include "cpu_kernels.h"

namespace cbn_ext {
namespace cpu {

namespace {

TilePlan base_tile_plan(const Geometry& g) {
  // About 32k elements (128 KiB of float) per interleaved tile: the kernels pass over a
  // tile two or three times while it sits in the L2 cache (the backward's x and grad
  // with the next tile's prefetched lines: 512 KiB of float, all of a Zen 3's L2, half a
  // Zen 4's; K = 1 batch statistics prefetch the next tile too, 256 KiB; measured on Zen
  // 4 only), and each tile leaves partial sums of K x C values
  // for the merges to add up (merge_moments, sum_partials). Against 16k elements
  // (module-level A/B, a training step, the length switched per call, BatchNorm's step
  // interleaved, medians of 40-80 steps, 2 cores, 2026-11-30): float32 channels-last 7x7
  // (C = 512) K = 2 0.96-0.98x the time, 14x14 0.96-0.99x, 28x28 1.01x; K = 4 at 7x7
  // 0.96x; K = 1 0.97-1.02x; bfloat16 K = 2 7x7 0.98x, 14x14 0.98x, 56x56 0.97x; the
  // evaluation at K = 2 (in-process) 0.95-1.00x. 64k took 1.06x 32k's time (7x7, K = 2).
  // Channels-last plans are not cut further for threads (make_tile_plan): a small batch
  // has half the tiles it had (N = 1, C = 256, 56x56: 25), fewer than the threads of a
  // large machine (unmeasured there). Planar tiles are longer (below).
  constexpr int64_t kInterleavedTileElems = 32768;
  constexpr int64_t kTileElems = 16384;
  TilePlan p{};
  const int64_t M = g.N * g.S;
  if (M == 0) return p;
  if (g.interleaved) {
    int64_t len = kInterleavedTileElems / std::max<int64_t>(g.C, 1);
    len = std::max<int64_t>(16, std::min<int64_t>(len, 4096));
    p.len = len;
    p.segs = 1;
    p.chunks = 1;
    p.num_tiles = (M + len - 1) / len;
    return p;
  }
  // Planar: whole samples, or chunks of one sample when a sample is long. The kernels
  // read and write the rows of a tile in place (half precision converted in the loads and
  // stores), channel after channel: a chunk is a piece of each channel's row, and short
  // pieces make a strided walk through memory (a few cache lines here, a few there) that
  // the hardware prefetchers follow poorly: 64 x 256 x 14 x 14 in chunks of 64 positions
  // ran 2-3x slower than in whole samples, and training steps at 56x56 and 28x28 (rows of
  // 3136 and 784 positions, batch 64) in whole samples took from 2 % more (float32, K = 2,
  // 56x56) to 35-45 % less time (K = 1) than in chunks of 256, 3-15 % less at K = 2, 4
  // otherwise (bfloat16 and float32; minimum of 40-48 runs, 2 cores, 2026-11-29), although
  // such a tile (800 KiB of float) no longer fits the L2 cache. The soft evaluation, which
  // reads the tile again after the E-step while y is written, kept chunks of
  // max(256, 16384 / C) positions (in the L2 cache) until the E-step prefetched its rows
  // (kPrefetchBytes); since then whole samples made it 5-20 % faster at 56x56 and 28x28
  // than those chunks (in-process A/B, batch 64, K = 2, float32 and bfloat16, 8 rounds of
  // 5, minimum and quartile times, 2 cores, 2026-11-29), and its normalization alone
  // (E-step skipped) took twice BatchNorm's time in chunks of 256: its short row pieces,
  // not the arithmetic. (Batches of 1 to 16: as fast as with those chunks, given
  // kMinTilesEval.)
  // So a sample is cut only when it is longer than 2 max(kMinChunk, chunk_elems / C)
  // positions, into chunks of nearly equal length: between about 2/3 and 1 times that
  // target, the last one shorter, even where a tile then exceeds chunk_elems.
  // make_tile_plan cuts shorter chunks on purpose when a batch of few samples would
  // otherwise leave threads idle.
  constexpr int64_t kMinChunk = 256;
  constexpr int64_t chunk_elems = 16 * kTileElems;
  const int64_t per_sample = g.S * g.C;
  const int64_t target_len =
      std::max<int64_t>(kMinChunk, chunk_elems / std::max<int64_t>(g.C, 1));
  if (g.S > 2 * target_len) {
    // chunks of one sample, of nearly equal lengths rounded up to a multiple of 16
    const int64_t chunks = (g.S + target_len - 1) / target_len;
    int64_t len = (g.S + chunks - 1) / chunks;
    len = (len + 15) / 16 * 16;
    p.len = len;
    p.segs = 1;
    p.chunks = (g.S + len - 1) / len;
    p.num_tiles = g.N * p.chunks;
    return p;
  }
  p.len = g.S;
  p.chunks = 1;
  p.segs = std::max<int64_t>(1, kTileElems / std::max<int64_t>(per_sample, 1));
  p.segs = std::min(p.segs, g.N);
  p.num_tiles = (g.N + p.segs - 1) / p.segs;
  return p;
}

}  // namespace

// A few large samples (a batch of one at inference) make fewer tiles than threads: split
// the samples into shorter chunks, down to kSplitChunk positions, until there are
// min_tiles tiles, so that a training batch of 16 at 56x56 still gives 32 tiles (2
// samples' chunks of 1568 positions) to a machine with more cores than this project's 2
// (measured only on 2). By shape and operator only, so that any number of threads sums
// the same tiles in the same order.
TilePlan make_tile_plan(const Geometry& g, int64_t min_tiles) {
  constexpr int64_t kSplitChunk = 64;
  TilePlan p = base_tile_plan(g);
  if (g.interleaved || p.num_tiles == 0 || p.num_tiles >= min_tiles || p.segs > 1) return p;
  const int64_t chunks = (min_tiles + g.N - 1) / g.N;
  int64_t len = (g.S + chunks - 1) / chunks;
  len = std::max<int64_t>(kSplitChunk, (len + 15) / 16 * 16);
  if (len >= p.len) return p;
  p.len = len;
  p.chunks = (g.S + len - 1) / len;
  p.num_tiles = g.N * p.chunks;
  return p;
}

namespace {

// ---------------------------------------------------------------------------------------
// Which compiled variant of the kernels runs on this processor.
// ---------------------------------------------------------------------------------------

// The best variant this processor runs, at most the one CBN_EXT_CPU_ISA names
// ("baseline", "avx2", "avx512"; unset or empty: the best). Any other value makes every
// kernel call raise (cpu_isa_checked); build_info (cpu_isa) still reports the best.
enum class Isa { kBaseline, kAvx2, kAvx512 };

struct IsaChoice {
  Isa isa;
  bool bad_env;     // CBN_EXT_CPU_ISA names no variant
  std::string env;  // its value
};

const IsaChoice& isa_choice() {
  static const IsaChoice choice = [] {
    IsaChoice c{Isa::kBaseline, false, ""};
    Isa cap = Isa::kAvx512;
    const char* env = std::getenv("CBN_EXT_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      c.env = env;
      if (c.env == "baseline") cap = Isa::kBaseline;
      else if (c.env == "avx2") cap = Isa::kAvx2;
      else if (c.env != "avx512") c.bad_env = true;
    }
#if defined(CBN_HAVE_AVX2_KERNELS)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && cap >= Isa::kAvx2) c.isa = Isa::kAvx2;
#if defined(CBN_HAVE_AVX512_KERNELS)
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bf16");
    if (avx512 && cap >= Isa::kAvx512) c.isa = Isa::kAvx512;
#endif
#endif
    return c;
  }();
  return choice;
}

Isa cpu_isa_checked() {
  const IsaChoice& c = isa_choice();
  TORCH_CHECK(!c.bad_env, "cbn_ext: CBN_EXT_CPU_ISA must be 'baseline', 'avx2' or "
              "'avx512' (the best variant up to that one), got '", c.env, "'");
  return c.isa;
}

// Non-temporal stores exist in the AVX2 and AVX-512 variants.
bool isa_streams() { return isa_choice().isa != Isa::kBaseline; }

// A kernel call in the chosen variant: a case per compiled variant, else the baseline.
#if defined(CBN_HAVE_AVX512_KERNELS)
#define CBN_CASE_AVX512(name, args) \
  case Isa::kAvx512: ::cbn_ext::cpu::avx512::name(args); break;
#else
#define CBN_CASE_AVX512(name, args)
#endif
#if defined(CBN_HAVE_AVX2_KERNELS)
#define CBN_CASE_AVX2(name, args) \
  case Isa::kAvx2: ::cbn_ext::cpu::avx2::name(args); break;
#else
#define CBN_CASE_AVX2(name, args)
#endif
#define CBN_CALL_KERNEL(name, args)                                   \
  do {                                                               \
    switch (cpu_isa_checked()) {                                     \
      CBN_CASE_AVX512(name, args)                                    \
      CBN_CASE_AVX2(name, args)                                      \
      default: ::cbn_ext::cpu::baseline::name(args); break;          \
    }                                                                \
  } while (0)

Geometry geometry_of(const Shape& s) { return Geometry{s.N, s.C, s.S, s.interleaved}; }

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------
// Non-temporal stores of large outputs
// ---------------------------------------------------------------------------------------

// Bytes of the last-level cache: from Linux's sysfs (the largest of cpu0's caches), else
// sysconf; 0 where neither says. (In this project's VMs sysconf reports the host's L3,
// ten times what sysfs and lscpu show.)
int64_t last_level_cache_bytes() {
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    std::string v;
    if (!(f >> v) || v.empty()) continue;
    char* end = nullptr;
    int64_t n = std::strtoll(v.c_str(), &end, 10);
    if (*end == 'K' || *end == 'k') n <<= 10;
    else if (*end == 'M' || *end == 'm') n <<= 20;
    best = std::max(best, n);
  }
  if (best > 0) return best;
#if defined(_SC_LEVEL3_CACHE_SIZE)
  best = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
  if (best == 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
  return best;
}

// Outputs (y, dx) at least this large are written by non-temporal stores (the AVX2 and
// AVX-512 builds only): they write whole lines without first reading them into the cache
// (half the memory traffic of writing an output; a third of a pass that reads x and
// writes y), and leave the caches to the inputs. Half the last-level cache, or
// CBN_EXT_STREAM_MIN_BYTES (bytes; negative: never), read once: from there an output and
// an input of its size (x, or the gradient) no longer fit in the cache together, and
// below it the pair stays there for the call after and the next layer. Never where the
// size is unknown.
// A/B against ordinary stores (alternating processes, medians of 5-8 rounds), 2 cores
// (Zen 4, 32 MiB L3), 2026-11-29/30: float32 evaluation, 64 x 64 x 56 x 56 (51 MB),
// K = 2, 12-21 % faster in both layouts; 64 x 256 x 14 x 14 float32 (13 MB, cache
// resident) streamed for a test: 2.3x slower. Outputs of 26 MB (float32 64 x 128 x 28 x
// 28, bfloat16 64 x 64 x 56 x 56), in-process A/B (the threshold halved from the whole
// cache, every call switched, module steps, medians of 40-80), 2026-11-30: a float32
// training step 0.79-0.93x the time (K = 1 to 4, both layouts), an evaluation
// 0.78-0.97x; bfloat16 training 0.96-1.01x, evaluation at K = 2 0.82-0.93x, at K = 1
// 0.96-0.98x, at K = 4 0.93x (NCHW) and 1.02-1.07x (channels-last). (An earlier
// comparison across processes had found bfloat16 at that size no faster: its noise.)
int64_t stream_threshold() {
  static const int64_t v = [] {
    const char* env = std::getenv("CBN_EXT_STREAM_MIN_BYTES");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      errno = 0;
      const long long n = std::strtoll(env, &end, 10);
      TORCH_CHECK(*end == '\0' && errno == 0, "cbn_ext: CBN_EXT_STREAM_MIN_BYTES must be an "
                  "integer number of bytes (negative: never stream), got '", env, "'");
      return n < 0 ? INT64_MAX : static_cast<int64_t>(n);
    }
    const int64_t llc = last_level_cache_bytes();
    return llc > 0 ? llc / 2 : INT64_MAX;
  }();
  return v;
}

std::atomic<int64_t> streamed_outputs{0};

// Whether the kernels write `out` (laid out as g, cut into tiles by plan) by non-temporal
// stores: large enough, and the rows (planar: S positions, interleaved: C channels) and
// a chunked plan's chunks whole cache lines, so that every streamed line is written by
// one tile, in full, and no line gets both kinds of store. (The store helpers also check
// each address's alignment: no store can fault.)
bool stream_output(const Geometry& g, const TilePlan& plan, const Tensor& out) {
  if (!isa_streams()) return false;
  const int64_t elt = static_cast<int64_t>(out.element_size());
  const int64_t bytes = out.numel() * elt;
  if (bytes == 0 || bytes < stream_threshold()) return false;
  constexpr int64_t kLine = 64;
  const int64_t row = (g.interleaved ? g.C : g.S) * elt;
  const bool chunked = !g.interleaved && plan.chunks > 1;
  const bool ok = row % kLine == 0 && (!chunked || (plan.len * elt) % kLine == 0) &&
                  reinterpret_cast<uintptr_t>(out.data_ptr()) % kLine == 0;
  if (ok) streamed_outputs.fetch_add(1, std::memory_order_relaxed);
  return ok;
}

// Whether the channels-last evaluation prefetches y's lines ahead of its stores
// (NormalizeArgs::prefetch_y; kernels_impl.h, kWriteAhead): y not streamed and at least
// half of stream_threshold() (a quarter of the last-level cache; half of
// CBN_EXT_STREAM_MIN_BYTES where that is set), where its lines are no longer in the cache
// from the call before. (Measured below the
// threshold; outputs above it that are not streamed, whose rows are not whole lines or in
// the baseline build, prefetch too, unmeasured. tests/test_stream_stores.py sets the
// threshold to 0 to run it.)
bool prefetch_output(const Geometry& g, const Tensor& out, bool stream) {
  if (!g.interleaved || stream) return false;
  const int64_t t = stream_threshold();
  return t != INT64_MAX && out.numel() * static_cast<int64_t>(out.element_size()) >= t / 2;
}

// sum_{i < n} f(i), pairwise (blocks of 16 summed in order, then a tree): the rounding
// error grows with log n, and the order depends on n alone (deterministic).
template <typename T, typename F>
T pairwise_sum(int64_t n, F&& f, int64_t lo = 0) {
  if (n <= 16) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += f(lo + i);
    return s;
  }
  const int64_t half = n / 2;
  return pairwise_sum<T>(half, f, lo) + pairwise_sum<T>(n - half, f, lo + half);
}

// Chan's merge of parts [lo, lo + n) of `part(i)`, as a tree: pairwise, like the sums.
template <typename T, typename F>
math::WeightedMoments<T> pairwise_merge(int64_t n, F&& part, int64_t lo = 0) {
  if (n == 1) return part(lo);
  const int64_t half = n / 2;
  math::WeightedMoments<T> a = pairwise_merge<T>(half, part, lo);
  math::chan_merge(a, pairwise_merge<T>(n - half, part, lo + half));
  return a;
}

// E-step coefficients of the mixture: mu, 1/2 a = 1/2 / (var + eps),
// b_k = log(max(prior_k, 1e-6)) - 1/2 sum_c log(var_kc + eps), and for K = 2 the
// coefficients of math::pair_term (m, A, B, C each) and db = b_0 - b_1 - sum_c (1/2 a_0
// e_0^2 - 1/2 a_1 e_1^2) (one allocation for all).
// With `copy`, also copies of the mixture (mean, var, prior), in the same pass.
struct EstepCoefs {
  Tensor mu, buf;
  const void* half_a = nullptr;
  const void* b = nullptr;
  const void* pair = nullptr;
  Tensor mean_copy, var_copy, prior_copy;
};

EstepCoefs estep_coefs(const Tensor& mix_mean, const Tensor& mix_var, const Tensor& mix_prior,
                       double eps, bool copy) {
  const int64_t K = mix_mean.size(0), C = mix_mean.size(1);
  EstepCoefs out;
  out.mu = mix_mean.contiguous();
  out.buf = at::empty({K * C + K + (K == 2 ? 3 * C + 1 : 0)}, out.mu.options());
  if (copy) {
    out.mean_copy = at::empty_like(out.mu);
    out.var_copy = at::empty_like(out.mu);
    out.prior_copy = at::empty({K}, out.mu.options());
  }
  AT_DISPATCH_FLOATING_TYPES(out.mu.scalar_type(), "cbn_estep_coefs", [&] {
    const Tensor var = mix_var.contiguous();
    const Tensor prior = mix_prior.contiguous();
    const scalar_t* m = out.mu.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    const scalar_t* pr = prior.data_ptr<scalar_t>();
    scalar_t* h = out.buf.data_ptr<scalar_t>();
    scalar_t* bb = h + K * C;
    out.half_a = h;
    out.b = bb;
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) h[k * C + c] = math::half_precision(v[k * C + c], e);
      bb[k] = math::log_prior(pr[k]) + pairwise_sum<scalar_t>(C, [&](int64_t c) {
                return math::neg_half_log_var(v[k * C + c], e);
              });
    }
    if (K == 2) {
      scalar_t* pc = bb + K;
      double cst = 0;
      for (int64_t c = 0; c < C; ++c)
        cst += math::pair_coefs(m[c], m[C + c], h[c], h[C + c], pc + c, pc + C + c, pc + 2 * C + c);
      pc[3 * C] = static_cast<scalar_t>(double(bb[0]) - double(bb[1]) - cst);
      out.pair = pc;
    }
    if (copy) {
      std::memcpy(out.mean_copy.data_ptr<scalar_t>(), m, K * C * sizeof(scalar_t));
      std::memcpy(out.var_copy.data_ptr<scalar_t>(), v, K * C * sizeof(scalar_t));
      std::memcpy(out.prior_copy.data_ptr<scalar_t>(), pr, K * sizeof(scalar_t));
    }
  });
  return out;
}

// alpha = gamma r, delta = beta - alpha m (K x C each, one allocation).
struct AffineCoefs {
  Tensor buf;
  const void* alpha = nullptr;
  const void* delta = nullptr;
};

AffineCoefs affine_coefs(const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
                         const Tensor& var, double eps) {
  const int64_t K = mean.size(0), C = mean.size(1);
  AffineCoefs out;
  out.buf = at::empty({2 * K * C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbn_affine_coefs", [&] {
    const Tensor m = mean.contiguous(), v = var.contiguous();
    const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
    const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
    const scalar_t* pm = m.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pw = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb = bb.defined() ? bb.data_ptr<scalar_t>() : nullptr;
    scalar_t* pa = out.buf.data_ptr<scalar_t>();
    scalar_t* pd = pa + K * C;
    out.alpha = pa;
    out.delta = pd;
    for (int64_t i = 0; i < K * C; ++i) {
      math::affine_coefs<scalar_t>(pw ? pw[i] : scalar_t(1), pb ? pb[i] : scalar_t(0), pm[i],
                                   pv[i], static_cast<scalar_t>(eps), pa[i], pd[i]);
    }
  });
  return out;
}

// Lanes of per-(k, c) values merged over the tiles together: channels c0 .. c0 + kLanes of
// one component, in a GCC vector (two or four SSE registers in this file's baseline
// build). The tree over the tiles is the one pairwise_sum / pairwise_merge take, lane by
// lane, so the result of each (k, c) does not depend on the lanes it shares.
constexpr int64_t kLanes = 16;
template <typename T>
struct LaneTraits {
  typedef T V __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using LaneVec = typename LaneTraits<T>::V;

template <typename T>
LaneVec<T> load_lanes(const T* p) {
  LaneVec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void store_lanes(T* p, const LaneVec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes of s (each 0 + s, as vsplat), built from one SSE register's worth: GCC built a LaneVec of a
// scalar (T{} + s, or a LaneVec times a scalar) lane by lane through the stack, each
// merge's vectors then loaded across those stores (perf: the stores and loads most of the
// merges' time). With it the merges took 0.35 perf samples (about 0.22 ms of CPU each) a
// training step in place of 0.65 (64 x 512 x 7 x 7 float32 channels-last, K = 1; the
// same results).
template <typename T>
LaneVec<T> splat_lanes(T s) {
  typedef T Q __attribute__((vector_size(16)));
  constexpr int kParts = sizeof(LaneVec<T>) / sizeof(Q);
  union {
    LaneVec<T> v;
    Q q[kParts];
  } u;
  const Q b = Q{} + s;
  for (int i = 0; i < kParts; ++i) u.q[i] = b;
  return u.v;
}

// sum_{i < n} row(lo + i), lane by lane, with the tree of pairwise_sum.
template <typename T, typename F>
LaneVec<T> pairwise_sum_lanes(int64_t n, F&& row, int64_t lo = 0) {
  if (n <= 16) {
    LaneVec<T> s = {};
    for (int64_t i = 0; i < n; ++i) s += row(lo + i);
    return s;
  }
  const int64_t half = n / 2;
  return pairwise_sum_lanes<T>(half, row, lo) + pairwise_sum_lanes<T>(n - half, row, lo + half);
}

template <typename T>
struct LaneMoments {
  T n;
  LaneVec<T> mean, m2;
};

// Work units (blocks of 16 channels and single leftover channels) per task of the merges
// and sums over the tiles: a unit merges `tiles` parts, so many tiles make a unit worth a
// task of its own. With a fixed grain of 16, up to 16 units (K (C / 16 + C % 16): K = 1
// and C = 256, K = 2 and C = 128, K = 4 and C = 64) ran in one thread while the others
// waited (64 x 256 x 14 x 14 channels-last, 196 tiles of 16k elements then, 98 of 32k
// now: a third of batch_stats' time by perf; batch_stats 0.81x with this grain,
// alternating processes, 5 rounds). Each unit merges alike in any thread: the results
// do not change.
int64_t merge_grain(int64_t tiles) {
  return std::max<int64_t>(1, 1024 / std::max<int64_t>(tiles, 1));
}

// pairwise_merge of lanes that share their counts (math::chan_merge_shared).
template <typename T, typename F>
LaneMoments<T> pairwise_merge_lanes(int64_t n, F&& part, int64_t lo = 0) {
  if (n == 1) return part(lo);
  const int64_t half = n / 2;
  LaneMoments<T> a = pairwise_merge_lanes<T>(half, part, lo);
  const LaneMoments<T> b = pairwise_merge_lanes<T>(n - half, part, lo + half);
  math::chan_merge_shared(a.n, a.mean, a.m2, b.n, b.mean, b.m2, splat_lanes<T>);
  return a;
}

// Merge the per-tile partials (a tree over the tiles): biased mean and variance per (k, c)
// and the count per k. replace_inactive: inactive components (count <= 1) take the mixture's
// statistics; else the raw moments are kept (0 for an empty component).
// parts: one buffer, (tiles, K) counts then (tiles, K, C) means then (tiles, K, C) M2.
void merge_moments(const Tensor& parts, int64_t tiles, int64_t K, int64_t C,
                   const Tensor& mix_mean, const Tensor& mix_var, Tensor& mean, Tensor& var,
                   Tensor& count, bool replace_inactive) {
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "cbn_merge_moments", [&] {
    const scalar_t* pn = parts.data_ptr<scalar_t>();
    const scalar_t* pmean = pn + tiles * K;
    const scalar_t* pm2 = pmean + tiles * K * C;
    const Tensor mm = mix_mean.contiguous(), mv = mix_var.contiguous();
    const scalar_t* pmm = mm.data_ptr<scalar_t>();
    const scalar_t* pmv = mv.data_ptr<scalar_t>();
    scalar_t* om = mean.data_ptr<scalar_t>();
    scalar_t* ov = var.data_ptr<scalar_t>();
    scalar_t* on = count.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      double n = 0;
      for (int64_t t = 0; t < tiles; ++t) n += static_cast<double>(pn[t * K + k]);
      on[k] = static_cast<scalar_t>(n);
    }
    const auto finish = [&](int64_t i, const math::WeightedMoments<scalar_t>& acc) {
      const int64_t k = i / C;
      if (!replace_inactive || math::is_active(on[k])) {
        om[i] = acc.mean;
        ov[i] = acc.n > scalar_t(0) ? acc.m2 / acc.n : scalar_t(0);
      } else {
        om[i] = pmm[i];
        ov[i] = pmv[i];
      }
    };
    // work units: (k, block of kLanes channels), then the channels past the last block
    const int64_t blocks = C / kLanes, rest = C - blocks * kLanes;
    at::parallel_for(0, K * (blocks + rest), merge_grain(tiles),
                     [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t k = u / (blocks + rest), r = u % (blocks + rest);
        if (r < blocks) {
          const int64_t c0 = r * kLanes;
          const LaneMoments<scalar_t> acc =
              tiles == 0 ? LaneMoments<scalar_t>{0, {}, {}}
                         : pairwise_merge_lanes<scalar_t>(tiles, [&](int64_t t) {
                             const int64_t o = (t * K + k) * C + c0;
                             return LaneMoments<scalar_t>{pn[t * K + k], load_lanes(pmean + o),
                                                          load_lanes(pm2 + o)};
                           });
          for (int64_t l = 0; l < kLanes; ++l)
            finish(k * C + c0 + l, math::WeightedMoments<scalar_t>{acc.n, acc.mean[l], acc.m2[l]});
          continue;
        }
        const int64_t c = blocks * kLanes + (r - blocks);
        const math::WeightedMoments<scalar_t> acc =
            tiles == 0 ? math::WeightedMoments<scalar_t>{0, 0, 0}
                       : pairwise_merge<scalar_t>(tiles, [&](int64_t t) {
                           return math::WeightedMoments<scalar_t>{
                               pn[t * K + k], pmean[(t * K + k) * C + c], pm2[(t * K + k) * C + c]};
                         });
        finish(k * C + c, acc);
      }
    });
  });
}

// Sum per-tile partial sums (tiles, K x C values at `part`), pairwise over the tiles.
Tensor sum_partials(const Tensor& buf, const void* part, int64_t tiles, int64_t K, int64_t C) {
  const int64_t KC = K * C;
  Tensor out = at::empty({K, C}, buf.options());
  AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "cbn_sum_partials", [&] {
    const scalar_t* p = static_cast<const scalar_t*>(part);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t blocks = KC / kLanes;
    at::parallel_for(0, blocks + (KC - blocks * kLanes), merge_grain(tiles),
                     [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        if (u < blocks) {
          const int64_t i0 = u * kLanes;
          store_lanes(o + i0, pairwise_sum_lanes<scalar_t>(tiles, [&](int64_t t) {
                        return load_lanes(p + t * KC + i0);
                      }));
          continue;
        }
        const int64_t i = blocks * kLanes + (u - blocks);
        o[i] = pairwise_sum<scalar_t>(tiles, [&](int64_t t) { return p[t * KC + i]; });
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// The steps the operators are made of
// ---------------------------------------------------------------------------------------

// E-step (or given groups) and M-step: tau, and the batch mean, biased variance and count
// (with replace_inactive, the mixture's statistics for inactive components).
BatchStats batch_stats_impl(const TrainSetup& st, const OptTensor& groups, int64_t K, double eps,
                            bool replace_inactive, const OptTensor&, const OptTensor&) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t C = shape.C;
  const Geometry geo = geometry_of(shape);
  const TilePlan plan = make_tile_plan(geo, kMinTiles);
  BatchStats out;
  out.tau = empty_tau(x, shape, K, st.acc);
  const int64_t tiles = plan.num_tiles;
  const Tensor parts = at::empty({tiles * (K + 2 * K * C)}, aopt);  // n | mean | M2
  EstepCoefs ec;
  if (st.resp == Resp::kSoft)
    ec = estep_coefs(st.mix_mean, st.mix_var, st.mix_prior, eps, /*copy=*/!st.all_owned());
  mix_outputs(st, out, ec.mean_copy, ec.var_copy, ec.prior_copy);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  StatsArgs sa{};
  sa.geo = geo;
  sa.plan = plan;
  sa.K = K;
  sa.resp = st.resp;
  sa.dtype = x.scalar_type();
  sa.x = x.data_ptr();
  sa.groups = grp.defined() ? grp.data_ptr<int64_t>() : nullptr;
  sa.mu = ec.mu.defined() ? ec.mu.data_ptr() : nullptr;
  sa.half_a = ec.half_a;
  sa.b = ec.b;
  sa.pair = ec.pair;
  sa.tau = out.tau.numel() > 0 ? out.tau.data_ptr() : nullptr;
  const size_t esize = parts.element_size();
  sa.part_n = parts.data_ptr();
  sa.part_mean = static_cast<char*>(parts.data_ptr()) + tiles * K * esize;
  sa.part_m2 = static_cast<char*>(parts.data_ptr()) + tiles * (K + K * C) * esize;
  if (tiles > 0) CBN_CALL_KERNEL(collect_mixture_stats, sa);
  out.mean = at::empty({K, C}, aopt);
  out.var = at::empty({K, C}, aopt);
  out.count = at::empty({K}, aopt);
  merge_moments(parts, tiles, K, C, st.mix_mean, st.mix_var, out.mean, out.var, out.count,
                replace_inactive);
  return out;
}

// y = sum_k tau_k (alpha x + delta) with alpha, delta from the given statistics.
Tensor normalize_impl(const ApplySetup& st, const OptTensor& groups, const OptTensor& weight,
                      const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                      const Tensor& var, double eps, const Tensor&, const Tensor&) {
  const Tensor& x = st.x;
  Tensor out = empty_like_input(x);
  const Geometry geo = geometry_of(st.shape);
  const TilePlan plan = make_tile_plan(geo, kMinTiles);
  if (plan.num_tiles == 0) return out;
  const AffineCoefs ac = affine_coefs(weight, bias, mean, var, eps);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  NormalizeArgs na{};
  na.geo = geo;
  na.plan = plan;
  na.K = st.K;
  na.resp = st.resp;
  na.dtype = x.scalar_type();
  na.x = x.data_ptr();
  na.groups = grp.defined() ? grp.data_ptr<int64_t>() : nullptr;
  na.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr();
  na.alpha = ac.alpha;
  na.delta = ac.delta;
  na.y = out.data_ptr();
  na.stream = stream_output(geo, plan, out);
  CBN_CALL_KERNEL(normalize_mixture, na);
  return out;
}

// Sg = sum_p g tau, Sgx = sum_p g tau (x - m), over this input's positions.
std::tuple<Tensor, Tensor> grad_sums_impl(const BackwardSetup& st, const Tensor& tau,
                                          const Tensor& mean) {
  const Tensor& x = st.x;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t K = st.K, C = st.shape.C;
  const Geometry geo = geometry_of(st.shape);
  const TilePlan plan = make_tile_plan(geo, kMinTiles);
  const Tensor parts = at::empty({plan.num_tiles * 2 * K * C}, aopt);  // Sg | Sgx
  void* part_sg = parts.data_ptr();
  void* part_sgx = static_cast<char*>(part_sg) + plan.num_tiles * K * C * parts.element_size();
  const Tensor mc = mean.contiguous();
  GradStatsArgs ga{};
  ga.geo = geo;
  ga.plan = plan;
  ga.K = K;
  ga.resp = st.resp;
  ga.dtype = x.scalar_type();
  ga.grad = st.grad.data_ptr();
  ga.x = x.data_ptr();
  ga.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr();
  ga.mean = mc.data_ptr();
  ga.part_sg = part_sg;
  ga.part_sgx = part_sgx;
  if (plan.num_tiles > 0) CBN_CALL_KERNEL(collect_grad_stats, ga);
  return {sum_partials(parts, part_sg, plan.num_tiles, K, C),
          sum_partials(parts, part_sgx, plan.num_tiles, K, C)};
}

// The backward's per-(k, c) coefficients (GradCoefs); sum_g / sum_gx undefined: zero
// (evaluation, input gradient only).
GradCoefs grad_coefs_impl(const BackwardSetup& st, const OptTensor& weight,
                                const OptTensor& bias, const Tensor& mean, const Tensor& var,
                                const Tensor& count, const Tensor& mix_mean, const Tensor& mix_var,
                                const Tensor& sum_g, const Tensor& sum_gx, double eps,
                                bool batch_stats) {
  const auto aopt = st.x.options().dtype(st.acc);
  const int64_t K = st.K, C = st.shape.C;
  GradCoefs out = GradCoefs::make(K, C, 1, aopt);
  const bool soft = st.resp == Resp::kSoft;
  AT_DISPATCH_FLOATING_TYPES(st.acc, "cbn_grad_coefs", [&] {
    const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
    const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
    const Tensor v = var.contiguous();
    const Tensor n = count.defined() && count.numel() == K ? count.contiguous() : Tensor();
    const Tensor mm = soft ? mix_mean.contiguous() : Tensor();
    const Tensor mv = soft ? mix_var.contiguous() : Tensor();
    const Tensor sg = sum_g.defined() ? sum_g.contiguous() : Tensor();
    const Tensor sgx = sum_gx.defined() ? sum_gx.contiguous() : Tensor();
    const scalar_t* pw = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb = bb.defined() ? bb.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pn = n.defined() ? n.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pmm = mm.defined() ? mm.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pmv = mv.defined() ? mv.data_ptr<scalar_t>() : nullptr;
    const scalar_t* psg = sg.defined() ? sg.data_ptr<scalar_t>() : nullptr;
    const scalar_t* psgx = sgx.defined() ? sgx.data_ptr<scalar_t>() : nullptr;
    const scalar_t e = static_cast<scalar_t>(eps);
    scalar_t* pa = out.row<scalar_t>(GradCoefs::kAlpha);
    scalar_t* pbeta = out.row<scalar_t>(GradCoefs::kBeta);
    scalar_t* p1 = out.row<scalar_t>(GradCoefs::kE1);
    scalar_t* p2 = out.row<scalar_t>(GradCoefs::kE2);
    scalar_t* pp = out.row<scalar_t>(GradCoefs::kP);
    scalar_t* pac = out.row<scalar_t>(GradCoefs::kA);
    scalar_t* pmu = out.row<scalar_t>(GradCoefs::kMu);
    scalar_t* pev = out.ev<scalar_t>();
    scalar_t* pdg = out.dgamma.data_ptr<scalar_t>();
    scalar_t* pdb = out.dbeta.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = k * C + c;
        const auto gc = math::grad_coefs<scalar_t>(
            pw ? pw[i] : scalar_t(1), pv[i], pn ? pn[k] : scalar_t(0), psg ? psg[i] : scalar_t(0),
            psgx ? psgx[i] : scalar_t(0), e, batch_stats);
        // the E-step precision: only soft responsibilities depend on x through it
        const scalar_t a = pmv ? scalar_t(2) * math::half_precision(pmv[i], e) : scalar_t(0);
        const auto dc = math::dx_coefs<scalar_t>(gc.alpha, gc.e2, a, pmm ? pmm[i] : scalar_t(0));
        pa[i] = gc.alpha;
        pbeta[i] = pb ? pb[i] : scalar_t(0);
        p1[i] = gc.e1;
        p2[i] = gc.e2;
        pdg[i] = gc.dgamma;
        pdb[i] = gc.dbeta;
        pp[i] = dc.p;
        pac[i] = dc.a;
        pmu[i] = dc.mu;
      }
      pev[k] = pairwise_sum<scalar_t>(C, [&](int64_t c) { return p2[k * C + c] * pv[k * C + c]; });
    }
  });
  return out;
}

// Two components, soft responsibilities: the coefficients of dtau_0 - dtau_1 as one sum
// (GradInputArgs::pair, math::dtau_pair_coefs), from the batch means m (K x C,
// contiguous) and cf.
Tensor dtau_pair(const GradCoefs& cf, const Tensor& m) {
  const int64_t C = m.size(1);
  Tensor out = at::empty({5 * C + 1}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cbn_dtau_pair", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* pm = m.data_ptr<scalar_t>();
    const scalar_t* al = cf.row<scalar_t>(GradCoefs::kAlpha);
    const scalar_t* be = cf.row<scalar_t>(GradCoefs::kBeta);
    const scalar_t* e1 = cf.row<scalar_t>(GradCoefs::kE1);
    const scalar_t* e2 = cf.row<scalar_t>(GradCoefs::kE2);
    const double cst = pairwise_sum<double>(C, [&](int64_t c) {
      return math::dtau_pair_coefs(pm, al, be, e1, e2, C, c, o + c, o + C + c, o + 2 * C + c,
                                   o + 3 * C + c, o + 4 * C + c);
    });
    const scalar_t* ev = cf.ev<scalar_t>();
    o[5 * C] = static_cast<scalar_t>(double(ev[0]) - double(ev[1]) - cst);
  });
  return out;
}

// Whether the input gradient sums dtau_0 - dtau_1 as one sum (dtau_pair): two components,
// soft responsibilities, channels-last, or NCHW rows of fewer than kPairDtauRowsMax
// positions. In-process A/B against two sums (2 cores, batch 64, 8 rounds, medians), the
// input gradient took: channels-last float32 0.92x at 14x14 and 7x7, bfloat16 14x14
// 0.86x (a forward + backward 0.93-0.98x); NCHW 0.82x at float32 7x7, 0.85-0.89x at 14x14,
// bfloat16 28x28 0.90x; but float32 28x28 1.05-1.08x, 56x56 1.22-1.34x, bfloat16 56x56
// 1.16x, also with both lines of each row's group of four prefetched (cause not found).
// The tau passed in must sum to 1 over the components (the forward's do): the one sum
// takes dl_1 = -dl_0.
constexpr int64_t kPairDtauRowsMax = 512;
bool dtau_as_pair(const Geometry& g, int64_t K, Resp resp) {
  return K == 2 && resp == Resp::kSoft && (g.interleaved || g.S < kPairDtauRowsMax);
}

Tensor grad_input_impl(const BackwardSetup& st, const Tensor& tau, const Tensor& mean,
                       const GradCoefs& cf) {
  const Tensor& x = st.x;
  Tensor dx = empty_like_input(x);
  const Geometry geo = geometry_of(st.shape);
  const TilePlan plan = make_tile_plan(geo, kMinTiles);
  if (plan.num_tiles == 0) return dx;
  const Tensor m = mean.contiguous();
  GradInputArgs ia{};
  ia.geo = geo;
  ia.plan = plan;
  ia.K = st.K;
  ia.resp = st.resp;
  ia.dtype = x.scalar_type();
  ia.grad = st.grad.data_ptr();
  ia.x = x.data_ptr();
  ia.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr();
  ia.mean = m.data_ptr();
  ia.alpha = cf.row_ptr(GradCoefs::kAlpha);
  ia.beta = cf.row_ptr(GradCoefs::kBeta);
  ia.e1 = cf.row_ptr(GradCoefs::kE1);
  ia.e2 = cf.row_ptr(GradCoefs::kE2);
  ia.ev = cf.ev_ptr();
  ia.p = cf.row_ptr(GradCoefs::kP);
  ia.a = cf.row_ptr(GradCoefs::kA);
  ia.mu = cf.row_ptr(GradCoefs::kMu);
  const Tensor pair = dtau_as_pair(geo, st.K, st.resp) ? dtau_pair(cf, m) : Tensor();
  ia.pair = pair.defined() ? pair.data_ptr() : nullptr;
  ia.dx = dx.data_ptr();
  ia.stream = stream_output(geo, plan, dx);
  CBN_CALL_KERNEL(mixture_grad_input, ia);
  return dx;
}

// ---------------------------------------------------------------------------------------
// The steps of the operators that are not shared with the other backends
// ---------------------------------------------------------------------------------------

// E-step and normalization in one pass (the CPU kernels fuse them).
std::tuple<Tensor, Tensor> forward_eval_impl(const EvalSetup& st, const OptTensor& weight,
                                             const OptTensor& bias, const Tensor& running_mean,
                                             const Tensor& running_var,
                                             const OptTensor& running_prior,
                                             const OptTensor& groups, int64_t K, double eps) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const Resp resp = st.resp;
  const Geometry geo = geometry_of(shape);
  const TilePlan plan = make_tile_plan(geo, resp == Resp::kSoft ? kMinTilesEval : kMinTiles);
  Tensor tau = empty_tau(x, shape, K, st.acc);
  Tensor out = empty_like_input(x);
  if (shape.M() == 0) return {out, tau};
  EstepCoefs ec;
  if (resp == Resp::kSoft)
    ec = estep_coefs(running_mean, running_var, *running_prior, eps, /*copy=*/false);
  const AffineCoefs ac = affine_coefs(weight, bias, running_mean, running_var, eps);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  NormalizeArgs na{};
  na.geo = geo;
  na.plan = plan;
  na.K = K;
  na.resp = resp;
  na.dtype = x.scalar_type();
  na.x = x.data_ptr();
  na.groups = grp.defined() ? grp.data_ptr<int64_t>() : nullptr;
  na.mu = ec.mu.defined() ? ec.mu.data_ptr() : nullptr;
  na.half_a = ec.half_a;
  na.b = ec.b;
  na.pair = ec.pair;
  na.tau = tau.numel() > 0 ? tau.data_ptr() : nullptr;
  na.alpha = ac.alpha;
  na.delta = ac.delta;
  na.y = out.data_ptr();
  na.stream = stream_output(geo, plan, out);
  na.prefetch_y = prefetch_output(geo, out, na.stream);
  CBN_CALL_KERNEL(estep_normalize_mixture, na);
  return {out, tau};
}

void update_running_stats_impl(Tensor& running_mean, Tensor& running_var,
                               const OptTensor& running_prior,
                               const OptTensor& num_batches_tracked, const Tensor& mix_mean,
                               const Tensor& mix_var, const Tensor& mix_prior, const Tensor& mean,
                               const Tensor& var, const Tensor& count, int64_t num_positions,
                               std::optional<double> momentum) {
  const int64_t K = mean.size(0), C = mean.size(1);
  // an empty mixture: the running buffers themselves (updated in place, element by element)
  const bool same = mix_mean.numel() == 0;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbn_update_running_stats", [&] {
    const Tensor m = mean.contiguous(), v = var.contiguous(), n = count.contiguous();
    const Tensor mm = same ? running_mean : mix_mean.contiguous();
    const Tensor mv = same ? running_var : mix_var.contiguous();
    const Tensor mp = same ? (defined(running_prior) ? *running_prior : mm) : mix_prior.contiguous();
    const scalar_t* pm = m.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pn = n.data_ptr<scalar_t>();
    const scalar_t* pmm = mm.data_ptr<scalar_t>();
    const scalar_t* pmv = mv.data_ptr<scalar_t>();
    const scalar_t* pmp = mp.data_ptr<scalar_t>();
    // one bad batch must not poison the running statistics
    for (int64_t k = 0; k < K; ++k) {
      if (!std::isfinite(static_cast<double>(pn[k]))) return;
      if (!math::is_active(pn[k])) continue;
      for (int64_t c = 0; c < C; ++c) {
        if (!std::isfinite(static_cast<double>(pm[k * C + c])) ||
            !std::isfinite(static_cast<double>(pv[k * C + c])))
          return;
      }
    }
    int64_t* nbt = defined(num_batches_tracked) ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
    const scalar_t eta = static_cast<scalar_t>(momentum.has_value() ? *momentum
                                                                    : 1.0 / static_cast<double>(*nbt + 1));
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      const bool active = math::is_active(pn[k]);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = k * C + c;
        rm[i] = active ? math::ema(pmm[i], pm[i], eta) : pmm[i];
        rv[i] = active ? math::ema(pmv[i], math::unbiased_var(pv[i], pn[k]), eta) : pmv[i];
      }
    }
    if (defined(running_prior)) {
      // num_positions 0: M = sum_k N_k (callers that do not know M on the host)
      scalar_t M = static_cast<scalar_t>(num_positions);
      if (num_positions <= 0) {
        M = 0;
        for (int64_t k = 0; k < K; ++k) M += pn[k];
      }
      scalar_t* rp = running_prior->data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) rp[k] = math::ema(pmp[k], pn[k] / M, eta);
    }
    if (nbt != nullptr) *nbt += 1;
  });
}

struct CpuBackend {
  using Guard = NoGuard;
  static constexpr bool kHostChecksGroupIds = true;  // a free read
  static constexpr bool kDecidesFirstBatchOnDevice = false;  // a free read
  static constexpr auto batch_stats = &batch_stats_impl;
  static constexpr auto normalize = &normalize_impl;
  static constexpr auto forward_eval = &forward_eval_impl;
  static constexpr auto grad_sums = &grad_sums_impl;
  static constexpr auto grad_coefs = &grad_coefs_impl;
  static constexpr auto grad_input = &grad_input_impl;
  static constexpr auto update_running_stats = &update_running_stats_impl;
};

}  // namespace

TORCH_LIBRARY_IMPL(cbn_ext, CPU, m) { register_operators<CpuBackend>(m); }

const char* cpu_isa() {
  switch (isa_choice().isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

int64_t stream_min_bytes() { return isa_streams() ? stream_threshold() : INT64_MAX; }

int64_t streamed_output_count() { return streamed_outputs.load(); }

}  // namespace cpu
}  // namespace cbn_ext
