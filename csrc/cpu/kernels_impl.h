// The fused CPU kernels of compound batch norm. This file is included once per
// instruction set, inside namespace cbn_ext::cpu::CBN_CPU_ISA, by kernels_<isa>.cpp,
// after every external header (kernels_deps.h): whatever is defined here is compiled for
// that instruction set only, and nothing here is shared between the variants.
//
// Layouts (cpu_kernels.h): interleaved (channels innermost: NHWC, (N, C)) and planar
// (NCHW). Each kernel walks the tiles of a TilePlan in parallel; per-tile partial results
// are merged by the caller in tile order, so results do not depend on the thread count.
// Inner loops run over SIMD vectors (GCC vector extensions, 32 bytes): over channels in
// the interleaved layout, over positions in the planar one. The per-element formulas are
// those of csrc/cbn_math.h.
//
// Performance notes: the work on a tile is done by functions that take their pointers
// as parameters (locals the compiler can keep in registers: a store through a float
// pointer cannot then force their reload); per-(k, c) coefficients of a planar row are
// copied to locals before the loop over positions; loops are specialised for whole
// vectors and one partial tail.
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

template <typename T>
C10_ALWAYS_INLINE Vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VecTraits<T>::U*>(p);
}

template <typename T>
C10_ALWAYS_INLINE void vstore(T* p, Vec<T> v) {
  *reinterpret_cast<typename VecTraits<T>::U*>(p) = v;
}

// The first n (< width) lanes from p, zero elsewhere.
template <typename T>
C10_ALWAYS_INLINE Vec<T> vload_part(const T* p, int64_t n) {
  Vec<T> v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

template <typename T>
C10_ALWAYS_INLINE void vstore_part(T* p, Vec<T> v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

// Whole vector (Full) or the first n lanes.
template <bool Full, typename T>
C10_ALWAYS_INLINE Vec<T> ld(const T* p, int64_t n) {
  if constexpr (Full) {
    return vload(p);
  } else {
    return vload_part(p, n);
  }
}

template <bool Full, typename T>
C10_ALWAYS_INLINE void st(T* p, Vec<T> v, int64_t n) {
  if constexpr (Full) {
    vstore(p, v);
  } else {
    vstore_part(p, v, n);
  }
}

// v with the lanes from n on set to zero (Full: v).
template <bool Full, typename V>
C10_ALWAYS_INLINE V keep(V v, int64_t n) {
  if constexpr (Full) {
    return v;
  } else {
    V r = {};
    for (int64_t i = 0; i < n; ++i) r[i] = v[i];
    return r;
  }
}

// body(std::true_type, i, W) over whole vectors of [0, n), then body(std::false_type, i,
// rest) for a partial tail.
template <typename T, typename F>
C10_ALWAYS_INLINE void for_vectors(int64_t n, F&& body) {
  int64_t i = 0;
  for (; i + kW<T> <= n; i += kW<T>) body(std::true_type{}, i, kW<T>);
  if (i < n) body(std::false_type{}, i, n - i);
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

// Blocked sums (SPEC "Accuracy"): long sums over channels or positions are cut into
// blocks whose partial sums are added at the end, so that the rounding error grows with
// the block length plus the number of blocks, not with the whole length.
constexpr int64_t kChannelBlock = 32;   // channels of a blocked sum over c, planar
constexpr int64_t kPositionBlock = 64;  // positions of a blocked sum over p

// Calls f(std::integral_constant<int, KB>, k0) over blocks of at most 4 components.
template <typename F>
C10_ALWAYS_INLINE void for_component_blocks(int64_t K, F&& f) {
  int64_t k0 = 0;
  for (; k0 + 4 <= K; k0 += 4) f(std::integral_constant<int, 4>{}, k0);
  switch (K - k0) {
    case 3: f(std::integral_constant<int, 3>{}, k0); break;
    case 2: f(std::integral_constant<int, 2>{}, k0); break;
    case 1: f(std::integral_constant<int, 1>{}, k0); break;
    default: break;
  }
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

// A tile as acc_t: element (j, c) of an interleaved tile is base[j * C + c]; element
// (seg, c, s) of a planar tile is base[seg * seg_stride + c * c_stride + s].
template <typename T>
struct View {
  T* base;
  int64_t seg_stride;
  int64_t c_stride;
  C10_ALWAYS_INLINE T* row(int64_t seg, int64_t c) const {
    return base + seg * seg_stride + c * c_stride;
  }
};

// ---------------------------------------------------------------------------------------
// Conversions of half-precision data to and from float, 8 values at a time: bfloat16 by
// integer shifts (rounding to nearest even, NaN kept), float16 by F16C where compiled in.
// Bit-identical to c10's scalar conversions, which handle the tails.
// ---------------------------------------------------------------------------------------

typedef uint16_t U16x8 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

template <typename scalar_t>
C10_ALWAYS_INLINE void to_float(const scalar_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    for (; i + 8 <= n; i += 8) {
      const U32x8 w = __builtin_convertvector(*reinterpret_cast<const U16x8*>(src + i), U32x8) << 16;
      Vec<float> f;
      std::memcpy(&f, &w, sizeof(f));
      vstore(dst + i, f);
    }
  }
#if defined(CBN_CPU_F16C)
  if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
C10_ALWAYS_INLINE void from_float(const float* src, scalar_t* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    for (; i + 8 <= n; i += 8) {
      const Vec<float> f = vload(src + i);
      U32x8 u;
      std::memcpy(&u, &f, sizeof(u));
      U32x8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      r = f != f ? U32x8{} + 0x7FC0u : r;
      *reinterpret_cast<U16x8*>(dst + i) = __builtin_convertvector(r, U16x8);
    }
  }
#if defined(CBN_CPU_F16C)
  if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
struct TileIO {
  static constexpr bool kNative = std::is_same<scalar_t, acc_t>::value;

  // View of a tile of src; half-precision input is converted into scratch first.
  static View<const acc_t> load(const Geometry& g, const Tile& tl, const scalar_t* src,
                                acc_t* scratch) {
    if (g.interleaved) {
      const scalar_t* p = src + tl.p0 * g.C;
      if constexpr (kNative) {
        return {p, 0, g.C};
      } else {
        to_float(p, scratch, tl.T * g.C);
        return {scratch, 0, g.C};
      }
    }
    const scalar_t* p = src + tl.n0 * g.C * g.S + tl.s0;
    if constexpr (kNative) {
      return {p, g.C * g.S, g.S};
    } else {
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        for (int64_t c = 0; c < g.C; ++c) {
          to_float(p + seg * g.C * g.S + c * g.S, scratch + (seg * g.C + c) * tl.len, tl.len);
        }
      }
      return {scratch, g.C * tl.len, tl.len};
    }
  }

  // Where to write a tile of dst: dst itself (native) or the scratch store() converts.
  static View<acc_t> out(const Geometry& g, const Tile& tl, scalar_t* dst, acc_t* scratch) {
    if constexpr (kNative) {
      if (g.interleaved) return {dst + tl.p0 * g.C, 0, g.C};
      return {dst + tl.n0 * g.C * g.S + tl.s0, g.C * g.S, g.S};
    } else {
      if (g.interleaved) return {scratch, 0, g.C};
      return {scratch, g.C * tl.len, tl.len};
    }
  }

  static void store(const Geometry& g, const Tile& tl, scalar_t* dst, const acc_t* scratch) {
    if constexpr (!kNative) {
      if (g.interleaved) {
        from_float(scratch, dst + tl.p0 * g.C, tl.T * g.C);
        return;
      }
      scalar_t* p = dst + tl.n0 * g.C * g.S + tl.s0;
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        for (int64_t c = 0; c < g.C; ++c) {
          from_float(scratch + (seg * g.C + c) * tl.len, p + seg * g.C * g.S + c * g.S, tl.len);
        }
      }
    }
  }
};

// Per-thread scratch, allocated once per chunk of tiles.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> data;
  explicit Scratch(int64_t n) : data(new T[n > 0 ? n : 1]) {}
  T* get() { return data.get(); }
};

int64_t max_tile_positions(const Geometry& g, const TilePlan& plan) {
  return g.interleaved ? plan.len : plan.len * plan.segs;
}

// Sample of local position j.
C10_ALWAYS_INLINE int64_t sample_of(const Geometry& g, const Tile& tl, int64_t j) {
  return g.interleaved ? (tl.p0 + j) / g.S : tl.n0 + j / tl.len;
}

// The tile's responsibilities loc[k * T + j], to / from the tensor's layout.
template <typename acc_t>
void tau_to_global(const Geometry& g, const Tile& tl, int64_t K, const acc_t* loc, acc_t* tau) {
  if (g.interleaved) {
    acc_t* out = tau + tl.p0 * K;
    for (int64_t j = 0; j < tl.T; ++j)
      for (int64_t k = 0; k < K; ++k) out[j * K + k] = loc[k * tl.T + j];
    return;
  }
  for (int64_t seg = 0; seg < tl.nseg; ++seg)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(tau + ((tl.n0 + seg) * K + k) * g.S + tl.s0, loc + k * tl.T + seg * tl.len,
                  tl.len * sizeof(acc_t));
}

template <typename acc_t>
void tau_from_global(const Geometry& g, const Tile& tl, int64_t K, const acc_t* tau, acc_t* loc) {
  if (g.interleaved) {
    const acc_t* in = tau + tl.p0 * K;
    for (int64_t j = 0; j < tl.T; ++j)
      for (int64_t k = 0; k < K; ++k) loc[k * tl.T + j] = in[j * K + k];
    return;
  }
  for (int64_t seg = 0; seg < tl.nseg; ++seg)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(loc + k * tl.T + seg * tl.len, tau + ((tl.n0 + seg) * K + k) * g.S + tl.s0,
                  tl.len * sizeof(acc_t));
}

// One-hot responsibilities of the split path.
template <typename acc_t>
void given_responsibilities(const Geometry& g, const Tile& tl, int64_t K, const int64_t* groups,
                            acc_t* loc) {
  const int64_t T = tl.T;
  for (int64_t j = 0; j < T; ++j) {
    const int64_t grp = groups[sample_of(g, tl, j)];
    for (int64_t k = 0; k < K; ++k) loc[k * T + j] = k == grp ? acc_t(1) : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------
// E-step: loc[k * T + j] = l (log-likelihood), then softmax over k.
// ---------------------------------------------------------------------------------------

// Interleaved: for each position (row of C channels), components in blocks of KB.
template <typename acc_t>
void estep_interleaved(const acc_t* x, int64_t T, int64_t C, int64_t K, const acc_t* mu,
                       const acc_t* ha, const acc_t* b, acc_t* loc) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  for (int64_t j = 0; j < T; ++j) {
    const acc_t* xr = x + j * C;
    for_component_blocks(K, [&](auto KBc, int64_t k0) {
      constexpr int KB = decltype(KBc)::value;
      const acc_t* m = mu + k0 * C;
      const acc_t* h = ha + k0 * C;
      V tot[KB];
      for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
      // blocks of kChannelBlock channels per lane (2 W lanes)
      for (int64_t c0 = 0; c0 < C; c0 += 2 * W * kChannelBlock) {
        const int64_t c1 = std::min(C, c0 + 2 * W * kChannelBlock);
        V acc0[KB], acc1[KB];
        for (int kb = 0; kb < KB; ++kb) acc0[kb] = acc1[kb] = V{};
        int64_t c = c0;
        for (; c + 2 * W <= c1; c += 2 * W) {
          const V x0 = vload(xr + c), x1 = vload(xr + c + W);
          for (int kb = 0; kb < KB; ++kb) {
            acc0[kb] += math::mahalanobis_term(x0, vload(m + kb * C + c), vload(h + kb * C + c));
            acc1[kb] += math::mahalanobis_term(x1, vload(m + kb * C + c + W),
                                               vload(h + kb * C + c + W));
          }
        }
        for_vectors<acc_t>(c1 - c, [&](auto full, int64_t i, int64_t n) {
          constexpr bool F = decltype(full)::value;
          const V x0 = ld<F>(xr + c + i, n);
          for (int kb = 0; kb < KB; ++kb)
            acc0[kb] += math::mahalanobis_term(x0, ld<F>(m + kb * C + c + i, n),
                                               ld<F>(h + kb * C + c + i, n));
        });
        for (int kb = 0; kb < KB; ++kb) tot[kb] += acc0[kb] + acc1[kb];
      }
      for (int kb = 0; kb < KB; ++kb) loc[(k0 + kb) * T + j] = b[k0 + kb] - vsum(tot[kb]);
    });
  }
}

// Planar: positions [s, s + 2W) (or fewer, n) of segment seg, over all channels.
template <bool Full, int KB, typename acc_t>
C10_ALWAYS_INLINE void estep_planar_block(View<const acc_t> xv, int64_t seg, int64_t s, int64_t n,
                                          int64_t C, const acc_t* mu, const acc_t* ha,
                                          const acc_t* b, acc_t* loc, int64_t T, int64_t j) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  V tot0[KB], tot1[KB];
  for (int kb = 0; kb < KB; ++kb) tot0[kb] = tot1[kb] = V{};
  const int64_t n0 = Full ? W : std::min(n, W), n1 = Full ? W : n - n0;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {  // blocked over channels
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    V acc0[KB], acc1[KB];
    for (int kb = 0; kb < KB; ++kb) acc0[kb] = acc1[kb] = V{};
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t* r = xv.row(seg, c) + s;
      const V x0 = ld<Full>(r, n0);
      const V x1 = (Full || n1 > 0) ? ld<Full>(r + W, n1) : V{};
      for (int kb = 0; kb < KB; ++kb) {
        const acc_t m = mu[kb * C + c], h = ha[kb * C + c];
        acc0[kb] += math::mahalanobis_term(x0, m, h);
        acc1[kb] += math::mahalanobis_term(x1, m, h);
      }
    }
    for (int kb = 0; kb < KB; ++kb) {
      tot0[kb] += acc0[kb];
      tot1[kb] += acc1[kb];
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    acc_t* o = loc + kb * T + j;
    const V bk = vsplat(b[kb]);
    st<Full>(o, bk - tot0[kb], n0);
    if (Full || n1 > 0) st<Full>(o + W, bk - tot1[kb], n1);
  }
}

template <typename acc_t>
void estep_planar(View<const acc_t> xv, int64_t nseg, int64_t len, int64_t C, int64_t K,
                  const acc_t* mu, const acc_t* ha, const acc_t* b, acc_t* loc) {
  constexpr int64_t W = kW<acc_t>;
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    for (int64_t s = 0; s < len; s += 2 * W) {
      const int64_t n = std::min(2 * W, len - s);
      for_component_blocks(K, [&](auto KBc, int64_t k0) {
        constexpr int KB = decltype(KBc)::value;
        if (n == 2 * W)
          estep_planar_block<true, KB>(xv, seg, s, n, C, mu + k0 * C, ha + k0 * C, b + k0,
                                       loc + k0 * T, T, seg * len + s);
        else
          estep_planar_block<false, KB>(xv, seg, s, n, C, mu + k0 * C, ha + k0 * C, b + k0,
                                        loc + k0 * T, T, seg * len + s);
      });
    }
  }
}

// In place over loc (K rows of T): tau = softmax over k, W positions at a time.
template <typename acc_t>
void softmax_components(acc_t* loc, int64_t T, int64_t K, Vec<acc_t>* lanes) {
  for_vectors<acc_t>(T, [&](auto full, int64_t j, int64_t n) {
    constexpr bool F = decltype(full)::value;
    for (int64_t k = 0; k < K; ++k) lanes[k] = ld<F>(loc + k * T + j, n);
    math::softmax_in_place(lanes, K, 1, VExp{});
    for (int64_t k = 0; k < K; ++k) st<F>(loc + k * T + j, lanes[k], n);
  });
}

template <typename acc_t>
void tile_responsibilities(const Geometry& g, const Tile& tl, int64_t K, Resp resp,
                           const View<const acc_t>& xv, const int64_t* groups, const acc_t* mu,
                           const acc_t* ha, const acc_t* b, acc_t* loc, Vec<acc_t>* lanes) {
  if (resp == Resp::kGiven) {
    given_responsibilities(g, tl, K, groups, loc);
    return;
  }
  if (g.interleaved)
    estep_interleaved(xv.base, tl.T, g.C, K, mu, ha, b, loc);
  else
    estep_planar(xv, tl.nseg, tl.len, g.C, K, mu, ha, b, loc);
  softmax_components(loc, tl.T, K, lanes);
}

// ---------------------------------------------------------------------------------------
// M-step partials of one tile: count, mean and M2 per (k, c), by two passes over the tile
// (mean first, then squared deviations from it) while it is in cache.
// ---------------------------------------------------------------------------------------

// Interleaved: channels [c, c + n) of all T rows; One: tau == 1.
template <bool Full, bool One, int KB, typename acc_t>
C10_ALWAYS_INLINE void moments_interleaved_block(const acc_t* x, int64_t T, int64_t C, int64_t c,
                                                 int64_t n, const acc_t* loc, const acc_t* cnt,
                                                 acc_t* pmean, acc_t* pm2) {
  using V = Vec<acc_t>;
  // pass 1: weighted sums, blocked over positions
  V tot[KB];
  for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    V s0[KB], s1[KB];
    for (int kb = 0; kb < KB; ++kb) s0[kb] = s1[kb] = V{};
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      const V x0 = ld<Full>(x + j * C + c, n), x1 = ld<Full>(x + (j + 1) * C + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        if constexpr (One) {
          s0[kb] += x0;
          s1[kb] += x1;
        } else {
          s0[kb] += loc[kb * T + j] * x0;
          s1[kb] += loc[kb * T + j + 1] * x1;
        }
      }
    }
    if (j < j1) {
      const V x0 = ld<Full>(x + j * C + c, n);
      for (int kb = 0; kb < KB; ++kb) s0[kb] += One ? x0 : loc[kb * T + j] * x0;
    }
    for (int kb = 0; kb < KB; ++kb) tot[kb] += s0[kb] + s1[kb];
  }
  V mt[KB];
  for (int kb = 0; kb < KB; ++kb) {
    mt[kb] = math::weighted_mean(tot[kb], cnt[kb]);
    tot[kb] = V{};
  }
  // pass 2: weighted squared deviations from the tile's mean, blocked the same way
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    V s0[KB], s1[KB];
    for (int kb = 0; kb < KB; ++kb) s0[kb] = s1[kb] = V{};
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      const V x0 = ld<Full>(x + j * C + c, n), x1 = ld<Full>(x + (j + 1) * C + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        const V d0 = x0 - mt[kb], d1 = x1 - mt[kb];
        if constexpr (One) {
          s0[kb] += d0 * d0;
          s1[kb] += d1 * d1;
        } else {
          s0[kb] += (loc[kb * T + j] * d0) * d0;
          s1[kb] += (loc[kb * T + j + 1] * d1) * d1;
        }
      }
    }
    if (j < j1) {
      const V x0 = ld<Full>(x + j * C + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        const V d0 = x0 - mt[kb];
        s0[kb] += One ? d0 * d0 : (loc[kb * T + j] * d0) * d0;
      }
    }
    for (int kb = 0; kb < KB; ++kb) tot[kb] += s0[kb] + s1[kb];
  }
  for (int kb = 0; kb < KB; ++kb) {
    st<Full>(pmean + kb * C + c, mt[kb], n);
    st<Full>(pm2 + kb * C + c, keep<Full>(tot[kb], n), n);
  }
}

// Planar: channel c over all segments of the tile.
template <bool One, int KB, typename acc_t>
C10_ALWAYS_INLINE void moments_planar_row(View<const acc_t> xv, int64_t nseg, int64_t len,
                                          int64_t c, const acc_t* loc, int64_t T,
                                          const acc_t* cnt, acc_t* pmean, acc_t* pm2,
                                          int64_t C) {
  using V = Vec<acc_t>;
  constexpr int64_t B = kW<acc_t> * kPositionBlock;  // positions of a block
  V tot[KB];
  for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* r = xv.row(seg, c);
    const acc_t* lt = loc + seg * len;
    for (int64_t b0 = 0; b0 < len; b0 += B) {
      V s0[KB];
      for (int kb = 0; kb < KB; ++kb) s0[kb] = V{};
      for_vectors<acc_t>(std::min(B, len - b0), [&](auto full, int64_t i, int64_t n) {
        constexpr bool F = decltype(full)::value;
        const int64_t s = b0 + i;
        const V x0 = ld<F>(r + s, n);
        for (int kb = 0; kb < KB; ++kb) s0[kb] += One ? x0 : ld<F>(lt + kb * T + s, n) * x0;
      });
      for (int kb = 0; kb < KB; ++kb) tot[kb] += s0[kb];
    }
  }
  acc_t mt[KB];
  for (int kb = 0; kb < KB; ++kb) {
    mt[kb] = math::weighted_mean(vsum(tot[kb]), cnt[kb]);
    tot[kb] = V{};
  }
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* r = xv.row(seg, c);
    const acc_t* lt = loc + seg * len;
    for (int64_t b0 = 0; b0 < len; b0 += B) {
      V s0[KB];
      for (int kb = 0; kb < KB; ++kb) s0[kb] = V{};
      for_vectors<acc_t>(std::min(B, len - b0), [&](auto full, int64_t i, int64_t n) {
        constexpr bool F = decltype(full)::value;
        const int64_t s = b0 + i;
        const V x0 = ld<F>(r + s, n);
        for (int kb = 0; kb < KB; ++kb) {
          const V d = keep<F>(x0 - mt[kb], n);
          s0[kb] += One ? d * d : (ld<F>(lt + kb * T + s, n) * d) * d;
        }
      });
      for (int kb = 0; kb < KB; ++kb) tot[kb] += s0[kb];
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    pmean[kb * C + c] = mt[kb];
    pm2[kb * C + c] = vsum(tot[kb]);
  }
}

template <bool One, typename acc_t>
void tile_moments(const Geometry& g, const Tile& tl, int64_t K, const View<const acc_t>& xv,
                  const acc_t* loc, acc_t* pn, acc_t* pmean, acc_t* pm2) {
  using V = Vec<acc_t>;
  const int64_t C = g.C, T = tl.T;
  for (int64_t k = 0; k < K; ++k) {
    acc_t n;
    if constexpr (One) {
      n = acc_t(T);
    } else {
      constexpr int64_t B = kW<acc_t> * kPositionBlock;
      V tot = {};
      for (int64_t b0 = 0; b0 < T; b0 += B) {
        V s = {};
        for_vectors<acc_t>(std::min(B, T - b0), [&](auto full, int64_t j, int64_t m) {
          s += ld<decltype(full)::value>(loc + k * T + b0 + j, m);
        });
        tot += s;
      }
      n = vsum(tot);
    }
    pn[k] = n;
  }
  if (g.interleaved) {
    for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
      constexpr bool F = decltype(full)::value;
      for_component_blocks(K, [&](auto KBc, int64_t k0) {
        moments_interleaved_block<F, One, decltype(KBc)::value>(
            xv.base, T, C, c, n, loc + k0 * T, pn + k0, pmean + k0 * C, pm2 + k0 * C);
      });
    });
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for_component_blocks(K, [&](auto KBc, int64_t k0) {
      moments_planar_row<One, decltype(KBc)::value>(xv, tl.nseg, tl.len, c, loc + k0 * T, T,
                                                    pn + k0, pmean + k0 * C, pm2 + k0 * C, C);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Normalization of a tile: y = sum_k tau_k (alpha_kc x + delta_kc).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
void normalize_interleaved(const acc_t* x, acc_t* y, int64_t T, int64_t C, int64_t K,
                           const acc_t* loc, const int64_t* kfix, const acc_t* alpha,
                           const acc_t* delta) {
  using V = Vec<acc_t>;
  for (int64_t j = 0; j < T; ++j) {
    const acc_t* xr = x + j * C;
    acc_t* yr = y + j * C;
    if (kfix != nullptr) {  // one component per position
      const acc_t* al = alpha + kfix[j] * C;
      const acc_t* de = delta + kfix[j] * C;
      for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
        constexpr bool F = decltype(full)::value;
        st<F>(yr + c, math::normalize_term(ld<F>(xr + c, n), ld<F>(al + c, n), ld<F>(de + c, n)), n);
      });
      continue;
    }
    for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
      constexpr bool F = decltype(full)::value;
      const V x0 = ld<F>(xr + c, n);
      V y0 = {};
      for (int64_t k = 0; k < K; ++k)
        y0 += loc[k * T + j] *
              math::normalize_term(x0, ld<F>(alpha + k * C + c, n), ld<F>(delta + k * C + c, n));
      st<F>(yr + c, y0, n);
    });
  }
}

template <typename acc_t>
void normalize_planar(View<const acc_t> xv, View<acc_t> yv, int64_t nseg, int64_t len, int64_t C,
                      int64_t K, const acc_t* loc, const int64_t* kfix, const acc_t* alpha,
                      const acc_t* delta, acc_t* coef) {
  using V = Vec<acc_t>;
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* lt = loc + seg * len;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* xr = xv.row(seg, c);
      acc_t* yr = yv.row(seg, c);
      if (kfix != nullptr) {
        const acc_t al = alpha[kfix[seg] * C + c], de = delta[kfix[seg] * C + c];
        for_vectors<acc_t>(len, [&](auto full, int64_t s, int64_t n) {
          constexpr bool F = decltype(full)::value;
          st<F>(yr + s, math::normalize_term(ld<F>(xr + s, n), al, de), n);
        });
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        coef[2 * k] = alpha[k * C + c];
        coef[2 * k + 1] = delta[k * C + c];
      }
      for_vectors<acc_t>(len, [&](auto full, int64_t s, int64_t n) {
        constexpr bool F = decltype(full)::value;
        const V x0 = ld<F>(xr + s, n);
        V y0 = {};
        for (int64_t k = 0; k < K; ++k)
          y0 += ld<F>(lt + k * T + s, n) * math::normalize_term(x0, coef[2 * k], coef[2 * k + 1]);
        st<F>(yr + s, y0, n);
      });
    }
  }
}

// The single component of each position (interleaved) or segment (planar), or nullptr
// when responsibilities are soft.
void fixed_components(const Geometry& g, const Tile& tl, Resp resp, const int64_t* groups,
                      int64_t* out) {
  const int64_t n = g.interleaved ? tl.T : tl.nseg;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t sample = g.interleaved ? (tl.p0 + i) / g.S : tl.n0 + i;
    out[i] = resp == Resp::kOne ? 0 : groups[sample];
  }
}

template <typename acc_t>
void tile_normalize(const Geometry& g, const Tile& tl, int64_t K, Resp resp,
                    const View<const acc_t>& xv, const View<acc_t>& yv, const acc_t* loc,
                    const int64_t* groups, int64_t* kfix_buf, const acc_t* alpha,
                    const acc_t* delta, acc_t* coef) {
  const int64_t* kfix = nullptr;
  if (resp != Resp::kSoft) {
    fixed_components(g, tl, resp, groups, kfix_buf);
    kfix = kfix_buf;
  }
  if (g.interleaved)
    normalize_interleaved(xv.base, yv.base, tl.T, g.C, K, loc, kfix, alpha, delta);
  else
    normalize_planar(xv, yv, tl.nseg, tl.len, g.C, K, loc, kfix, alpha, delta, coef);
}

// ---------------------------------------------------------------------------------------
// Backward, pass 1: per-tile Sg = sum g tau, Sgx = sum g tau (x - m).
// ---------------------------------------------------------------------------------------

template <bool Full, bool One, int KB, typename acc_t>
C10_ALWAYS_INLINE void grad_stats_interleaved_block(const acc_t* x, const acc_t* gr, int64_t T,
                                                    int64_t C, int64_t c, int64_t n,
                                                    const acc_t* loc, const acc_t* mean,
                                                    acc_t* sg, acc_t* sgx) {
  using V = Vec<acc_t>;
  V ag[KB], agx[KB], m[KB];
  for (int kb = 0; kb < KB; ++kb) {
    ag[kb] = agx[kb] = V{};
    m[kb] = ld<Full>(mean + kb * C + c, n);
  }
  for (int64_t j0 = 0; j0 < T; j0 += kPositionBlock) {  // blocked over positions
    const int64_t j1 = std::min(T, j0 + kPositionBlock);
    V bg[KB], bgx[KB];
    for (int kb = 0; kb < KB; ++kb) bg[kb] = bgx[kb] = V{};
    for (int64_t j = j0; j < j1; ++j) {
      const V g0 = ld<Full>(gr + j * C + c, n);
      const V x0 = ld<Full>(x + j * C + c, n);
      for (int kb = 0; kb < KB; ++kb) {
        const V gt = One ? g0 : loc[kb * T + j] * g0;
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
    st<Full>(sg + kb * C + c, ag[kb], n);
    st<Full>(sgx + kb * C + c, agx[kb], n);
  }
}

template <bool One, int KB, typename acc_t>
C10_ALWAYS_INLINE void grad_stats_planar_row(View<const acc_t> xv, View<const acc_t> gv,
                                             int64_t nseg, int64_t len, int64_t c,
                                             const acc_t* loc, int64_t T, const acc_t* mean,
                                             acc_t* sg, acc_t* sgx, int64_t C) {
  using V = Vec<acc_t>;
  V ag[KB], agx[KB];
  acc_t m[KB];
  for (int kb = 0; kb < KB; ++kb) {
    ag[kb] = agx[kb] = V{};
    m[kb] = mean[kb * C + c];
  }
  constexpr int64_t B = kW<acc_t> * kPositionBlock;  // positions of a block
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* xr = xv.row(seg, c);
    const acc_t* grr = gv.row(seg, c);
    const acc_t* lt = loc + seg * len;
    for (int64_t b0 = 0; b0 < len; b0 += B) {
      V bg[KB], bgx[KB];
      for (int kb = 0; kb < KB; ++kb) bg[kb] = bgx[kb] = V{};
      for_vectors<acc_t>(std::min(B, len - b0), [&](auto full, int64_t i, int64_t n) {
        constexpr bool F = decltype(full)::value;
        const int64_t s = b0 + i;
        const V g0 = ld<F>(grr + s, n);
        const V x0 = ld<F>(xr + s, n);
        for (int kb = 0; kb < KB; ++kb) {
          const V gt = One ? g0 : ld<F>(lt + kb * T + s, n) * g0;
          bg[kb] += gt;
          bgx[kb] += gt * (x0 - m[kb]);
        }
      });
      for (int kb = 0; kb < KB; ++kb) {
        ag[kb] += bg[kb];
        agx[kb] += bgx[kb];
      }
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    sg[kb * C + c] = vsum(ag[kb]);
    sgx[kb * C + c] = vsum(agx[kb]);
  }
}

template <bool One, typename acc_t>
void tile_grad_stats(const Geometry& g, const Tile& tl, int64_t K, const View<const acc_t>& xv,
                     const View<const acc_t>& gv, const acc_t* loc, const acc_t* mean, acc_t* sg,
                     acc_t* sgx) {
  const int64_t C = g.C, T = tl.T;
  if (g.interleaved) {
    for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
      for_component_blocks(K, [&](auto KBc, int64_t k0) {
        grad_stats_interleaved_block<decltype(full)::value, One, decltype(KBc)::value>(
            xv.base, gv.base, T, C, c, n, loc + k0 * T, mean + k0 * C, sg + k0 * C,
            sgx + k0 * C);
      });
    });
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for_component_blocks(K, [&](auto KBc, int64_t k0) {
      grad_stats_planar_row<One, decltype(KBc)::value>(xv, gv, tl.nseg, tl.len, c, loc + k0 * T,
                                                       T, mean + k0 * C, sg + k0 * C,
                                                       sgx + k0 * C, C);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass 2: dtau -> dl (soft), then dx = g A + x B + E.
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

// Interleaved: dl[k * T + j] = dtau (before the softmax's Jacobian).
template <typename acc_t>
void dtau_interleaved(const acc_t* x, const acc_t* gr, int64_t T, int64_t C, int64_t K,
                      DtauPtrs<acc_t> cf, acc_t* dl) {
  using V = Vec<acc_t>;
  for (int64_t j = 0; j < T; ++j) {
    const acc_t* xr = x + j * C;
    const acc_t* grr = gr + j * C;
    for_component_blocks(K, [&](auto KBc, int64_t k0) {
      constexpr int KB = decltype(KBc)::value;
      V tot[KB];
      for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
      // blocks of kChannelBlock channels per lane
      for (int64_t c0 = 0; c0 < C; c0 += kW<acc_t> * kChannelBlock) {
        const int64_t c1 = std::min(C, c0 + kW<acc_t> * kChannelBlock);
        V acc[KB];
        for (int kb = 0; kb < KB; ++kb) acc[kb] = V{};
        for_vectors<acc_t>(c1 - c0, [&](auto full, int64_t i, int64_t n) {
          constexpr bool F = decltype(full)::value;
          const int64_t c = c0 + i;
          const V x0 = ld<F>(xr + c, n), g0 = ld<F>(grr + c, n);
          for (int kb = 0; kb < KB; ++kb) {
            const int64_t o = (k0 + kb) * C + c;
            const V d = keep<F>(x0 - ld<F>(cf.m + o, n), n);
            acc[kb] += math::dtau_term(g0, d, ld<F>(cf.al + o, n), ld<F>(cf.be + o, n),
                                       ld<F>(cf.e1 + o, n), ld<F>(cf.e2 + o, n));
          }
        });
        for (int kb = 0; kb < KB; ++kb) tot[kb] += acc[kb];
      }
      for (int kb = 0; kb < KB; ++kb) dl[(k0 + kb) * T + j] = vsum(tot[kb]) - cf.ev[k0 + kb];
    });
  }
}

// Planar: positions [s, s + n), n <= W, of segment seg, components [k0, k0 + KB).
template <bool Full, int KB, typename acc_t>
C10_ALWAYS_INLINE void dtau_planar_block(View<const acc_t> xv, View<const acc_t> gv, int64_t seg,
                                         int64_t s, int64_t n, int64_t C, int64_t k0,
                                         DtauPtrs<acc_t> cf, acc_t* dl, int64_t T, int64_t j) {
  using V = Vec<acc_t>;
  V tot[KB];
  for (int kb = 0; kb < KB; ++kb) tot[kb] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {  // blocked over channels
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    V acc[KB];
    for (int kb = 0; kb < KB; ++kb) acc[kb] = V{};
    for (int64_t c = c0; c < c1; ++c) {
      const V x0 = ld<Full>(xv.row(seg, c) + s, n);
      const V g0 = ld<Full>(gv.row(seg, c) + s, n);
      for (int kb = 0; kb < KB; ++kb) {
        const int64_t o = (k0 + kb) * C + c;
        acc[kb] += math::dtau_term(g0, x0 - cf.m[o], cf.al[o], cf.be[o], cf.e1[o], cf.e2[o]);
      }
    }
    for (int kb = 0; kb < KB; ++kb) tot[kb] += acc[kb];
  }
  for (int kb = 0; kb < KB; ++kb) st<Full>(dl + (k0 + kb) * T + j, tot[kb] - cf.ev[k0 + kb], n);
}

template <typename acc_t>
void dtau_planar(View<const acc_t> xv, View<const acc_t> gv, int64_t nseg, int64_t len, int64_t C,
                 int64_t K, DtauPtrs<acc_t> cf, acc_t* dl) {
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    for_vectors<acc_t>(len, [&](auto full, int64_t s, int64_t n) {
      for_component_blocks(K, [&](auto KBc, int64_t k0) {
        dtau_planar_block<decltype(full)::value, decltype(KBc)::value>(xv, gv, seg, s, n, C, k0,
                                                                      cf, dl, T, seg * len + s);
      });
    });
  }
}

// dl = tau (dtau - sum_i tau_i dtau_i), in place over dl.
template <typename acc_t>
void softmax_jacobian(const acc_t* loc, acc_t* dl, int64_t T, int64_t K, Vec<acc_t>* lanes) {
  using V = Vec<acc_t>;
  for_vectors<acc_t>(T, [&](auto full, int64_t j, int64_t n) {
    constexpr bool F = decltype(full)::value;
    V dot = {};
    for (int64_t k = 0; k < K; ++k) {
      lanes[k] = ld<F>(loc + k * T + j, n);
      lanes[K + k] = ld<F>(dl + k * T + j, n);
      dot += lanes[k] * lanes[K + k];
    }
    for (int64_t k = 0; k < K; ++k) st<F>(dl + k * T + j, lanes[k] * (lanes[K + k] - dot), n);
  });
}

template <typename acc_t>
struct DxPtrs {
  const acc_t* al;
  const acc_t* p;
  const acc_t* q;
  const acc_t* a;
  const acc_t* amu;
  const acc_t* shift;  // (C,): dx = g A + (x - shift) B + E
  // one component per position (given groups, K = 1): dx = alpha g + e1 + p (x - mean),
  // on the component's own mean (no cancellation against a shared shift)
  const acc_t* e1;
  const acc_t* mean;
};

// Interleaved dx; loc/dl soft, or kfix (one component each: given groups, K = 1).
template <typename acc_t>
void dx_interleaved(const acc_t* x, const acc_t* gr, acc_t* dx, int64_t T, int64_t C, int64_t K,
                    const acc_t* loc, const acc_t* dl, const int64_t* kfix, DxPtrs<acc_t> cf) {
  using V = Vec<acc_t>;
  for (int64_t j = 0; j < T; ++j) {
    const acc_t* xr = x + j * C;
    const acc_t* grr = gr + j * C;
    acc_t* dr = dx + j * C;
    if (kfix != nullptr) {
      const int64_t o = kfix[j] * C;
      for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
        constexpr bool F = decltype(full)::value;
        V A = {}, B = {}, E = {};
        math::dx_accumulate(acc_t(1), ld<F>(cf.al + o + c, n), ld<F>(cf.p + o + c, n),
                            ld<F>(cf.e1 + o + c, n), A, B, E);
        st<F>(dr + c,
              math::dx_combine(ld<F>(grr + c, n), ld<F>(xr + c, n) - ld<F>(cf.mean + o + c, n),
                               A, B, E),
              n);
      });
      continue;
    }
    for_vectors<acc_t>(C, [&](auto full, int64_t c, int64_t n) {
      constexpr bool F = decltype(full)::value;
      V A = {}, B = {}, E = {};
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = k * C + c;
        math::dx_accumulate(loc[k * T + j], dl[k * T + j], ld<F>(cf.al + o, n),
                            ld<F>(cf.p + o, n), ld<F>(cf.q + o, n), ld<F>(cf.a + o, n),
                            ld<F>(cf.amu + o, n), A, B, E);
      }
      st<F>(dr + c,
            math::dx_combine(ld<F>(grr + c, n), ld<F>(xr + c, n) - ld<F>(cf.shift + c, n), A, B,
                             E),
            n);
    });
  }
}

template <typename acc_t>
void dx_planar(View<const acc_t> xv, View<const acc_t> gv, View<acc_t> dv, int64_t nseg,
               int64_t len, int64_t C, int64_t K, const acc_t* loc, const acc_t* dl,
               const int64_t* kfix, DxPtrs<acc_t> cf, acc_t* coef) {
  using V = Vec<acc_t>;
  const int64_t T = nseg * len;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    const acc_t* lt = loc + seg * len;
    const acc_t* dlt = dl + seg * len;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* xr = xv.row(seg, c);
      const acc_t* grr = gv.row(seg, c);
      acc_t* dr = dv.row(seg, c);
      const acc_t sh = cf.shift[c];
      if (kfix != nullptr) {
        const int64_t o = kfix[seg] * C + c;
        const acc_t al = cf.al[o], p = cf.p[o], e1 = cf.e1[o], m = cf.mean[o];
        for_vectors<acc_t>(len, [&](auto full, int64_t s, int64_t n) {
          constexpr bool F = decltype(full)::value;
          V A = {}, B = {}, E = {};
          math::dx_accumulate(acc_t(1), al, p, e1, A, B, E);
          st<F>(dr + s, math::dx_combine(ld<F>(grr + s, n), ld<F>(xr + s, n) - m, A, B, E), n);
        });
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = k * C + c;
        coef[5 * k + 0] = cf.al[o];
        coef[5 * k + 1] = cf.p[o];
        coef[5 * k + 2] = cf.q[o];
        coef[5 * k + 3] = cf.a[o];
        coef[5 * k + 4] = cf.amu[o];
      }
      for_vectors<acc_t>(len, [&](auto full, int64_t s, int64_t n) {
        constexpr bool F = decltype(full)::value;
        V A = {}, B = {}, E = {};
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* q = coef + 5 * k;
          math::dx_accumulate(ld<F>(lt + k * T + s, n), ld<F>(dlt + k * T + s, n), q[0], q[1],
                              q[2], q[3], q[4], A, B, E);
        }
        st<F>(dr + s, math::dx_combine(ld<F>(grr + s, n), ld<F>(xr + s, n) - sh, A, B, E), n);
      });
    }
  }
}

template <typename F>
void for_each_tile(const TilePlan& plan, F&& f) {
  at::parallel_for(0, plan.num_tiles, 1, [&](int64_t begin, int64_t end) { f(begin, end); });
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void collect_mixture_stats_impl(const StatsArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* mu = static_cast<const acc_t*>(a.mu);
  const auto* ha = static_cast<const acc_t*>(a.half_a);
  const auto* b = static_cast<const acc_t*>(a.b);
  const int64_t* groups = a.groups;
  auto* tau = static_cast<acc_t*>(a.tau);
  auto* pn = static_cast<acc_t*>(a.part_n);
  auto* pmean = static_cast<acc_t*>(a.part_mean);
  auto* pm2 = static_cast<acc_t*>(a.part_m2);
  using IO = TileIO<scalar_t, acc_t>;
  const int64_t maxT = max_tile_positions(g, plan);
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<acc_t> xs(IO::kNative ? 0 : maxT * C);
    Scratch<acc_t> loc(resp == Resp::kOne ? 0 : K * maxT);
    Scratch<Vec<acc_t>> lanes(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      if (resp == Resp::kOne) {
        tile_moments<true>(g, tl, K, xv, loc.get(), pn + t * K, pmean + t * K * C,
                           pm2 + t * K * C);
        continue;
      }
      tile_responsibilities(g, tl, K, resp, xv, groups, mu, ha, b, loc.get(), lanes.get());
      tau_to_global(g, tl, K, loc.get(), tau);
      tile_moments<false>(g, tl, K, xv, loc.get(), pn + t * K, pmean + t * K * C,
                          pm2 + t * K * C);
    }
  });
}

template <typename scalar_t, typename acc_t>
void normalize_mixture_impl(const NormalizeArgs& a, bool estep) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* y = static_cast<scalar_t*>(a.y);
  auto* tau = static_cast<acc_t*>(a.tau);
  const auto* alpha = static_cast<const acc_t*>(a.alpha);
  const auto* delta = static_cast<const acc_t*>(a.delta);
  const auto* mu = static_cast<const acc_t*>(a.mu);
  const auto* ha = static_cast<const acc_t*>(a.half_a);
  const auto* b = static_cast<const acc_t*>(a.b);
  const int64_t* groups = a.groups;
  using IO = TileIO<scalar_t, acc_t>;
  const int64_t maxT = max_tile_positions(g, plan);
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<acc_t> xs(IO::kNative ? 0 : maxT * C), ys(IO::kNative ? 0 : maxT * C);
    Scratch<acc_t> loc(resp == Resp::kOne ? 0 : K * maxT);
    Scratch<int64_t> kfix(maxT);
    Scratch<acc_t> coef(2 * K);
    Scratch<Vec<acc_t>> lanes(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      if (estep && resp != Resp::kOne) {
        tile_responsibilities(g, tl, K, resp, xv, groups, mu, ha, b, loc.get(), lanes.get());
        tau_to_global(g, tl, K, loc.get(), tau);
      } else if (resp == Resp::kSoft) {
        tau_from_global(g, tl, K, tau, loc.get());
      }
      const View<acc_t> yv = IO::out(g, tl, y, ys.get());
      tile_normalize(g, tl, K, resp, xv, yv, loc.get(), groups, kfix.get(), alpha, delta,
                     coef.get());
      IO::store(g, tl, y, ys.get());
    }
  });
}

template <typename scalar_t, typename acc_t>
void collect_grad_stats_impl(const GradStatsArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const bool one = a.resp == Resp::kOne;
  const auto* gr = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* tau = static_cast<const acc_t*>(a.tau);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  auto* psg = static_cast<acc_t*>(a.part_sg);
  auto* psgx = static_cast<acc_t*>(a.part_sgx);
  using IO = TileIO<scalar_t, acc_t>;
  const int64_t maxT = max_tile_positions(g, plan);
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<acc_t> xs(IO::kNative ? 0 : maxT * C), gs(IO::kNative ? 0 : maxT * C);
    Scratch<acc_t> loc(one ? 0 : K * maxT);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      const View<const acc_t> gv = IO::load(g, tl, gr, gs.get());
      if (one) {
        tile_grad_stats<true>(g, tl, K, xv, gv, loc.get(), mean, psg + t * K * C,
                              psgx + t * K * C);
      } else {
        tau_from_global(g, tl, K, tau, loc.get());
        tile_grad_stats<false>(g, tl, K, xv, gv, loc.get(), mean, psg + t * K * C,
                               psgx + t * K * C);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void mixture_grad_input_impl(const GradInputArgs& a) {
  const Geometry g = a.geo;
  const TilePlan plan = a.plan;
  const int64_t K = a.K, C = g.C;
  const Resp resp = a.resp;
  const bool soft = resp == Resp::kSoft;
  const int64_t* groups = nullptr;  // given components are read from tau
  const auto* gr = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dx = static_cast<scalar_t*>(a.dx);
  const auto* tau = static_cast<const acc_t*>(a.tau);
  const DtauPtrs<acc_t> dcf{static_cast<const acc_t*>(a.mean), static_cast<const acc_t*>(a.alpha),
                            static_cast<const acc_t*>(a.beta), static_cast<const acc_t*>(a.e1),
                            static_cast<const acc_t*>(a.e2), static_cast<const acc_t*>(a.ev)};
  const DxPtrs<acc_t> xcf{static_cast<const acc_t*>(a.alpha), static_cast<const acc_t*>(a.p),
                          static_cast<const acc_t*>(a.q), static_cast<const acc_t*>(a.a),
                          static_cast<const acc_t*>(a.amu), static_cast<const acc_t*>(a.shift),
                          static_cast<const acc_t*>(a.e1), static_cast<const acc_t*>(a.mean)};
  using IO = TileIO<scalar_t, acc_t>;
  const int64_t maxT = max_tile_positions(g, plan);
  for_each_tile(plan, [=](int64_t begin, int64_t end) {
    Scratch<acc_t> xs(IO::kNative ? 0 : maxT * C), gs(IO::kNative ? 0 : maxT * C),
        ds(IO::kNative ? 0 : maxT * C);
    Scratch<acc_t> loc(resp == Resp::kOne ? 0 : K * maxT);
    Scratch<acc_t> dl(soft ? K * maxT : 0);
    Scratch<int64_t> kfix(maxT);
    Scratch<acc_t> coef(5 * K);
    Scratch<Vec<acc_t>> lanes(2 * K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, plan, t);
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      const View<const acc_t> gv = IO::load(g, tl, gr, gs.get());
      const View<acc_t> dv = IO::out(g, tl, dx, ds.get());
      const int64_t* kf = nullptr;
      if (soft) {
        tau_from_global(g, tl, K, tau, loc.get());
        if (g.interleaved)
          dtau_interleaved(xv.base, gv.base, tl.T, C, K, dcf, dl.get());
        else
          dtau_planar(xv, gv, tl.nseg, tl.len, C, K, dcf, dl.get());
        softmax_jacobian(loc.get(), dl.get(), tl.T, K, lanes.get());
      } else {
        if (resp == Resp::kGiven) {
          // recover each position's (sample's) component from the one-hot tau
          tau_from_global(g, tl, K, tau, loc.get());
          const int64_t n = g.interleaved ? tl.T : tl.nseg;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t j = g.interleaved ? i : i * tl.len;
            int64_t k = 0;
            while (k + 1 < K && loc.get()[k * tl.T + j] == acc_t(0)) ++k;
            kfix.get()[i] = k;
          }
        } else {
          fixed_components(g, tl, resp, groups, kfix.get());
        }
        kf = kfix.get();
      }
      if (g.interleaved)
        dx_interleaved(xv.base, gv.base, dv.base, tl.T, C, K, loc.get(), dl.get(), kf, xcf);
      else
        dx_planar(xv, gv, dv, tl.nseg, tl.len, C, K, loc.get(), dl.get(), kf, xcf, coef.get());
      IO::store(g, tl, dx, ds.get());
    }
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
