// The fused CPU kernels of compound batch norm. This file is included once per
// instruction set, inside namespace cbn_ext::cpu::CBN_CPU_ISA, by kernels_<isa>.cpp,
// after every external header (kernels_deps.h): whatever is defined here is compiled for
// that instruction set only, and nothing here is shared between the variants.
//
// Layouts (cpu_kernels.h): interleaved (channels innermost: NHWC, (N, C)) and planar
// (NCHW). Each kernel walks the tiles of a TilePlan in parallel; per-tile partial results
// are merged by the caller in tile order, so results do not depend on the thread count.
// Inner loops run over SIMD vectors (GCC vector extensions, 32 bytes in every build, the
// AVX-512 one included): over channels in the interleaved layout, over positions in the
// planar one. The per-element formulas are those of csrc/cbn_math.h.
//
// Performance notes:
// * Half-precision input (bfloat16, float16) is converted to float in the loads and
//   stores of the inner loops, one vector at a time (vload / vstore below): no pass of its
//   own over a tile, no scratch copy. The soft planar rows of y and dx in bfloat16 store
//   their whole vectors two at a time (vstore2: one pack, one permute, one 32-byte store;
//   in-process A/B 4-12 % faster NCHW evaluation), and so do the soft interleaved rows
//   of y and dx (store_rows: two vectors of channels of a row), those with one
//   component (K = 1, given groups) too (normalize_row_fixed, dx_row_fixed). The planar
//   rows with one component store one vector at a time.
// * A planar row (one channel of one sample in the tile) whose length is not a multiple of
//   the vector width ends with a whole vector that overlaps the one before it (kOverlap):
//   outputs per position are written twice with the same value, sums leave the repeated
//   lanes out. Only rows (or chunks of rows) shorter than a vector take lane-by-lane
//   loads (kPart). So 7x7 and 14x14 rows run whole vectors.
// * Interleaved tiles are walked one row (position) at a time, two vectors of channels a
//   step, in memory order; their Sg / Sgx sums too at K = 1 (grad_sums_rows, the sums of a
//   block of rows in memory), down the columns with the sums in registers at K > 1
//   (grad_sums_interleaved). Two rows at once (each coefficient vector serving both)
//   stalled on the loads of x and ran 1.3-1.5x slower in float32. Planar per-(k, c)
//   coefficients are loaded once per row (a broadcast before the loop over positions); dx's
//   as vectors in a scratch array (as broadcast scalars GCC spilled them and broadcast them
//   again at every step). dtau walks the channels for each group of positions, so its
//   coefficients are read again for every group and channel: from one array, the five of a
//   (k, c) side by side (five separate arrays cost a pointer reload each).
// * Evaluation: the tile's E-step (softmax over components with positions in the lanes),
//   then its normalization while the tile is in the L2 cache: x read once from memory, y
//   written once. (Planar: normalizing each group of 32 positions right after its E-step,
//   from the L1 cache with its responsibilities in registers, was no faster: medians of
//   alternating-process A/B 1.0-1.37x the time, bfloat16 and float32, 56x56 to 7x7, also
//   with y's rows prefetched for writing; its stores go to C rows at once.)
// * Two components (K = 2, soft): the E-step sums l_0 - l_1 as one sum, expanded about the
//   components' midpoint (math::pair_term: a subtraction and two multiply-adds an element,
//   against two subtractions, two products and two multiply-adds), then a softmax of
//   (l_0 - l_1, 0) (by one exp: softmax_pair_in_place). The pair against two sums,
//   in-process A/B (2 cores, batch 64): evaluation 0.86-0.95x the time, batch
//   statistics 0.92-0.94x (channels-last, float32 and bfloat16, 56x56 to 7x7); the
//   responsibilities near the boundary between components far apart are more accurate
//   (tests/test_separated.py). Planar rows of 128 positions or more sum it one channel
//   row at a time (responsibilities_planar_pair).
// * Outputs of at least half the last-level cache (y, dx; cbn_cpu.cpp, stream_threshold,
//   stream_output) are written by non-temporal stores in the AVX2 and AVX-512 builds: the
//   kernel is instantiated for that (NT, a compile-time constant, so that the ordinary
//   stores of the common case test nothing), and each thread fences its stores
//   (for_each_tile).
// * The AVX-512 build (kernels_avx512.cpp) is this code with 32-byte vectors, compiled
//   with the EVEX encoding (32 vector registers, mask registers, embedded broadcasts), and
//   bfloat16 stores by vcvtneps2bf16 (vstore, vstore2). Alternating-process A/B against
//   the AVX2 build (Zen 4, 2 cores, medians of 5-6 rounds): bfloat16 evaluation, K = 2,
//   11-24 % faster (56x56 to 7x7, both layouts), float32 evaluation 4-13 % (two shapes),
//   training 1-4 %. Its results are the AVX2 build's, bit for bit (but for the payload
//   of a float32 NaN: tests/test_cpu_isa.py).
// * The work on a tile is done by functions that take their pointers as parameters
//   (locals the compiler can keep in registers: a store through a float pointer cannot
//   then force their reload).
//
// Expects: CBN_CPU_ISA defined, kernels_deps.h included.

#include "../cbn_math.h"

namespace cbn_ext {
namespace cpu {
namespace CBN_CPU_ISA {

namespace {

namespace math = ::cbn_ext::math;

// ---------------------------------------------------------------------------------------
// SIMD vectors
// ---------------------------------------------------------------------------------------

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef double U __attribute__((vector_size(32), aligned(8), may_alias));
  typedef int64_t I __attribute__((vector_size(32)));
};

template <typename T>
using Vec = typename VecTraits<T>::V;

template <typename T>
constexpr int64_t kW = 32 / sizeof(T);

// The accumulation type of an input dtype: float, or double for double.
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename S>
using acc_of = typename AccOf<S>::type;

template <typename T>
C10_ALWAYS_INLINE Vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VecTraits<T>::U*>(p);
}

// Stores of an output that streams past the caches (nt: NormalizeArgs::stream,
// GradInputArgs::stream): with AVX2, non-temporal stores where p is aligned to the
// store's size, ordinary stores elsewhere (and in the baseline build).
C10_ALWAYS_INLINE bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

#if defined(CBN_CPU_F16C) || defined(CBN_CPU_AVX2)
// 16 or 32 bytes of an output at p: non-temporal where nt and p is aligned to their size.
C10_ALWAYS_INLINE void store_bytes(void* p, __m128i v, bool nt) {
  if (nt && aligned_to(p, 16))
    _mm_stream_si128(static_cast<__m128i*>(p), v);
  else
    _mm_storeu_si128(static_cast<__m128i*>(p), v);
}

C10_ALWAYS_INLINE void store_bytes(void* p, __m256i v, bool nt) {
  if (nt && aligned_to(p, 32))
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  else
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}

// The float vector as the intrinsics' type.
C10_ALWAYS_INLINE __m256 as_m256(Vec<float> f) {
  __m256 w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}
#endif

template <typename T>
C10_ALWAYS_INLINE void vstore(T* p, Vec<T> v, bool nt = false) {
#if defined(CBN_CPU_AVX2)
  if (nt) {
    __m256i w;
    std::memcpy(&w, &v, sizeof(w));
    store_bytes(p, w, true);
    return;
  }
#else
  (void)nt;
#endif
  *reinterpret_cast<typename VecTraits<T>::U*>(p) = v;
}

// ---------------------------------------------------------------------------------------
// Half-precision data to and from float, 8 values at a time (16 in vstore2's bfloat16
// stores), inside the loads and stores of the inner loops: bfloat16 by integer shifts
// (rounding to nearest even, NaN as c10 writes it) or, in the AVX-512 build, by
// vcvtneps2bf16 where no lane is denormal or NaN; float16 by F16C where compiled in,
// else by c10's own bit manipulations on whole vectors. Bit-identical to c10's scalar
// conversions, which handle rows shorter than a vector.
// ---------------------------------------------------------------------------------------

typedef uint16_t U16x8 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

C10_ALWAYS_INLINE Vec<float> float_from_bits(U32x8 u) {
  Vec<float> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

C10_ALWAYS_INLINE U32x8 bits_of(Vec<float> f) {
  U32x8 u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// 8 uint16 to uint32 lanes, and back (lanes below 2^16). With AVX2, intrinsics: GCC
// lowers __builtin_convertvector here to two 128-bit widenings and an insert (5
// instructions a load instead of one vpmovzxwd from memory), and the narrowing to a mask
// and a pack; the half-precision loads and stores are most of the instructions of the
// bfloat16 inner loops.
C10_ALWAYS_INLINE U32x8 widen(const void* p) {
#if defined(CBN_CPU_F16C)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  U32x8 u;
  std::memcpy(&u, &w, sizeof(u));
  return u;
#else
  return __builtin_convertvector(*reinterpret_cast<const U16x8*>(p), U32x8);
#endif
}

C10_ALWAYS_INLINE void narrow_store(void* p, U32x8 v, bool nt = false) {
#if defined(CBN_CPU_F16C)
  __m256i w;
  std::memcpy(&w, &v, sizeof(w));
  // packus saturates to [0, 2^16): the lanes are already there; the 64-bit permute puts
  // the two 128-bit halves' packs in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0xD8);
  store_bytes(p, _mm256_castsi256_si128(packed), nt);
#else
  (void)nt;
  *reinterpret_cast<U16x8*>(p) = __builtin_convertvector(v, U16x8);
#endif
}

C10_ALWAYS_INLINE Vec<float> vload(const c10::BFloat16* p) { return float_from_bits(widen(p) << 16); }

// bfloat16 bits of f in the low half of each lane: rounded to nearest even, NaN as c10
// writes it (0x7FC0).
C10_ALWAYS_INLINE U32x8 bf16_bits(Vec<float> f) {
  const U32x8 u = bits_of(f);
  const U32x8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? U32x8{} + 0x7FC0u : r;
}

#if defined(CBN_CPU_AVX512)
// With AVX512-BF16, vcvtneps2bf16 rounds to nearest even as bf16_bits does, but flushes
// denormals to zero and keeps a NaN's sign and payload: vectors with a denormal or NaN
// lane (vfpclassps: QNaN 0x01, denormal 0x20, SNaN 0x80) take bf16_bits. (With MXCSR.DAZ
// set, vfpclassps sees no denormal and the vector is flushed, unlike c10's conversion;
// torch.set_flush_denormal(True) sets FTZ with it, so the kernels make no denormals
// there.)
C10_ALWAYS_INLINE __mmask8 bf16_special(__m256 w) { return _mm256_fpclass_ps_mask(w, 0xA1); }
#endif

C10_ALWAYS_INLINE void vstore(c10::BFloat16* p, Vec<float> f, bool nt = false) {
#if defined(CBN_CPU_AVX512)
  const __m256 w = as_m256(f);
  if (__builtin_expect(bf16_special(w) == 0, 1)) {
    const __m128bh h = _mm256_cvtneps_pbh(w);
    __m128i hi;
    std::memcpy(&hi, &h, sizeof(hi));
    store_bytes(p, hi, nt);
    return;
  }
#endif
  narrow_store(p, bf16_bits(f), nt);
}

C10_ALWAYS_INLINE Vec<float> vload(const c10::Half* p) {
#if defined(CBN_CPU_F16C)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  Vec<float> v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  // c10::detail::fp16_ieee_to_fp32_value, lane by lane
  const U32x8 w = widen(p) << 16;
  const U32x8 sign = w & 0x80000000u;
  const U32x8 two_w = w + w;
  const Vec<float> normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const Vec<float> denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const U32x8 r = sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized));
  return float_from_bits(r);
#endif
}

C10_ALWAYS_INLINE void vstore(c10::Half* p, Vec<float> f, bool nt = false) {
#if defined(CBN_CPU_F16C)
  // NaN as c10's conversion (and the baseline build below) writes it: sign | 0x7E00, not
  // the payload that vcvtps2ph would keep
  f = f != f ? float_from_bits((bits_of(f) & 0x80000000u) | 0x7FC00000u) : f;
  const __m128i h = _mm256_cvtps_ph(as_m256(f), _MM_FROUND_TO_NEAREST_INT);
  store_bytes(p, h, nt);
#else
  // c10::detail::fp16_ieee_from_fp32_value, lane by lane (no FMA here to fuse its
  // multiply and add differently)
  const U32x8 w = bits_of(f);
  const Vec<float> base0 = (float_from_bits(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const U32x8 shl1_w = w + w;
  const U32x8 sign = w & 0x80000000u;
  U32x8 bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? U32x8{} + 0x71000000u : bias;
  const U32x8 bits = bits_of(float_from_bits((bias >> 1) + 0x07800000u) + base0);
  const U32x8 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  narrow_store(p, (sign >> 16) | (shl1_w > 0xFF000000u ? U32x8{} + 0x7E00u : nonsign), nt);
#endif
}

// Two vectors of floats to 16 consecutive bfloat16 values. With AVX2: both rounded, then
// one pack, one permute and one 32-byte store (in place of two of each and two 16-byte
// stores).
C10_ALWAYS_INLINE void vstore2(c10::BFloat16* p, Vec<float> a, Vec<float> b, bool nt) {
#if defined(CBN_CPU_AVX512)
  const __m256 fa = as_m256(a), fb = as_m256(b);
  if (__builtin_expect((bf16_special(fa) | bf16_special(fb)) == 0, 1)) {
    // the low half from the second operand
    const __m256bh h = _mm256_cvtne2ps_pbh(fb, fa);
    __m256i packed;
    std::memcpy(&packed, &h, sizeof(packed));
    store_bytes(p, packed, nt);
    return;
  }
#endif
#if defined(CBN_CPU_AVX2)
  __m256i wa, wb;
  const U32x8 ra = bf16_bits(a), rb = bf16_bits(b);
  std::memcpy(&wa, &ra, sizeof(wa));
  std::memcpy(&wb, &rb, sizeof(wb));
  // packus: (a0-3, b0-3 | a4-7, b4-7) in 64-bit quarters; the permute puts them in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(wa, wb), 0xD8);
  store_bytes(p, packed, nt);
#else
  vstore(p, a, nt);
  vstore(p + 8, b, nt);
#endif
}

// The first n (< width) lanes from p, zero elsewhere; c10's scalar conversions.
template <typename S>
C10_ALWAYS_INLINE Vec<acc_of<S>> vload_part(const S* p, int64_t n) {
  Vec<acc_of<S>> v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<acc_of<S>>(p[i]);
  return v;
}

template <typename S>
C10_ALWAYS_INLINE void vstore_part(S* p, Vec<acc_of<S>> v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(v[i]);
}

// How a vector covers positions (or channels):
//   kWhole: W new lanes;
//   kOverlap: a whole vector ending at the end of its row, whose first W - n lanes repeat
//     positions of the vector before (n new lanes);
//   kPart: the first n lanes (a row shorter than a vector, or interleaved channels).
enum Span : int { kWhole = 0, kOverlap = 1, kPart = 2 };
template <int P>
using SpanC = std::integral_constant<int, P>;
template <int N>
using IntC = std::integral_constant<int, N>;

template <int P, typename S>
C10_ALWAYS_INLINE Vec<acc_of<S>> ld(const S* p, int64_t n) {
  if constexpr (P == kPart) {
    return vload_part(p, n);
  } else {
    return vload(p);
  }
}

template <int P, typename S>
C10_ALWAYS_INLINE void st(S* p, Vec<acc_of<S>> v, int64_t n, bool nt = false) {
  if constexpr (P == kPart) {
    vstore_part(p, v, n);
  } else {
    vstore(p, v, nt);
  }
}

// Which lanes of a vector (not kWhole) hold new positions (or channels): lanes [W - n, W)
// of a kOverlap vector, [0, n) of a kPart one.
template <int P, typename T>
C10_ALWAYS_INLINE auto new_lane_mask(int64_t n) {
  using I = typename VecTraits<T>::I;
  using E = std::remove_cv_t<std::remove_reference_t<decltype(I{}[0])>>;
  constexpr int64_t W = kW<T>;
  I idx;
  for (int64_t i = 0; i < W; ++i) idx[i] = static_cast<E>(i);
  const I lim = I{} + static_cast<E>(P == kOverlap ? W - n : n);
  return P == kOverlap ? idx >= lim : idx < lim;
}

template <typename V>
using lane_t = std::remove_cv_t<std::remove_reference_t<decltype(V{}[0])>>;

// v with the lanes that hold no new position (or channel) set to zero: what a sum takes.
template <int P, typename V>
C10_ALWAYS_INLINE V fresh(V v, int64_t n) {
  if constexpr (P == kWhole) {
    return v;
  } else {
    return new_lane_mask<P, lane_t<V>>(n) ? v : V{};
  }
}

// The lanes of t that hold new positions (those fresh keeps), the others from old.
template <int P, typename V>
C10_ALWAYS_INLINE V new_lanes(V old, V t, int64_t n) {
  if constexpr (P == kWhole) {
    return t;
  } else {
    return new_lane_mask<P, lane_t<V>>(n) ? t : old;
  }
}

// body(SpanC<kWhole>, i, W) over the whole vectors of [0, n), then body(SpanC<kPart>, i,
// rest) for a partial tail (channels of an interleaved row).
template <typename T, typename F>
C10_ALWAYS_INLINE void for_vectors(int64_t n, F&& body) {
  int64_t i = 0;
  for (; i + kW<T> <= n; i += kW<T>) body(SpanC<kWhole>{}, i, kW<T>);
  if (i < n) body(SpanC<kPart>{}, i, n - i);
}

// Positions [i, end) of a planar row of len positions: body(SpanC<kWhole>, i, W) over
// whole vectors, then the rest as one kOverlap vector at len - W (kPart when len < W).
template <typename T, typename F>
C10_ALWAYS_INLINE void row_span(int64_t len, int64_t i, int64_t end, F&& body) {
  constexpr int64_t W = kW<T>;
  for (; i + W <= end; i += W) body(SpanC<kWhole>{}, i, W);
  if (i < end) {
    if (len >= W) {
      body(SpanC<kOverlap>{}, len - W, end - i);
    } else {
      body(SpanC<kPart>{}, i, end - i);
    }
  }
}

// A planar row of len positions in blocks of kW<T> * block_vectors positions:
// body(SpanC<kWhole>, i, W) over whole vectors, the rest as one kOverlap vector at
// len - W (or kPart when len < W); end_block() after each block.
template <typename T, typename F, typename G>
C10_ALWAYS_INLINE void for_row_blocks(int64_t len, int64_t block_vectors, F&& body,
                                      G&& end_block) {
  const int64_t B = kW<T> * block_vectors;
  for (int64_t b0 = 0; b0 < len; b0 += B) {
    row_span<T>(len, b0, std::min(len, b0 + B), body);
    end_block();
  }
}

template <typename T, typename F>
C10_ALWAYS_INLINE void for_row(int64_t len, F&& body) {
  for_row_blocks<T>(len, int64_t(1) << 40, body, [] {});
}

// A planar row as for_row, its whole vectors two at a time (pair(i): [i, i + 2 W)) up to
// the last pair, then body over the rest as for_row does.
template <typename T, typename F, typename G>
C10_ALWAYS_INLINE void for_row_pairs(int64_t len, F&& body, G&& pair) {
  constexpr int64_t W = kW<T>;
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) pair(i);
  row_span<T>(len, i, len, body);
}

// A planar output row of len positions at out: out[s ..] = value(SpanC<P>, s, n) over the
// row as for_row covers it; in bfloat16 its whole vectors two at a time (vstore2).
template <typename acc_t, typename S, typename F>
C10_ALWAYS_INLINE void store_row(S* out, int64_t len, F&& value, bool nt) {
  auto body = [&](auto span, int64_t s, int64_t n) {
    st<decltype(span)::value>(out + s, value(span, s, n), n, nt);
  };
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    for_row_pairs<acc_t>(len, body, [&](int64_t s) {
      constexpr int64_t W = kW<acc_t>;
      vstore2(out + s, value(SpanC<kWhole>{}, s, W), value(SpanC<kWhole>{}, s + W, W), nt);
    });
  } else {
    for_row<acc_t>(len, body);
  }
}

// NP interleaved output rows of C channels at out (row p at out + p C): value(SpanC<P>,
// c, n, v) gives the rows' vectors at channels [c, c + n) in v[0 .. NP); in bfloat16 two
// whole vectors of a row at once (vstore2), the rest as for_vectors covers it.
template <int NP, typename acc_t, typename S, typename F>
C10_ALWAYS_INLINE void store_rows(S* out, int64_t C, F&& value, bool nt) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  int64_t c0 = 0;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    for (; c0 + 2 * W <= C; c0 += 2 * W) {
      V a[NP], b[NP];
      value(SpanC<kWhole>{}, c0, W, a);
      value(SpanC<kWhole>{}, c0 + W, W, b);
      for (int p = 0; p < NP; ++p) vstore2(out + p * C + c0, a[p], b[p], nt);
    }
  }
  for_vectors<acc_t>(C - c0, [&](auto span, int64_t i, int64_t n) {
    constexpr int P = decltype(span)::value;
    V v[NP];
    value(span, c0 + i, n, v);
    for (int p = 0; p < NP; ++p) st<P>(out + p * C + c0 + i, v[p], n, nt);
  });
}

// A planar row in groups of G (2 or 4) vectors: g(std::integral_constant<int, NV>,
// SpanC<P>, o, n) with NV <= G vectors at offsets o[0 .. NV). The last group ends at len
// (its vectors may overlap the group before, or each other); rows shorter than a vector
// are one kPart vector of n lanes. Only for outputs per position (a repeated position is
// computed again, with the same result).
template <typename T, int G, typename F>
C10_ALWAYS_INLINE void for_row_groups(int64_t len, F&& g) {
  static_assert(G == 2 || G == 4, "groups of 2 or 4 vectors");
  constexpr int64_t W = kW<T>;
  int64_t o[G];
  if (len < W) {
    o[0] = 0;
    if (len > 0) g(IntC<1>{}, SpanC<kPart>{}, o, len);
    return;
  }
  int64_t s = 0;
  for (; s + G * W <= len; s += G * W) {
    for (int v = 0; v < G; ++v) o[v] = s + v * W;
    g(IntC<G>{}, SpanC<kWhole>{}, o, W);
  }
  const int64_t r = len - s;
  if (r == 0) return;
  const int64_t nv = (r + W - 1) / W;  // 1 .. G
  for (int v = 0; v < G; ++v) o[v] = std::min(s + v * W, len - W);
  switch (nv) {
    case 1: g(IntC<1>{}, SpanC<kWhole>{}, o, W); break;
    case 2: g(IntC<2>{}, SpanC<kWhole>{}, o, W); break;
    default:
      if constexpr (G == 4) {
        if (nv == 3) g(IntC<3>{}, SpanC<kWhole>{}, o, W);
        else g(IntC<4>{}, SpanC<kWhole>{}, o, W);
      }
      break;
  }
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> vsplat(T s) {
  return Vec<T>{} + s;
}

template <typename V>
C10_ALWAYS_INLINE auto vsum_impl(V v) {
  auto s = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(s); ++i) s += v[i];
  return s;
}
C10_ALWAYS_INLINE float vsum(Vec<float> v) { return vsum_impl(v); }
C10_ALWAYS_INLINE double vsum(Vec<double> v) { return vsum_impl(v); }

// Lane r: vsum(t[r]), for the W vectors t[0..W) (the same additions in the same order:
// the same bits). With AVX, an 8 x 8 transpose and 7 vector additions in place of 8
// chains of 7 lane extractions and scalar additions.
template <typename V>
C10_ALWAYS_INLINE V vsum_lanes_impl(const V* t) {
  V o;
  for (size_t r = 0; r < sizeof(V) / sizeof(o[0]); ++r) o[r] = vsum_impl(t[r]);
  return o;
}
C10_ALWAYS_INLINE Vec<float> vsum_lanes(const Vec<float>* t) {
#if defined(CBN_CPU_AVX2)
  __m256 r[8];
  std::memcpy(r, t, sizeof(r));
  // a[2i] = (t2i[0] t2i+1[0] t2i[1] t2i+1[1] | lanes 4, 5), a[2i + 1] = lanes 2, 3 | 6, 7
  __m256 a[8], q[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // q[4h + m]: lane m | lane m + 4 of rows 4h .. 4h + 3
  for (int h = 0; h < 2; ++h) {
    q[4 * h + 0] = _mm256_shuffle_ps(a[4 * h], a[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    q[4 * h + 1] = _mm256_shuffle_ps(a[4 * h], a[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    q[4 * h + 2] = _mm256_shuffle_ps(a[4 * h + 1], a[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    q[4 * h + 3] = _mm256_shuffle_ps(a[4 * h + 1], a[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // column m (lane m of rows 0 .. 7) and column m + 4
  __m256 col[8];
  for (int m = 0; m < 4; ++m) {
    col[m] = _mm256_permute2f128_ps(q[m], q[4 + m], 0x20);
    col[m + 4] = _mm256_permute2f128_ps(q[m], q[4 + m], 0x31);
  }
  __m256 s = col[0];
  for (int m = 1; m < 8; ++m) s = _mm256_add_ps(s, col[m]);
  Vec<float> o;
  std::memcpy(&o, &s, sizeof(o));
  return o;
#else
  return vsum_lanes_impl(t);
#endif
}
C10_ALWAYS_INLINE Vec<double> vsum_lanes(const Vec<double>* t) { return vsum_lanes_impl(t); }

// Sums over channels of the n <= W rows of a group, KB of them a row: row_sums(j, tot)
// leaves row j's as vectors whose lanes add up to them; out[kb] gets them in lanes (lane
// j: row j; lanes from n on: 0), added up by vsum_lanes.
template <int KB, typename V, typename F>
C10_ALWAYS_INLINE void group_sums(int64_t n, V (&out)[KB], F&& row_sums) {
  constexpr int64_t W = sizeof(V) / sizeof(out[0][0]);
  V rows[KB][W];
  for (int64_t j = 0; j < W; ++j) {
    V tot[KB];
    if (j < n) {
      row_sums(j, tot);
    } else {
      for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
    }
    for (int kb = 0; kb < KB; ++kb) rows[kb][j] = tot[kb];
  }
  for (int kb = 0; kb < KB; ++kb) out[kb] = vsum_lanes(rows[kb]);
}

// exp on 8 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial), about
// 1 ulp; exp(x) = 0 below -88.38, NaN stays NaN.
C10_ALWAYS_INLINE Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  using I = VecTraits<float>::I;
  const V xin = x;
  x = x > 88.3762626647949f ? vsplat(88.3762626647949f) : x;
  x = x < -88.3762626647949f ? vsplat(-88.3762626647949f) : x;
  V fx = x * 1.44269504088896341f + 0.5f;
  I ti = __builtin_convertvector(fx, I);
  V tf = __builtin_convertvector(ti, V);
  tf = tf > fx ? tf - 1.0f : tf;  // floor
  x = x - tf * 0.693359375f;
  x = x - tf * -2.12194440e-4f;
  const V z = x * x;
  V p = vsplat(1.9875691500E-4f);
  p = p * x + 1.3981999507E-3f;
  p = p * x + 8.3334519073E-3f;
  p = p * x + 4.1665795894E-2f;
  p = p * x + 1.6666665459E-1f;
  p = p * x + 5.0000001201E-1f;
  p = p * z + x + 1.0f;
  I e = (__builtin_convertvector(tf, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(scale));
  V r = p * scale;
  return xin == xin ? r : xin;
}

C10_ALWAYS_INLINE Vec<double> vexp(Vec<double> x) {
  Vec<double> r;
  for (int64_t i = 0; i < kW<double>; ++i) r[i] = std::exp(x[i]);
  return r;
}

struct VExp {
  template <typename V>
  C10_ALWAYS_INLINE V operator()(V x) const {
    return vexp(x);
  }
};

// math::softmax_in_place over two log-likelihoods of which the second is 0 (the E-step of
// two components by pair_term: l_0 - l_1 and 0), lanes l0, l1 (stride apart), by one exp
// where it takes two: with m = max(l_0, 0), one of l_0 - m and 0 - m is 0 (exp(0) = 1
// exactly; NaN where l_0 = +inf, inf - inf, as there), the other -|l_0| (l_0 itself
// where it is NaN: the same value as l_0 - m or 0 - m, so the same exp). The same bits as
// softmax_in_place. With
// store_interleaved_pair below, in-process A/B (cold inputs, both orders): a bfloat16
// channels-last evaluation at K = 2 took 0.84-0.98x the time at C = 64 (56x56), 0.99-1.02x
// at C = 256 and 512 (the E-step of a row longer there).
template <typename V>
C10_ALWAYS_INLINE void softmax_pair_in_place(V* l, int64_t stride) {
  using E = lane_t<V>;
  const V l0 = l[0];
  const auto pos = l0 > V{};                   // m = l_0 there, 0 elsewhere (NaN too)
  const V other = vexp(pos ? -l0 : l0);        // exp(0 - m) there, exp(l_0 - 0) elsewhere
  const V one = (pos ? l0 - l0 : V{}) + E(1);  // exp(l_0 - m) there, exp(0 - m) elsewhere
  const V e0 = pos ? one : other, e1 = pos ? other : one;
  const V inv = 1 / (e0 + e1);
  l[0] = e0 * inv;
  l[stride] = e1 * inv;
}

// The responsibilities of loglik_interleaved_group's K log-likelihoods (lanes l[k]), in
// place: with pair, of (l_0 - l_1, 0) by softmax_pair_in_place.
template <typename V>
C10_ALWAYS_INLINE void softmax_lanes(V* l, int64_t K, bool pair) {
  if (pair)
    softmax_pair_in_place(l, 1);
  else
    math::softmax_in_place(l, K, 1, VExp{});
}

// Lanes [0, n) of a and b interleaved into t: t[2 j] = a[j], t[2 j + 1] = b[j] (two
// components' responsibilities in the (P, K) layout), by two shuffles and two stores
// where a lane-by-lane copy took 2 n scalar loads and stores.
template <typename T>
C10_ALWAYS_INLINE void store_interleaved_pair(T* t, Vec<T> a, Vec<T> b, int64_t n) {
  using I = typename VecTraits<T>::I;
  constexpr int64_t W = kW<T>;
  Vec<T> lo, hi;
  if constexpr (W == 8) {
    lo = __builtin_shuffle(a, b, I{0, 8, 1, 9, 2, 10, 3, 11});
    hi = __builtin_shuffle(a, b, I{4, 12, 5, 13, 6, 14, 7, 15});
  } else {
    static_assert(W == 4);
    lo = __builtin_shuffle(a, b, I{0, 4, 1, 5});
    hi = __builtin_shuffle(a, b, I{2, 6, 3, 7});
  }
  if (n == W) {
    vstore(t, lo);
    vstore(t + W, hi);
  } else {
    vstore_part(t, lo, std::min(2 * n, W));
    if (2 * n > W) vstore_part(t + W, hi, 2 * n - W);
  }
}

// Blocked sums (SPEC "Accuracy"): long sums over channels or positions are cut into
// blocks whose partial sums are added at the end, so that the rounding error grows with
// the block length plus the number of blocks, not with the whole length.
constexpr int64_t kChannelBlock = 32;   // channels per lane of a blocked sum over c
constexpr int64_t kPositionBlock = 64;  // positions per lane of a blocked sum over p

// The planar E-step and dtau sum over channels for a group of positions: they walk the C
// rows of a tile side by side, up to four (E-step, and two components' one dtau sum) or
// two (dtau) vectors of each row at a time, more streams than the hardware prefetchers
// follow, so each row is prefetched kPrefetchBytes ahead of where it is read, every 64
// bytes of it once, when rows are longer than that (shorter rows lie next to each other:
// one stream). In-process A/B on 2 cores, 64 x C x H x W, K = 2, minimum times: a bfloat16
// training step 7-30 % faster at 56x56 to 14x14, a float32 evaluation 15-30 %; at 7x7
// (196-byte rows) the prefetch made the float32 evaluation 5 % slower. The other passes
// walk one channel at a time (a few streams: x, the gradient, dx and the K tau or dl rows).
constexpr int64_t kPrefetchBytes = 256;

// c_stride: the distance from one channel's row to the next, in elements.
template <typename S>
C10_ALWAYS_INLINE bool rows_need_prefetch(int64_t c_stride) {
  return c_stride * static_cast<int64_t>(sizeof(S)) > kPrefetchBytes;
}

// The address is formed as an integer: it may lie past the end of the tensor, where a
// prefetch does nothing but a pointer may not point.
template <typename S>
C10_ALWAYS_INLINE void prefetch_ahead(const S* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  __builtin_prefetch(reinterpret_cast<const void*>(a));
}

// Calls f(IntC<KB>, k0) over blocks of at most 4 components.
template <typename F>
C10_ALWAYS_INLINE void for_component_blocks(int64_t K, F&& f) {
  int64_t k0 = 0;
  for (; k0 + 4 <= K; k0 += 4) f(IntC<4>{}, k0);
  switch (K - k0) {
    case 3: f(IntC<3>{}, k0); break;
    case 2: f(IntC<2>{}, k0); break;
    case 1: f(IntC<1>{}, k0); break;
    default: break;
  }
}

// Calls f(IntC<KB>, k0) over blocks of at most 2 components (sums of two positions or of
// two to four vectors at once: up to 2 x 4 accumulators stay in registers through the
// inner loop over channels; block totals, touched once a block, may go to the stack).
template <typename F>
C10_ALWAYS_INLINE void for_component_pairs(int64_t K, F&& f) {
  int64_t k0 = 0;
  for (; k0 + 2 <= K; k0 += 2) f(IntC<2>{}, k0);
  if (k0 < K) f(IntC<1>{}, k0);
}

// f(IntC<K>) for K = 2, 3, 4 (loops over components unrolled, per-position values in
// registers), else f(IntC<0>) (K read at run time).
template <typename F>
C10_ALWAYS_INLINE void with_small_K(int64_t K, F&& f) {
  switch (K) {
    case 2: f(IntC<2>{}); break;
    case 3: f(IntC<3>{}); break;
    case 4: f(IntC<4>{}); break;
    default: f(IntC<0>{}); break;
  }
}

// with_small_K, and whether the kernel's output is streamed (NormalizeArgs::stream,
// GradInputArgs::stream) as a compile-time constant: the stores of the common, cached
// case test nothing.
template <typename F>
C10_ALWAYS_INLINE void with_small_K_stream(int64_t K, bool stream, F&& f) {
  with_small_K(K, [&](auto kc) {
    if (stream) {
      f(kc, std::true_type{});
    } else {
      f(kc, std::false_type{});
    }
  });
}

// ---------------------------------------------------------------------------------------
// Tiles and their data
// ---------------------------------------------------------------------------------------

struct Tile {
  int64_t T;     // positions in the tile
  int64_t p0;    // interleaved: first position
  int64_t n0;    // planar: first sample
  int64_t nseg;  // planar: samples (segments) in the tile
  int64_t s0;    // planar: first spatial index in each segment
  int64_t len;   // planar: positions per segment
};

Tile tile_at(const Geometry& g, const TilePlan& plan, int64_t t) {
  Tile tl{};
  if (g.interleaved) {
    const int64_t M = g.N * g.S;
    tl.p0 = t * plan.len;
    tl.T = std::min(plan.len, M - tl.p0);
  } else if (plan.chunks > 1) {
    tl.n0 = t / plan.chunks;
    tl.nseg = 1;
    tl.s0 = (t % plan.chunks) * plan.len;
    tl.len = std::min(plan.len, g.S - tl.s0);
    tl.T = tl.len;
  } else {
    tl.n0 = t * plan.segs;
    tl.nseg = std::min(plan.segs, g.N - tl.n0);
    tl.s0 = 0;
    tl.len = g.S;
    tl.T = tl.nseg * tl.len;
  }
  return tl;
}

// Rows of a planar tile: row (seg, c) starts at base + seg * seg_stride + c * c_stride
// (x, y, grad, dx: c a channel; tau: c a component).
template <typename T>
struct View {
  T* base;
  int64_t seg_stride;
  int64_t c_stride;
  C10_ALWAYS_INLINE T* row(int64_t seg, int64_t c) const {
    return base + seg * seg_stride + c * c_stride;
  }
};

template <typename T>
View<T> planar_view(const Geometry& g, const Tile& tl, T* p) {
  return {p + tl.n0 * g.C * g.S + tl.s0, g.C * g.S, g.S};
}

// The responsibilities (N, K, S) of a planar tile.
template <typename T>
View<T> planar_tau(const Geometry& g, const Tile& tl, int64_t K, T* tau) {
  return {tau + tl.n0 * K * g.S + tl.s0, K * g.S, g.S};
}

// Scratch memory: per thread, allocated once per chunk of tiles (or, read only, once per
// call before the parallel loop).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> data;
  explicit Scratch(int64_t n) : data(new T[n > 0 ? n : 1]) {}
  T* get() { return data.get(); }
};

// Interleaved: the tile's responsibilities loc[k * T + j] to the tensor's (P, K) layout.
template <typename acc_t>
void tau_to_global(const Tile& tl, int64_t K, const acc_t* loc, acc_t* tau) {
  acc_t* out = tau + tl.p0 * K;
  for (int64_t j = 0; j < tl.T; ++j)
    for (int64_t k = 0; k < K; ++k) out[j * K + k] = loc[k * tl.T + j];
}

// Entries of fixed_components' (and components_from_tau's) output: a position of an
// interleaved tile, a segment of a planar one.
inline int64_t fixed_count(const Geometry& g, const TilePlan& plan) {
  return g.interleaved ? plan.len : plan.segs;
}

// The single component of each position (interleaved) or segment (planar): 0 (K = 1)
// or the sample's group.
void fixed_components(const Geometry& g, const Tile& tl, Resp resp, const int64_t* groups,
                      int64_t* out) {
  const int64_t n = g.interleaved ? tl.T : tl.nseg;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t sample = g.interleaved ? (tl.p0 + i) / g.S : tl.n0 + i;
    out[i] = resp == Resp::kOne ? 0 : groups[sample];
  }
}

// The same, recovered from one-hot responsibilities (the backward of the split path).
template <typename acc_t>
void components_from_tau(const Geometry& g, const Tile& tl, int64_t K, const acc_t* tau,
                         int64_t* out) {
  const int64_t n = g.interleaved ? tl.T : tl.nseg;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* t = g.interleaved ? tau + (tl.p0 + i) * K : tau + (tl.n0 + i) * K * g.S + tl.s0;
    const int64_t stride = g.interleaved ? 1 : g.S;
    int64_t k = 0;
    while (k + 1 < K && t[k * stride] == acc_t(0)) ++k;
    out[i] = k;
  }
}

// ---------------------------------------------------------------------------------------
// E-step: l = b_k - sum_c 1/2 a (x - mu)^2, then tau = softmax over k.
// ---------------------------------------------------------------------------------------

// Interleaved: the sums sum_c 1/2 a_kc (x_c - mu_kc)^2 of one row, components [0, KB),
// as vectors whose lanes add up to them (vsum): two vectors of channels a step (two
// accumulators a component), blocked over channels. One row at a time, in memory order:
// two rows at once (each coefficient vector serving both) ran 1.5x slower on float32
// channels-last tiles, stalled on the loads of x.
template <int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void mahalanobis_row(const S* xr, int64_t C, const acc_t* mu,
                                       const acc_t* ha, Vec<acc_t> (&tot)[KB]) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += 2 * W * kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + 2 * W * kChannelBlock);
    V acc0[KB], acc1[KB];
    for (int kb = 0; kb < KB; ++kb) acc0[kb] = acc1[kb] = V{};
    int64_t c = c0;
    for (; c + 2 * W <= c1; c += 2 * W) {
      const V x0 = vload(xr + c), x1 = vload(xr + c + W);
      for (int kb = 0; kb < KB; ++kb) {
        acc0[kb] += math::mahalanobis_term(x0, vload(mu + kb * C + c), vload(ha + kb * C + c));
        acc1[kb] += math::mahalanobis_term(x1, vload(mu + kb * C + c + W),
                                           vload(ha + kb * C + c + W));
      }
    }
    for_vectors<acc_t>(c1 - c, [&](auto span, int64_t i, int64_t n) {
      constexpr int P = decltype(span)::value;
      const V x0 = ld<P>(xr + c + i, n);
      for (int kb = 0; kb < KB; ++kb)
        acc0[kb] += math::mahalanobis_term(x0, ld<P>(mu + kb * C + c + i, n),
                                           ld<P>(ha + kb * C + c + i, n));
    });
    for (int kb = 0; kb < KB; ++kb) tot[kb] += acc0[kb] + acc1[kb];
  }
}

// Interleaved, two components: sum_c d (A d + B) of one row (math::pair_term; pc: m, A,
// B, C each) as a vector whose lanes add up to it, blocked over channels as
// mahalanobis_row; four vectors of channels a step (four accumulators: one multiply-add
// chain each).
template <typename S, typename acc_t>
C10_ALWAYS_INLINE void pair_row(const S* xr, int64_t C, const acc_t* pc, Vec<acc_t> (&tot)[1]) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const acc_t* m = pc;
  const acc_t* A = pc + C;
  const acc_t* B = pc + 2 * C;
  tot[0] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += 2 * W * kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + 2 * W * kChannelBlock);
    V acc[4] = {};
    int64_t c = c0;
    for (; c + 4 * W <= c1; c += 4 * W)
      for (int u = 0; u < 4; ++u) {
        const int64_t i = c + u * W;
        acc[u] += math::pair_term(vload(xr + i), vload(m + i), vload(A + i), vload(B + i));
      }
    for_vectors<acc_t>(c1 - c, [&](auto span, int64_t i, int64_t n) {
      constexpr int P = decltype(span)::value;
      const int64_t q = c + i;
      acc[0] += math::pair_term(ld<P>(xr + q, n), ld<P>(m + q, n), ld<P>(A + q, n),
                                ld<P>(B + q, n));
    });
    tot[0] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

// Interleaved: the log-likelihoods b_k - sum_c 1/2 a_kc (x_c - mu_kc)^2 of the n <= W
// rows at x, one vector a component: l[k], lane j for row j (lanes from n on: b_k); with
// pair (K = 2), l[0] = l_0 - l_1 (lanes from n on: db) and l[1] = 0. Each
// row's sums as vectors (mahalanobis_row), their lanes added up W rows at a time by
// vsum_lanes: the same additions, in the same order, as a vsum a row, without a chain of
// scalar additions and lane extractions per row and component (a third of the
// channels-last E-step's time at C = 64, by perf).
template <typename S, typename acc_t>
C10_ALWAYS_INLINE void loglik_interleaved_group(const S* x, int64_t n, int64_t C, int64_t K,
                                                const acc_t* mu, const acc_t* ha,
                                                const acc_t* b, const acc_t* pair,
                                                Vec<acc_t>* l) {
  using V = Vec<acc_t>;
  if (pair != nullptr) {
    V s[1];
    group_sums<1>(n, s, [&](int64_t j, V(&tot)[1]) __attribute__((always_inline)) {
      pair_row(x + j * C, C, pair, tot);
    });
    l[0] = vsplat(pair[3 * C]) - s[0];
    l[1] = V{};
    return;
  }
  for_component_blocks(K, [&](auto kbc, int64_t k0) {
    constexpr int KB = decltype(kbc)::value;
    V s[KB];
    // (inlined: as a call, GCC's choice, each row paid a vzeroupper and its sums' round
    // trip through the stack)
    group_sums<KB>(n, s, [&](int64_t j, V(&tot)[KB]) __attribute__((always_inline)) {
      mahalanobis_row<KB>(x + j * C, C, mu + k0 * C, ha + k0 * C, tot);
    });
    for (int kb = 0; kb < KB; ++kb) l[k0 + kb] = vsplat(b[k0 + kb]) - s[kb];
  });
}

// Interleaved: the tile's T rows' responsibilities into loc (K rows of T), W rows at a time.
template <typename S, typename acc_t>
void responsibilities_interleaved(const S* x, int64_t T, int64_t C, int64_t K,
                                  const acc_t* mu, const acc_t* ha, const acc_t* b,
                                  const acc_t* pair, acc_t* loc, Vec<acc_t>* lanes) {
  for_vectors<acc_t>(T, [&](auto span, int64_t j, int64_t n) {
    constexpr int P = decltype(span)::value;
    loglik_interleaved_group(x + j * C, n, C, K, mu, ha, b, pair, lanes);
    softmax_lanes(lanes, K, pair != nullptr);
    for (int64_t k = 0; k < K; ++k) st<P>(loc + k * T + j, lanes[k], n);
  });
}

// Planar: KB sums over channels for the NV vectors of positions at o[v] of segment seg,
// into tot[kb][v]; blocked over channels. add(c, xs, acc) adds channel c's terms, its
// row's vectors xs[v], into acc[kb][v].
template <int NV, int P, int KB, typename S, typename V, typename F>
C10_ALWAYS_INLINE void planar_channel_sums(View<const S> xv, int64_t seg, const int64_t* o,
                                           int64_t n, int64_t C, V (&tot)[KB][NV], F&& add) {
  using acc_t = lane_t<V>;
  const bool pf = rows_need_prefetch<S>(xv.c_stride);
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) tot[kb][v] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    V acc[KB][NV];
    for (int kb = 0; kb < KB; ++kb)
      for (int v = 0; v < NV; ++v) acc[kb][v] = V{};
    for (int64_t c = c0; c < c1; ++c) {
      const S* r = xv.row(seg, c);
      if (pf) {
        prefetch_ahead(r + o[0]);
        // a group longer than a line: each 64 bytes of the stream prefetched once
        if constexpr (NV * kW<acc_t> * sizeof(S) > 64) prefetch_ahead(r + o[0] + 64 / sizeof(S));
      }
      V xs[NV];
      for (int v = 0; v < NV; ++v) xs[v] = ld<P>(r + o[v], n);
      add(c, xs, acc);
    }
    for (int kb = 0; kb < KB; ++kb)
      for (int v = 0; v < NV; ++v) tot[kb][v] += acc[kb][v];
  }
}

// Planar: log-likelihoods of the NV vectors of positions at o[v] of segment seg,
// components [0, KB) of mu / ha / b, into l[kb * NV + v].
template <int NV, int P, int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void loglik_planar(View<const S> xv, int64_t seg, const int64_t* o, int64_t n,
                                     int64_t C, const acc_t* mu, const acc_t* ha, const acc_t* b,
                                     Vec<acc_t>* l) {
  using V = Vec<acc_t>;
  V tot[KB][NV];
  planar_channel_sums<NV, P, KB>(xv, seg, o, n, C, tot,
                                 [&](int64_t c, const V(&xs)[NV], V(&acc)[KB][NV])
                                     __attribute__((always_inline)) {
    for (int kb = 0; kb < KB; ++kb) {
      const acc_t m = mu[kb * C + c], h = ha[kb * C + c];
      for (int v = 0; v < NV; ++v) acc[kb][v] += math::mahalanobis_term(xs[v], m, h);
    }
  });
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) l[kb * NV + v] = vsplat(b[kb]) - tot[kb][v];
}

// Planar, two components: l_0 - l_1 of the NV vectors of positions at o[v] into l[v]
// (math::pair_term; pc: m, A, B, C each, then db).
template <int NV, int P, typename S, typename acc_t>
C10_ALWAYS_INLINE void loglik_planar_pair(View<const S> xv, int64_t seg, const int64_t* o,
                                          int64_t n, int64_t C, const acc_t* pc,
                                          Vec<acc_t>* l) {
  using V = Vec<acc_t>;
  V tot[1][NV];
  planar_channel_sums<NV, P, 1>(xv, seg, o, n, C, tot,
                                [&](int64_t c, const V(&xs)[NV], V(&acc)[1][NV])
                                    __attribute__((always_inline)) {
    const acc_t m = pc[c], A = pc[C + c], B = pc[2 * C + c];
    for (int v = 0; v < NV; ++v) acc[0][v] += math::pair_term(xs[v], m, A, B);
  });
  for (int v = 0; v < NV; ++v) l[v] = vsplat(pc[3 * C]) - tot[0][v];
}

// Planar: responsibilities of a group of NV vectors of positions: lanes[k * NV + v].
template <int NV, int P, typename S, typename acc_t>
C10_ALWAYS_INLINE void responsibilities_planar_group(View<const S> xv, int64_t seg,
                                                     const int64_t* o, int64_t n, int64_t C,
                                                     int64_t K, const acc_t* mu,
                                                     const acc_t* ha, const acc_t* b,
                                                     const acc_t* pair, Vec<acc_t>* lanes) {
  if (pair != nullptr) {
    loglik_planar_pair<NV, P>(xv, seg, o, n, C, pair, lanes);
    for (int v = 0; v < NV; ++v) softmax_pair_in_place(lanes + v, NV);
    return;
  }
  for_component_pairs(K, [&](auto kbc, int64_t k0) {
    loglik_planar<NV, P, decltype(kbc)::value>(xv, seg, o, n, C, mu + k0 * C, ha + k0 * C,
                                               b + k0, lanes + k0 * NV);
  });
  for (int v = 0; v < NV; ++v) math::softmax_in_place(lanes + v, K, NV, VExp{});
}

// Planar, two components, rows of at least kPairRowsMin positions: the tile's
// responsibilities from l_0 - l_1 (math::pair_term; pc: m, A, B, C each, then db) summed
// one channel row at a time, over the positions of the whole row (chunks of kPairChunk
// positions in longer rows), the sums in scratch arrays (sc: 2 kPairChunk, in the L1 or
// L2 cache): the tile is read in memory order, where the E-step of a group of positions
// (loglik_planar_pair) walks its C rows side by side, one stream each. In-process A/B
// against that walk (2 cores, batch 64, 8 rounds, medians): evaluation 0.62x the time
// (float32 28x28), 0.70-0.72x (float32 56x56), 0.84x (float32 14x14), 0.90-0.94x
// (bfloat16 56x56 to 14x14); at 7x7 (rows of 49) it took 1.6x: short rows go by groups.
// Sums over channels stay blocked: kChannelBlock rows into acc, then acc into tot.
constexpr int64_t kPairChunk = 4096;
constexpr int64_t kPairRowsMin = 128;

template <typename S, typename acc_t>
void responsibilities_planar_pair(View<const S> xv, View<acc_t> tv, int64_t nseg, int64_t len,
                                  int64_t C, const acc_t* pc, acc_t* sc) {
  using V = Vec<acc_t>;
  acc_t* const tot = sc;
  acc_t* const acc = sc + kPairChunk;
  const V db = vsplat(pc[3 * C]);
  // Each chunk of n positions is walked as a row of its own (row_span over [0, n)), so
  // that a tail vector stays inside the chunk: kOverlap at n - W, or kPart when n < W.
  // add_into: into q[0, n), t for the first row of a sum, else q + t; a kOverlap vector
  // changes only its new lanes.
  const auto add_into = [](acc_t* q, int64_t n, bool first, auto&& term) {
    row_span<acc_t>(n, 0, n, [&](auto span, int64_t i, int64_t w) {
      constexpr int P = decltype(span)::value;
      acc_t* qi = q + i;
      const V t = term(span, i, w);
      if (first)
        st<P>(qi, P == kOverlap ? new_lanes<P>(ld<P>(qi, w), t, w) : t, w);
      else
        st<P>(qi, ld<P>(qi, w) + fresh<P>(t, w), w);
    });
  };
  for (int64_t seg = 0; seg < nseg; ++seg) {
    for (int64_t p0 = 0; p0 < len; p0 += kPairChunk) {
      const int64_t n = std::min(len - p0, kPairChunk);
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t c1 = std::min(C, c0 + kChannelBlock);
        for (int64_t c = c0; c < c1; ++c) {
          const S* r = xv.row(seg, c) + p0;
          const acc_t m = pc[c], A = pc[C + c], B = pc[2 * C + c];
          add_into(acc, n, c == c0, [&](auto span, int64_t i, int64_t w) {
            return math::pair_term(ld<decltype(span)::value>(r + i, w), m, A, B);
          });
        }
        add_into(tot, n, c0 == 0, [&](auto span, int64_t i, int64_t w) {
          return ld<decltype(span)::value>(acc + i, w);
        });
      }
      acc_t* const t0 = tv.row(seg, 0) + p0;
      acc_t* const t1 = tv.row(seg, 1) + p0;
      row_span<acc_t>(n, 0, n, [&](auto span, int64_t i, int64_t w) {
        constexpr int P = decltype(span)::value;
        V l[2] = {db - ld<P>(tot + i, w), V{}};
        softmax_pair_in_place(l, 1);
        st<P>(t0 + i, l[0], w);
        st<P>(t1 + i, l[1], w);
      });
    }
  }
}

// The length of responsibilities_planar_pair's scratch array for a plan (0: not used).
C10_ALWAYS_INLINE int64_t pair_scratch(const Geometry& g, const TilePlan& plan,
                                       const void* pair) {
  return pair != nullptr && !g.interleaved && plan.len >= kPairRowsMin ? 2 * kPairChunk : 0;
}

// Planar: the tile's responsibilities, written to tau's rows.
template <typename S, typename acc_t>
void responsibilities_planar(View<const S> xv, View<acc_t> tv, int64_t nseg, int64_t len,
                             int64_t C, int64_t K, const acc_t* mu, const acc_t* ha,
                             const acc_t* b, const acc_t* pair, acc_t* sc,
                             Vec<acc_t>* lanes) {
  if (pair != nullptr && len >= kPairRowsMin) {
    responsibilities_planar_pair(xv, tv, nseg, len, C, pair, sc);
    return;
  }
  for (int64_t seg = 0; seg < nseg; ++seg) {
    auto body = [&](auto nvc, auto span, const int64_t* o, int64_t n) {
      constexpr int NV = decltype(nvc)::value, P = decltype(span)::value;
      responsibilities_planar_group<NV, P>(xv, seg, o, n, C, K, mu, ha, b, pair, lanes);
      for (int64_t k = 0; k < K; ++k)
        for (int v = 0; v < NV; ++v) st<P>(tv.row(seg, k) + o[v], lanes[k * NV + v], n);
    };
    for_row_groups<acc_t, 4>(len, body);
  }
}

// One-hot responsibilities of the split path.
template <typename acc_t>
void given_interleaved(const Geometry& g, const Tile& tl, int64_t K, const int64_t* groups,
                       acc_t* loc) {
  const int64_t T = tl.T;
  for (int64_t j = 0; j < T; ++j) {
    const int64_t grp = groups[(tl.p0 + j) / g.S];
    for (int64_t k = 0; k < K; ++k) loc[k * T + j] = k == grp ? acc_t(1) : acc_t(0);
  }
}

template <typename acc_t>
void given_planar(const Tile& tl, int64_t K, const int64_t* groups, View<acc_t> tv) {
  for (int64_t seg = 0; seg < tl.nseg; ++seg) {
    const int64_t grp = groups[tl.n0 + seg];
    for (int64_t k = 0; k < K; ++k) std::fill_n(tv.row(seg, k), tl.len, k == grp ? acc_t(1) : acc_t(0));
  }
}

// ---------------------------------------------------------------------------------------
// M-step partials of one tile: count, mean and M2 per (k, c), by two passes over the tile
// (mean first, then squared deviations from it) while it is in cache.
// ---------------------------------------------------------------------------------------

// Calls f(IntC<NR>, j, first) over the rows of [0, T) in groups of at most 4 within
// blocks of kPositionBlock rows (first: the group opens its block), and end_block(j0)
// after each block.
template <typename F, typename G>
C10_ALWAYS_INLINE void for_row_quads(int64_t T, F&& f, G&& end_block) {
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    for (int64_t j = j0; j < j1; j += 4) {
      switch (std::min<int64_t>(4, j1 - j)) {
        case 4: f(IntC<4>{}, j, j == j0); break;
        case 3: f(IntC<3>{}, j, j == j0); break;
        case 2: f(IntC<2>{}, j, j == j0); break;
        default: f(IntC<1>{}, j, j == j0); break;
      }
    }
    end_block(j0);
  }
}

// tot (+)= blk over KB rows of Cp values (the sums of a block of positions).
template <int KB, typename acc_t>
C10_ALWAYS_INLINE void add_block(acc_t* tot, const acc_t* blk, int64_t Cp, bool first) {
  for (int64_t i = 0; i < KB * Cp; i += kW<acc_t>)
    vstore(tot + i, first ? vload(blk + i) : vload(tot + i) + vload(blk + i));
}

// The cache lines of the next tile, for the prefetches of NextRows and NextLines: from the
// line that holds the tile's first element, tile_lines(bytes) of them, to one past its
// last (the tile need not start on a line; none if bytes == 0). An address may then lie
// past the end of the tensor: formed as an integer, as in prefetch_ahead.
constexpr int64_t kLine = 64;
C10_ALWAYS_INLINE uintptr_t line_of(const void* p) {
  return reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(kLine - 1);
}
C10_ALWAYS_INLINE int64_t tile_lines(int64_t bytes) {
  return bytes > 0 ? (bytes + kLine - 1) / kLine + 1 : 0;
}

// Lines of the next tile (one array) to prefetch into L2 (prefetcht1, as NextLines) while
// this tile is walked row by row from the cache: row(j) prefetches lines [j per,
// (j + 1) per) of its n (none where n == 0). Used where rows hold at least
// kNextRowsMinRowBytes and a tile at most kNextRowsMaxTileBytes
// (collect_mixture_stats_impl).
constexpr int64_t kNextRowsMinRowBytes = 512;
constexpr int64_t kNextRowsMaxTileBytes = 128 * 1024;
struct NextRows {
  uintptr_t a = 0;
  int64_t n = 0, per = 0;
  C10_ALWAYS_INLINE void row(int64_t j) const {
    const int64_t i1 = std::min(n, (j + 1) * per);
    for (int64_t i = j * per; i < i1; ++i)
      __builtin_prefetch(reinterpret_cast<const void*>(a + kLine * i), 0, 2);
  }
};

// The lines of a tile of bytes at a spread over rows rows, per row the ceiling of their
// share (none if bytes or rows is 0).
C10_ALWAYS_INLINE NextRows next_rows(const void* a, int64_t bytes, int64_t rows) {
  NextRows r;
  if (bytes <= 0 || rows <= 0) return r;
  r.a = line_of(a);
  r.n = tile_lines(bytes);
  r.per = (r.n + rows - 1) / rows;
  return r;
}

// Interleaved: per-(k, c) sums over the T rows of a tile, read row after row in memory
// order into accumulators that stay in the L1 cache (KB rows of Cp >= C values, whole
// vectors), blocked over positions; each accumulator vector is loaded and stored once per
// four rows. Pass 1 (Sq false): sum w x; pass 2 (Sq true): sum (w d) d with d = x - mt.
// One: w == 1. Components [0, KB): weights w[kb * T + j], centers mt[kb * Cp + c], sums
// into tot[kb * Cp + c]; blk: scratch like tot. pf: lines to prefetch, those of a group of
// (up to four) rows at its start.
template <bool Sq, bool One, int KB, typename S, typename acc_t>
void moment_sums_interleaved(const S* x, int64_t T, int64_t C, int64_t Cp, const acc_t* w,
                             const acc_t* mt, acc_t* blk, acc_t* tot, const NextRows& pf) {
  using V = Vec<acc_t>;
  for_row_quads(
      T,
      [&](auto nrc, int64_t j, bool first) {
        constexpr int NR = decltype(nrc)::value;
        for (int r = 0; r < NR; ++r) pf.row(j + r);
        for_vectors<acc_t>(C, [&](auto span, int64_t c, int64_t n) {
          constexpr int P = decltype(span)::value;
          V xs[NR];
          for (int r = 0; r < NR; ++r) xs[r] = ld<P>(x + (j + r) * C + c, n);
          for (int kb = 0; kb < KB; ++kb) {
            V a = first ? V{} : vload(blk + kb * Cp + c);
            if constexpr (Sq) {
              const V m = vload(mt + kb * Cp + c);
              for (int r = 0; r < NR; ++r) {
                const V d = xs[r] - m;
                a += One ? d * d : (w[kb * T + j + r] * d) * d;
              }
            } else {
              for (int r = 0; r < NR; ++r) a += One ? xs[r] : w[kb * T + j + r] * xs[r];
            }
            vstore(blk + kb * Cp + c, a);
          }
        });
      },
      [&](int64_t j0) { add_block<KB>(tot, blk, Cp, j0 == 0); });
}

// Interleaved M-step partials of a tile: loc ([k][T] weights; unused if One), counts cnt;
// scratch: 3 K Cp values; pf: lines to prefetch during the second pass (given at K = 1,
// one block of components).
template <bool One, typename S, typename acc_t>
void moments_interleaved(const S* x, int64_t T, int64_t C, int64_t K, const acc_t* loc,
                         const acc_t* cnt, acc_t* pmean, acc_t* pm2, acc_t* scratch,
                         const NextRows& pf) {
  constexpr int64_t W = kW<acc_t>;
  const int64_t Cp = (C + W - 1) / W * W;
  acc_t* blk = scratch;
  acc_t* tot = scratch + K * Cp;
  acc_t* mt = scratch + 2 * K * Cp;
  for_component_blocks(K, [&](auto kbc, int64_t k0) {
    moment_sums_interleaved<false, One, decltype(kbc)::value>(x, T, C, Cp, loc + k0 * T, mt,
                                                              blk, tot + k0 * Cp, NextRows{});
  });
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < Cp; c += W)
      vstore(mt + k * Cp + c, math::weighted_mean(vload(tot + k * Cp + c), cnt[k]));
  for_component_blocks(K, [&](auto kbc, int64_t k0) {
    moment_sums_interleaved<true, One, decltype(kbc)::value>(x, T, C, Cp, loc + k0 * T,
                                                             mt + k0 * Cp, blk, tot + k0 * Cp,
                                                             pf);
  });
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(pmean + k * C, mt + k * Cp, C * sizeof(acc_t));
    std::memcpy(pm2 + k * C, tot + k * Cp, C * sizeof(acc_t));
  }
}

// Planar: channel c over all segments of the tile; tv: the tile's tau rows (unused if One).
template <bool One, int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void moments_planar_row(View<const S> xv, View<const acc_t> tv, int64_t nseg,
                                          int64_t len, int64_t c, int64_t k0, const acc_t* cnt,
                                          acc_t* pmean, acc_t* pm2, int64_t C) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  constexpr int64_t B = W * kPositionBlock;
  V tot[KB];
  // sum over the row of term(x, kb, tau) (tau unused when One), blocked (kPositionBlock
  // positions a lane); the walk of for_row_blocks, written out so that the block sums stay
  // in registers (through for_row_blocks' lambdas GCC kept them on the stack, two stores
  // a vector)
  const auto row_sums = [&](auto term) {
    for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
    for (int64_t seg = 0; seg < nseg; ++seg) {
      const S* r = xv.row(seg, c);
      const acc_t* t[KB];
      for (int kb = 0; kb < KB; ++kb) t[kb] = One ? nullptr : tv.row(seg, k0 + kb);
      for (int64_t b0 = 0; b0 < len; b0 += B) {
        const int64_t b1 = std::min(len, b0 + B);
        // for one or two components, two vectors a step, each into sums of its own: the
        // sums' additions (a chain per component) are then the loop's critical path, which
        // two chains each halve (three or four components already give as many chains)
        V s0[KB], s1[KB];
        for (int kb = 0; kb < KB; ++kb) s0[kb] = s1[kb] = V{};
        int64_t i = b0;
        for (; KB <= 2 && i + 2 * W <= b1; i += 2 * W) {
          const V x0 = vload(r + i), x1 = vload(r + i + W);
          for (int kb = 0; kb < KB; ++kb) {
            s0[kb] += term(x0, kb, One ? V{} : vload(t[kb] + i));
            s1[kb] += term(x1, kb, One ? V{} : vload(t[kb] + i + W));
          }
        }
        for (; i + W <= b1; i += W) {
          const V x0 = vload(r + i);
          for (int kb = 0; kb < KB; ++kb) s0[kb] += term(x0, kb, One ? V{} : vload(t[kb] + i));
        }
        if (i < b1) {
          // the tail's terms into u, added to s0 here: a lambda that captured s0 itself kept
          // the block sums on the stack through the loops above, a store a vector
          V u[KB];
          const auto tail = [&](auto span, int64_t s, int64_t n) {
            constexpr int P = decltype(span)::value;
            const V x0 = ld<P>(r + s, n);
            for (int kb = 0; kb < KB; ++kb)
              u[kb] = fresh<P>(term(x0, kb, One ? V{} : ld<P>(t[kb] + s, n)), n);
          };
          if (len >= W)
            tail(SpanC<kOverlap>{}, len - W, b1 - i);
          else
            tail(SpanC<kPart>{}, i, b1 - i);
          for (int kb = 0; kb < KB; ++kb) s0[kb] += u[kb];
        }
        for (int kb = 0; kb < KB; ++kb) tot[kb] += KB <= 2 ? s0[kb] + s1[kb] : s0[kb];
      }
    }
  };
  row_sums([](V x0, int, V t) { return One ? x0 : t * x0; });
  acc_t mt[KB];
  for (int kb = 0; kb < KB; ++kb) mt[kb] = math::weighted_mean(vsum(tot[kb]), cnt[kb]);
  row_sums([&](V x0, int kb, V t) {
    const V d = x0 - mt[kb];
    return One ? d * d : (t * d) * d;
  });
  for (int kb = 0; kb < KB; ++kb) {
    pmean[kb * C + c] = mt[kb];
    pm2[kb * C + c] = vsum(tot[kb]);
  }
}

// Counts sum_j tau_kj: interleaved from loc ([k][T]), planar from the tile's tau rows.
template <typename acc_t>
acc_t count_interleaved(const acc_t* w, int64_t T) {
  using V = Vec<acc_t>;
  constexpr int64_t B = kW<acc_t> * kPositionBlock;
  V tot = {};
  for (int64_t b0 = 0; b0 < T; b0 += B) {
    V s = {};
    for_vectors<acc_t>(std::min(B, T - b0), [&](auto span, int64_t j, int64_t m) {
      s += ld<decltype(span)::value>(w + b0 + j, m);
    });
    tot += s;
  }
  return vsum(tot);
}

template <typename acc_t>
acc_t count_planar(View<const acc_t> tv, int64_t nseg, int64_t len, int64_t k) {
  using V = Vec<acc_t>;
  V tot = {}, s = {};
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* r = tv.row(seg, k);
    for_row_blocks<acc_t>(
        len, kPositionBlock,
        [&](auto span, int64_t i, int64_t n) {
          constexpr int P = decltype(span)::value;
          s += fresh<P>(ld<P>(r + i, n), n);
        },
        [&] {
          tot += s;
          s = V{};
        });
  }
  return vsum(tot);
}

// ---------------------------------------------------------------------------------------
// Normalization: y = sum_k tau_k (alpha_kc x + delta_kc).
// ---------------------------------------------------------------------------------------

// Interleaved: NP rows at x, soft (tau scalars t[k][p]; one component per row:
// normalize_row_fixed).
template <int NP, int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void normalize_rows(const S* x, S* y, int64_t C, int64_t Kd,
                                      const acc_t (*t)[NP], const acc_t* alpha,
                                      const acc_t* delta, bool nt) {
  using V = Vec<acc_t>;
  const int64_t K = KS ? KS : Kd;
  store_rows<NP, acc_t>(y, C, [&](auto span, int64_t c, int64_t n, V (&ys)[NP]) {
    constexpr int P = decltype(span)::value;
    V xs[NP];
    for (int p = 0; p < NP; ++p) {
      xs[p] = ld<P>(x + p * C + c, n);
      ys[p] = V{};
    }
    for (int64_t k = 0; k < K; ++k) {
      const V al = ld<P>(alpha + k * C + c, n), de = ld<P>(delta + k * C + c, n);
      for (int p = 0; p < NP; ++p) ys[p] += t[k][p] * math::normalize_term(xs[p], al, de);
    }
  }, nt);
}

// One row, one component (K = 1, or given groups); in bfloat16 two vectors a 32-byte store
// (store_rows: vstore2), where a store of 16 bytes a vector had made a channels-last step
// (module level, in-process A/B, medians of 60-80, K = 1) take 1.03-1.09x the time in
// training (28x28, 7x7) and 1.03-1.22x in evaluation (56x56 to 7x7); as dx_row_fixed.
template <typename S, typename acc_t>
C10_ALWAYS_INLINE void normalize_row_fixed(const S* x, S* y, int64_t C, const acc_t* al,
                                           const acc_t* de, bool nt) {
  store_rows<1, acc_t>(y, C, [&](auto span, int64_t c, int64_t n, Vec<acc_t>(&v)[1]) {
    constexpr int P = decltype(span)::value;
    v[0] = math::normalize_term(ld<P>(x + c, n), ld<P>(al + c, n), ld<P>(de + c, n));
  }, nt);
}

// The channels-last evaluation's pairs of rows (soft responsibilities, K = 2 to 4)
// prefetch the lines of y kWriteAhead bytes ahead of those they write (prefetch_lines,
// prefetcht0: a prefetch for writing would need PRFCHW, not enabled here), where y is at
// least a quarter of the last-level cache and not streamed (NormalizeArgs::prefetch_y):
// their stores had stalled on fetching y's lines (perf: the normalization, from the tile
// just read by the E-step, took 1.6x BatchNorm's evaluation at 64 x 256 x 14 x 14
// float32, K = 2, and less than BatchNorm at batch 8). In-process A/B, 2 cores, batch 64,
// K = 2, 8 rounds, medians: float32 14x14 0.80x the time, 28x28 0.85x; bfloat16 56x56
// 0.95x, 28x28 0.93x. Not for outputs that stay in the cache (float32 7x7, 6.4 MB: 1.10x
// with it) nor for streamed ones (float32 56x56: 1.31x), nor in training (its
// normalization 1.02-1.18x at K = 1, forward + backward within noise).
constexpr int64_t kWriteAhead = 2048;

// Prefetches the cache lines that start in [from, from + bytes) bytes past the line that
// holds p (consecutive calls with consecutive ranges: each line once). The addresses are
// formed as integers (they may lie past the end of the tensor, where a pointer may not
// point; such a prefetch fetches whatever lies there, or nothing).
C10_ALWAYS_INLINE void prefetch_lines(const void* p, int64_t from, int64_t bytes) {
  constexpr int64_t L = 64;
  const uintptr_t base = reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(L - 1);
  for (int64_t off = (from + L - 1) & ~(L - 1); off < from + bytes; off += L)
    __builtin_prefetch(reinterpret_cast<const void*>(base + off), 0, 3);
}

// Interleaved, rows [j0, j0 + n) of the tile; tau in the (P, K) layout at tj (row j0).
template <int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void normalize_interleaved_rows(const S* x, S* y, int64_t n, int64_t C,
                                                  int64_t K, const acc_t* tj,
                                                  const acc_t* alpha, const acc_t* delta,
                                                  bool nt, bool pfw = false) {
  constexpr int KM = KS ? KS : 1;
  int64_t j = 0;
  if constexpr (KS != 0) {
    for (; j + 2 <= n; j += 2) {
      if (pfw) {
        const int64_t rb = C * static_cast<int64_t>(sizeof(S));
        prefetch_lines(y, j * rb + kWriteAhead, 2 * rb);
      }
      acc_t t[KM][2];
      for (int k = 0; k < KM; ++k) {
        t[k][0] = tj[j * K + k];
        t[k][1] = tj[(j + 1) * K + k];
      }
      normalize_rows<2, KS>(x + j * C, y + j * C, C, K, t, alpha, delta, nt);
    }
  }
  for (; j < n; ++j) {
    // any K: one row, its responsibilities read as a K x 1 array
    normalize_rows<1, KS>(x + j * C, y + j * C, C, K,
                          reinterpret_cast<const acc_t(*)[1]>(tj + j * K), alpha, delta, nt);
  }
}

// Planar: a row of len positions, components' tau rows at t[k] (soft), coefficients al,
// de per component (hoisted).
template <int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void normalize_planar_row(const S* x, S* y, int64_t len, int64_t Kd,
                                            const acc_t* const* t, const acc_t* al,
                                            const acc_t* de, bool nt) {
  using V = Vec<acc_t>;
  const int64_t K = KS ? KS : Kd;
  auto value = [&](auto span, int64_t s, int64_t n) {
    constexpr int P = decltype(span)::value;
    const V x0 = ld<P>(x + s, n);
    V y0 = {};
    for (int64_t k = 0; k < K; ++k)
      y0 += ld<P>(t[k] + s, n) * math::normalize_term(x0, al[k], de[k]);
    return y0;
  };
  store_row<acc_t>(y, len, value, nt);
}

template <typename S, typename acc_t>
C10_ALWAYS_INLINE void normalize_planar_row_fixed(const S* x, S* y, int64_t len, acc_t al,
                                                  acc_t de, bool nt) {
  for_row<acc_t>(len, [&](auto span, int64_t s, int64_t n) {
    constexpr int P = decltype(span)::value;
    st<P>(y + s, math::normalize_term(ld<P>(x + s, n), al, de), n, nt);
  });
}

// Planar tile: y from x and the tile's tau rows (soft) or one component per segment.
template <int KS, bool NT, typename S, typename acc_t>
void normalize_planar(View<const S> xv, View<S> yv, View<const acc_t> tv, int64_t nseg,
                      int64_t len, int64_t C, int64_t K, const int64_t* kfix,
                      const acc_t* alpha, const acc_t* delta, acc_t* coef,
                      const acc_t** rows) {
  for (int64_t seg = 0; seg < nseg; ++seg) {
    if (kfix != nullptr) {
      const acc_t* al = alpha + kfix[seg] * C;
      const acc_t* de = delta + kfix[seg] * C;
      for (int64_t c = 0; c < C; ++c)
        normalize_planar_row_fixed(xv.row(seg, c), yv.row(seg, c), len, al[c], de[c], NT);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) rows[k] = tv.row(seg, k);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        coef[k] = alpha[k * C + c];
        coef[K + k] = delta[k * C + c];
      }
      normalize_planar_row<KS>(xv.row(seg, c), yv.row(seg, c), len, K, rows, coef, coef + K,
                               NT);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass 1: per-tile Sg = sum g tau, Sgx = sum g tau (x - m).
// ---------------------------------------------------------------------------------------

// Lines of the next tile (two arrays, the same lines of each; tile_lines) to prefetch
// while a column of this tile is walked (K > 1, grad_sums_interleaved; K = 1 walked the
// columns too until it moved to memory order, grad_sums_rows): step(j) prefetches line j
// of each, for j < n.
// A column walk reads each row's vector at a stride of C elements; left to the hardware,
// the tile's lines came from memory in that order, a strided stream per vector of the
// row. With the next tile prefetched into L1
// (ffa93b2), the channels-last gradient sums ran 11-37 % faster (in-process A/B, 2
// cores, 10 rounds, medians: float32 56x56 K = 2, 28x28 K = 1, 14x14 K = 2, bfloat16
// 28x28 K = 2; outputs unchanged), a forward + backward 2-8 %. The prefetches are now for
// the L2 cache (locality 2: prefetcht1, which on this Zen 4 fills L2, leaving the walk's
// current lines in L1): at 56x56 the sums took 22-34 % less time than with prefetches
// into L1 (a forward + backward 7-12 %; float32 K = 1 and 2, bfloat16 K = 2); elsewhere
// the sums 2-8 % less, a forward + backward within 3 % either way.
struct NextLines {
  uintptr_t a = 0, b = 0;
  int64_t n = 0;
  C10_ALWAYS_INLINE void step(int64_t j) const {
    if (j < n) {
      __builtin_prefetch(reinterpret_cast<const void*>(a + kLine * j), 0, 2);
      __builtin_prefetch(reinterpret_cast<const void*>(b + kLine * j), 0, 2);
    }
  }
};

// The share of column q (of nq) of the lines of [a, a + bytes) and [b, b + bytes)
// (none if bytes == 0).
C10_ALWAYS_INLINE NextLines next_lines(const void* a, const void* b, int64_t bytes, int64_t q,
                                       int64_t nq) {
  const int64_t lines = tile_lines(bytes), per = (lines + nq - 1) / nq;
  const int64_t l0 = std::min(lines, q * per), l1 = std::min(lines, l0 + per);
  NextLines r;
  r.a = line_of(a) + kLine * l0;
  r.b = line_of(b) + kLine * l0;
  r.n = l1 - l0;
  return r;
}

// Interleaved, K > 1: Sg and Sgx of a vector of channels [c, c + n) over the tile's T
// rows, components [0, KB) (tau in the (P, K) layout at tt, row 0), blocked over
// positions, the sums in registers, walking down the tile's columns (the tile stays in the
// L2 cache between them). In-process A/B against a walk in memory order (grad_sums_rows
// extended to K components, the sums of each block of rows in memory, the same results;
// not kept; 2 cores, batch 64, channels-last, K = 2, 2026-11-30), a training step
// (module, BatchNorm's step interleaved, medians of 50, both orders) took with the walk in
// memory order: float32 0.91-0.97x at 56x56 and 28x28, but 0.96-1.04x at 7x7, 1.01x at
// 14x14, bfloat16 1.02-1.05x at 14x14, 1.08x at 7x7: slower where K = 2 training is
// nearest its limit (issue 14: 1.8x BatchNorm; float32 channels-last 14x14 and 7x7).
// K = 1 walks in memory order (grad_sums_rows).
// pf: lines of the next tile to prefetch, pf.step(j) at row j.
template <int P, int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void grad_sums_interleaved(const S* x, const S* gr, int64_t T, int64_t C,
                                             int64_t c, int64_t n, const acc_t* tt, int64_t K,
                                             const acc_t* mean, acc_t* sg, acc_t* sgx,
                                             const NextLines& pf) {
  using V = Vec<acc_t>;
  V ag[KB], agx[KB], m[KB];
  for (int kb = 0; kb < KB; ++kb) {
    ag[kb] = agx[kb] = V{};
    m[kb] = ld<P>(mean + kb * C + c, n);
  }
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    V bg[KB], bgx[KB];
    for (int kb = 0; kb < KB; ++kb) bg[kb] = bgx[kb] = V{};
    for (int64_t j = j0; j < j1; ++j) {
      pf.step(j);
      const V g0 = ld<P>(gr + j * C + c, n);
      const V x0 = ld<P>(x + j * C + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        const V gt = tt[j * K + kb] * g0;
        bg[kb] += gt;
        bgx[kb] += gt * (x0 - m[kb]);
      }
    }
    for (int kb = 0; kb < KB; ++kb) {
      ag[kb] += bg[kb];
      agx[kb] += bgx[kb];
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    st<P>(sg + kb * C + c, ag[kb], n);
    st<P>(sgx + kb * C + c, agx[kb], n);
  }
}

// Interleaved, one component (K = 1): Sg and Sgx of the tile's T rows (at x / gr), every
// channel, walked in memory order, blocked over positions: the sums of each block of
// kPositionBlock rows in bs (2 C: the thread's scratch, 4 KiB in float32 at C = 512), then
// added to the tile's (sg, sgx); no software prefetch (the hardware's follows memory
// order). Each channel adds the same terms in the same order as the former K = 1 walk down
// the columns (grad_sums_interleaved's, two vectors a walk, the next tile prefetched): the
// same results. In-process A/B against that walk (2 cores, batch 64, channels-last,
// 2026-11-30): the sums on cold inputs (5 copies in turn, both orders) took float32
// 0.70-0.77x the time at 7x7, 0.79-0.85x at 14x14, 0.81-0.89x at 28x28 and 56x56; bfloat16
// 0.66-0.88x at 28x28 to 7x7, 0.97-1.02x at 56x56 (but float32 7x7 on one input in cache,
// which the column walk had been tuned on: 1.13-1.16x in three runs of four); a training
// step (module, BatchNorm's step interleaved, medians of 60-80, both orders) float32
// 0.93-0.97x at 56x56 to 7x7; bfloat16 0.87-0.92x at 28x28, 1.01-1.03x at 56x56, 14x14 and
// 7x7. Not written with the M-step's for_row_quads and add_block (four rows a step, the
// block sums loaded and stored once per four rows; the same bits): its sums on cold inputs
// took 1.35-1.49x this walk's time in float32 at 7x7 and 14x14, 1.93-2.00x in bfloat16 at
// 14x14, 0.92-0.97x at float32 56x56.
template <typename S, typename acc_t>
C10_ALWAYS_INLINE void grad_sums_rows(const S* x, const S* gr, int64_t T, int64_t C,
                                      const acc_t* mean, acc_t* sg, acc_t* sgx, acc_t* bs) {
  using V = Vec<acc_t>;
  acc_t* bg = bs;
  acc_t* bgx = bs + C;
  std::fill(sg, sg + C, acc_t(0));
  std::fill(sgx, sgx + C, acc_t(0));
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    std::fill(bs, bs + 2 * C, acc_t(0));
    for (int64_t j = j0; j < j1; ++j) {
      const S* xr = x + j * C;
      const S* grr = gr + j * C;
      for_vectors<acc_t>(C, [&](auto span, int64_t c, int64_t n) {
        constexpr int P = decltype(span)::value;
        const V g0 = ld<P>(grr + c, n), x0 = ld<P>(xr + c, n);
        st<P>(bg + c, ld<P>(bg + c, n) + g0, n);
        st<P>(bgx + c, ld<P>(bgx + c, n) + g0 * (x0 - ld<P>(mean + c, n)), n);
      });
    }
    for_vectors<acc_t>(C, [&](auto span, int64_t c, int64_t n) {
      constexpr int P = decltype(span)::value;
      st<P>(sg + c, ld<P>(sg + c, n) + ld<P>(bg + c, n), n);
      st<P>(sgx + c, ld<P>(sgx + c, n) + ld<P>(bgx + c, n), n);
    });
  }
}

template <bool One, int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void grad_stats_planar_row(View<const S> xv, View<const S> gv,
                                             View<const acc_t> tv, int64_t nseg, int64_t len,
                                             int64_t c, int64_t k0, const acc_t* mean,
                                             acc_t* sg, acc_t* sgx, int64_t C) {
  using V = Vec<acc_t>;
  V ag[KB], agx[KB], bg[KB], bgx[KB];
  acc_t m[KB];
  for (int kb = 0; kb < KB; ++kb) {
    ag[kb] = agx[kb] = bg[kb] = bgx[kb] = V{};
    m[kb] = mean[kb * C + c];
  }
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const S* xr = xv.row(seg, c);
    const S* grr = gv.row(seg, c);
    for_row_blocks<acc_t>(
        len, kPositionBlock,
        [&](auto span, int64_t s, int64_t n) {
          constexpr int P = decltype(span)::value;
          const V g0 = ld<P>(grr + s, n);
          const V x0 = ld<P>(xr + s, n);
          for (int kb = 0; kb < KB; ++kb) {
            // the repeated lanes of a kOverlap vector left out of both sums (masking the
            // products, not only g tau: an infinite x there would give 0 inf = NaN)
            const V gt = One ? g0 : ld<P>(tv.row(seg, k0 + kb) + s, n) * g0;
            bg[kb] += fresh<P>(gt, n);
            bgx[kb] += fresh<P>(gt * (x0 - m[kb]), n);
          }
        },
        [&] {
          for (int kb = 0; kb < KB; ++kb) {
            ag[kb] += bg[kb];
            agx[kb] += bgx[kb];
            bg[kb] = bgx[kb] = V{};
          }
        });
  }
  for (int kb = 0; kb < KB; ++kb) {
    sg[kb * C + c] = vsum(ag[kb]);
    sgx[kb * C + c] = vsum(agx[kb]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass 2: dtau -> dl (soft), then dx (cbn_math.h).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct DtauPtrs {
  const acc_t* m;
  const acc_t* al;
  const acc_t* be;
  const acc_t* e1;
  const acc_t* e2;
  const acc_t* ev;
};

template <typename acc_t>
struct DxPtrs {
  // dx on each component's own means (cbn_math.h): soft, sum_k tau_k (al g + e1 +
  // p (x - mean_k)) - dl_k a (x - mu_k); one component per position (given groups, K = 1),
  // al g + e1 + p (x - mean)
  const acc_t* al;
  const acc_t* p;
  const acc_t* e1;
  const acc_t* mean;
  const acc_t* a;
  const acc_t* mu;
};

// Interleaved: sum_c dtau_term of the row at x / gr, components [k0, k0 + KB), as vectors
// whose lanes add up to it (vsum); blocked over channels.
template <int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void dtau_row(const S* x, const S* gr, int64_t C, int64_t k0,
                                DtauPtrs<acc_t> cf, Vec<acc_t> (&tot)[KB]) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += W * kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + W * kChannelBlock);
    V acc[KB];
    for (int kb = 0; kb < KB; ++kb) acc[kb] = V{};
    for_vectors<acc_t>(c1 - c0, [&](auto span, int64_t i, int64_t n) {
      constexpr int P = decltype(span)::value;
      const int64_t c = c0 + i;
      const V xs = ld<P>(x + c, n), gs = ld<P>(gr + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        const int64_t o = (k0 + kb) * C + c;
        const V m = ld<P>(cf.m + o, n), al = ld<P>(cf.al + o, n), be = ld<P>(cf.be + o, n),
                e1 = ld<P>(cf.e1 + o, n), e2 = ld<P>(cf.e2 + o, n);
        acc[kb] += math::dtau_term(gs, fresh<P>(xs - m, n), al, be, e1, e2);
      }
    });
    for (int kb = 0; kb < KB; ++kb) tot[kb] += acc[kb];
  }
}

// Interleaved: dx of NP rows, soft responsibilities t[k][p] and dl[k][p].
template <int NP, int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void dx_rows(const S* x, const S* gr, S* dx, int64_t C, int64_t Kd,
                               const acc_t (*t)[NP], const acc_t (*dl)[NP], DxPtrs<acc_t> cf,
                               bool nt) {
  using V = Vec<acc_t>;
  const int64_t K = KS ? KS : Kd;
  store_rows<NP, acc_t>(dx, C, [&](auto span, int64_t c, int64_t n, V (&out)[NP]) {
    constexpr int P = decltype(span)::value;
    V A[NP], E[NP], xs[NP];
    for (int p = 0; p < NP; ++p) {
      A[p] = E[p] = V{};
      xs[p] = ld<P>(x + p * C + c, n);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = k * C + c;
      const V al = ld<P>(cf.al + o, n), pp = ld<P>(cf.p + o, n), e1 = ld<P>(cf.e1 + o, n),
              m = ld<P>(cf.mean + o, n), a = ld<P>(cf.a + o, n), mu = ld<P>(cf.mu + o, n);
      for (int p = 0; p < NP; ++p)
        math::dx_accumulate_soft(t[k][p], dl[k][p], al, pp, e1, xs[p] - m, a, xs[p] - mu, A[p],
                                 E[p]);
    }
    for (int p = 0; p < NP; ++p) out[p] = ld<P>(gr + p * C + c, n) * A[p] + E[p];
  }, nt);
}

// Interleaved: dx of one row with a single component (given groups, K = 1), on the
// component's own mean: alpha g + e1 + p (x - mean); stored as normalize_row_fixed's y.
template <typename S, typename acc_t>
C10_ALWAYS_INLINE void dx_row_fixed(const S* x, const S* gr, S* dx, int64_t C, int64_t o,
                                    DxPtrs<acc_t> cf, bool nt) {
  using V = Vec<acc_t>;
  store_rows<1, acc_t>(dx, C, [&](auto span, int64_t c, int64_t n, V(&v)[1]) {
    constexpr int P = decltype(span)::value;
    V A = {}, B = {}, E = {};
    math::dx_accumulate(acc_t(1), ld<P>(cf.al + o + c, n), ld<P>(cf.p + o + c, n),
                        ld<P>(cf.e1 + o + c, n), A, B, E);
    v[0] = math::dx_combine(ld<P>(gr + c, n), ld<P>(x + c, n) - ld<P>(cf.mean + o + c, n), A,
                            B, E);
  }, nt);
}

// The coefficients of dtau_0 - dtau_1 (GradInputArgs::pair, K = 2) as those of one
// component for dtau_row / dtau_planar_group: s, P, Q, U, R as m, alpha, beta, e1, e2,
// and pev as ev.
template <typename acc_t>
C10_ALWAYS_INLINE DtauPtrs<acc_t> pair_dtau_ptrs(const acc_t* pair, int64_t C) {
  return DtauPtrs<acc_t>{pair, pair + C, pair + 2 * C, pair + 3 * C, pair + 4 * C, pair + 5 * C};
}

// Interleaved, soft: the n <= W rows at x / gr (tau at tj, K a row): dtau of each row
// (dtau_row), its lanes added up W rows at a time (vsum_lanes, as in the E-step), the
// softmax Jacobian in lanes, then dx row by row (each row's tau and dl in registers or on
// the stack for K <= 4, in ts / ds beyond). dcf: each component's coefficients, or with
// pair (K = 2) those of dtau_0 - dtau_1 as one sum (pair_dtau_ptrs). t, d: scratch of
// K x W values; ts, ds: of K values.
template <int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void grad_input_group(const S* x, const S* gr, S* dx, int64_t n, int64_t C,
                                        int64_t K, const acc_t* tj, DtauPtrs<acc_t> dcf,
                                        bool pair, DxPtrs<acc_t> xcf, acc_t (*t)[kW<acc_t>],
                                        acc_t (*d)[kW<acc_t>], acc_t* ts, acc_t* ds, bool nt) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < W; ++p) t[k][p] = p < n ? tj[p * K + k] : acc_t(0);
  if (pair) {
    // dl_0 = tau_0 tau_1 (dtau_0 - dtau_1) = -dl_1, the W rows in lanes
    V s[1];
    group_sums<1>(n, s, [&](int64_t p, V(&tot)[1]) __attribute__((always_inline)) {
      dtau_row<1>(x + p * C, gr + p * C, C, 0, dcf, tot);
    });
    const V dl0 = (vload(t[0]) * vload(t[1])) * (s[0] - vsplat(dcf.ev[0]));
    vstore(d[0], dl0);
    vstore(d[1], -dl0);
  } else {
    for_component_pairs(K, [&](auto kbc, int64_t k0) __attribute__((always_inline)) {
      constexpr int KB = decltype(kbc)::value;
      V s[KB];
      group_sums<KB>(n, s, [&](int64_t p, V(&tot)[KB]) __attribute__((always_inline)) {
        dtau_row<KB>(x + p * C, gr + p * C, C, k0, dcf, tot);
      });
      for (int kb = 0; kb < KB; ++kb) vstore(d[k0 + kb], s[kb] - vsplat(dcf.ev[k0 + kb]));
    });
    // dl = tau (dtau - sum_i tau_i dtau_i), the W rows in lanes
    V dot = {};
    for (int64_t k = 0; k < K; ++k) dot += vload(t[k]) * vload(d[k]);
    for (int64_t k = 0; k < K; ++k) vstore(d[k], vload(t[k]) * (vload(d[k]) - dot));
  }
  constexpr int KM = KS ? KS : 1;
  for (int64_t p = 0; p < n; ++p) {
    if constexpr (KS != 0) {
      acc_t tr[KM][1], dr[KM][1];
      for (int k = 0; k < KM; ++k) {
        tr[k][0] = t[k][p];
        dr[k][0] = d[k][p];
      }
      dx_rows<1, KS>(x + p * C, gr + p * C, dx + p * C, C, K, tr, dr, xcf, nt);
    } else {
      // any K: the row's values as K x 1 arrays in ts, ds (scratch of K values each)
      for (int64_t k = 0; k < K; ++k) {
        ts[k] = t[k][p];
        ds[k] = d[k][p];
      }
      dx_rows<1, 0>(x + p * C, gr + p * C, dx + p * C, C, K,
                    reinterpret_cast<const acc_t(*)[1]>(ts),
                    reinterpret_cast<const acc_t(*)[1]>(ds), xcf, nt);
    }
  }
}

// Planar: dtau of a group of NV vectors of positions (segment seg), components
// [k0, k0 + KB), into out[kb * NV + v]; blocked over channels. k0 and KB: a block of
// for_component_pairs, whose coefficients pc holds in the layout that
// mixture_grad_input_kernel gives it.
template <int NV, int P, int KB, typename S, typename acc_t>
C10_ALWAYS_INLINE void dtau_planar_group(View<const S> xv, View<const S> gv, int64_t seg,
                                         const int64_t* o, int64_t n, int64_t C,
                                         int64_t k0, const acc_t* pc, const acc_t* ev,
                                         Vec<acc_t>* out) {
  using V = Vec<acc_t>;
  const bool pf = rows_need_prefetch<S>(xv.c_stride);
  V tot[KB][NV];
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) tot[kb][v] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {  // blocked over channels
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    V acc[KB][NV];
    for (int kb = 0; kb < KB; ++kb)
      for (int v = 0; v < NV; ++v) acc[kb][v] = V{};
    for (int64_t c = c0; c < c1; ++c) {
      const S* xr = xv.row(seg, c);
      const S* gr = gv.row(seg, c);
      if (pf) {
        prefetch_ahead(xr + o[0]);
        prefetch_ahead(gr + o[0]);
        // groups of three or four vectors (two components' one sum): both lines
        if constexpr (NV * kW<acc_t> * sizeof(S) > 64) {
          prefetch_ahead(xr + o[0] + 64 / sizeof(S));
          prefetch_ahead(gr + o[0] + 64 / sizeof(S));
        }
      }
      V xs[NV], gs[NV];
      for (int v = 0; v < NV; ++v) {
        xs[v] = ld<P>(xr + o[v], n);
        gs[v] = ld<P>(gr + o[v], n);
      }
      for (int kb = 0; kb < KB; ++kb) {
        const acc_t* q = pc + (k0 * C + c * KB + kb) * 5;  // m, alpha, beta, e1, e2
        const acc_t m = q[0], al = q[1], be = q[2], e1 = q[3], e2 = q[4];
        for (int v = 0; v < NV; ++v) acc[kb][v] += math::dtau_term(gs[v], xs[v] - m, al, be, e1, e2);
      }
    }
    for (int kb = 0; kb < KB; ++kb)
      for (int v = 0; v < NV; ++v) tot[kb][v] += acc[kb][v];
  }
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) out[kb * NV + v] = tot[kb][v] - ev[k0 + kb];
}

// Planar: dl of the tile into dl rows [k][T] (j = seg * len + s): dtau per group of
// positions, then the softmax Jacobian in registers.
// pair (K = 2): pc holds the coefficients of dtau_0 - dtau_1 (one component's five a
// channel) and ev its pev; dl_0 = tau_0 tau_1 (dtau_0 - dtau_1) = -dl_1.
template <typename S, typename acc_t>
void dl_planar(View<const S> xv, View<const S> gv, View<const acc_t> tv, int64_t nseg,
               int64_t len, int64_t C, int64_t K, const acc_t* pc, const acc_t* ev, bool pair,
               acc_t* dl, Vec<acc_t>* lanes) {
  using V = Vec<acc_t>;
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    if (pair) {
      // one sum: groups of four vectors (four chains of multiply-adds, as two components'
      // two vectors)
      for_row_groups<acc_t, 4>(len, [&](auto nvc, auto span, const int64_t* o, int64_t n) {
        constexpr int NV = decltype(nvc)::value, P = decltype(span)::value;
        V* d = lanes;  // NV vectors of dtau_0 - dtau_1
        dtau_planar_group<NV, P, 1>(xv, gv, seg, o, n, C, 0, pc, ev, d);
        for (int v = 0; v < NV; ++v) {
          const V dl0 = (ld<P>(tv.row(seg, 0) + o[v], n) * ld<P>(tv.row(seg, 1) + o[v], n)) * d[v];
          st<P>(dl + seg * len + o[v], dl0, n);
          st<P>(dl + T + seg * len + o[v], -dl0, n);
        }
      });
      continue;
    }
    for_row_groups<acc_t, 2>(len, [&](auto nvc, auto span, const int64_t* o, int64_t n) {
      constexpr int NV = decltype(nvc)::value, P = decltype(span)::value;
      V* d = lanes;       // K x NV dtau
      V* t = lanes + 2 * K;  // K x NV tau
      for_component_pairs(K, [&](auto kbc, int64_t k0) {
        dtau_planar_group<NV, P, decltype(kbc)::value>(xv, gv, seg, o, n, C, k0, pc, ev,
                                                       d + k0 * NV);
      });
      for (int v = 0; v < NV; ++v) {
        V dot = {};
        for (int64_t k = 0; k < K; ++k) {
          t[k * NV + v] = ld<P>(tv.row(seg, k) + o[v], n);
          dot += t[k * NV + v] * d[k * NV + v];
        }
        for (int64_t k = 0; k < K; ++k)
          st<P>(dl + k * T + seg * len + o[v], t[k * NV + v] * (d[k * NV + v] - dot), n);
      }
    });
  }
}

// Planar dx, row by row with the coefficients of (k, c) hoisted.
template <int KS, typename S, typename acc_t>
C10_ALWAYS_INLINE void dx_planar_row(const S* xr, const S* grr, S* dr, int64_t len,
                                     int64_t Kd, const acc_t* const* t, const acc_t* const* d,
                                     const Vec<acc_t>* coef, bool nt) {
  using V = Vec<acc_t>;
  const int64_t K = KS ? KS : Kd;
  auto value = [&](auto span, int64_t s, int64_t n) {
    constexpr int P = decltype(span)::value;
    V A = {}, E = {};
    const V x0 = ld<P>(xr + s, n);
    for (int64_t k = 0; k < K; ++k) {
      const V* q = coef + 6 * k;  // alpha, p, e1, m, a, mu
      math::dx_accumulate_soft(ld<P>(t[k] + s, n), ld<P>(d[k] + s, n), q[0], q[1], q[2],
                               x0 - q[3], q[4], x0 - q[5], A, E);
    }
    return ld<P>(grr + s, n) * A + E;
  };
  store_row<acc_t>(dr, len, value, nt);
}

template <int KS, bool NT, typename S, typename acc_t>
void dx_planar(View<const S> xv, View<const S> gv, View<S> dv, View<const acc_t> tv,
               int64_t nseg, int64_t len, int64_t C, int64_t K, const acc_t* dl,
               const int64_t* kfix, DxPtrs<acc_t> cf, Vec<acc_t>* coef, const acc_t** rows) {
  using V = Vec<acc_t>;
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    if (kfix == nullptr) {
      for (int64_t k = 0; k < K; ++k) {
        rows[k] = tv.row(seg, k);
        rows[K + k] = dl + k * T + seg * len;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const S* xr = xv.row(seg, c);
      const S* grr = gv.row(seg, c);
      S* dr = dv.row(seg, c);
      if (kfix != nullptr) {
        const int64_t o = kfix[seg] * C + c;
        const acc_t al = cf.al[o], p = cf.p[o], e1 = cf.e1[o], m = cf.mean[o];
        for_row<acc_t>(len, [&](auto span, int64_t s, int64_t n) {
          constexpr int P = decltype(span)::value;
          V A = {}, B = {}, E = {};
          math::dx_accumulate(acc_t(1), al, p, e1, A, B, E);
          st<P>(dr + s, math::dx_combine(ld<P>(grr + s, n), ld<P>(xr + s, n) - m, A, B, E), n,
                NT);
        });
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = k * C + c;
        coef[6 * k + 0] = vsplat(cf.al[o]);
        coef[6 * k + 1] = vsplat(cf.p[o]);
        coef[6 * k + 2] = vsplat(cf.e1[o]);
        coef[6 * k + 3] = vsplat(cf.mean[o]);
        coef[6 * k + 4] = vsplat(cf.a[o]);
        coef[6 * k + 5] = vsplat(cf.mu[o]);
      }
      dx_planar_row<KS>(xr, grr, dr, len, K, rows, rows + K, coef, NT);
    }
  }
}

// The tiles in parallel. stream: f wrote non-temporal stores (vstore's nt), which are
// weakly ordered: each thread fences them before its part counts as done.
template <typename F>
void for_each_tile(const TilePlan& plan, F&& f, bool stream = false) {
  at::parallel_for(0, plan.num_tiles, 1, [&](int64_t begin, int64_t end) {
    f(begin, end);
#if defined(CBN_CPU_AVX2)
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
  });
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

template <typename S, typename A>
void collect_mixture_stats_impl(const StatsArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const auto* x = static_cast<const S*>(a.x);
  const auto* mu = static_cast<const A*>(a.mu);
  const auto* ha = static_cast<const A*>(a.half_a);
  const auto* b = static_cast<const A*>(a.b);
  const auto* pair = static_cast<const A*>(a.pair);
  const int64_t* groups = a.groups;
  auto* tau = static_cast<A*>(a.tau);
  auto* pn = static_cast<A*>(a.part_n);
  auto* pmean = static_cast<A*>(a.part_mean);
  auto* pm2 = static_cast<A*>(a.part_m2);
  // Channels-last, K = 1: a tile's first pass reads it from memory, its second from the
  // L2 cache, which leaves memory idle; the second prefetches the next tile of the
  // thread's range (it follows this one in memory) into L2, where rows hold at least
  // kNextRowsMinRowBytes and a tile at most kNextRowsMaxTileBytes (with the next one, half
  // of a Zen 4's L2). In-process A/B on cold inputs (Zen 4, 2 cores, 2026-11-30; 5 copies
  // of the input in turn, batch 64, runs of 120-300 calls in both orders, medians), the
  // batch statistics: float32 0.63-0.79x the time at 28x28 and 14x14 (C = 128, 256),
  // 0.78-0.97x at 7x7; bfloat16 0.53-0.55x at 14x14, 0.92-0.98x at 7x7. A training step
  // (module, BatchNorm's step interleaved, medians of 60): float32 0.92-0.96x at 28x28 and
  // 14x14, 1.00-1.02x at 7x7; bfloat16 0.99-1.01x. Not on shorter rows (56x56: float32
  // 0.99-1.02x, bfloat16 1.10-1.19x; bfloat16 28x28 0.98-1.01x), nor at K > 1, whose pass
  // from memory is the E-step (float32 K = 2, 7x7 and 14x14: 1.09-1.21x). (Tried and
  // dropped: the same prefetch in the soft evaluation's normalization, bfloat16 56x56
  // K = 2 1.17-1.19x.) Unmeasured: float16 (bfloat16's footprint).
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(S));
  const bool next_tile_rows = g.interleaved && resp == Resp::kOne &&
                              row_bytes >= kNextRowsMinRowBytes &&
                              plan.len * row_bytes <= kNextRowsMaxTileBytes;
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<A> loc(g.interleaved && resp != Resp::kOne ? K * plan.len : 0);
    Scratch<A> sums(g.interleaved ? 3 * K * (C + kW<A>) : 0);
    Scratch<Vec<A>> lanes(4 * K);  // K x 4 vectors: a planar E-step's group
    Scratch<A> psc(pair_scratch(g, plan, pair));
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const int64_t T = tl.T;
      A* cnt = pn + t * K;
      A* tm = pmean + t * K * C;
      A* t2 = pm2 + t * K * C;
      if (g.interleaved) {
        const S* xt = x + tl.p0 * C;
        const A* w = loc.get();
        if (resp == Resp::kOne) {
          cnt[0] = A(T);
        } else {
          if (resp == Resp::kSoft) {
            responsibilities_interleaved(xt, T, C, K, mu, ha, b, pair, loc.get(), lanes.get());
          } else {
            given_interleaved(g, tl, K, groups, loc.get());
          }
          tau_to_global(tl, K, w, tau);
          for (int64_t k = 0; k < K; ++k) cnt[k] = count_interleaved(w + k * T, T);
        }
        if (resp == Resp::kOne) {
          const int64_t next_bytes =
              next_tile_rows && t + 1 < end ? tile_at(g, plan, t + 1).T * row_bytes : 0;
          moments_interleaved<true>(xt, T, C, K, w, cnt, tm, t2, sums.get(),
                                    next_rows(xt + T * C, next_bytes, T));
        } else {
          moments_interleaved<false>(xt, T, C, K, w, cnt, tm, t2, sums.get(), NextRows{});
        }
        continue;
      }
      const View<const S> xv = planar_view(g, tl, x);
      View<A> tv{};
      if (resp == Resp::kOne) {
        cnt[0] = A(T);
      } else {
        tv = planar_tau(g, tl, K, tau);
        if (resp == Resp::kSoft)
          responsibilities_planar(xv, tv, tl.nseg, tl.len, C, K, mu, ha, b, pair, psc.get(),
                                  lanes.get());
        else
          given_planar(tl, K, groups, tv);
      }
      const View<const A> ctv{tv.base, tv.seg_stride, tv.c_stride};
      if (resp != Resp::kOne)
        for (int64_t k = 0; k < K; ++k) cnt[k] = count_planar(ctv, tl.nseg, tl.len, k);
      for (int64_t c = 0; c < C; ++c) {
        if (resp == Resp::kOne) {
          moments_planar_row<true, 1>(xv, ctv, tl.nseg, tl.len, c, 0, cnt, tm, t2, C);
          continue;
        }
        for_component_blocks(K, [&](auto kbc, int64_t k0) {
          moments_planar_row<false, decltype(kbc)::value>(xv, ctv, tl.nseg, tl.len, c, k0,
                                                          cnt + k0, tm + k0 * C, t2 + k0 * C, C);
        });
      }
    }
  });
}

// Training: y from the batch statistics (alpha, delta) and the forward's tau.
template <int KS, bool NT, typename S, typename A>
void normalize_mixture_kernel(const NormalizeArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const auto* x = static_cast<const S*>(a.x);
  auto* y = static_cast<S*>(a.y);
  const auto* tau = static_cast<const A*>(a.tau);
  const auto* alpha = static_cast<const A*>(a.alpha);
  const auto* delta = static_cast<const A*>(a.delta);
  const int64_t* groups = a.groups;
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<int64_t> kfix(fixed_count(g, plan));
    Scratch<A> coef(2 * K);
    Scratch<const A*> rows(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const int64_t* kf = nullptr;
      if (resp != Resp::kSoft) {
        fixed_components(g, tl, resp, groups, kfix.get());
        kf = kfix.get();
      }
      if (g.interleaved) {
        const S* xt = x + tl.p0 * C;
        S* yt = y + tl.p0 * C;
        if (kf != nullptr) {
          for (int64_t j = 0; j < tl.T; ++j)
            normalize_row_fixed(xt + j * C, yt + j * C, C, alpha + kf[j] * C, delta + kf[j] * C,
                                NT);
        } else {
          normalize_interleaved_rows<KS>(xt, yt, tl.T, C, K, tau + tl.p0 * K, alpha, delta, NT);
        }
        continue;
      }
      const View<const A> tv = kf ? View<const A>{} : planar_tau(g, tl, K, tau);
      normalize_planar<KS, NT>(planar_view(g, tl, x), planar_view(g, tl, y), tv, tl.nseg, tl.len,
                               C, K, kf, alpha, delta, coef.get(), rows.get());
    }
  }, NT);
}

// Evaluation: E-step (soft) and normalization in one pass over each tile.
template <int KS, bool NT, typename S, typename A>
void estep_normalize_kernel(const NormalizeArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const auto* x = static_cast<const S*>(a.x);
  auto* y = static_cast<S*>(a.y);
  auto* tau = static_cast<A*>(a.tau);
  const auto* alpha = static_cast<const A*>(a.alpha);
  const auto* delta = static_cast<const A*>(a.delta);
  const auto* mu = static_cast<const A*>(a.mu);
  const auto* ha = static_cast<const A*>(a.half_a);
  const auto* b = static_cast<const A*>(a.b);
  const auto* pair = static_cast<const A*>(a.pair);
  constexpr int64_t W = kW<A>;
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<Vec<A>> lanes(4 * K);  // K x 4 vectors: a planar E-step's group
    Scratch<A> psc(pair_scratch(g, plan, pair));
    Scratch<A> coef(2 * K);
    Scratch<const A*> rows(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      if (g.interleaved) {
        // groups of W positions: log-likelihoods, softmax over k with positions in lanes;
        // then the tile's rows normalized while in the L2 cache (normalizing each group
        // right after its E-step, from the L1 cache, was no faster: in-process A/B,
        // bfloat16 and float32, C = 64 to 512)
        const S* xt = x + tl.p0 * C;
        S* yt = y + tl.p0 * C;
        A* tt = tau + tl.p0 * K;
        for (int64_t j0 = 0; j0 < tl.T; j0 += W) {
          const int64_t n = std::min(W, tl.T - j0);
          Vec<A>* l = lanes.get();
          loglik_interleaved_group(xt + j0 * C, n, C, K, mu, ha, b, pair, l);
          softmax_lanes(l, K, pair != nullptr);
          if constexpr (KS == 2) {
            store_interleaved_pair(tt + j0 * 2, l[0], l[1], n);
          } else {
            for (int64_t j = 0; j < n; ++j)
              for (int64_t k = 0; k < K; ++k) tt[(j0 + j) * K + k] = l[k][j];
          }
        }
        normalize_interleaved_rows<KS>(xt, yt, tl.T, C, K, tt, alpha, delta, NT,
                                       !NT && a.prefetch_y);
        continue;
      }
      const View<const S> xv = planar_view(g, tl, x);
      const View<S> yv = planar_view(g, tl, y);
      const View<A> tv = planar_tau(g, tl, K, tau);
      responsibilities_planar(xv, tv, tl.nseg, tl.len, C, K, mu, ha, b, pair, psc.get(),
                                  lanes.get());
      normalize_planar<KS, NT>(xv, yv, View<const A>{tv.base, tv.seg_stride, tv.c_stride},
                               tl.nseg, tl.len, C, K, nullptr, alpha, delta, coef.get(),
                               rows.get());
    }
  }, NT);
}

template <typename S, typename A>
void normalize_mixture_impl(const NormalizeArgs& a, bool estep) {
  if (estep && a.resp == Resp::kSoft) {
    with_small_K_stream(a.K, a.stream, [&](auto kc, auto ntc) {
      estep_normalize_kernel<decltype(kc)::value, decltype(ntc)::value, S, A>(a);
    });
    return;
  }
  // evaluation with given (or single) responsibilities: tau as in training, then y
  if (estep && a.resp == Resp::kGiven) {
    const Geometry g = a.geo;
    auto* tau = static_cast<A*>(a.tau);
    const int64_t K = a.K;
    for_each_tile(a.plan, [&](int64_t begin, int64_t end) {
      Scratch<A> loc(g.interleaved ? K * a.plan.len : 0);
      for (int64_t t = begin; t < end; ++t) {
        const Tile tl = tile_at(g, a.plan, t);
        if (g.interleaved) {
          given_interleaved(g, tl, K, a.groups, loc.get());
          tau_to_global(tl, K, loc.get(), tau);
        } else {
          given_planar(tl, K, a.groups, planar_tau(g, tl, K, tau));
        }
      }
    });
  }
  with_small_K_stream(a.K, a.stream, [&](auto kc, auto ntc) {
    normalize_mixture_kernel<decltype(kc)::value, decltype(ntc)::value, S, A>(a);
  });
}

template <typename S, typename A>
void collect_grad_stats_impl(const GradStatsArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const bool one = a.resp == Resp::kOne;
  const auto* gr = static_cast<const S*>(a.grad);
  const auto* x = static_cast<const S*>(a.x);
  const auto* tau = static_cast<const A*>(a.tau);
  const auto* mean = static_cast<const A*>(a.mean);
  auto* psg = static_cast<A*>(a.part_sg);
  auto* psgx = static_cast<A*>(a.part_sgx);
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<A> blk(g.interleaved && one ? 2 * C : 0);  // grad_sums_rows' block sums
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      A* sg = psg + t * K * C;
      A* sgx = psgx + t * K * C;
      if (g.interleaved) {
        const S* xt = x + tl.p0 * C;
        const S* gt = gr + tl.p0 * C;
        const A* tt = one ? nullptr : tau + tl.p0 * K;
        if (one) {
          grad_sums_rows(xt, gt, tl.T, C, mean, sg, sgx, blk.get());
          continue;
        }
        // the next tile of this thread's range follows this one in memory
        const int64_t next_bytes =
            t + 1 < end ? tile_at(g, plan, t + 1).T * C * static_cast<int64_t>(sizeof(S)) : 0;
        const int64_t nq = (C + kW<A> - 1) / kW<A>;
        for_vectors<A>(C, [&](auto span, int64_t c, int64_t n) {
          constexpr int P = decltype(span)::value;
          const NextLines pf = next_lines(xt + tl.T * C, gt + tl.T * C, next_bytes, c / kW<A>, nq);
          for_component_blocks(K, [&](auto kbc, int64_t k0) {
            grad_sums_interleaved<P, decltype(kbc)::value>(
                xt, gt, tl.T, C, c, n, tt + k0, K, mean + k0 * C, sg + k0 * C, sgx + k0 * C,
                k0 == 0 ? pf : NextLines{});
          });
        });
        continue;
      }
      const View<const S> xv = planar_view(g, tl, x), gv = planar_view(g, tl, gr);
      const View<const A> tv = one ? View<const A>{} : planar_tau(g, tl, K, tau);
      for (int64_t c = 0; c < C; ++c) {
        if (one) {
          grad_stats_planar_row<true, 1>(xv, gv, tv, tl.nseg, tl.len, c, 0, mean, sg, sgx, C);
          continue;
        }
        for_component_blocks(K, [&](auto kbc, int64_t k0) {
          grad_stats_planar_row<false, decltype(kbc)::value>(xv, gv, tv, tl.nseg, tl.len, c, k0,
                                                             mean + k0 * C, sg + k0 * C,
                                                             sgx + k0 * C, C);
        });
      }
    }
  });
}

template <int KS, bool NT, typename S, typename A>
void mixture_grad_input_kernel(const GradInputArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const bool soft = resp == Resp::kSoft;
  const auto* gr = static_cast<const S*>(a.grad);
  const auto* x = static_cast<const S*>(a.x);
  auto* dx = static_cast<S*>(a.dx);
  const auto* tau = static_cast<const A*>(a.tau);
  // dtau's coefficients: each component's, or with pair (K = 2) those of dtau_0 - dtau_1
  // as one component's
  const auto* pair = static_cast<const A*>(a.pair);
  const DtauPtrs<A> dcf =
      pair ? pair_dtau_ptrs(pair, C)
           : DtauPtrs<A>{static_cast<const A*>(a.mean), static_cast<const A*>(a.alpha),
                         static_cast<const A*>(a.beta), static_cast<const A*>(a.e1),
                         static_cast<const A*>(a.e2), static_cast<const A*>(a.ev)};
  const DxPtrs<A> xcf{static_cast<const A*>(a.alpha), static_cast<const A*>(a.p),
                      static_cast<const A*>(a.e1),    static_cast<const A*>(a.mean),
                      static_cast<const A*>(a.a),     static_cast<const A*>(a.mu)};
  const int64_t maxT = g.interleaved ? plan.len : plan.len * plan.segs;
  // planar dtau (dtau_planar_group): the five coefficients of each (k, c) side by side,
  // in the order its loops read them: per pair of components (for_component_pairs),
  // channel after channel, the pair's components within a channel. One array per call,
  // shared by the threads (read only).
  const bool planar_soft = soft && !g.interleaved;
  const int64_t Kd = pair ? 1 : K;  // components of dcf
  Scratch<A> pco(planar_soft ? 5 * Kd * C : 0);
  for (int64_t k = 0; k < (planar_soft ? Kd : 0); ++k) {
    const int64_t k0 = k & ~int64_t(1), KB = std::min<int64_t>(2, Kd - k0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      A* q = pco.get() + (k0 * C + c * KB + (k - k0)) * 5;
      q[0] = dcf.m[i], q[1] = dcf.al[i], q[2] = dcf.be[i], q[3] = dcf.e1[i], q[4] = dcf.e2[i];
    }
  }
  const A* const pc = pco.get();
  constexpr int64_t W = kW<A>;
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<A> dl(planar_soft ? K * maxT : 0);
    Scratch<A> tdl(2 * K * (W + 1));  // interleaved: tau and dl of W positions, and of one
    Scratch<int64_t> kfix(fixed_count(g, plan));
    Scratch<Vec<A>> coef(6 * K);
    Scratch<Vec<A>> lanes(4 * K);
    Scratch<const A*> rows(2 * K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const int64_t* kf = nullptr;
      if (!soft) {
        if (resp == Resp::kGiven)
          components_from_tau(g, tl, K, tau, kfix.get());
        else
          fixed_components(g, tl, resp, nullptr, kfix.get());
        kf = kfix.get();
      }
      if (g.interleaved) {
        const S* xt = x + tl.p0 * C;
        const S* gt = gr + tl.p0 * C;
        S* dt = dx + tl.p0 * C;
        if (kf != nullptr) {
          for (int64_t j = 0; j < tl.T; ++j)
            dx_row_fixed(xt + j * C, gt + j * C, dt + j * C, C, kf[j] * C, xcf, NT);
          continue;
        }
        const A* tt = tau + tl.p0 * K;
        // W rows a group, each row's sums one row at a time (two rows sharing each
        // coefficient vector stalled on the loads of x, as in the E-step)
        auto* tg = reinterpret_cast<A(*)[W]>(tdl.get());
        for (int64_t j = 0; j < tl.T; j += W)
          grad_input_group<KS>(xt + j * C, gt + j * C, dt + j * C, std::min(W, tl.T - j), C, K,
                               tt + j * K, dcf, pair != nullptr, xcf, tg, tg + K,
                               tdl.get() + 2 * K * W, tdl.get() + 2 * K * W + K, NT);
        continue;
      }
      const View<const S> xv = planar_view(g, tl, x), gv = planar_view(g, tl, gr);
      const View<S> dv = planar_view(g, tl, dx);
      const View<const A> tv = soft ? planar_tau(g, tl, K, tau) : View<const A>{};
      if (soft)
        dl_planar(xv, gv, tv, tl.nseg, tl.len, C, K, pc, dcf.ev, pair != nullptr, dl.get(),
                  lanes.get());
      dx_planar<KS, NT>(xv, gv, dv, tv, tl.nseg, tl.len, C, K, dl.get(), kf, xcf, coef.get(),
                        rows.get());
    }
  }, NT);
}

template <typename S, typename A>
void mixture_grad_input_impl(const GradInputArgs& a) {
  with_small_K_stream(a.K, a.stream, [&](auto kc, auto ntc) {
    mixture_grad_input_kernel<decltype(kc)::value, decltype(ntc)::value, S, A>(a);
  });
}

template <template <typename, typename> class F, typename Args, typename... Extra>
void dispatch_dtype(const Args& a, Extra... extra) {
  switch (a.dtype) {
    case c10::ScalarType::Float: F<float, float>::run(a, extra...); break;
    case c10::ScalarType::Double: F<double, double>::run(a, extra...); break;
    case c10::ScalarType::Half: F<c10::Half, float>::run(a, extra...); break;
    case c10::ScalarType::BFloat16: F<c10::BFloat16, float>::run(a, extra...); break;
    default: TORCH_CHECK(false, "cbn_ext: unsupported dtype ", a.dtype);
  }
}

template <typename s, typename a>
struct RunStats {
  static void run(const StatsArgs& args) { collect_mixture_stats_impl<s, a>(args); }
};
template <typename s, typename a>
struct RunNormalize {
  static void run(const NormalizeArgs& args, bool estep) { normalize_mixture_impl<s, a>(args, estep); }
};
template <typename s, typename a>
struct RunGradStats {
  static void run(const GradStatsArgs& args) { collect_grad_stats_impl<s, a>(args); }
};
template <typename s, typename a>
struct RunGradInput {
  static void run(const GradInputArgs& args) { mixture_grad_input_impl<s, a>(args); }
};

}  // namespace

void collect_mixture_stats(const StatsArgs& args) { dispatch_dtype<RunStats>(args); }
void normalize_mixture(const NormalizeArgs& args) { dispatch_dtype<RunNormalize>(args, false); }
void estep_normalize_mixture(const NormalizeArgs& args) { dispatch_dtype<RunNormalize>(args, true); }
void collect_grad_stats(const GradStatsArgs& args) { dispatch_dtype<RunGradStats>(args); }
void mixture_grad_input(const GradInputArgs& args) { dispatch_dtype<RunGradInput>(args); }

}  // namespace CBN_CPU_ISA
}  // namespace cpu
}  // namespace cbn_ext
