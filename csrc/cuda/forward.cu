// CUDA forward operators of cbn_ext: forward_train, forward_eval, update_running_stats.
//
// forward_train: one kernel reads each tile of x to compute the responsibilities (E-step,
// or the given groups) and the tile's per-(k, c) weighted count, mean and M2 (M-step),
// the tile re-read from L2 for its second pass; a second kernel merges the tile
// partials in tile order (Chan's count-weighted formula) into the batch statistics and
// the affine coefficients; a third normalizes, y = sum_k tau_k (alpha_kc x + delta_kc).
// forward_eval: the responsibilities (same kernel, no moments), then the normalization.
// The math is that of csrc/cbn_math.h, as on the CPU.
#include "cuda_backend.h"
#include "cuda_utils.cuh"

#include <tuple>

namespace cbn_ext {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// E-step coefficients: 1/2 a = 1/2 / (var + eps) per (k, c) and
// b_k = log(max(prior_k, 1e-6)) - 1/2 sum_c log(var_kc + eps). One block per component.
// ---------------------------------------------------------------------------------------

// With copy_mean not null, also copies of the mixture (mean, var, prior), in the same pass.
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
// Responsibilities of a tile into shared memory (and tau), then optionally its moments.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct StatsParams {
  const void* x;
  acc_t* tau;              // (layout of x, C -> K); null for K = 1
  const int64_t* groups;   // (N,), given responsibilities
  const acc_t* mu;         // E-step mixture mean (K, C)
  const acc_t* half_a;     // (K, C)
  const acc_t* b;          // (K,)
  acc_t* part_n;           // (tiles, K)
  acc_t* part_mean;        // (tiles, K, C)
  acc_t* part_m2;          // (tiles, K, C)
  TileParams geo;
  Resp resp;
};

// ts: the tile's responsibilities (tau_index layout). Writes them to p.tau too.
template <typename scalar_t, typename acc_t, int KB>
__device__ void tile_responsibilities(const StatsParams<acc_t>& p, const TileGeo& tg, acc_t* ts) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  if (p.resp == Resp::kGiven) {
    for (int i = threadIdx.x; i < tg.P * K; i += kThreads) {
      const int j = i / K, k = i % K;
      const int64_t n = p.geo.interleaved ? (tg.p0 + j) / S : tg.n;
      const int64_t grp = p.groups[n];
      // the host does not read the ids (no sync): bad ones stop here, as in PyTorch's
      // index kernels
      CUDA_KERNEL_ASSERT(grp >= 0 && grp < K && "group ids must be in [0, K)");
      ts[tau_index(p.geo.interleaved, j, k, K, len)] = grp == k ? acc_t(1) : acc_t(0);
    }
  } else if (p.geo.interleaved) {
    // a warp per position, lanes over channels
    for (int j = warp; j < tg.P; j += kWarps) {
      const scalar_t* xr = x + (tg.p0 + j) * C;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t acc[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
        for (int64_t c = lane; c < C; c += 32) {
          const acc_t v = static_cast<acc_t>(xr[c]);
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const int64_t o = (k0 + kk) * C + c;
              acc[kk] += math::mahalanobis_term(v, p.mu[o], p.half_a[o]);
            }
          }
        }
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
    // a thread per position, channels in sequence (coalesced across the warp), blocked
    for (int j = threadIdx.x; j < tg.P; j += kThreads) {
      const scalar_t* xc = x + tg.n * C * S + tg.s0 + j;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t tot[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) tot[kk] = acc_t(0);
        for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
          const int64_t c1 = c0 + kChannelBlock < C ? c0 + kChannelBlock : C;
          acc_t acc[KB];
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t v = static_cast<acc_t>(xc[c * S]);
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) {
              if (k0 + kk < K) {
                const int64_t o = (k0 + kk) * C + c;
                acc[kk] += math::mahalanobis_term(v, p.mu[o], p.half_a[o]);
              }
            }
          }
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) tot[kk] += acc[kk];
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk)
          if (k0 + kk < K) ts[(k0 + kk) * len + j] = p.b[k0 + kk] - tot[kk];
      }
      math::softmax_in_place(ts + j, K, len, DevExp{});
    }
  }
  __syncthreads();
  // to tau, coalesced
  if (p.geo.interleaved) {
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

// Count, mean and M2 of the tile per (k, c), by two passes over the tile (the second
// from L2), so that no E[x^2] - E[x]^2 cancellation arises.
template <typename scalar_t, typename acc_t, int KB>
__device__ void tile_moments(const StatsParams<acc_t>& p, const TileGeo& tg, const acc_t* ts,
                             acc_t* cnt, acc_t* red, int64_t t) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const bool one = p.resp == Resp::kOne;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  // counts, in a fixed order
  for (int k = threadIdx.x; k < K; k += kThreads) {
    acc_t n = 0;
    if (one) {
      n = static_cast<acc_t>(tg.P);
    } else {
      for (int j = 0; j < tg.P; ++j) n += ts[tau_index(p.geo.interleaved, j, k, K, len)];
    }
    p.part_n[t * K + k] = n;
    cnt[k] = n;
  }
  __syncthreads();

  if (p.geo.interleaved) {
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
        for (int kk = 0; kk < KB; ++kk) red[threadIdx.x * KB + kk] = s1[kk];
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          mt[kk] = k0 + kk < K ? math::weighted_mean(sum_groups(red, cg, KB, kk), cnt[k0 + kk])
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
        for (int kk = 0; kk < KB; ++kk) red[threadIdx.x * KB + kk] = s1[kk];
        __syncthreads();
        if (g == 0 && c < C) {
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const int64_t o = (t * K + k0 + kk) * C + c;
              p.part_mean[o] = mt[kk];
              p.part_m2[o] = sum_groups(red, cg, KB, kk);
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
              const int64_t o = (t * K + k0 + kk) * C + c;
              p.part_mean[o] = mt[kk];
              p.part_m2[o] = m2;
            }
          }
        }
      }
    }
  }
}

// Dynamic shared memory: ts (len x K) | cnt (K) | red (kThreads x KB).
template <typename scalar_t, typename acc_t, int KB, bool kMoments>
__global__ void __launch_bounds__(kThreads) collect_mixture_stats_kernel(StatsParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  acc_t* cnt = ts + p.geo.len * p.geo.K;
  acc_t* red = cnt + p.geo.K;
  const int64_t t = blockIdx.x;
  const TileGeo tg = tile_geo(p.geo.interleaved, t, p.geo.len, p.geo.chunks, p.geo.N * p.geo.S, p.geo.S);
  if (p.resp != Resp::kOne) tile_responsibilities<scalar_t, acc_t, KB>(p, tg, ts);
  if constexpr (kMoments) tile_moments<scalar_t, acc_t, KB>(p, tg, ts, cnt, red, t);
}

// ---------------------------------------------------------------------------------------
// Merge of the tile partials (Chan, in tile order) into the batch statistics, with
// (replace_inactive) the mixture's for inactive components, and (alpha not null) the
// affine coefficients.
// Block (32 channels, 8 groups of tiles); grid (channel blocks, K).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
__global__ void __launch_bounds__(256) merge_moments_kernel(
    const acc_t* __restrict__ pn, const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
    int64_t tiles, int64_t K, int64_t C, const acc_t* __restrict__ mix_mean,
    const acc_t* __restrict__ mix_var, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, acc_t eps, acc_t* __restrict__ mean, acc_t* __restrict__ var,
    acc_t* __restrict__ count, acc_t* __restrict__ alpha, acc_t* __restrict__ delta,
    bool replace_inactive) {
  CBN_STATIC_SMEM(math::WeightedMoments<acc_t>[8][32], sm);
  const int64_t k = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int g = threadIdx.y;
  math::WeightedMoments<acc_t> acc{0, 0, 0};
  if (c < C) {
    for (int64_t t = g; t < tiles; t += 8) {
      const int64_t o = (t * K + k) * C + c;
      const math::WeightedMoments<acc_t> part{pn[t * K + k], pmean[o], pm2[o]};
      math::chan_merge(acc, part);
    }
  }
  sm[g][threadIdx.x] = acc;
  __syncthreads();
  if (g != 0 || c >= C) return;
  math::WeightedMoments<acc_t> r = sm[0][threadIdx.x];
  for (int gg = 1; gg < 8; ++gg) math::chan_merge(r, sm[gg][threadIdx.x]);
  const int64_t i = k * C + c;
  const bool keep = !replace_inactive || math::is_active(r.n);
  const acc_t m = keep ? r.mean : mix_mean[i];
  const acc_t v = keep ? (r.n > acc_t(0) ? r.m2 / r.n : acc_t(0)) : mix_var[i];
  mean[i] = m;
  var[i] = v;
  if (alpha != nullptr)
    math::affine_coefs(weight ? weight[i] : acc_t(1), bias ? bias[i] : acc_t(0), m, v, eps,
                       alpha[i], delta[i]);
  if (c == 0) count[k] = r.n;
}

// alpha, delta from given statistics (evaluation).
template <typename acc_t>
__global__ void affine_coefs_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                    const acc_t* __restrict__ weight,
                                    const acc_t* __restrict__ bias, acc_t eps, int64_t n,
                                    acc_t* __restrict__ alpha, acc_t* __restrict__ delta) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  math::affine_coefs(weight ? weight[i] : acc_t(1), bias ? bias[i] : acc_t(0), mean[i], var[i],
                     eps, alpha[i], delta[i]);
}

// ---------------------------------------------------------------------------------------
// Normalization: y = sum_k tau_k (alpha_kc x + delta_kc), row by row (Rows).
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) normalize_mixture_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ tau,
    const acc_t* __restrict__ alpha, const acc_t* __restrict__ delta, int64_t C, int64_t S,
    int64_t K, bool interleaved, Rows rows) {
  const int tx = threadIdx.x % rows.width, ty = threadIdx.x / rows.width;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows.per_block + ty; r < rows.count;
       r += static_cast<int64_t>(gridDim.x) * rows.per_block) {
    const scalar_t* xr = x + r * rows.length;
    scalar_t* yr = y + r * rows.length;
    if (interleaved) {
      const acc_t* tr = tau + r * K;
      for (int64_t c = tx; c < C; c += rows.width) {
        const acc_t v = static_cast<acc_t>(xr[c]);
        acc_t out = 0;
        for (int64_t k = 0; k < K; ++k)
          out += (tau ? tr[k] : acc_t(1)) * math::normalize_term(v, alpha[k * C + c], delta[k * C + c]);
        yr[c] = static_cast<scalar_t>(out);
      }
    } else {
      const int64_t n = r / C, c = r % C;
      const acc_t* tr = tau ? tau + n * K * S : nullptr;
      for (int64_t s = tx; s < S; s += rows.width) {
        const acc_t v = static_cast<acc_t>(xr[s]);
        acc_t out = 0;
        for (int64_t k = 0; k < K; ++k)
          out += (tr ? tr[k * S + s] : acc_t(1)) *
                 math::normalize_term(v, alpha[k * C + c], delta[k * C + c]);
        yr[s] = static_cast<scalar_t>(out);
      }
    }
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
  out.half_a = at::empty_like(var);
  out.b = at::empty({K}, var.options());
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

template <typename scalar_t, typename acc_t, bool kMoments>
void launch_stats(const StatsParams<acc_t>& p, const Tiles& tiles) {
  dispatch_kb(p.geo.K, [&](auto kb) {
    constexpr int KB = decltype(kb)::value;
    const size_t smem = sizeof(acc_t) * (p.geo.len * p.geo.K + p.geo.K + kThreads * KB);
    allow_smem(collect_mixture_stats_kernel<scalar_t, acc_t, KB, kMoments>, smem);
    CBN_LAUNCH_KERNEL(collect_mixture_stats_kernel<scalar_t, acc_t, KB, kMoments>,
                      grid_1d(tiles.num), kThreads, smem, p);
  });
}

template <typename scalar_t, typename acc_t>
void launch_normalize(const Tensor& x, Tensor& y, const Tensor& tau, const Tensor& alpha,
                      const Tensor& delta, const Shape& s, int64_t K) {
  const Rows rows = plan_rows(s);
  CBN_LAUNCH_KERNEL(normalize_mixture_kernel<scalar_t, acc_t>, grid_1d(rows_grid(rows)), kThreads,
                    0, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                    tau.defined() && tau.numel() > 0 ? tau.data_ptr<acc_t>() : nullptr,
                    alpha.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), s.C, s.S, K,
                    s.interleaved, rows);
}

}  // namespace

BatchStats CudaBackend::batch_stats(const TrainSetup& st, const OptTensor& groups, int64_t K,
                                    double eps, bool replace_inactive, const OptTensor& weight,
                                    const OptTensor& bias) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t C = shape.C;
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
  const Tiles tiles = plan_tiles(shape, K, st.acc == at::kDouble ? 8 : 4);
  Tensor part_n = at::empty({tiles.num, K}, aopt);
  Tensor part_mean = at::empty({tiles.num, K, C}, aopt);
  Tensor part_m2 = at::empty({tiles.num, K, C}, aopt);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  const Tensor mix_mean = st.mix_mean.contiguous(), mix_var = st.mix_var.contiguous();
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_batch_stats_cuda", [&] {
    EstepCoefs ec;
    if (st.resp == Resp::kSoft)
      ec = estep_coefs<acc_t>(mix_mean, mix_var, st.mix_prior, eps, /*copy=*/!st.mix_owned);
    mix_outputs(st, out, ec.mean_copy, ec.var_copy, ec.prior_copy);
    const Tensor& mu = ec.mu;
    const Tensor& ha = ec.half_a;
    const Tensor& b = ec.b;
    if (tiles.num > 0) {
      StatsParams<acc_t> p{};
      p.x = x.data_ptr();
      p.tau = out.tau.numel() > 0 ? out.tau.data_ptr<acc_t>() : nullptr;
      p.groups = ptr_or_null<int64_t>(grp);
      p.mu = ptr_or_null<acc_t>(mu);
      p.half_a = ptr_or_null<acc_t>(ha);
      p.b = ptr_or_null<acc_t>(b);
      p.part_n = part_n.data_ptr<acc_t>();
      p.part_mean = part_mean.data_ptr<acc_t>();
      p.part_m2 = part_m2.data_ptr<acc_t>();
      p.geo = tile_params(shape, K, tiles);
      p.resp = st.resp;
      launch_stats<scalar_t, acc_t, true>(p, tiles);
    }
    const dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>(K));
    CBN_LAUNCH_KERNEL(merge_moments_kernel<acc_t>, grid, dim3(32, 8), 0,
                      part_n.data_ptr<acc_t>(), part_mean.data_ptr<acc_t>(),
                      part_m2.data_ptr<acc_t>(), tiles.num, K, C, mix_mean.data_ptr<acc_t>(),
                      mix_var.data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(bb),
                      static_cast<acc_t>(eps), out.mean.data_ptr<acc_t>(),
                      out.var.data_ptr<acc_t>(), out.count.data_ptr<acc_t>(),
                      mut_ptr_or_null<acc_t>(out.alpha), mut_ptr_or_null<acc_t>(out.delta),
                      replace_inactive);
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
      alpha = at::empty({K, C}, aopt);
      delta = at::empty({K, C}, aopt);
      const int64_t n = K * C;
      CBN_LAUNCH_KERNEL(affine_coefs_kernel<acc_t>, grid_1d((n + kThreads - 1) / kThreads),
                        kThreads, 0, m.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
                        ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(bb), static_cast<acc_t>(eps), n,
                        alpha.data_ptr<acc_t>(), delta.data_ptr<acc_t>());
    }
    launch_normalize<scalar_t, acc_t>(x, out, st.resp == Resp::kOne ? Tensor() : tau, alpha,
                                      delta, st.shape, K);
  });
  return out;
}

// The responsibilities (written to tau), then the normalization with running statistics.
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
  if (shape.M() == 0) return {empty_like_input(x), tau};
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  const Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
  if (st.resp != Resp::kOne) {
    CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_forward_eval_cuda", [&] {
      EstepCoefs ec;
      if (st.resp == Resp::kSoft) ec = estep_coefs<acc_t>(rm, rv, *running_prior, eps, false);
      const Tensor& mu = ec.mu;
      const Tensor& ha = ec.half_a;
      const Tensor& b = ec.b;
      const Tiles tiles = plan_tiles(shape, K, sizeof(acc_t));
      StatsParams<acc_t> p{};
      p.x = x.data_ptr();
      p.tau = tau.data_ptr<acc_t>();
      p.groups = ptr_or_null<int64_t>(grp);
      p.mu = ptr_or_null<acc_t>(mu);
      p.half_a = ptr_or_null<acc_t>(ha);
      p.b = ptr_or_null<acc_t>(b);
      p.geo = tile_params(shape, K, tiles);
      p.resp = st.resp;
      launch_stats<scalar_t, acc_t, false>(p, tiles);
    });
  }
  const ApplySetup ap{x, shape, st.resp, st.acc, K};
  return {normalize(ap, groups, weight, bias, tau, rm, rv, eps, Tensor(), Tensor()), tau};
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
