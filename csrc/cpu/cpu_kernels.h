// The interface between the CPU operators (cbn_cpu.cpp) and the CPU kernels, which are
// compiled once per instruction set (kernels_baseline.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) into namespaces of their own. Only plain data crosses this
// boundary, so that nothing inline is shared between translation units compiled for
// different instruction sets.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../cbn_resp.h"

// The AVX2+FMA variant is compiled with a per-file target pragma, which GCC supports.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define CBN_HAVE_AVX2_KERNELS 1
// The AVX-512 variant needs the AVX512-BF16 intrinsics and __builtin_cpu_supports'
// "avx512bf16" (GCC 11 and later, to be safe).
#if __GNUC__ >= 11
#define CBN_HAVE_AVX512_KERNELS 1
#endif
#endif

namespace cbn_ext {
namespace cpu {

using ::cbn_ext::Resp;

// x viewed as (N, C, S): interleaved = channels innermost (x[(n S + s) C + c], NHWC and
// (N, C) inputs), planar = x[(n C + c) S + s] (NCHW).
struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  bool interleaved;
};

// Positions are cut into tiles that depend on the shape and the operator (min_tiles)
// alone, so that per-tile partial sums merged in tile order give bit-identical results for
// any number of threads.
//   interleaved: tile t holds positions [t len, min(M, (t+1) len)).
//   planar: tile t holds `segs` whole samples (len == S), or one chunk of `len`
//   positions of one sample (segs == 1, chunks chunks per sample).
struct TilePlan {
  int64_t num_tiles;
  int64_t len;
  int64_t segs;
  int64_t chunks;
};

// Planar tiles (make_tile_plan, measured on 2 cores): whole samples up to
// 2 max(256, 262144 / C) positions, long rows for the hardware prefetchers, for every
// operator (faster overall, although the soft M-step, the input gradient and the soft
// evaluation read a tile twice and such a tile may not fit the L2 cache). A batch of few
// samples is cut into shorter chunks until there are min_tiles tiles: kMinTiles for the
// operators that sum over positions, kMinTilesEval for the soft evaluation (with 32 its
// short chunks made batches of 1 to 16 at 56x56 to 14x14 10-35 % slower than with 8).
constexpr int64_t kMinTiles = 32;
constexpr int64_t kMinTilesEval = 8;
TilePlan make_tile_plan(const Geometry& g, int64_t min_tiles);

// Outputs of at least this many bytes may be written by non-temporal stores
// (cbn_cpu.cpp, stream_output); INT64_MAX: never (also in the baseline build).
int64_t stream_min_bytes();
// How many outputs this process has written by non-temporal stores (for the tests).
int64_t streamed_output_count();

// Pointers to float (float32/bfloat16/float16 input) or double (float64) data are
// `acc` pointers; `x`, `y`, `grad`, `dx` have the input's dtype. Per-(k, c) arrays are
// K x C, row-major. tau has the layout of x with C replaced by K.
struct StatsArgs {
  Geometry geo;
  TilePlan plan;
  int64_t K;
  Resp resp;
  c10::ScalarType dtype;
  const void* x;
  const int64_t* groups;  // (N,), kGiven only
  const void* mu;         // E-step mixture mean, kSoft only
  const void* half_a;     // 1/2 / (running_var + eps), kSoft only
  const void* b;          // (K,) log prior - 1/2 sum_c log(running_var + eps), kSoft only
  const void* pair;       // K = 2, kSoft: m, A, B (C each) and db (math::pair_term)
  void* tau;              // output, unless kOne
  void* part_n;           // output (tiles, K)
  void* part_mean;        // output (tiles, K, C)
  void* part_m2;          // output (tiles, K, C)
};

struct NormalizeArgs {
  Geometry geo;
  TilePlan plan;
  int64_t K;
  Resp resp;
  c10::ScalarType dtype;
  const void* x;
  const int64_t* groups;  // eval, kGiven
  const void* mu;         // eval, kSoft
  const void* half_a;     // eval, kSoft
  const void* b;          // eval, kSoft
  const void* pair;       // eval, kSoft, K = 2: as StatsArgs::pair
  void* tau;              // train: input; eval: output (unless kOne)
  const void* alpha;      // gamma r
  const void* delta;      // beta - alpha m
  void* y;
  bool stream;            // y by non-temporal stores (stream_output)
  bool prefetch_y;        // eval, interleaved: y's lines prefetched ahead (prefetch_output)
};

struct GradStatsArgs {
  Geometry geo;
  TilePlan plan;
  int64_t K;
  Resp resp;
  c10::ScalarType dtype;
  const void* grad;
  const void* x;
  const void* tau;
  const void* mean;   // m (batch, or running at eval)
  void* part_sg;      // output (tiles, K, C): sum_p g tau
  void* part_sgx;     // output (tiles, K, C): sum_p g tau (x - m)
};

// dx (cbn_math.h): soft responsibilities, sum_k tau_k (alpha g + e1 + p (x - m_k)) -
// dl_k a (x - mu_k); one component per position, alpha g + e1 + p (x - m).
struct GradInputArgs {
  Geometry geo;
  TilePlan plan;
  int64_t K;
  Resp resp;
  c10::ScalarType dtype;
  const void* grad;
  const void* x;
  const void* tau;
  // dtau (kSoft only): D = x - mean, sum_c g (alpha D + beta) + D (e1 + e2 D) - ev; mean
  // and e1 also for dx
  const void* mean;
  const void* alpha;
  const void* beta;
  const void* e1;
  const void* e2;
  const void* ev;  // (K,) sum_c e2 v
  // dx: alpha, e1, mean (above), p = 2 e2; a (E-step precision) and mu (E-step mean),
  // kSoft only
  const void* p;
  const void* a;
  const void* mu;
  // K = 2, soft: dtau_0 - dtau_1 as one sum (math::dtau_pair_coefs): s, P, Q, U, R (C
  // each, in the order of mean, alpha, beta, e1, e2), then pev = (ev_0 - ev_1) - the
  // constant; else null
  const void* pair;
  void* dx;
  bool stream;  // dx by non-temporal stores (stream_output)
};

#define CBN_DECLARE_CPU_KERNELS(isa)                              \
  namespace isa {                                                 \
  void collect_mixture_stats(const StatsArgs& args);              \
  void normalize_mixture(const NormalizeArgs& args);              \
  void estep_normalize_mixture(const NormalizeArgs& args);        \
  void collect_grad_stats(const GradStatsArgs& args);             \
  void mixture_grad_input(const GradInputArgs& args);             \
  }

CBN_DECLARE_CPU_KERNELS(baseline)
#if defined(CBN_HAVE_AVX2_KERNELS)
CBN_DECLARE_CPU_KERNELS(avx2)
#endif
#if defined(CBN_HAVE_AVX512_KERNELS)
CBN_DECLARE_CPU_KERNELS(avx512)
#endif

}  // namespace cpu
}  // namespace cbn_ext
