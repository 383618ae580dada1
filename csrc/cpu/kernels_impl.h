// The fused CPU kernels of compound batch norm. This file is included once per
// instruction set, inside namespace cbn_ext::cpu::CBN_CPU_ISA, by kernels_<isa>.cpp,
// after every external header (see kernels_deps.h): whatever is defined here is compiled
// for that instruction set only, and nothing here is shared between the variants.
//
// Layouts (cpu_kernels.h): interleaved (channels innermost: NHWC, (N, C)) and planar
// (NCHW). Each kernel walks the tiles of a TilePlan in parallel; per-tile partial results
// are merged by the caller in tile order, so results do not depend on the thread count.
// Inner loops run over SIMD vectors (GCC vector extensions, 32 bytes): over channels in
// the interleaved layout, over positions in the planar one. The per-element formulas are
// those of csrc/cbn_math.h.
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
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
};

template <typename T>
using Vec = typename VecTraits<T>::V;

template <typename T>
constexpr int64_t kW = 32 / sizeof(T);

template <typename T>
C10_ALWAYS_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n (< width) lanes from p, zero elsewhere.
template <typename T>
C10_ALWAYS_INLINE Vec<T> vload_part(const T* p, int64_t n) {
  Vec<T> v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> vload_n(const T* p, int64_t n) {
  return n >= kW<T> ? vload(p) : vload_part(p, n);
}

// v with the lanes from n on set to zero.
template <typename V>
C10_ALWAYS_INLINE V vkeep_n(V v, int64_t n) {
  constexpr int64_t w = sizeof(V) / sizeof(v[0]);
  if (n >= w) return v;
  V r = {};
  for (int64_t i = 0; i < n; ++i) r[i] = v[i];
  return r;
}

template <typename T>
C10_ALWAYS_INLINE void vstore(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
C10_ALWAYS_INLINE void vstore_n(T* p, Vec<T> v, int64_t n) {
  std::memcpy(p, &v, (n >= kW<T> ? kW<T> : n) * sizeof(T));
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

C10_ALWAYS_INLINE Tile tile_at(const Geometry& g, const TilePlan& plan, int64_t t) {
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

// A tile of an (N, C, S) tensor as acc_t: element (j, c) of an interleaved tile is
// base[j * C + c]; element (seg, c, s) of a planar tile is
// base[seg * seg_stride + c * c_stride + s].
template <typename T>
struct View {
  T* base;
  int64_t seg_stride;
  int64_t c_stride;
  C10_ALWAYS_INLINE T* row(int64_t seg, int64_t c) const {
    return base + seg * seg_stride + c * c_stride;
  }
};

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
        const int64_t n = tl.T * g.C;
        for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<acc_t>(p[i]);
        return {scratch, 0, g.C};
      }
    }
    const scalar_t* p = src + tl.n0 * g.C * g.S + tl.s0;
    if constexpr (kNative) {
      return {p, g.C * g.S, g.S};
    } else {
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* r = p + seg * g.C * g.S + c * g.S;
          acc_t* o = scratch + (seg * g.C + c) * tl.len;
          for (int64_t s = 0; s < tl.len; ++s) o[s] = static_cast<acc_t>(r[s]);
        }
      }
      return {scratch, g.C * tl.len, tl.len};
    }
  }

  // Where to write a tile of dst (native) or the scratch to convert from (store()).
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
        scalar_t* p = dst + tl.p0 * g.C;
        const int64_t n = tl.T * g.C;
        for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(scratch[i]);
        return;
      }
      scalar_t* p = dst + tl.n0 * g.C * g.S + tl.s0;
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        for (int64_t c = 0; c < g.C; ++c) {
          scalar_t* r = p + seg * g.C * g.S + c * g.S;
          const acc_t* o = scratch + (seg * g.C + c) * tl.len;
          for (int64_t s = 0; s < tl.len; ++s) r[s] = static_cast<scalar_t>(o[s]);
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

template <typename scalar_t>
C10_ALWAYS_INLINE int64_t tile_scratch_size(const Geometry& g, const TilePlan& plan) {
  const int64_t positions = g.interleaved ? plan.len : plan.len * plan.segs;
  return positions * g.C;
}

C10_ALWAYS_INLINE int64_t max_tile_positions(const Geometry& g, const TilePlan& plan) {
  return g.interleaved ? plan.len : plan.len * plan.segs;
}

// Sample of local position j.
C10_ALWAYS_INLINE int64_t sample_of(const Geometry& g, const Tile& tl, int64_t j) {
  return g.interleaved ? (tl.p0 + j) / g.S : tl.n0 + j / tl.len;
}

// The tile's responsibilities tau[k * T + j], from / to the tensor's layout.
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

// ---------------------------------------------------------------------------------------
// E-step over a tile: loc[k * T + j] = tau (soft / given).
// ---------------------------------------------------------------------------------------

// out[kb] = sum_c half_a[kb][c] (x[c] - mu[kb][c])^2 for one interleaved row.
template <int KB, typename acc_t>
C10_ALWAYS_INLINE void maha_row(const acc_t* x, const acc_t* mu, const acc_t* ha, int64_t C,
                                acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  V acc0[KB], acc1[KB];
  for (int kb = 0; kb < KB; ++kb) acc0[kb] = acc1[kb] = V{};
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    const V x0 = vload(x + c), x1 = vload(x + c + W);
    for (int kb = 0; kb < KB; ++kb) {
      const acc_t* m = mu + kb * C + c;
      const acc_t* h = ha + kb * C + c;
      acc0[kb] += math::mahalanobis_term(x0, vload(m), vload(h));
      acc1[kb] += math::mahalanobis_term(x1, vload(m + W), vload(h + W));
    }
  }
  for (; c < C; c += W) {
    const int64_t n = C - c;
    const V x0 = vload_n(x + c, n);
    for (int kb = 0; kb < KB; ++kb)
      acc0[kb] += math::mahalanobis_term(x0, vload_n(mu + kb * C + c, n),
                                         vload_n(ha + kb * C + c, n));
  }
  for (int kb = 0; kb < KB; ++kb) out[kb] = vsum(acc0[kb] + acc1[kb]);
}

// For positions [j, j + n) of planar segment seg (n <= 2W), components [0, KB):
// loc[kb * T + j + i] = b[kb] - sum_c half_a (x - mu)^2.
template <int KB, typename acc_t>
C10_ALWAYS_INLINE void maha_cols(const View<const acc_t>& xv, int64_t seg, int64_t s,
                                 int64_t n, int64_t C, const acc_t* mu, const acc_t* ha,
                                 const acc_t* b, acc_t* loc, int64_t T, int64_t j) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  V acc0[KB], acc1[KB];
  for (int kb = 0; kb < KB; ++kb) acc0[kb] = acc1[kb] = V{};
  if (n == 2 * W) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* r = xv.row(seg, c) + s;
      const V x0 = vload(r), x1 = vload(r + W);
      for (int kb = 0; kb < KB; ++kb) {
        const acc_t m = mu[kb * C + c], h = ha[kb * C + c];
        acc0[kb] += math::mahalanobis_term(x0, m, h);
        acc1[kb] += math::mahalanobis_term(x1, m, h);
      }
    }
  } else {
    const int64_t n0 = std::min(n, W), n1 = n - n0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* r = xv.row(seg, c) + s;
      const V x0 = vload_n(r, n0);
      const V x1 = n1 > 0 ? vload_n(r + W, n1) : V{};
      for (int kb = 0; kb < KB; ++kb) {
        const acc_t m = mu[kb * C + c], h = ha[kb * C + c];
        acc0[kb] += math::mahalanobis_term(x0, m, h);
        acc1[kb] += math::mahalanobis_term(x1, m, h);
      }
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    acc_t* o = loc + kb * T + j;
    const V bk = vsplat(b[kb]);
    vstore_n(o, bk - acc0[kb], n);
    if (n > W) vstore_n(o + W, bk - acc1[kb], n - W);
  }
}

// Calls f.template operator()<KB>(k0) over blocks of at most 4 components.
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

// Log-likelihoods then softmax into loc (soft), or one-hot of the groups (given).
template <typename acc_t>
void tile_responsibilities(const Geometry& g, const Tile& tl, int64_t K, Resp resp,
                           const View<const acc_t>& xv, const int64_t* groups, const acc_t* mu,
                           const acc_t* ha, const acc_t* b, acc_t* loc, Vec<acc_t>* lanes) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const int64_t C = g.C, T = tl.T;
  if (resp == Resp::kGiven) {
    for (int64_t j = 0; j < T; ++j) {
      const int64_t grp = groups[sample_of(g, tl, j)];
      for (int64_t k = 0; k < K; ++k) loc[k * T + j] = k == grp ? acc_t(1) : acc_t(0);
    }
    return;
  }
  if (g.interleaved) {
    acc_t out[4];
    for (int64_t j = 0; j < T; ++j) {
      const acc_t* xr = xv.base + j * C;
      for_component_blocks(K, [&](auto KB, int64_t k0) {
        maha_row<decltype(KB)::value>(xr, mu + k0 * C, ha + k0 * C, C, out);
        for (int kb = 0; kb < decltype(KB)::value; ++kb)
          loc[(k0 + kb) * T + j] = b[k0 + kb] - out[kb];
      });
    }
  } else {
    for (int64_t seg = 0; seg < tl.nseg; ++seg) {
      for (int64_t s = 0; s < tl.len; s += 2 * W) {
        const int64_t n = std::min(2 * W, tl.len - s);
        for_component_blocks(K, [&](auto KB, int64_t k0) {
          maha_cols<decltype(KB)::value>(xv, seg, s, n, C, mu + k0 * C, ha + k0 * C, b + k0,
                                         loc + k0 * T, T, seg * tl.len + s);
        });
      }
    }
  }
  // softmax over k, W positions at a time
  for (int64_t j = 0; j < T; j += W) {
    const int64_t n = std::min(W, T - j);
    for (int64_t k = 0; k < K; ++k) lanes[k] = vload_n(loc + k * T + j, n);
    math::softmax_in_place(lanes, K, 1, VExp{});
    for (int64_t k = 0; k < K; ++k) vstore_n(loc + k * T + j, lanes[k], n);
  }
  (void)sizeof(V);
}

// ---------------------------------------------------------------------------------------
// M-step partials of one tile: count, mean and M2 per (k, c).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
void tile_moments(const Geometry& g, const Tile& tl, int64_t K, bool one,
                  const View<const acc_t>& xv, const acc_t* loc, acc_t* pn, acc_t* pmean,
                  acc_t* pm2) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const int64_t C = g.C, T = tl.T;
  acc_t inv_n[64];
  std::unique_ptr<acc_t[]> inv_heap;
  acc_t* inv = inv_n;
  if (K > 64) {
    inv_heap.reset(new acc_t[K]);
    inv = inv_heap.get();
  }
  for (int64_t k = 0; k < K; ++k) {
    acc_t n;
    if (one) {
      n = acc_t(T);
    } else {
      V s = {};
      for (int64_t j = 0; j < T; j += W) s += vload_n(loc + k * T + j, T - j);
      n = vsum(s);
    }
    pn[k] = n;
    inv[k] = n > acc_t(0) ? acc_t(1) / n : acc_t(0);
  }

  if (g.interleaved) {
    for (int64_t c = 0; c < C; c += W) {
      const int64_t nc = C - c;
      for_component_blocks(K, [&](auto KBc, int64_t k0) {
        constexpr int KB = decltype(KBc)::value;
        V s0[KB], s1[KB];
        for (int kb = 0; kb < KB; ++kb) s0[kb] = s1[kb] = V{};
        int64_t j = 0;
        for (; j + 2 <= T; j += 2) {
          const V x0 = vload_n(xv.base + j * C + c, nc);
          const V x1 = vload_n(xv.base + (j + 1) * C + c, nc);
          for (int kb = 0; kb < KB; ++kb) {
            if (one) {
              s0[kb] += x0;
              s1[kb] += x1;
            } else {
              s0[kb] += loc[(k0 + kb) * T + j] * x0;
              s1[kb] += loc[(k0 + kb) * T + j + 1] * x1;
            }
          }
        }
        if (j < T) {
          const V x0 = vload_n(xv.base + j * C + c, nc);
          for (int kb = 0; kb < KB; ++kb) s0[kb] += (one ? acc_t(1) : loc[(k0 + kb) * T + j]) * x0;
        }
        V mt[KB];
        for (int kb = 0; kb < KB; ++kb) {
          mt[kb] = (s0[kb] + s1[kb]) * inv[k0 + kb];
          s0[kb] = s1[kb] = V{};
        }
        for (j = 0; j + 2 <= T; j += 2) {
          const V x0 = vload_n(xv.base + j * C + c, nc);
          const V x1 = vload_n(xv.base + (j + 1) * C + c, nc);
          for (int kb = 0; kb < KB; ++kb) {
            const V d0 = x0 - mt[kb], d1 = x1 - mt[kb];
            if (one) {
              s0[kb] += d0 * d0;
              s1[kb] += d1 * d1;
            } else {
              s0[kb] += loc[(k0 + kb) * T + j] * (d0 * d0);
              s1[kb] += loc[(k0 + kb) * T + j + 1] * (d1 * d1);
            }
          }
        }
        if (j < T) {
          const V x0 = vload_n(xv.base + j * C + c, nc);
          for (int kb = 0; kb < KB; ++kb) {
            const V d0 = x0 - mt[kb];
            s0[kb] += (one ? acc_t(1) : loc[(k0 + kb) * T + j]) * (d0 * d0);
          }
        }
        for (int kb = 0; kb < KB; ++kb) {
          vstore_n(pmean + (k0 + kb) * C + c, mt[kb], nc);
          vstore_n(pm2 + (k0 + kb) * C + c, s0[kb] + s1[kb], nc);
        }
      });
    }
    return;
  }

  // planar: one channel row at a time, positions along the vector
  for (int64_t c = 0; c < C; ++c) {
    for_component_blocks(K, [&](auto KBc, int64_t k0) {
      constexpr int KB = decltype(KBc)::value;
      V s0[KB];
      for (int kb = 0; kb < KB; ++kb) s0[kb] = V{};
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        const acc_t* r = xv.row(seg, c);
        const acc_t* lt = loc + seg * tl.len;
        for (int64_t s = 0; s < tl.len; s += W) {
          const int64_t n = tl.len - s;
          const V x0 = vload_n(r + s, n);
          for (int kb = 0; kb < KB; ++kb)
            s0[kb] += one ? x0 : vload_n(lt + (k0 + kb) * T + s, n) * x0;
        }
      }
      acc_t mt[KB];
      for (int kb = 0; kb < KB; ++kb) {
        mt[kb] = vsum(s0[kb]) * inv[k0 + kb];
        s0[kb] = V{};
      }
      for (int64_t seg = 0; seg < tl.nseg; ++seg) {
        const acc_t* r = xv.row(seg, c);
        const acc_t* lt = loc + seg * tl.len;
        for (int64_t s = 0; s < tl.len; s += W) {
          const int64_t n = tl.len - s;
          const V x0 = vload_n(r + s, n);
          for (int kb = 0; kb < KB; ++kb) {
            const V d = vkeep_n(x0 - mt[kb], n);
            s0[kb] += one ? d * d : vload_n(lt + (k0 + kb) * T + s, n) * (d * d);
          }
        }
      }
      for (int kb = 0; kb < KB; ++kb) {
        pmean[(k0 + kb) * C + c] = mt[kb];
        pm2[(k0 + kb) * C + c] = vsum(s0[kb]);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// Normalization of a tile: y = sum_k tau_k (alpha_kc x + delta_kc).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
void tile_normalize(const Geometry& g, const Tile& tl, int64_t K, Resp resp,
                    const View<const acc_t>& xv, const View<acc_t>& yv, const acc_t* loc,
                    const int64_t* groups, const acc_t* alpha, const acc_t* delta) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const int64_t C = g.C, T = tl.T;
  if (g.interleaved) {
    for (int64_t j = 0; j < T; ++j) {
      const acc_t* xr = xv.base + j * C;
      acc_t* yr = yv.base + j * C;
      if (resp != Resp::kSoft) {
        const int64_t k = resp == Resp::kOne ? 0 : groups[sample_of(g, tl, j)];
        const acc_t* al = alpha + k * C;
        const acc_t* de = delta + k * C;
        for (int64_t c = 0; c < C; c += W) {
          const int64_t n = C - c;
          vstore_n(yr + c, math::normalize_term(vload_n(xr + c, n), vload_n(al + c, n),
                                                vload_n(de + c, n)), n);
        }
        continue;
      }
      for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c;
        const V x0 = vload_n(xr + c, n);
        V y0 = {};
        for (int64_t k = 0; k < K; ++k)
          y0 += loc[k * T + j] *
                math::normalize_term(x0, vload_n(alpha + k * C + c, n), vload_n(delta + k * C + c, n));
        vstore_n(yr + c, y0, n);
      }
    }
    return;
  }
  for (int64_t seg = 0; seg < tl.nseg; ++seg) {
    const acc_t* lt = loc + seg * tl.len;
    const int64_t kfix = resp == Resp::kOne ? 0 : resp == Resp::kGiven ? groups[tl.n0 + seg] : -1;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* xr = xv.row(seg, c);
      acc_t* yr = yv.row(seg, c);
      if (kfix >= 0) {
        const acc_t al = alpha[kfix * C + c], de = delta[kfix * C + c];
        for (int64_t s = 0; s < tl.len; s += W) {
          const int64_t n = tl.len - s;
          vstore_n(yr + s, math::normalize_term(vload_n(xr + s, n), al, de), n);
        }
        continue;
      }
      for (int64_t s = 0; s < tl.len; s += W) {
        const int64_t n = tl.len - s;
        const V x0 = vload_n(xr + s, n);
        V y0 = {};
        for (int64_t k = 0; k < K; ++k)
          y0 += vload_n(lt + k * T + s, n) *
                math::normalize_term(x0, alpha[k * C + c], delta[k * C + c]);
        vstore_n(yr + s, y0, n);
      }
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
  const Geometry& g = a.geo;
  const int64_t K = a.K, C = g.C;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* mu = static_cast<const acc_t*>(a.mu);
  const auto* ha = static_cast<const acc_t*>(a.half_a);
  const auto* b = static_cast<const acc_t*>(a.b);
  auto* tau = static_cast<acc_t*>(a.tau);
  auto* pn = static_cast<acc_t*>(a.part_n);
  auto* pmean = static_cast<acc_t*>(a.part_mean);
  auto* pm2 = static_cast<acc_t*>(a.part_m2);
  const int64_t maxT = max_tile_positions(g, a.plan);
  for_each_tile(a.plan, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> xs(TileIO<scalar_t, acc_t>::kNative ? 0 : tile_scratch_size<scalar_t>(g, a.plan));
    Scratch<acc_t> loc(a.resp == Resp::kOne ? 0 : K * maxT);
    Scratch<Vec<acc_t>> lanes(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, a.plan, t);
      const View<const acc_t> xv = TileIO<scalar_t, acc_t>::load(g, tl, x, xs.get());
      if (a.resp != Resp::kOne) {
        tile_responsibilities(g, tl, K, a.resp, xv, a.groups, mu, ha, b, loc.get(), lanes.get());
        tau_to_global(g, tl, K, loc.get(), tau);
      }
      tile_moments(g, tl, K, a.resp == Resp::kOne, xv, loc.get(), pn + t * K,
                   pmean + t * K * C, pm2 + t * K * C);
    }
  });
}

template <typename scalar_t, typename acc_t>
void normalize_mixture_impl(const NormalizeArgs& a, bool estep) {
  const Geometry& g = a.geo;
  const int64_t K = a.K;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* y = static_cast<scalar_t*>(a.y);
  auto* tau = static_cast<acc_t*>(a.tau);
  const auto* alpha = static_cast<const acc_t*>(a.alpha);
  const auto* delta = static_cast<const acc_t*>(a.delta);
  const int64_t maxT = max_tile_positions(g, a.plan);
  using IO = TileIO<scalar_t, acc_t>;
  for_each_tile(a.plan, [&](int64_t begin, int64_t end) {
    const int64_t scratch = IO::kNative ? 0 : tile_scratch_size<scalar_t>(g, a.plan);
    Scratch<acc_t> xs(scratch), ys(scratch);
    Scratch<acc_t> loc(a.resp == Resp::kOne ? 0 : K * maxT);
    Scratch<Vec<acc_t>> lanes(K);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, a.plan, t);
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      if (estep && a.resp != Resp::kOne) {
        tile_responsibilities(g, tl, K, a.resp, xv, a.groups, static_cast<const acc_t*>(a.mu),
                              static_cast<const acc_t*>(a.half_a),
                              static_cast<const acc_t*>(a.b), loc.get(), lanes.get());
        tau_to_global(g, tl, K, loc.get(), tau);
      } else if (a.resp == Resp::kSoft) {
        tau_from_global(g, tl, K, tau, loc.get());
      }
      const View<acc_t> yv = IO::out(g, tl, y, ys.get());
      tile_normalize(g, tl, K, a.resp, xv, yv, loc.get(), a.groups, alpha, delta);
      IO::store(g, tl, y, ys.get());
    }
  });
}

template <typename scalar_t, typename acc_t>
void collect_grad_stats_impl(const GradStatsArgs& a) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const Geometry& g = a.geo;
  const int64_t K = a.K, C = g.C;
  const bool one = a.resp == Resp::kOne;
  const auto* gr = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* tau = static_cast<const acc_t*>(a.tau);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  auto* psg = static_cast<acc_t*>(a.part_sg);
  auto* psgx = static_cast<acc_t*>(a.part_sgx);
  const int64_t maxT = max_tile_positions(g, a.plan);
  using IO = TileIO<scalar_t, acc_t>;
  for_each_tile(a.plan, [&](int64_t begin, int64_t end) {
    const int64_t scratch = IO::kNative ? 0 : tile_scratch_size<scalar_t>(g, a.plan);
    Scratch<acc_t> xs(scratch), gs(scratch);
    Scratch<acc_t> loc(one ? 0 : K * maxT);
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, a.plan, t);
      const int64_t T = tl.T;
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      const View<const acc_t> gv = IO::load(g, tl, gr, gs.get());
      if (!one) tau_from_global(g, tl, K, tau, loc.get());
      const acc_t* lc = loc.get();
      acc_t* sg = psg + t * K * C;
      acc_t* sgx = psgx + t * K * C;
      if (g.interleaved) {
        for (int64_t c = 0; c < C; c += W) {
          const int64_t nc = C - c;
          for_component_blocks(K, [&](auto KBc, int64_t k0) {
            constexpr int KB = decltype(KBc)::value;
            V ag[KB], agx[KB], m[KB];
            for (int kb = 0; kb < KB; ++kb) {
              ag[kb] = agx[kb] = V{};
              m[kb] = vload_n(mean + (k0 + kb) * C + c, nc);
            }
            for (int64_t j = 0; j < T; ++j) {
              const V g0 = vload_n(gv.base + j * C + c, nc);
              const V x0 = vload_n(xv.base + j * C + c, nc);
              for (int kb = 0; kb < KB; ++kb) {
                const V gt = one ? g0 : lc[(k0 + kb) * T + j] * g0;
                ag[kb] += gt;
                agx[kb] += gt * (x0 - m[kb]);
              }
            }
            for (int kb = 0; kb < KB; ++kb) {
              vstore_n(sg + (k0 + kb) * C + c, ag[kb], nc);
              vstore_n(sgx + (k0 + kb) * C + c, agx[kb], nc);
            }
          });
        }
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        for_component_blocks(K, [&](auto KBc, int64_t k0) {
          constexpr int KB = decltype(KBc)::value;
          V ag[KB], agx[KB];
          for (int kb = 0; kb < KB; ++kb) ag[kb] = agx[kb] = V{};
          for (int64_t seg = 0; seg < tl.nseg; ++seg) {
            const acc_t* xr = xv.row(seg, c);
            const acc_t* grr = gv.row(seg, c);
            const acc_t* lt = lc + seg * tl.len;
            for (int64_t s = 0; s < tl.len; s += W) {
              const int64_t n = tl.len - s;
              const V g0 = vload_n(grr + s, n);
              const V x0 = vload_n(xr + s, n);
              for (int kb = 0; kb < KB; ++kb) {
                const V gt = one ? g0 : vload_n(lt + (k0 + kb) * T + s, n) * g0;
                ag[kb] += gt;
                agx[kb] += gt * (x0 - mean[(k0 + kb) * C + c]);
              }
            }
          }
          for (int kb = 0; kb < KB; ++kb) {
            sg[(k0 + kb) * C + c] = vsum(ag[kb]);
            sgx[(k0 + kb) * C + c] = vsum(agx[kb]);
          }
        });
      }
    }
  });
}

// dtau for one interleaved row, components [0, KB) (coefficient pointers offset to k0).
template <int KB, typename acc_t>
C10_ALWAYS_INLINE void dtau_row(const acc_t* x, const acc_t* gr, int64_t C, const acc_t* m,
                                const acc_t* al, const acc_t* be, const acc_t* e1,
                                const acc_t* e2, acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  V acc[KB];
  for (int kb = 0; kb < KB; ++kb) acc[kb] = V{};
  for (int64_t c = 0; c < C; c += W) {
    const int64_t n = C - c;
    const V x0 = vload_n(x + c, n), g0 = vload_n(gr + c, n);
    for (int kb = 0; kb < KB; ++kb) {
      const int64_t o = kb * C + c;
      const V d = x0 - vload_n(m + o, n);
      acc[kb] += math::dtau_term(g0, d, vload_n(al + o, n), vload_n(be + o, n),
                                 vload_n(e1 + o, n), vload_n(e2 + o, n));
    }
  }
  for (int kb = 0; kb < KB; ++kb) out[kb] = vsum(acc[kb]);
}

template <typename scalar_t, typename acc_t>
void mixture_grad_input_impl(const GradInputArgs& a) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kW<acc_t>;
  const Geometry& g = a.geo;
  const int64_t K = a.K, C = g.C;
  const bool one = a.resp == Resp::kOne;
  const bool soft = a.resp == Resp::kSoft;
  const auto* gr = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dx = static_cast<scalar_t*>(a.dx);
  const auto* tau = static_cast<const acc_t*>(a.tau);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  const auto* alpha = static_cast<const acc_t*>(a.alpha);
  const auto* beta = static_cast<const acc_t*>(a.beta);
  const auto* e1 = static_cast<const acc_t*>(a.e1);
  const auto* two_e2 = static_cast<const acc_t*>(a.two_e2);
  const auto* e2 = static_cast<const acc_t*>(a.e2);
  const auto* ev = static_cast<const acc_t*>(a.ev);
  const auto* mu = static_cast<const acc_t*>(a.mu);
  const auto* pa = static_cast<const acc_t*>(a.a);
  const int64_t maxT = max_tile_positions(g, a.plan);
  using IO = TileIO<scalar_t, acc_t>;
  for_each_tile(a.plan, [&](int64_t begin, int64_t end) {
    const int64_t scratch = IO::kNative ? 0 : tile_scratch_size<scalar_t>(g, a.plan);
    Scratch<acc_t> xs(scratch), gs(scratch), ds(scratch);
    Scratch<acc_t> loc(one ? 0 : K * maxT);
    Scratch<acc_t> dl(soft ? K * maxT : 0);
    Scratch<Vec<acc_t>> lane_buf(soft ? 2 * K : 0);
    Vec<acc_t>* lanes = lane_buf.get();
    for (int64_t t = begin; t < end; ++t) {
      const Tile tl = tile_at(g, a.plan, t);
      const int64_t T = tl.T;
      const View<const acc_t> xv = IO::load(g, tl, x, xs.get());
      const View<const acc_t> gv = IO::load(g, tl, gr, gs.get());
      const View<acc_t> dv = IO::out(g, tl, dx, ds.get());
      if (!one) tau_from_global(g, tl, K, tau, loc.get());
      const acc_t* lc = loc.get();
      acc_t* dlc = dl.get();

      if (soft) {
        // dtau[k, j] into dl, then dl = tau (dtau - sum_i tau_i dtau_i)
        if (g.interleaved) {
          acc_t out[4];
          for (int64_t j = 0; j < T; ++j) {
            for_component_blocks(K, [&](auto KBc, int64_t k0) {
              constexpr int KB = decltype(KBc)::value;
              const int64_t o = k0 * C;
              dtau_row<KB>(xv.base + j * C, gv.base + j * C, C, mean + o, alpha + o, beta + o,
                           e1 + o, e2 + o, out);
              for (int kb = 0; kb < KB; ++kb) dlc[(k0 + kb) * T + j] = out[kb] - ev[k0 + kb];
            });
          }
        } else {
          for (int64_t seg = 0; seg < tl.nseg; ++seg) {
            for (int64_t s = 0; s < tl.len; s += W) {
              const int64_t n = tl.len - s;
              const int64_t j = seg * tl.len + s;
              for (int64_t k = 0; k < K; ++k) lanes[k] = V{};
              for (int64_t c = 0; c < C; ++c) {
                const V x0 = vload_n(xv.row(seg, c) + s, n);
                const V g0 = vload_n(gv.row(seg, c) + s, n);
                for (int64_t k = 0; k < K; ++k) {
                  const int64_t o = k * C + c;
                  lanes[k] += math::dtau_term(g0, x0 - mean[o], alpha[o], beta[o], e1[o], e2[o]);
                }
              }
              for (int64_t k = 0; k < K; ++k) vstore_n(dlc + k * T + j, lanes[k] - ev[k], n);
            }
          }
        }
        for (int64_t j = 0; j < T; j += W) {
          const int64_t n = T - j;
          V dot = {};
          for (int64_t k = 0; k < K; ++k) {
            lanes[k] = vload_n(lc + k * T + j, n);
            lanes[K + k] = vload_n(dlc + k * T + j, n);
            dot += lanes[k] * lanes[K + k];
          }
          for (int64_t k = 0; k < K; ++k)
            vstore_n(dlc + k * T + j, lanes[k] * (lanes[K + k] - dot), n);
        }
      }

      // dx
      if (g.interleaved) {
        for (int64_t j = 0; j < T; ++j) {
          const acc_t* xr = xv.base + j * C;
          const acc_t* grr = gv.base + j * C;
          acc_t* dr = dv.base + j * C;
          int64_t k_lo = 0, k_hi = K;
          if (a.resp == Resp::kGiven) {
            k_lo = 0;
            while (lc[k_lo * T + j] == acc_t(0) && k_lo + 1 < K) ++k_lo;
            k_hi = k_lo + 1;
          }
          for (int64_t c = 0; c < C; c += W) {
            const int64_t n = C - c;
            const V x0 = vload_n(xr + c, n), g0 = vload_n(grr + c, n);
            V acc = {};
            for (int64_t k = k_lo; k < k_hi; ++k) {
              const int64_t o = k * C + c;
              const V tk = vsplat(one ? acc_t(1) : lc[k * T + j]);
              acc += math::dx_norm_term(tk, g0, x0 - vload_n(mean + o, n), vload_n(alpha + o, n),
                                        vload_n(e1 + o, n), vload_n(two_e2 + o, n));
              if (soft)
                acc += math::dx_resp_term(vsplat(dlc[k * T + j]), x0, vload_n(pa + o, n),
                                          vload_n(mu + o, n));
            }
            vstore_n(dr + c, acc, n);
          }
        }
      } else {
        for (int64_t seg = 0; seg < tl.nseg; ++seg) {
          const int64_t kfix = one ? 0 : a.resp == Resp::kGiven ? -2 : -1;
          int64_t k_lo = 0, k_hi = K;
          if (kfix == -2) {
            // given responsibilities are one-hot per sample
            const acc_t* lt = lc + seg * tl.len;
            k_lo = 0;
            while (lt[k_lo * T] == acc_t(0) && k_lo + 1 < K) ++k_lo;
            k_hi = k_lo + 1;
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* xr = xv.row(seg, c);
            const acc_t* grr = gv.row(seg, c);
            acc_t* dr = dv.row(seg, c);
            for (int64_t s = 0; s < tl.len; s += W) {
              const int64_t n = tl.len - s;
              const int64_t j = seg * tl.len + s;
              const V x0 = vload_n(xr + s, n), g0 = vload_n(grr + s, n);
              V acc = {};
              for (int64_t k = k_lo; k < k_hi; ++k) {
                const int64_t o = k * C + c;
                const V tk = one ? vsplat(acc_t(1)) : vload_n(lc + k * T + j, n);
                acc += math::dx_norm_term(tk, g0, x0 - mean[o], alpha[o], e1[o], two_e2[o]);
                if (soft)
                  acc += math::dx_resp_term(vload_n(dlc + k * T + j, n), x0, pa[o], mu[o]);
              }
              vstore_n(dr + s, acc, n);
            }
          }
        }
      }
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
