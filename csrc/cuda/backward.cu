// CUDA backward operators of cbn_ext: backward_train and backward_eval (and the building
// blocks grad_sums and grad_input).
//
//   collect_grad_stats_kernel  per tile of positions (resident blocks walking the tiles):
//     Sg = sum g tau and Sgx = sum g tau (x - m) per (k, c), added into the block's row of
//     partials (partial_rows);
//   reduce_tile_sums_kernel    both sums over the tiles, by many blocks (each a chunk of
//     the tiles), in a fixed-order tree (finish_sums_kernel adds the chunks in order when
//     there are several);
//   grad_coefs_kernel          the per-(k, c) gradient coefficients (cbn_math.h);
//   grad_input_soft_kernel     per tile, soft responsibilities: dtau per position (a
//     reduction over channels), dl = tau (dtau - sum tau dtau), then dx = g A + E with A, E
//     summed over components on their own means (dx_accumulate_soft), while the tile is in cache;
//   grad_input_given_kernel    given or single responsibilities: dx element-wise.
// x and g meant to be read twice from DRAM (the sums, the input gradient; the soft tile's
// later passes from L2, see plan_tiles; not yet measured on a GPU), dx written once.
#include "cuda_backend.h"
#include "cuda_utils.cuh"

#include <array>
#include <tuple>

namespace cbn_ext {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// Pass 1: per-tile Sg, Sgx.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct GradStatsParams {
  const void* grad;
  const void* x;
  const acc_t* tau;   // null for K = 1
  const acc_t* mean;  // (K, C)
  acc_t* part_sg;     // (rows, K, C): a row per block (partial_rows)
  acc_t* part_sgx;    // (rows, K, C)
  TileParams geo;
};

// Dynamic shared memory: ts (len x K) | red (kThreads x 2 KB). partial_rows(tiles) blocks,
// block b walking tiles b, b + gridDim.x, ... and adding their sums into its row b (the
// thread that owns an entry is the same for every tile).
template <typename scalar_t, typename acc_t, int KB>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<acc_t, KB>))
    collect_grad_stats_kernel(GradStatsParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  acc_t* red = ts + p.geo.len * p.geo.K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const bool one = p.tau == nullptr;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  const int64_t row = blockIdx.x;
  for (int64_t t = blockIdx.x; t < p.geo.num; t += gridDim.x) {
    const TileGeo tg = tile_geo(p.geo, t);
    const bool first = t == blockIdx.x;
    if (!one) load_tile_tau(p.tau, p.geo, tg, ts);
    __syncthreads();

    if (p.geo.interleaved) {
      const ChannelGroups cg = channel_groups(C);
      const int G = cg.G, g = cg.g;
      for (int64_t c0 = 0; c0 < C; c0 += cg.cc) {
        const int64_t c = c0 + cg.ci;
        const bool active = g < G && c < C;
        for (int k0 = 0; k0 < K; k0 += KB) {
          acc_t sg[KB], sgx[KB], m[KB];
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            sg[kk] = sgx[kk] = acc_t(0);
            m[kk] = active && k0 + kk < K ? p.mean[(k0 + kk) * C + c] : acc_t(0);
          }
          if (active) {
            for (int j = g; j < tg.P; j += G) {
              const int64_t o = (tg.p0 + j) * C + c;
              const acc_t gv = static_cast<acc_t>(gr[o]);
              const acc_t xv = static_cast<acc_t>(x[o]);
#pragma unroll
              for (int kk = 0; kk < KB; ++kk) {
                if (k0 + kk < K) {
                  const acc_t gt = one ? gv : ts[j * K + k0 + kk] * gv;
                  sg[kk] += gt;
                  sgx[kk] += gt * (xv - m[kk]);
                }
              }
            }
          }
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            red[kk * kThreads + threadIdx.x] = sg[kk];
            red[(KB + kk) * kThreads + threadIdx.x] = sgx[kk];
          }
          __syncthreads();
          if (g == 0 && c < C) {
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) {
              if (k0 + kk < K) {
                const int64_t o = (row * K + k0 + kk) * C + c;
                const acc_t a = sum_groups(red, cg, kk), b = sum_groups(red, cg, KB + kk);
                p.part_sg[o] = first ? a : p.part_sg[o] + a;
                p.part_sgx[o] = first ? b : p.part_sgx[o] + b;
              }
            }
          }
          __syncthreads();
        }
      }
    } else {
      // a warp per channel, lanes over the tile's positions. int channels (C <= 2^30,
      // plan_tiles) and row pointers stepped per channel (never past the tensor): the form
      // without spills at 64 registers (float64, KB = 2) on both sm_80 and sm_90 (CUDA
      // 13.0); a stepped 64-bit offset spilled on sm_90, 64-bit channels on sm_80, and
      // addresses stepped as integers made the loads generic (LD, not LDG).
      const int Ci = static_cast<int>(C);
      const int64_t row0 = tg.n * C * S + tg.s0 + (warp < Ci ? warp : 0) * S;
      const scalar_t* xb = x + row0;
      const scalar_t* gb = gr + row0;
      for (int c = warp; c < Ci; c += kWarps) {
        for (int k0 = 0; k0 < K; k0 += KB) {
          acc_t sg[KB], sgx[KB], m[KB];
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            sg[kk] = sgx[kk] = acc_t(0);
            m[kk] = k0 + kk < K ? p.mean[(k0 + kk) * C + c] : acc_t(0);
          }
          for (int j = lane; j < tg.P; j += 32) {
            const acc_t gv = static_cast<acc_t>(gb[j]);
            const acc_t xv = static_cast<acc_t>(xb[j]);
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) {
              if (k0 + kk < K) {
                const acc_t gt = one ? gv : ts[(k0 + kk) * len + j] * gv;
                sg[kk] += gt;
                sgx[kk] += gt * (xv - m[kk]);
              }
            }
          }
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const acc_t a = warp_sum(sg[kk]), b = warp_sum(sgx[kk]);
              if (lane == 0) {
                const int64_t o = (row * K + k0 + kk) * C + c;
                p.part_sg[o] = first ? a : p.part_sg[o] + a;
                p.part_sgx[o] = first ? b : p.part_sgx[o] + b;
              }
            }
          }
        }
        if (c + kWarps < Ci) {  // the next channel's rows
          xb += kWarps * S;
          gb += kWarps * S;
        }
      }
    }
    __syncthreads();  // ts is reused by the next tile
  }
}

// Sums over the partial rows of parts[z] (z = blockIdx.z: Sg, Sgx), (rows, n) each: a
// block sums the rows of chunk g = blockIdx.y for kReduceCols entries, its kReduceRows
// threads' rows walking them and then added pairwise; out[z] is (G, n), the chunks' sums.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceCols * kReduceRows) reduce_tile_sums_kernel(
    const acc_t* __restrict__ part0, const acc_t* __restrict__ part1, int64_t rows, int64_t n,
    acc_t* __restrict__ out0, acc_t* __restrict__ out1) {
  CBN_STATIC_SMEM(acc_t[kReduceRows][kReduceCols], sm);
  const acc_t* part = blockIdx.z == 0 ? part0 : part1;
  acc_t* out = blockIdx.z == 0 ? out0 : out1;
  const int64_t G = gridDim.y, g = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  const int row = threadIdx.y;
  acc_t s = 0;
  if (e < n) {
    const int64_t t0 = rows * g / G, t1 = rows * (g + 1) / G;
    for (int64_t t = t0 + row; t < t1; t += kReduceRows) s += part[t * n + e];
  }
  sm[row][threadIdx.x] = s;
  for (int half = kReduceRows / 2; half > 0; half /= 2) {
    __syncthreads();
    if (row < half) sm[row][threadIdx.x] += sm[row + half][threadIdx.x];
  }
  if (row == 0 && e < n) out[g * n + e] = sm[0][threadIdx.x];
}

// The G chunks' sums added in chunk order (for grad_sums, when there are several).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_sums_kernel(
    const acc_t* __restrict__ g0, const acc_t* __restrict__ g1, int64_t G, int64_t n,
    acc_t* __restrict__ out0, acc_t* __restrict__ out1) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    acc_t a = 0, b = 0;
    for (int64_t g = 0; g < G; ++g) {
      a += g0[g * n + i];
      b += g1[g * n + i];
    }
    out0[i] = a;
    out1[i] = b;
  }
}

// ---------------------------------------------------------------------------------------
// The per-(k, c) coefficients of the backward. Grid (channel blocks of kThreads, K);
// ev_part[k, block] = sum over the block's channels of e2 v.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct CoefParams {
  const acc_t* sum_g;  // (K, C); null: zero (evaluation, input gradient only)
  const acc_t* sum_gx;
  const acc_t* weight;
  const acc_t* bias;  // null: zero
  const acc_t* var;
  const acc_t* count;    // null at evaluation
  const acc_t* mix_mean;  // soft responsibilities only
  const acc_t* mix_var;
  acc_t eps;
  bool batch_stats;
  int64_t K, C;
  acc_t *alpha, *beta, *e1, *e2, *pc, *a, *mu, *dgamma, *dbeta, *ev_part;
};

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_coefs_kernel(CoefParams<acc_t> p) {
  CBN_STATIC_SMEM(acc_t[kWarps], buf);
  const int64_t k = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t ev = 0;
  if (c < p.C) {
    const int64_t i = k * p.C + c;
    const acc_t sg = p.sum_g ? p.sum_g[i] : acc_t(0);
    const acc_t sgx = p.sum_gx ? p.sum_gx[i] : acc_t(0);
    const acc_t v = p.var[i];
    const auto gc = math::grad_coefs<acc_t>(p.weight ? p.weight[i] : acc_t(1), v,
                                            p.count ? p.count[k] : acc_t(0), sg, sgx, p.eps,
                                            p.batch_stats);
    const acc_t a = p.mix_var ? acc_t(2) * math::half_precision(p.mix_var[i], p.eps) : acc_t(0);
    const auto dc =
        math::dx_coefs<acc_t>(gc.alpha, gc.e2, a, p.mix_mean ? p.mix_mean[i] : acc_t(0));
    p.alpha[i] = gc.alpha;
    p.beta[i] = p.bias ? p.bias[i] : acc_t(0);
    p.e1[i] = gc.e1;
    p.e2[i] = gc.e2;
    p.pc[i] = dc.p;
    p.a[i] = dc.a;
    p.mu[i] = dc.mu;
    p.dgamma[i] = gc.dgamma;
    p.dbeta[i] = gc.dbeta;
    ev = gc.e2 * v;
  }
  ev = block_sum(ev, buf);
  if (threadIdx.x == 0) p.ev_part[k * gridDim.x + blockIdx.x] = ev;
}

// ---------------------------------------------------------------------------------------
// Pass 2: the input gradient.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct GradInputParams {
  const void* grad;
  const void* x;
  void* dx;
  const acc_t* tau;  // null for K = 1
  // dtau (soft): D = x - mean, sum_c g (alpha D + beta) + D (e1 + e2 D) - ev
  const acc_t *mean, *alpha, *beta, *e1, *e2;
  const acc_t* ev_part;  // (K, ev_blocks)
  int64_t ev_blocks;
  // dx on each component's own means (cbn_math.h): alpha, e1, mean (above), p; soft also
  // a (E-step precision) and mu (E-step mean)
  const acc_t *pc, *a, *mu;
  int64_t C, S, K;
  TileParams geo;  // soft: the tiles
};

// sum_c dtau_term over channels [c0, c1) (every `step`-th) of one position, components
// [k0, k0 + KB), blocked; x[c], g[c] at xp[c * stride], gp[c * stride].
template <typename scalar_t, typename acc_t, int KB>
__device__ __forceinline__ void dtau_sums(const GradInputParams<acc_t>& p, const scalar_t* xp,
                                          const scalar_t* gp, int64_t stride, int c0,
                                          int c1, int step, int k0, acc_t* tot) {
  const int K = static_cast<int>(p.K);
  const int64_t C = p.C;
  blocked_channel_sums<acc_t, KB>(c0, c1, step, tot, [&](int c, acc_t* acc) {
    const acc_t xv = static_cast<acc_t>(xp[c * stride]);
    const acc_t gv = static_cast<acc_t>(gp[c * stride]);
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      if (k0 + kk < K) {
        const int64_t o = (k0 + kk) * C + c;
        acc[kk] += math::dtau_term(gv, xv - p.mean[o], p.alpha[o], p.beta[o], p.e1[o], p.e2[o]);
      }
    }
  });
}

// dx for V consecutive elements of one row from element e: channels c.. of one position
// (interleaved) or positions of one (sample, channel c) row (planar); tau(k, v), dl(k, v):
// the component's responsibility and its gradient at the v-th element's position.
template <typename scalar_t, typename acc_t, int V, bool kSoft, typename Tau, typename Dl>
__device__ __forceinline__ void grad_input_vector(const GradInputParams<acc_t>& p,
                                                  const scalar_t* x, const scalar_t* gr,
                                                  scalar_t* dx, int64_t e, int64_t c,
                                                  bool per_channel_row, Tau tau, Dl dl) {
  const Pack<scalar_t, V> xv = load_pack<V>(x + e), gv = load_pack<V>(gr + e);
  const int K = static_cast<int>(p.K);
  (void)dl;  // soft responsibilities only
  Pack<scalar_t, V> out;
  if constexpr (!kSoft) {
    // Given (one-hot) or single responsibilities: sum_k tau_k (alpha g + e1 + p (x - m_k)),
    // on each component's own mean (a shift shared by far-apart components would cancel).
    acc_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = acc_t(0);
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t o = k * p.C + c + (per_channel_row ? 0 : v);
        acc_t A = 0, B = 0, E = 0;
        math::dx_accumulate(tau(k, v), p.alpha[o], p.pc[o], p.e1[o], A, B, E);
        acc[v] += math::dx_combine(static_cast<acc_t>(gv.v[v]),
                                   static_cast<acc_t>(xv.v[v]) - p.mean[o], A, B, E);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = static_cast<scalar_t>(acc[v]);
  } else {
    // every term on its own component's means (math::dx_accumulate_soft)
    acc_t A[V], E[V];
#pragma unroll
    for (int v = 0; v < V; ++v) A[v] = E[v] = acc_t(0);
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t o = k * p.C + c + (per_channel_row ? 0 : v);
        const acc_t xe = static_cast<acc_t>(xv.v[v]);
        math::dx_accumulate_soft(tau(k, v), dl(k, v), p.alpha[o], p.pc[o], p.e1[o],
                                 xe - p.mean[o], p.a[o], xe - p.mu[o], A[v], E[v]);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v)
      out.v[v] = static_cast<scalar_t>(static_cast<acc_t>(gv.v[v]) * A[v] + E[v]);
  }
  store_pack<V>(dx + e, out);
}

// Soft responsibilities, a block per tile. Dynamic shared memory: ts (len x K) | dl
// (len x K) | red (kThreads x KB) | ev (K).
template <typename scalar_t, typename acc_t, int KB, int V>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<acc_t, KB>))
    grad_input_soft_kernel(GradInputParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  const int K = static_cast<int>(p.K), len = static_cast<int>(p.geo.len);
  acc_t* dl = ts + len * K;
  acc_t* red = dl + len * K;
  acc_t* ev = red + kThreads * KB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t C = p.C, S = p.S;
  const bool inter = p.geo.interleaved;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  scalar_t* dx = static_cast<scalar_t*>(p.dx);
  // ev_k = sum of the per-block parts, in order
  for (int k = threadIdx.x; k < K; k += kThreads) {
    acc_t s = 0;
    for (int64_t i = 0; i < p.ev_blocks; ++i) s += p.ev_part[k * p.ev_blocks + i];
    ev[k] = s;
  }
  for (int64_t t = blockIdx.x; t < p.geo.num; t += gridDim.x) {
    const TileGeo tg = tile_geo(p.geo, t);
    load_tile_tau(p.tau, p.geo, tg, ts);
    __syncthreads();
    // dtau per position and component, into dl
    if (inter) {
      for (int j = warp; j < tg.P; j += kWarps) {
        const scalar_t* xr = x + (tg.p0 + j) * C;
        const scalar_t* grr = gr + (tg.p0 + j) * C;
        for (int k0 = 0; k0 < K; k0 += KB) {
          acc_t acc[KB];
          dtau_sums<scalar_t, acc_t, KB>(p, xr, grr, 1, lane, static_cast<int>(C), 32, k0, acc);
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            const acc_t total = warp_sum(acc[kk]);
            if (lane == 0 && k0 + kk < K) dl[j * K + k0 + kk] = total - ev[k0 + kk];
          }
        }
      }
    } else {
      const PositionLanes pl = position_lanes(tg.P, C);
      for (int j0 = 0; j0 < tg.P; j0 += pl.L) {
        const int j = j0 + pl.j;
        const int64_t base = tg.n * C * S + tg.s0 + j;
        for (int k0 = 0; k0 < K; k0 += KB) {
          acc_t acc[KB];
          if (j < tg.P) {
            dtau_sums<scalar_t, acc_t, KB>(p, x + base, gr + base, S, pl.c0, pl.c1, 1, k0, acc);
          } else {
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
          }
          combine_channel_groups<acc_t, KB>(pl, j < tg.P, K, k0, acc, red,
                                            [&](int kk, acc_t total) {
                                              dl[(k0 + kk) * len + j] = total - ev[k0 + kk];
                                            });
        }
      }
    }
    __syncthreads();
    // dl = tau (dtau - sum_j tau_j dtau_j), a thread per position
    for (int j = threadIdx.x; j < tg.P; j += kThreads) {
      acc_t dot = 0;
      for (int k = 0; k < K; ++k)
        dot += ts[tau_index(inter, j, k, K, len)] * dl[tau_index(inter, j, k, K, len)];
      for (int k = 0; k < K; ++k) {
        const int i = tau_index(inter, j, k, K, len);
        dl[i] = ts[i] * (dl[i] - dot);
      }
    }
    __syncthreads();
    // dx over the tile, V values at a time along its rows
    if (inter) {
      const int64_t base = tg.p0 * C;
      for (int64_t i = threadIdx.x; i * V < tg.P * C; i += kThreads) {
        const int64_t e = i * V;
        const DivMod jc = tile_divmod(e, C);
        const int j = static_cast<int>(jc.q);
        grad_input_vector<scalar_t, acc_t, V, true>(
            p, x, gr, dx, base + e, jc.r, false, [&](int k, int) { return ts[j * K + k]; },
            [&](int k, int) { return dl[j * K + k]; });
      }
    } else {
      const int per_row = tg.P / V;  // V divides the tile's positions (host's choice)
      for (int64_t i = threadIdx.x; i < C * per_row; i += kThreads) {
        const DivMod cj = tile_divmod(i, per_row);
        const int64_t c = cj.q;
        const int j = static_cast<int>(cj.r) * V;
        grad_input_vector<scalar_t, acc_t, V, true>(
            p, x, gr, dx, (tg.n * C + c) * S + tg.s0 + j, c, true,
            [&](int k, int v) { return smem_vec_value<V>(ts + k * len + j, v); },
            [&](int k, int v) { return smem_vec_value<V>(dl + k * len + j, v); });
      }
    }
    __syncthreads();  // ts and dl are reused by the next tile
  }
}

// Given (one-hot) or single responsibilities: element-wise over the whole tensor, V values
// at a time (grid-stride: every thread busy whatever the row length). tau: null for K = 1.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) grad_input_given_kernel(GradInputParams<acc_t> p,
                                                                    bool interleaved,
                                                                    int64_t total) {
  const int64_t C = p.C, S = p.S, K = p.K;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  scalar_t* dx = static_cast<scalar_t*>(p.dx);
  const acc_t* tau = p.tau;
  const auto none = [](int, int) { return acc_t(0); };
  const bool narrow = narrow_indices(total);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i * V < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i * V;
    if (interleaved) {
      const DivMod pc = divmod(e, C, narrow);
      const int64_t pos = pc.q;
      grad_input_vector<scalar_t, acc_t, V, false>(
          p, x, gr, dx, e, pc.r, false,
          [&](int k, int) { return tau ? tau[pos * K + k] : acc_t(1); }, none);
    } else {
      const DivMod rs = divmod(e, S, narrow), nc = divmod(rs.q, C, narrow);
      const int64_t s = rs.r, c = nc.r, n = nc.q;
      grad_input_vector<scalar_t, acc_t, V, false>(
          p, x, gr, dx, e, c, true,
          [&](int k, int v) { return tau ? tau[(n * K + k) * S + s + v] : acc_t(1); }, none);
    }
  }
}

template <typename scalar_t>
bool vectorizable(const void* a, const void* b, const void* c, int64_t row) {
  return row % kVec<scalar_t> == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

}  // namespace

// Sg, Sgx over this input's positions: a row of partials per block (its tiles added in
// order), the rows summed in a fixed-order tree.
std::tuple<Tensor, Tensor> CudaBackend::grad_sums(const BackwardSetup& st, const Tensor& tau,
                                                  const Tensor& mean) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t K = st.K, C = shape.C, n = K * C;
  Tensor sum_g = at::empty({K, C}, aopt), sum_gx = at::empty({K, C}, aopt);
  const Tensor m = mean.contiguous();
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_grad_sums_cuda", [&] {
    // one pass over each tile: no re-read to keep in cache
    const Tiles tiles = plan_tiles(shape, K, sizeof(acc_t), 0, true);
    if (tiles.num == 0) {  // no positions: zero sums
      sum_g.zero_();
      sum_gx.zero_();
      return;
    }
    const int64_t rows = partial_rows(tiles.num);
    const int64_t G = reduce_groups(rows, n);
    // the blocks' partials (Sg | Sgx), then, with several chunks, their sums (Sg | Sgx)
    const Tensor parts = at::empty({2 * rows * n + (G > 1 ? 2 * G * n : 0)}, aopt);
    acc_t* part_sg = parts.data_ptr<acc_t>();
    acc_t* part_sgx = part_sg + rows * n;
    GradStatsParams<acc_t> gp{};
    gp.grad = st.grad.data_ptr();
    gp.x = x.data_ptr();
    gp.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr<acc_t>();
    gp.mean = m.data_ptr<acc_t>();
    gp.part_sg = part_sg;
    gp.part_sgx = part_sgx;
    gp.geo = tile_params(shape, K, tiles);
    dispatch_kb<acc_t>(K, [&](auto kb) {
      constexpr int KB = decltype(kb)::value;
      const size_t smem = sizeof(acc_t) * (tiles.len * K + kThreads * 2 * KB);
      allow_smem(collect_grad_stats_kernel<scalar_t, acc_t, KB>, smem);
      CBN_LAUNCH_KERNEL(collect_grad_stats_kernel<scalar_t, acc_t, KB>, grid_1d(rows),
                        kThreads, smem, gp);
    });
    acc_t* out0 = G > 1 ? part_sgx + rows * n : sum_g.data_ptr<acc_t>();
    acc_t* out1 = G > 1 ? out0 + G * n : sum_gx.data_ptr<acc_t>();
    CBN_LAUNCH_KERNEL(reduce_tile_sums_kernel<acc_t>,
                      dim3(static_cast<unsigned>((n + kReduceCols - 1) / kReduceCols),
                           static_cast<unsigned>(G), 2u),
                      dim3(kReduceCols, kReduceRows), 0, part_sg, part_sgx, rows, n, out0,
                      out1);
    if (G > 1)
      CBN_LAUNCH_KERNEL(finish_sums_kernel<acc_t>, grid_for(n), kThreads, 0, out0, out1, G, n,
                        sum_g.data_ptr<acc_t>(), sum_gx.data_ptr<acc_t>());
  });
  return {sum_g, sum_gx};
}

// The backward's per-(k, c) coefficients; ev holds per-block parts (K, blocks).
GradCoefs CudaBackend::grad_coefs(const BackwardSetup& st, const OptTensor& weight,
                                  const OptTensor& bias, const Tensor& mean, const Tensor& var,
                                  const Tensor& count, const Tensor& mix_mean,
                                  const Tensor& mix_var, const Tensor& sum_g, const Tensor& sum_gx,
                                  double eps, bool batch_stats) {
  const auto aopt = st.x.options().dtype(st.acc);
  const int64_t K = st.K, C = st.shape.C;
  const bool soft = st.resp == Resp::kSoft;
  const int64_t ev_blocks = (C + kThreads - 1) / kThreads;
  GradCoefs cf = GradCoefs::make(K, C, ev_blocks, aopt);
  const Tensor v = var.contiguous();
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
  const Tensor n = count.defined() && count.numel() == K ? count.contiguous() : Tensor();
  const Tensor mm = soft ? mix_mean.contiguous() : Tensor();
  const Tensor mv = soft ? mix_var.contiguous() : Tensor();
  const Tensor sg = sum_g.defined() ? sum_g.contiguous() : Tensor();
  const Tensor sgx = sum_gx.defined() ? sum_gx.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(st.acc, "cbn_grad_coefs_cuda", [&] {
    using acc_t = scalar_t;
    CoefParams<acc_t> cp{};
    cp.sum_g = ptr_or_null<acc_t>(sg);
    cp.sum_gx = ptr_or_null<acc_t>(sgx);
    cp.weight = ptr_or_null<acc_t>(w);
    cp.bias = ptr_or_null<acc_t>(bb);
    cp.var = v.data_ptr<acc_t>();
    cp.count = ptr_or_null<acc_t>(n);
    cp.mix_mean = ptr_or_null<acc_t>(mm);
    cp.mix_var = ptr_or_null<acc_t>(mv);
    cp.eps = static_cast<acc_t>(eps);
    cp.batch_stats = batch_stats;
    cp.K = K;
    cp.C = C;
    cp.alpha = cf.row<acc_t>(GradCoefs::kAlpha);
    cp.beta = cf.row<acc_t>(GradCoefs::kBeta);
    cp.e1 = cf.row<acc_t>(GradCoefs::kE1);
    cp.e2 = cf.row<acc_t>(GradCoefs::kE2);
    cp.pc = cf.row<acc_t>(GradCoefs::kP);
    cp.a = cf.row<acc_t>(GradCoefs::kA);
    cp.mu = cf.row<acc_t>(GradCoefs::kMu);
    cp.dgamma = cf.dgamma.data_ptr<acc_t>();
    cp.dbeta = cf.dbeta.data_ptr<acc_t>();
    cp.ev_part = cf.ev<acc_t>();
    CBN_LAUNCH_KERNEL(grad_coefs_kernel<acc_t>,
                      dim3(static_cast<unsigned>(ev_blocks), static_cast<unsigned>(K)), kThreads,
                      0, cp);
  });
  return cf;
}

Tensor CudaBackend::grad_input(const BackwardSetup& st, const Tensor& tau, const Tensor& mean,
                               const GradCoefs& cf) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const int64_t K = st.K, C = shape.C;
  Tensor grad_input = empty_like_input(x);
  if (shape.M() == 0) return grad_input;
  const Tensor m = mean.contiguous();
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_grad_input_cuda", [&] {
    GradInputParams<acc_t> ip{};
    ip.grad = st.grad.data_ptr();
    ip.x = x.data_ptr();
    ip.dx = grad_input.data_ptr();
    ip.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr<acc_t>();
    ip.mean = m.data_ptr<acc_t>();
    ip.alpha = cf.row<acc_t>(GradCoefs::kAlpha);
    ip.beta = cf.row<acc_t>(GradCoefs::kBeta);
    ip.e1 = cf.row<acc_t>(GradCoefs::kE1);
    ip.e2 = cf.row<acc_t>(GradCoefs::kE2);
    ip.ev_part = cf.ev<acc_t>();
    ip.ev_blocks = cf.ev_cols;
    ip.pc = cf.row<acc_t>(GradCoefs::kP);
    ip.a = cf.row<acc_t>(GradCoefs::kA);
    ip.mu = cf.row<acc_t>(GradCoefs::kMu);
    ip.C = C;
    ip.S = shape.S;
    ip.K = K;
    const int64_t row = shape.interleaved ? C : shape.S;
    const bool vec = vectorizable<scalar_t>(x.data_ptr(), st.grad.data_ptr(),
                                            grad_input.data_ptr(), row);
    if (st.resp == Resp::kSoft) {
      const Tiles tiles = plan_tiles(shape, K, sizeof(acc_t), 2 * sizeof(scalar_t), false);
      ip.geo = tile_params(shape, K, tiles);
      // Planar tiles read tau and dl from shared memory V at a time (smem_vec_value): that
      // needs V to divide the tile length, so that every row of ts and dl (len values)
      // and every V-th position stays 16-byte aligned. Checked only by the emulated build.
      const bool tile_vec = vec && (shape.interleaved || tiles.len % kVec<scalar_t> == 0);
      dispatch_kb<acc_t>(K, [&](auto kb) {
        constexpr int KB = decltype(kb)::value;
        const size_t smem = sizeof(acc_t) * (2 * tiles.len * K + kThreads * KB + K);
        const auto run = [&](auto vv) {
          constexpr int V = decltype(vv)::value;
          allow_smem(grad_input_soft_kernel<scalar_t, acc_t, KB, V>, smem);
          CBN_LAUNCH_KERNEL(grad_input_soft_kernel<scalar_t, acc_t, KB, V>, grid_1d(tiles.num),
                            kThreads, smem, ip);
        };
        if (tile_vec)
          run(std::integral_constant<int, kVec<scalar_t>>{});
        else
          run(std::integral_constant<int, 1>{});
      });
    } else {
      const int64_t total = shape.M() * C;
      const auto run = [&](auto vv) {
        constexpr int V = decltype(vv)::value;
        CBN_LAUNCH_KERNEL(grad_input_given_kernel<scalar_t, acc_t, V>, grid_for(total / V),
                          kThreads, 0, ip, shape.interleaved, total);
      };
      if (vec)
        run(std::integral_constant<int, kVec<scalar_t>>{});
      else
        run(std::integral_constant<int, 1>{});
    }
  });
  return grad_input;
}

}  // namespace cuda
}  // namespace cbn_ext
