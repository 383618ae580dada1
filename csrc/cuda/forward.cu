// CUDA forward operators of cbn_ext: forward_train, forward_eval, update_running_stats.
//
// forward_train, in four launches:
//   collect_mixture_stats_kernel  per tile of positions (resident blocks walking the
//     tiles): the responsibilities (E-step, or the given groups) into tau, and the tile's
//     per-(k, c) weighted count, mean and M2 (M-step), by two passes over the tile (the
//     second from L1/L2), merged into the block's row of partials (partial_rows);
//   merge_tile_moments_kernel     the partial rows merged (Chan's count-weighted formula)
//     by many blocks, each over a chunk of the rows, in a fixed-order tree;
//   finish_moments_kernel         the chunks' results merged in order into the batch
//     statistics and the affine coefficients alpha, delta;
//   normalize_mixture_kernel      y = sum_k tau_k (alpha_kc x + delta_kc), 16-byte vectors.
// Meant to read x twice from DRAM (the tile's later passes from L2: tiles are sized so that
// the resident blocks' tiles fit, see plan_tiles; not yet measured on a GPU), write y once.
// forward_eval: one kernel per tile: the responsibilities, then the tile's normalization
// while it is in cache: x meant to be read once, y written once (and tau, which the
// backward needs).
// The math is that of csrc/cbn_math.h, as on the CPU. Reductions have a fixed order (no
// floating-point atomics): results are deterministic.
#include "cuda_backend.h"
#include "cuda_utils.cuh"

#include <tuple>

namespace cbn_ext {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// E-step coefficients: 1/2 a = 1/2 / (var + eps) per (k, c) and
// b_k = log(max(prior_k, 1e-6)) - 1/2 sum_c log(var_kc + eps). One block per component.
// With copy_mean not null, also copies of the mixture (mean, var, prior), in the same pass.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    estep_coefs_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                       const acc_t* __restrict__ prior, acc_t eps, int64_t C,
                       acc_t* __restrict__ half_a, acc_t* __restrict__ b,
                       acc_t* __restrict__ copy_mean, acc_t* __restrict__ copy_var,
                       acc_t* __restrict__ copy_prior) {
  CBN_STATIC_SMEM(acc_t[kWarps], buf);
  const int64_t k = blockIdx.x;
  acc_t s = 0;
  // not unrolled: an unrolled loop spills around the double division's slow-path calls
  // (sm_80); K x C elements, no loop worth unrolling
#pragma unroll 1
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t v = var[k * C + c];
    half_a[k * C + c] = math::half_precision(v, eps);
    s += math::neg_half_log_var(v, eps);
    if (copy_mean != nullptr) {
      copy_mean[k * C + c] = mean[k * C + c];
      copy_var[k * C + c] = v;
    }
  }
  s = block_sum(s, buf);
  if (threadIdx.x == 0) {
    b[k] = math::log_prior(prior[k]) + s;
    if (copy_prior != nullptr) copy_prior[k] = prior[k];
  }
}

// ---------------------------------------------------------------------------------------
// Responsibilities of a tile into shared memory (and tau).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct StatsParams {
  const void* x;
  acc_t* tau;              // (layout of x, C -> K); null for K = 1
  const int64_t* groups;   // (N,), given responsibilities
  const acc_t* mu;         // E-step mixture mean (K, C)
  const acc_t* half_a;     // (K, C)
  const acc_t* b;          // (K,)
  acc_t* part_n;           // (rows, K): a row per block (partial_rows)
  acc_t* part_mean;        // (rows, K, C)
  acc_t* part_m2;          // (rows, K, C)
  // evaluation (estep_normalize_kernel): y and the affine coefficients
  void* y;
  const acc_t* alpha;      // (K, C)
  const acc_t* delta;      // (K, C)
  TileParams geo;
  Resp resp;
};

// sum_c 1/2 a_kc (x[c] - mu_kc)^2 over channels [c0, c1) of one position, for components
// [k0, k0 + KB), blocked (kChannelBlock terms at a time); x[c] at xp[c * stride].
template <typename scalar_t, typename acc_t, int KB>
__device__ __forceinline__ void mahalanobis_sums(const StatsParams<acc_t>& p, const scalar_t* xp,
                                                 int64_t stride, int c0, int c1,
                                                 int step, int k0, acc_t* tot) {
  const int K = static_cast<int>(p.geo.K);
  const int64_t C = p.geo.C;
  blocked_channel_sums<acc_t, KB>(c0, c1, step, tot, [&](int c, acc_t* acc) {
    const acc_t v = static_cast<acc_t>(xp[c * stride]);
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      if (k0 + kk < K) {
        const int64_t o = (k0 + kk) * C + c;
        acc[kk] += math::mahalanobis_term(v, p.mu[o], p.half_a[o]);
      }
    }
  });
}

// ts: the tile's responsibilities (tau_index layout); red: kThreads x KB values. Writes
// them to p.tau too.
// kInter: the layout (p.geo.interleaved), a template parameter so that each instantiation
// holds one layout's code (fewer registers).
template <typename scalar_t, typename acc_t, int KB, bool kInter>
__device__ void tile_responsibilities(const StatsParams<acc_t>& p, const TileGeo& tg, acc_t* ts,
                                      acc_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  if (p.resp == Resp::kGiven) {
    // interleaved: the sample of the tile's first position (one division a tile, no
    // call), then of position j, at most len positions further: u = s + j < S + len
    const DivMod first = kInter ? divmod_wide(tg.p0, S) : DivMod{tg.n, 0};
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) {
      const int j = i / K, k = i % K;
      const int64_t u = first.r + j;
      const int64_t n =
          kInter ? first.q + (u < S ? 0 : S >= len ? 1 : tile_divmod(u, S).q) : tg.n;
      const int64_t grp = p.groups[n];
      // the host does not read the ids (no sync): bad ones stop here, as in PyTorch's
      // index kernels
      CUDA_KERNEL_ASSERT(grp >= 0 && grp < K && "group ids must be in [0, K)");
      ts[tau_index(kInter, j, k, K, len)] = grp == k ? acc_t(1) : acc_t(0);
    }
  } else if constexpr (kInter) {
    // a warp per position, lanes over channels
    for (int j = warp; j < tg.P; j += kWarps) {
      const scalar_t* xr = x + (tg.p0 + j) * C;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t acc[KB];
        mahalanobis_sums<scalar_t, acc_t, KB>(p, xr, 1, lane, static_cast<int>(C), 32, k0, acc);
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          const acc_t total = warp_sum(acc[kk]);
          if (lane == 0 && k0 + kk < K) ts[j * K + k0 + kk] = p.b[k0 + kk] - total;
        }
      }
      __syncwarp();
      if (lane == 0) math::softmax_in_place(ts + j * K, K, 1, DevExp{});
    }
  } else {
    // position lanes times channel groups: each thread sums a chunk of the channels of
    // its positions, the groups' sums are added in group order
    const PositionLanes pl = position_lanes(tg.P, C);
    for (int j0 = 0; j0 < tg.P; j0 += pl.L) {
      const int j = j0 + pl.j;
      const scalar_t* xc = x + tg.n * C * S + tg.s0 + j;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t acc[KB];
        if (j < tg.P) {
          mahalanobis_sums<scalar_t, acc_t, KB>(p, xc, S, pl.c0, pl.c1, 1, k0, acc);
        } else {
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
        }
        combine_channel_groups<acc_t, KB>(pl, j < tg.P, K, k0, acc, red, [&](int kk, acc_t total) {
          ts[(k0 + kk) * len + j] = p.b[k0 + kk] - total;
        });
      }
    }
    // every log-likelihood of the tile is in ts (combine_channel_groups ends with a
    // barrier): the softmax of each position, by all the threads and with little else live
    for (int j = threadIdx.x; j < tg.P; j += kThreads)
      math::softmax_in_place(ts + j, K, len, DevExp{});
  }
  __syncthreads();
  // to tau, coalesced
  if constexpr (kInter) {
    acc_t* out = p.tau + tg.p0 * K;
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) out[i] = ts[i];
  } else {
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) {
      const int k = i / tg.P, j = i % tg.P;
      p.tau[(tg.n * K + k) * S + tg.s0 + j] = ts[k * len + j];
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t tile_tau(const acc_t* ts, bool one, bool interleaved, int j,
                                          int k, int K, int len) {
  return one ? acc_t(1) : ts[tau_index(interleaved, j, k, K, len)];
}

// ---------------------------------------------------------------------------------------
// M-step partials of a tile: count, mean and M2 per (k, c), by two passes over the tile
// (the second from the cache), so that no E[x^2] - E[x]^2 cancellation arises; merged
// (Chan) into the block's row of partials, or written there for the block's first tile.
// ---------------------------------------------------------------------------------------

// The tile's (n, mean, M2) of entry o = (row, k, c) into the row: the thread that owns an
// entry is the same for every tile of the block; the row's count is updated after. wb: the
// tile's merge weight, math::merge_weight(n_row, n), one per component.
template <typename acc_t>
__device__ __forceinline__ void put_moments(const StatsParams<acc_t>& p, bool first, int64_t o,
                                            acc_t n_row, acc_t n, acc_t mean, acc_t m2,
                                            acc_t wb) {
  if (first) {
    p.part_mean[o] = mean;
    p.part_m2[o] = m2;
  } else {
    math::WeightedMoments<acc_t> a{n_row, p.part_mean[o], p.part_m2[o]};
    math::chan_merge_weighted(a, math::WeightedMoments<acc_t>{n, mean, m2}, wb);
    p.part_mean[o] = a.mean;
    p.part_m2[o] = a.m2;
  }
}

template <typename scalar_t, typename acc_t, int KB, bool kInter>
__device__ void tile_moments(const StatsParams<acc_t>& p, const TileGeo& tg, const acc_t* ts,
                             acc_t* cnt, acc_t* red, int64_t row, bool first) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const bool one = p.resp == Resp::kOne;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  // counts, a warp per component: each lane sums its positions (j = lane, lane + 32, ...),
  // then the lanes' sums in a fixed tree: deterministic
  for (int k = warp; k < K; k += kWarps) {
    acc_t n = 0;
    if (one) {
      n = static_cast<acc_t>(tg.P);
    } else {
      for (int j = lane; j < tg.P; j += 32) n += ts[tau_index(kInter, j, k, K, len)];
      n = warp_sum(n);
    }
    if (lane == 0) {
      cnt[k] = n;
      // the tile's weight in the merges into the row: one division per component, none
      // per (k, c) (a division is a call on the GPU, whose convention costs registers)
      cnt[K + k] = first ? acc_t(0) : math::merge_weight(p.part_n[row * K + k], n);
    }
  }
  __syncthreads();

  if constexpr (kInter) {
    const ChannelGroups cg = channel_groups(C);
    const int G = cg.G, g = cg.g;
    for (int64_t c0 = 0; c0 < C; c0 += cg.cc) {
      const int64_t c = c0 + cg.ci;
      const bool active = g < G && c < C;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t s1[KB], mt[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) s1[kk] = acc_t(0);
        if (active) {
          for (int j = g; j < tg.P; j += G) {
            const acc_t v = static_cast<acc_t>(x[(tg.p0 + j) * C + c]);
#pragma unroll
            for (int kk = 0; kk < KB; ++kk)
              if (k0 + kk < K) s1[kk] += tile_tau(ts, one, true, j, k0 + kk, K, len) * v;
          }
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) red[kk * kThreads + threadIdx.x] = s1[kk];
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          mt[kk] = k0 + kk < K && active ? math::weighted_mean(sum_groups(red, cg, kk), cnt[k0 + kk])
                                         : acc_t(0);
          s1[kk] = acc_t(0);
        }
        __syncthreads();
        if (active) {
          for (int j = g; j < tg.P; j += G) {
            const acc_t v = static_cast<acc_t>(x[(tg.p0 + j) * C + c]);
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) {
              if (k0 + kk < K) {
                const acc_t d = v - mt[kk];
                s1[kk] += tile_tau(ts, one, true, j, k0 + kk, K, len) * d * d;
              }
            }
          }
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) red[kk * kThreads + threadIdx.x] = s1[kk];
        __syncthreads();
        if (g == 0 && c < C) {
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const int k = k0 + kk;
              put_moments(p, first, (row * K + k) * C + c, first ? acc_t(0) : p.part_n[row * K + k],
                          cnt[k], mt[kk], sum_groups(red, cg, kk), cnt[K + k]);
            }
          }
        }
        __syncthreads();
      }
    }
  } else {
    // a warp per channel, lanes over the tile's positions
    for (int64_t c = warp; c < C; c += kWarps) {
      const scalar_t* xr = x + (tg.n * C + c) * S + tg.s0;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t s1[KB], mt[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) s1[kk] = acc_t(0);
        for (int j = lane; j < tg.P; j += 32) {
          const acc_t v = static_cast<acc_t>(xr[j]);
#pragma unroll
          for (int kk = 0; kk < KB; ++kk)
            if (k0 + kk < K) s1[kk] += tile_tau(ts, one, false, j, k0 + kk, K, len) * v;
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          mt[kk] = k0 + kk < K ? math::weighted_mean(warp_sum(s1[kk]), cnt[k0 + kk]) : acc_t(0);
          s1[kk] = acc_t(0);
        }
        for (int j = lane; j < tg.P; j += 32) {
          const acc_t v = static_cast<acc_t>(xr[j]);
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const acc_t d = v - mt[kk];
              s1[kk] += tile_tau(ts, one, false, j, k0 + kk, K, len) * d * d;
            }
          }
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          if (k0 + kk < K) {
            const acc_t m2 = warp_sum(s1[kk]);
            if (lane == 0) {
              const int k = k0 + kk;
              put_moments(p, first, (row * K + k) * C + c,
                          first ? acc_t(0) : p.part_n[row * K + k], cnt[k], mt[kk], m2,
                          cnt[K + k]);
            }
          }
        }
      }
    }
  }
}

// Dynamic shared memory: ts (len x K) | cnt (2 K: the tile's counts, then its merge
// weights) | red (kThreads x KB). partial_rows(tiles)
// blocks, block b walking tiles b, b + gridDim.x, ... into its row b of partials.
template <typename scalar_t, typename acc_t, int KB, bool kInter>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<acc_t, KB>))
    collect_mixture_stats_kernel(StatsParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  acc_t* cnt = ts + p.geo.len * p.geo.K;
  acc_t* red = cnt + 2 * p.geo.K;
  for (int64_t t = blockIdx.x; t < p.geo.num; t += gridDim.x) {
    const TileGeo tg = tile_geo(p.geo, t);
    if (p.resp != Resp::kOne)
      tile_responsibilities<scalar_t, acc_t, KB, kInter>(p, tg, ts, red);
    const bool first = t == blockIdx.x;
    tile_moments<scalar_t, acc_t, KB, kInter>(p, tg, ts, cnt, red, blockIdx.x, first);
    __syncthreads();  // every merge has read the row's count
    for (int64_t k = threadIdx.x; k < p.geo.K; k += kThreads) {
      acc_t& n = p.part_n[blockIdx.x * p.geo.K + k];
      n = first ? cnt[k] : n + cnt[k];
    }
    __syncthreads();  // ts, cnt and red are reused by the next tile
  }
}

// ---------------------------------------------------------------------------------------
// Normalization: y = sum_k tau_k (alpha_kc x + delta_kc), V values at a time.
// ---------------------------------------------------------------------------------------

// The V values of x from element e (V consecutive elements of one row: channels of one
// position, interleaved, or positions of one (sample, channel) row, planar); tau(k, v):
// the responsibility of component k at the v-th of them.
template <typename scalar_t, typename acc_t, int V, typename Tau>
__device__ __forceinline__ void normalize_vector(const scalar_t* x, scalar_t* y, int64_t e,
                                                 int64_t c, bool per_channel_row,
                                                 const acc_t* alpha, const acc_t* delta,
                                                 int64_t C, int K, Tau tau) {
  const Pack<scalar_t, V> xv = load_pack<V>(x + e);
  acc_t out[V];
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = acc_t(0);
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t o = k * C + c + (per_channel_row ? 0 : v);
      out[v] += tau(k, v) * math::normalize_term(static_cast<acc_t>(xv.v[v]), alpha[o], delta[o]);
    }
  }
  Pack<scalar_t, V> yv;
#pragma unroll
  for (int v = 0; v < V; ++v) yv.v[v] = static_cast<scalar_t>(out[v]);
  store_pack<V>(y + e, yv);
}

// The whole tensor, element-wise (grid-stride: every thread busy whatever the row length).
// tau: null for K = 1.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) normalize_mixture_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ tau,
    const acc_t* __restrict__ alpha, const acc_t* __restrict__ delta, int64_t C, int64_t S,
    int64_t K, int64_t total, bool interleaved) {
  const int k_count = static_cast<int>(K);
  const bool narrow = narrow_indices(total);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i * V < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i * V;
    if (interleaved) {
      const DivMod pc = divmod(e, C, narrow);
      const int64_t pos = pc.q, c = pc.r;
      normalize_vector<scalar_t, acc_t, V>(x, y, e, c, false, alpha, delta, C, k_count,
                                           [&](int k, int) {
                                             return tau ? tau[pos * K + k] : acc_t(1);
                                           });
    } else {
      const DivMod rs = divmod(e, S, narrow), nc = divmod(rs.q, C, narrow);
      const int64_t s = rs.r, c = nc.r, n = nc.q;
      normalize_vector<scalar_t, acc_t, V>(x, y, e, c, true, alpha, delta, C, k_count,
                                           [&](int k, int v) {
                                             return tau ? tau[(n * K + k) * S + s + v] : acc_t(1);
                                           });
    }
  }
}

// Evaluation: per tile, the responsibilities, then the tile's normalization while it is in
// cache (V values at a time along its rows). Dynamic shared memory as the stats kernel's.
template <typename scalar_t, typename acc_t, int KB, int V, bool kInter>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<acc_t, KB>))
    estep_normalize_kernel(StatsParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  acc_t* red = ts + p.geo.len * p.geo.K + 2 * p.geo.K;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* y = static_cast<scalar_t*>(p.y);
  for (int64_t t = blockIdx.x; t < p.geo.num; t += gridDim.x) {
    const TileGeo tg = tile_geo(p.geo, t);
    // ts is complete after it (a barrier precedes its copy to tau, which only reads ts)
    tile_responsibilities<scalar_t, acc_t, KB, kInter>(p, tg, ts, red);
    if constexpr (kInter) {
      const int64_t base = tg.p0 * C;
      for (int64_t i = threadIdx.x; i * V < tg.P * C; i += kThreads) {
        const int64_t e = i * V;
        const DivMod jc = tile_divmod(e, C);
        const int j = static_cast<int>(jc.q);
        normalize_vector<scalar_t, acc_t, V>(x, y, base + e, jc.r, false, p.alpha, p.delta, C,
                                             K, [&](int k, int) { return ts[j * K + k]; });
      }
    } else {
      const int per_row = tg.P / V;  // V divides the tile's positions (host's choice)
      for (int64_t i = threadIdx.x; i < C * per_row; i += kThreads) {
        const DivMod cj = tile_divmod(i, per_row);
        const int64_t c = cj.q;
        const int j = static_cast<int>(cj.r) * V;
        normalize_vector<scalar_t, acc_t, V>(
            x, y, (tg.n * C + c) * S + tg.s0 + j, c, true, p.alpha, p.delta, C, K,
            [&](int k, int v) { return smem_vec_value<V>(ts + k * len + j, v); });
      }
    }
    __syncthreads();  // ts is reused by the next tile
  }
}

// ---------------------------------------------------------------------------------------
// Merge of the partial rows (Chan's formula) into the batch statistics: a block merges
// the rows of one of G chunks for kReduceCols (k, c) entries, kReduceRows threads' rows
// walking the partial rows and then combined pairwise; finish_moments_kernel merges the G results in
// order, replaces inactive components' statistics by the mixture's (replace_inactive), and
// forms the affine coefficients (alpha not null).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
__global__ void __launch_bounds__(kReduceCols * kReduceRows) merge_tile_moments_kernel(
    const acc_t* __restrict__ pn, const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
    int64_t rows, int64_t K, int64_t C, acc_t* __restrict__ gn, acc_t* __restrict__ gmean,
    acc_t* __restrict__ gm2) {
  CBN_STATIC_SMEM(math::WeightedMoments<acc_t>[kReduceRows][kReduceCols], sm);
  const int64_t KC = K * C, G = gridDim.y, g = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  const int row = threadIdx.y;
  math::WeightedMoments<acc_t> acc{0, 0, 0};
  if (e < KC) {
    const int64_t k = e / C;
    const int64_t t0 = rows * g / G, t1 = rows * (g + 1) / G;
    for (int64_t t = t0 + row; t < t1; t += kReduceRows) {
      const math::WeightedMoments<acc_t> part{pn[t * K + k], pmean[t * KC + e], pm2[t * KC + e]};
      math::chan_merge(acc, part);
    }
  }
  sm[row][threadIdx.x] = acc;
  for (int half = kReduceRows / 2; half > 0; half /= 2) {
    __syncthreads();
    if (row < half) math::chan_merge(sm[row][threadIdx.x], sm[row + half][threadIdx.x]);
  }
  if (row == 0 && e < KC) {
    gn[g * KC + e] = sm[0][threadIdx.x].n;
    gmean[g * KC + e] = sm[0][threadIdx.x].mean;
    gm2[g * KC + e] = sm[0][threadIdx.x].m2;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_moments_kernel(
    const acc_t* __restrict__ gn, const acc_t* __restrict__ gmean, const acc_t* __restrict__ gm2,
    int64_t G, int64_t K, int64_t C, const acc_t* __restrict__ mix_mean,
    const acc_t* __restrict__ mix_var, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, acc_t eps, acc_t* __restrict__ mean, acc_t* __restrict__ var,
    acc_t* __restrict__ count, acc_t* __restrict__ alpha, acc_t* __restrict__ delta,
    bool replace_inactive) {
  const int64_t KC = K * C;
  const bool narrow = narrow_indices(KC);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < KC;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    math::WeightedMoments<acc_t> r{0, 0, 0};
    // a chain of dependent merges: unrolling it bought nothing and cost registers (68 on
    // sm_80 in float64, 47 not unrolled)
#pragma unroll 1
    for (int64_t g = 0; g < G; ++g) {
      const math::WeightedMoments<acc_t> part{gn[g * KC + i], gmean[g * KC + i], gm2[g * KC + i]};
      math::chan_merge(r, part);
    }
    const bool keep = !replace_inactive || math::is_active(r.n);
    const acc_t m = keep ? r.mean : mix_mean[i];
    const acc_t v = keep ? math::weighted_mean(r.m2, r.n) : mix_var[i];
    mean[i] = m;
    var[i] = v;
    if (alpha != nullptr)
      math::affine_coefs(weight ? weight[i] : acc_t(1), bias ? bias[i] : acc_t(0), m, v, eps,
                         alpha[i], delta[i]);
    // in 32 bits when they fit: a 64-bit division is a called routine, whose calling
    // convention made ptxas spill 8 bytes here (float64)
    const DivMod kc = divmod(i, C, narrow);
    if (kc.r == 0) count[kc.q] = r.n;
  }
}

// Group ids in [0, K) where no kernel reads them (K = 1 with groups): a device-side assert,
// as the responsibility kernels do.
__global__ void __launch_bounds__(kThreads) check_group_ids_kernel(const int64_t* __restrict__ groups,
                                                                   int64_t n, int64_t K) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t grp = groups[i];
    CUDA_KERNEL_ASSERT(grp >= 0 && grp < K && "group ids must be in [0, K)");
  }
}

void check_group_ids(const Tensor& groups, Resp resp, int64_t K) {
  if (resp != Resp::kOne || !groups.defined() || groups.numel() == 0) return;
  CBN_LAUNCH_KERNEL(check_group_ids_kernel, grid_for(groups.numel()), kThreads, 0,
                    groups.data_ptr<int64_t>(), groups.numel(), K);
}

// alpha, delta from given statistics (evaluation).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) affine_coefs_kernel(
    const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, acc_t eps, int64_t n,
    acc_t* __restrict__ alpha, acc_t* __restrict__ delta) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    math::affine_coefs(weight ? weight[i] : acc_t(1), bias ? bias[i] : acc_t(0), mean[i],
                       var[i], eps, alpha[i], delta[i]);
  }
}

// ---------------------------------------------------------------------------------------
// Running update: one block. Nothing changes when an active statistic is not finite.
// The mixture may be the running buffers themselves (rm == mix_mean, ...): each element
// is read before it is written, by the same thread, so no __restrict__ on those.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
__global__ void __launch_bounds__(1024) update_running_stats_kernel(
    acc_t* rm, acc_t* rv, acc_t* rp, int64_t* __restrict__ nbt, const acc_t* mix_mean,
    const acc_t* mix_var, const acc_t* mix_prior,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
    const acc_t* __restrict__ count, int64_t K, int64_t C, int64_t M, double momentum,
    bool has_momentum) {
  CBN_STATIC_SMEM(int, bad);
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < K * C; i += blockDim.x) {
    const int64_t k = i / C;
    if (math::is_active(count[k]) && !(isfinite(mean[i]) && isfinite(var[i]))) atomicOr(&bad, 1);
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (!isfinite(count[k])) atomicOr(&bad, 1);
  __syncthreads();
  if (bad) return;
  const acc_t eta = static_cast<acc_t>(
      has_momentum ? momentum : 1.0 / static_cast<double>(nbt[0] + 1));
  for (int64_t i = threadIdx.x; i < K * C; i += blockDim.x) {
    const int64_t k = i / C;
    const bool active = math::is_active(count[k]);
    rm[i] = active ? math::ema(mix_mean[i], mean[i], eta) : mix_mean[i];
    rv[i] = active ? math::ema(mix_var[i], math::unbiased_var(var[i], count[k]), eta) : mix_var[i];
  }
  if (rp != nullptr) {
    // M 0: M = sum_k N_k (callers that do not know M on the host), in order
    acc_t m = static_cast<acc_t>(M);
    if (M <= 0) {
      m = 0;
      for (int64_t k = 0; k < K; ++k) m += count[k];
    }
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      rp[k] = math::ema(mix_prior[k], count[k] / m, eta);
  }
  __syncthreads();  // every thread has read nbt
  if (threadIdx.x == 0 && nbt != nullptr) nbt[0] += 1;
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// E-step coefficients mu, 1/2 a, b of a mixture; with `copy`, also copies of it.
struct EstepCoefs {
  Tensor mu, half_a, b;
  Tensor mean_copy, var_copy, prior_copy;
};

template <typename acc_t>
EstepCoefs estep_coefs(const Tensor& mix_mean, const Tensor& mix_var, const Tensor& mix_prior,
                       double eps, bool copy) {
  const int64_t K = mix_mean.size(0), C = mix_mean.size(1);
  const Tensor var = mix_var.contiguous(), prior = mix_prior.contiguous();
  EstepCoefs out;
  out.mu = mix_mean.contiguous();
  const Tensor buf = at::empty({K * C + K}, var.options());  // 1/2 a | b
  out.half_a = buf.narrow(0, 0, K * C);
  out.b = buf.narrow(0, K * C, K);
  if (copy) {
    out.mean_copy = at::empty_like(var);
    out.var_copy = at::empty_like(var);
    out.prior_copy = at::empty({K}, var.options());
  }
  CBN_LAUNCH_KERNEL(estep_coefs_kernel<acc_t>, grid_1d(K), kThreads, 0,
                    out.mu.data_ptr<acc_t>(), var.data_ptr<acc_t>(), prior.data_ptr<acc_t>(),
                    static_cast<acc_t>(eps), C, out.half_a.data_ptr<acc_t>(),
                    out.b.data_ptr<acc_t>(), mut_ptr_or_null<acc_t>(out.mean_copy),
                    mut_ptr_or_null<acc_t>(out.var_copy), mut_ptr_or_null<acc_t>(out.prior_copy));
  return out;
}

template <typename acc_t>
size_t tile_smem(const TileParams& g, int KB) {
  return sizeof(acc_t) * (g.len * g.K + 2 * g.K + kThreads * KB);
}

// f(integral_constant<bool, interleaved>)
template <typename F>
void dispatch_layout(bool interleaved, F&& f) {
  if (interleaved)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// rows: the partial rows the host allocated (partial_rows, computed once).
template <typename scalar_t, typename acc_t>
void launch_stats(const StatsParams<acc_t>& p, int64_t rows) {
  dispatch_kb<acc_t>(p.geo.K, [&](auto kb) {
    dispatch_layout(p.geo.interleaved, [&](auto inter) {
      constexpr int KB = decltype(kb)::value;
      constexpr bool kInter = decltype(inter)::value;
      const size_t smem = tile_smem<acc_t>(p.geo, KB);
      allow_smem(collect_mixture_stats_kernel<scalar_t, acc_t, KB, kInter>, smem);
      CBN_LAUNCH_KERNEL(collect_mixture_stats_kernel<scalar_t, acc_t, KB, kInter>,
                        grid_1d(rows), kThreads, smem, p);
    });
  });
}

// The widest vector (16 bytes, else 1 value) for rows of `row` elements of x and y.
template <typename scalar_t>
bool vectorizable(const void* x, const void* y, int64_t row) {
  return row % kVec<scalar_t> == 0 && aligned16(x) && aligned16(y);
}

template <typename scalar_t, typename acc_t>
void launch_normalize(const Tensor& x, Tensor& y, const Tensor& tau, const Tensor& alpha,
                      const Tensor& delta, const Shape& s, int64_t K) {
  const int64_t total = s.M() * s.C;
  const acc_t* tp = tau.defined() && tau.numel() > 0 ? tau.data_ptr<acc_t>() : nullptr;
  const auto run = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    CBN_LAUNCH_KERNEL(normalize_mixture_kernel<scalar_t, acc_t, V>, grid_for(total / V),
                      kThreads, 0, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), tp,
                      alpha.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), s.C, s.S, K, total,
                      s.interleaved);
  };
  if (vectorizable<scalar_t>(x.data_ptr(), y.data_ptr(), s.interleaved ? s.C : s.S))
    run(std::integral_constant<int, kVec<scalar_t>>{});
  else
    run(std::integral_constant<int, 1>{});
}

}  // namespace

BatchStats CudaBackend::batch_stats(const TrainSetup& st, const OptTensor& groups, int64_t K,
                                    double eps, bool replace_inactive, const OptTensor& weight,
                                    const OptTensor& bias) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t C = shape.C, KC = K * C;
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
  BatchStats out;
  if (replace_inactive) {
    out.alpha = at::empty({K, C}, aopt);
    out.delta = at::empty({K, C}, aopt);
  }
  out.tau = empty_tau(x, shape, K, st.acc);
  out.mean = at::empty({K, C}, aopt);
  out.var = at::empty({K, C}, aopt);
  out.count = at::empty({K}, aopt);
  const Tiles tiles =
      plan_tiles(shape, K, st.acc == at::kDouble ? 8 : 4, x.element_size(), true);
  const int64_t rows = partial_rows(tiles.num);
  const int64_t G = std::max<int64_t>(1, reduce_groups(rows, KC));
  // the blocks' partials (n | mean | M2), then the G chunks' merged results (n | mean | M2)
  const Tensor parts = at::empty({rows * (K + 2 * KC) + 3 * G * KC}, aopt);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  check_group_ids(grp, st.resp, K);
  const Tensor mix_mean = st.mix_mean.contiguous(), mix_var = st.mix_var.contiguous();
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_batch_stats_cuda", [&] {
    EstepCoefs ec;
    if (st.resp == Resp::kSoft)
      ec = estep_coefs<acc_t>(mix_mean, mix_var, st.mix_prior, eps, /*copy=*/!st.all_owned());
    mix_outputs(st, out, ec.mean_copy, ec.var_copy, ec.prior_copy);
    acc_t* pn = parts.data_ptr<acc_t>();
    acc_t* pmean = pn + rows * K;
    acc_t* pm2 = pmean + rows * KC;
    acc_t* gn = pm2 + rows * KC;
    acc_t* gmean = gn + G * KC;
    acc_t* gm2 = gmean + G * KC;
    if (tiles.num > 0) {
      StatsParams<acc_t> p{};
      p.x = x.data_ptr();
      p.tau = out.tau.numel() > 0 ? out.tau.data_ptr<acc_t>() : nullptr;
      p.groups = ptr_or_null<int64_t>(grp);
      p.mu = ptr_or_null<acc_t>(ec.mu);
      p.half_a = ptr_or_null<acc_t>(ec.half_a);
      p.b = ptr_or_null<acc_t>(ec.b);
      p.part_n = pn;
      p.part_mean = pmean;
      p.part_m2 = pm2;
      p.geo = tile_params(shape, K, tiles);
      p.resp = st.resp;
      launch_stats<scalar_t, acc_t>(p, rows);
      CBN_LAUNCH_KERNEL(merge_tile_moments_kernel<acc_t>,
                        dim3(static_cast<unsigned>((KC + kReduceCols - 1) / kReduceCols),
                             static_cast<unsigned>(G)),
                        dim3(kReduceCols, kReduceRows), 0, pn, pmean, pm2, rows, K, C, gn,
                        gmean, gm2);
    } else {  // no positions: empty components
      parts.zero_();
    }
    CBN_LAUNCH_KERNEL(finish_moments_kernel<acc_t>, grid_for(KC), kThreads, 0, gn, gmean, gm2,
                      G, K, C, mix_mean.data_ptr<acc_t>(), mix_var.data_ptr<acc_t>(),
                      ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(bb), static_cast<acc_t>(eps),
                      out.mean.data_ptr<acc_t>(), out.var.data_ptr<acc_t>(),
                      out.count.data_ptr<acc_t>(), mut_ptr_or_null<acc_t>(out.alpha),
                      mut_ptr_or_null<acc_t>(out.delta), replace_inactive);
  });
  return out;
}

// y = sum_k tau_k (alpha x + delta); alpha, delta from (mean, var) unless given. Given
// groups are read from tau.
Tensor CudaBackend::normalize(const ApplySetup& st, const OptTensor&, const OptTensor& weight,
                              const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                              const Tensor& var, double eps, const Tensor& alpha_in,
                              const Tensor& delta_in) {
  const Tensor& x = st.x;
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
  Tensor alpha = alpha_in, delta = delta_in;
  const int64_t K = st.K, C = st.shape.C;
  Tensor out = empty_like_input(x);
  if (st.shape.M() == 0) return out;
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_normalize_cuda", [&] {
    if (!alpha.defined()) {
      const auto aopt = x.options().dtype(st.acc);
      const Tensor m = mean.contiguous(), v = var.contiguous();
      const Tensor buf = at::empty({2 * K * C}, aopt);
      alpha = buf.narrow(0, 0, K * C);
      delta = buf.narrow(0, K * C, K * C);
      const int64_t n = K * C;
      CBN_LAUNCH_KERNEL(affine_coefs_kernel<acc_t>, grid_for(n), kThreads, 0, m.data_ptr<acc_t>(),
                        v.data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(bb),
                        static_cast<acc_t>(eps), n, alpha.data_ptr<acc_t>(),
                        delta.data_ptr<acc_t>());
    }
    launch_normalize<scalar_t, acc_t>(x, out, st.resp == Resp::kOne ? Tensor() : tau, alpha,
                                      delta, st.shape, K);
  });
  return out;
}

// Evaluation: the responsibilities and the normalization in one pass over each tile.
std::tuple<Tensor, Tensor> CudaBackend::forward_eval(const EvalSetup& st, const OptTensor& weight,
                                                     const OptTensor& bias,
                                                     const Tensor& running_mean,
                                                     const Tensor& running_var,
                                                     const OptTensor& running_prior,
                                                     const OptTensor& groups, int64_t K,
                                                     double eps) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  Tensor tau = empty_tau(x, shape, K, st.acc);
  Tensor y = empty_like_input(x);
  if (shape.M() == 0) return {y, tau};
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  check_group_ids(grp, st.resp, K);
  const Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
  const auto aopt = x.options().dtype(st.acc);
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_forward_eval_cuda", [&] {
    const int64_t n = K * shape.C;
    const Tensor coefs = at::empty({2 * n}, aopt);  // alpha | delta
    acc_t* alpha = coefs.data_ptr<acc_t>();
    CBN_LAUNCH_KERNEL(affine_coefs_kernel<acc_t>, grid_for(n), kThreads, 0, rm.data_ptr<acc_t>(),
                      rv.data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(bb),
                      static_cast<acc_t>(eps), n, alpha, alpha + n);
    if (st.resp == Resp::kOne) {  // element-wise
      launch_normalize<scalar_t, acc_t>(x, y, Tensor(), coefs.narrow(0, 0, n),
                                        coefs.narrow(0, n, n), shape, K);
      return;
    }
    EstepCoefs ec;
    if (st.resp == Resp::kSoft) ec = estep_coefs<acc_t>(rm, rv, *running_prior, eps, false);
    const Tiles tiles = plan_tiles(shape, K, sizeof(acc_t), sizeof(scalar_t), false);
    StatsParams<acc_t> p{};
    p.x = x.data_ptr();
    p.tau = tau.data_ptr<acc_t>();
    p.groups = ptr_or_null<int64_t>(grp);
    p.mu = ptr_or_null<acc_t>(ec.mu);
    p.half_a = ptr_or_null<acc_t>(ec.half_a);
    p.b = ptr_or_null<acc_t>(ec.b);
    p.y = y.data_ptr();
    p.alpha = alpha;
    p.delta = alpha + n;
    p.geo = tile_params(shape, K, tiles);
    p.resp = st.resp;
    // vectors along the tile's rows: channels (interleaved), or positions, whose tiles all
    // hold a multiple of V when S is one (planar)
    const bool vec = vectorizable<scalar_t>(x.data_ptr(), y.data_ptr(),
                                            shape.interleaved ? shape.C : shape.S) &&
                     (shape.interleaved || tiles.len % kVec<scalar_t> == 0);
    dispatch_kb<acc_t>(K, [&](auto kb) {
      dispatch_layout(shape.interleaved, [&](auto inter) {
        constexpr int KB = decltype(kb)::value;
        constexpr bool kInter = decltype(inter)::value;
        const size_t smem = tile_smem<acc_t>(p.geo, KB);
        const auto run = [&](auto v) {
          constexpr int V = decltype(v)::value;
          allow_smem(estep_normalize_kernel<scalar_t, acc_t, KB, V, kInter>, smem);
          CBN_LAUNCH_KERNEL(estep_normalize_kernel<scalar_t, acc_t, KB, V, kInter>,
                            grid_1d(tiles.num), kThreads, smem, p);
        };
        if (vec)
          run(std::integral_constant<int, kVec<scalar_t>>{});
        else
          run(std::integral_constant<int, 1>{});
      });
    });
  });
  return {y, tau};
}

void CudaBackend::update_running_stats(Tensor& running_mean, Tensor& running_var,
                                       const OptTensor& running_prior,
                                       const OptTensor& num_batches_tracked,
                                       const Tensor& mix_mean, const Tensor& mix_var,
                                       const Tensor& mix_prior, const Tensor& mean,
                                       const Tensor& var, const Tensor& count,
                                       int64_t num_positions, std::optional<double> momentum) {
  const int64_t K = mean.size(0), C = mean.size(1);
  // an empty mixture: the running buffers themselves (updated in place, element by element)
  const bool same = mix_mean.numel() == 0;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbn_update_running_stats_cuda", [&] {
    const Tensor m = mean.contiguous(), v = var.contiguous(), n = count.contiguous();
    const Tensor mm = same ? running_mean : mix_mean.contiguous();
    const Tensor mv = same ? running_var : mix_var.contiguous();
    const Tensor mp = same ? (defined(running_prior) ? *running_prior : mm)
                           : mix_prior.contiguous();
    CBN_LAUNCH_KERNEL(
        update_running_stats_kernel<scalar_t>, 1, 1024, 0, running_mean.data_ptr<scalar_t>(),
        running_var.data_ptr<scalar_t>(),
        defined(running_prior) ? running_prior->data_ptr<scalar_t>() : nullptr,
        defined(num_batches_tracked) ? num_batches_tracked->data_ptr<int64_t>() : nullptr,
        mm.data_ptr<scalar_t>(), mv.data_ptr<scalar_t>(), mp.data_ptr<scalar_t>(),
        m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(), K, C,
        num_positions, momentum.value_or(0.0), momentum.has_value());
  });
}

}  // namespace cuda
}  // namespace cbn_ext
