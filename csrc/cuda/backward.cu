// CUDA backward operators of cbn_ext: backward_train and backward_eval.
//
// One reduction pass: per tile, Sg = sum g tau and Sgx = sum g tau (x - m) per (k, c),
// merged in tile order by the kernel that forms the per-(k, c) gradient coefficients
// (cbn_math.h). One element-wise pass: for soft responsibilities, dtau per position
// (a reduction over channels), dl = tau (dtau - sum tau dtau), then
// dx = g A + x B + E with A, B, E summed over components.
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
  acc_t* part_sg;     // (tiles, K, C)
  acc_t* part_sgx;    // (tiles, K, C)
  TileParams geo;
};

// Dynamic shared memory: ts (len x K) | red (kThreads x 2 KB).
template <typename scalar_t, typename acc_t, int KB>
__global__ void __launch_bounds__(kThreads) collect_grad_stats_kernel(GradStatsParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ts);
  acc_t* red = ts + p.geo.len * p.geo.K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.geo.K), len = static_cast<int>(p.geo.len);
  const int64_t C = p.geo.C, S = p.geo.S;
  const int64_t t = blockIdx.x;
  const bool one = p.tau == nullptr;
  const TileGeo tg = tile_geo(p.geo.interleaved, t, p.geo.len, p.geo.chunks, p.geo.N * p.geo.S, S);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  if (!one) {
    if (p.geo.interleaved) {
      const acc_t* in = p.tau + tg.p0 * K;
      for (int i = threadIdx.x; i < tg.P * K; i += kThreads) ts[i] = in[i];
    } else {
      for (int i = threadIdx.x; i < tg.P * K; i += kThreads) {
        const int k = i / tg.P, j = i % tg.P;
        ts[k * len + j] = p.tau[(tg.n * K + k) * S + tg.s0 + j];
      }
    }
  }
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
          red[threadIdx.x * 2 * KB + kk] = sg[kk];
          red[threadIdx.x * 2 * KB + KB + kk] = sgx[kk];
        }
        __syncthreads();
        if (g == 0 && c < C) {
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const int64_t o = (t * K + k0 + kk) * C + c;
              p.part_sg[o] = sum_groups(red, cg, 2 * KB, kk);
              p.part_sgx[o] = sum_groups(red, cg, 2 * KB, KB + kk);
            }
          }
        }
        __syncthreads();
      }
    }
  } else {
    for (int64_t c = warp; c < C; c += kWarps) {
      const int64_t base = (tg.n * C + c) * S + tg.s0;
      for (int k0 = 0; k0 < K; k0 += KB) {
        acc_t sg[KB], sgx[KB], m[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          sg[kk] = sgx[kk] = acc_t(0);
          m[kk] = k0 + kk < K ? p.mean[(k0 + kk) * C + c] : acc_t(0);
        }
        for (int j = lane; j < tg.P; j += 32) {
          const acc_t gv = static_cast<acc_t>(gr[base + j]);
          const acc_t xv = static_cast<acc_t>(x[base + j]);
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
              const int64_t o = (t * K + k0 + kk) * C + c;
              p.part_sg[o] = a;
              p.part_sgx[o] = b;
            }
          }
        }
      }
    }
  }
}

// The tile partials summed in tile order: out[i] = sum_t part[t, i].
template <typename acc_t>
__global__ void sum_tiles_kernel(const acc_t* __restrict__ part, int64_t tiles, int64_t n,
                                 acc_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc_t s = 0;
  for (int64_t t = 0; t < tiles; ++t) s += part[t * n + i];
  out[i] = s;
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
  const acc_t* mean;
  const acc_t* mix_mean;  // soft responsibilities only
  const acc_t* mix_var;
  acc_t eps;
  bool batch_stats;
  int64_t K, C;
  acc_t *alpha, *beta, *e1, *e2, *pc, *qc, *a, *amu, *dgamma, *dbeta, *ev_part;
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
    const auto dc = math::dx_coefs<acc_t>(gc.alpha, gc.e1, gc.e2, p.mean[i], a,
                                          p.mix_mean ? p.mix_mean[i] : acc_t(0));
    p.alpha[i] = gc.alpha;
    p.beta[i] = p.bias ? p.bias[i] : acc_t(0);
    p.e1[i] = gc.e1;
    p.e2[i] = gc.e2;
    p.pc[i] = dc.p;
    p.qc[i] = dc.q;
    p.a[i] = dc.a;
    p.amu[i] = dc.amu;
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
  // dx = g A + x B + E: alpha, p, q (and a, amu for soft)
  const acc_t *pc, *qc, *a, *amu;
  int64_t N, C, S, K;
};

// ev_k = sum of the per-block parts, in order.
template <typename acc_t>
__device__ __forceinline__ void load_ev(const GradInputParams<acc_t>& p, acc_t* ev) {
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    acc_t s = 0;
    for (int64_t i = 0; i < p.ev_blocks; ++i) s += p.ev_part[k * p.ev_blocks + i];
    ev[k] = s;
  }
  __syncthreads();
}

// Soft, interleaved: a warp per position. Shared memory: ev (K) | per warp dtau/dl (K)
// and tau (K).
template <typename scalar_t, typename acc_t, int KB>
__global__ void __launch_bounds__(kThreads) grad_input_soft_interleaved_kernel(
    GradInputParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ev);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(p.K);
  acc_t* dl = ev + K + warp * 2 * K;
  acc_t* tw = dl + K;
  const int64_t C = p.C, M = p.N * p.S;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  scalar_t* dx = static_cast<scalar_t*>(p.dx);
  load_ev(p, ev);
  for (int64_t pos = static_cast<int64_t>(blockIdx.x) * kWarps + warp; pos < M;
       pos += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* xr = x + pos * C;
    const scalar_t* grr = gr + pos * C;
    for (int k0 = 0; k0 < K; k0 += KB) {
      acc_t acc[KB];
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t xv = static_cast<acc_t>(xr[c]), gv = static_cast<acc_t>(grr[c]);
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          if (k0 + kk < K) {
            const int64_t o = (k0 + kk) * C + c;
            acc[kk] += math::dtau_term(gv, xv - p.mean[o], p.alpha[o], p.beta[o], p.e1[o], p.e2[o]);
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const acc_t total = warp_sum(acc[kk]);
        if (lane == 0 && k0 + kk < K) dl[k0 + kk] = total - ev[k0 + kk];
      }
    }
    __syncwarp();
    if (lane == 0) {
      acc_t dot = 0;
      for (int k = 0; k < K; ++k) {
        tw[k] = p.tau[pos * K + k];
        dot += tw[k] * dl[k];
      }
      for (int k = 0; k < K; ++k) dl[k] = tw[k] * (dl[k] - dot);
    }
    __syncwarp();
    for (int64_t c = lane; c < C; c += 32) {
      acc_t A = 0, B = 0, E = 0;
      for (int k = 0; k < K; ++k) {
        const int64_t o = k * C + c;
        math::dx_accumulate(tw[k], dl[k], p.alpha[o], p.pc[o], p.qc[o], p.a[o], p.amu[o], A, B, E);
      }
      dx[pos * C + c] = static_cast<scalar_t>(
          math::dx_combine(static_cast<acc_t>(grr[c]), static_cast<acc_t>(xr[c]), A, B, E));
    }
    __syncwarp();
  }
}

// Soft, planar: a thread per position, channels in sequence (coalesced across the warp).
// Shared memory: ev (K) | dtau/dl (K x kThreads) | tau (K x kThreads).
template <typename scalar_t, typename acc_t, int KB>
__global__ void __launch_bounds__(kThreads) grad_input_soft_planar_kernel(GradInputParams<acc_t> p) {
  CBN_DYNAMIC_SMEM(acc_t, ev);
  const int K = static_cast<int>(p.K);
  acc_t* dl = ev + K;
  acc_t* tw = dl + K * kThreads;
  const int tid = threadIdx.x;
  const int64_t C = p.C, S = p.S, M = p.N * p.S;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  scalar_t* dx = static_cast<scalar_t*>(p.dx);
  load_ev(p, ev);
  for (int64_t pos = static_cast<int64_t>(blockIdx.x) * kThreads + tid; pos < M;
       pos += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = pos / S, s = pos % S;
    const int64_t base = n * C * S + s;
    for (int k0 = 0; k0 < K; k0 += KB) {
      acc_t tot[KB];
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) tot[kk] = acc_t(0);
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {  // blocked over channels
        const int64_t c1 = c0 + kChannelBlock < C ? c0 + kChannelBlock : C;
        acc_t acc[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) acc[kk] = acc_t(0);
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t xv = static_cast<acc_t>(x[base + c * S]);
          const acc_t gv = static_cast<acc_t>(gr[base + c * S]);
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (k0 + kk < K) {
              const int64_t o = (k0 + kk) * C + c;
              acc[kk] +=
                  math::dtau_term(gv, xv - p.mean[o], p.alpha[o], p.beta[o], p.e1[o], p.e2[o]);
            }
          }
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) tot[kk] += acc[kk];
      }
#pragma unroll
      for (int kk = 0; kk < KB; ++kk)
        if (k0 + kk < K) dl[(k0 + kk) * kThreads + tid] = tot[kk] - ev[k0 + kk];
    }
    acc_t dot = 0;
    for (int k = 0; k < K; ++k) {
      const acc_t tk = p.tau[(n * K + k) * S + s];
      tw[k * kThreads + tid] = tk;
      dot += tk * dl[k * kThreads + tid];
    }
    for (int k = 0; k < K; ++k)
      dl[k * kThreads + tid] = tw[k * kThreads + tid] * (dl[k * kThreads + tid] - dot);
    for (int64_t c = 0; c < C; ++c) {
      acc_t A = 0, B = 0, E = 0;
      for (int k = 0; k < K; ++k) {
        const int64_t o = k * C + c;
        math::dx_accumulate(tw[k * kThreads + tid], dl[k * kThreads + tid], p.alpha[o], p.pc[o],
                            p.qc[o], p.a[o], p.amu[o], A, B, E);
      }
      const int64_t e = base + c * S;
      dx[e] = static_cast<scalar_t>(math::dx_combine(static_cast<acc_t>(gr[e]),
                                                     static_cast<acc_t>(x[e]), A, B, E));
    }
  }
}

// Given (one-hot) or single responsibilities: element-wise, row by row (Rows).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_input_given_kernel(GradInputParams<acc_t> p,
                                                                    bool interleaved, Rows rows) {
  const int tx = threadIdx.x % rows.width, ty = threadIdx.x / rows.width;
  const int64_t C = p.C, S = p.S, K = p.K;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* gr = static_cast<const scalar_t*>(p.grad);
  scalar_t* dx = static_cast<scalar_t*>(p.dx);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows.per_block + ty; r < rows.count;
       r += static_cast<int64_t>(gridDim.x) * rows.per_block) {
    const int64_t base = r * rows.length;
    for (int64_t e = tx; e < rows.length; e += rows.width) {
      const int64_t c = interleaved ? e : r % C;
      acc_t A = 0, B = 0, E = 0;
      for (int64_t k = 0; k < K; ++k) {
        acc_t tk = 1;
        if (p.tau != nullptr)
          tk = interleaved ? p.tau[r * K + k] : p.tau[((r / C) * K + k) * S + e];
        const int64_t o = k * C + c;
        math::dx_accumulate(tk, p.alpha[o], p.pc[o], p.qc[o], A, B, E);
      }
      dx[base + e] = static_cast<scalar_t>(math::dx_combine(
          static_cast<acc_t>(gr[base + e]), static_cast<acc_t>(x[base + e]), A, B, E));
    }
  }
}

}  // namespace

// Sg, Sgx over this input's positions: per-tile partials, summed in tile order.
std::tuple<Tensor, Tensor> CudaBackend::grad_sums(const BackwardSetup& st, const Tensor& tau,
                                                  const Tensor& mean) {
  const Tensor& x = st.x;
  const Shape& shape = st.shape;
  const auto aopt = x.options().dtype(st.acc);
  const int64_t K = st.K, C = shape.C;
  Tensor sum_g = at::empty({K, C}, aopt), sum_gx = at::empty({K, C}, aopt);
  const Tensor m = mean.contiguous();
  CBN_DISPATCH_INPUT_TYPES(x.scalar_type(), "cbn_grad_sums_cuda", [&] {
    const Tiles tiles = plan_tiles(shape, K, sizeof(acc_t));
    if (tiles.num == 0) {  // no positions: zero sums
      sum_g.zero_();
      sum_gx.zero_();
      return;
    }
    Tensor part_sg = at::empty({tiles.num, K, C}, aopt);
    Tensor part_sgx = at::empty({tiles.num, K, C}, aopt);
    GradStatsParams<acc_t> gp{};
    gp.grad = st.grad.data_ptr();
    gp.x = x.data_ptr();
    gp.tau = st.resp == Resp::kOne ? nullptr : tau.data_ptr<acc_t>();
    gp.mean = m.data_ptr<acc_t>();
    gp.part_sg = part_sg.data_ptr<acc_t>();
    gp.part_sgx = part_sgx.data_ptr<acc_t>();
    gp.geo = tile_params(shape, K, tiles);
    dispatch_kb(K, [&](auto kb) {
      constexpr int KB = decltype(kb)::value;
      const size_t smem = sizeof(acc_t) * (tiles.len * K + kThreads * 2 * KB);
      allow_smem(collect_grad_stats_kernel<scalar_t, acc_t, KB>, smem);
      CBN_LAUNCH_KERNEL(collect_grad_stats_kernel<scalar_t, acc_t, KB>, grid_1d(tiles.num),
                        kThreads, smem, gp);
    });
    const int64_t n = K * C;
    for (auto pair : {std::make_pair(&part_sg, &sum_g), std::make_pair(&part_sgx, &sum_gx)}) {
      CBN_LAUNCH_KERNEL(sum_tiles_kernel<acc_t>, grid_1d((n + kThreads - 1) / kThreads),
                        kThreads, 0, pair.first->data_ptr<acc_t>(), tiles.num, n,
                        pair.second->data_ptr<acc_t>());
    }
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
  const Tensor m = mean.contiguous(), v = var.contiguous();
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
    cp.mean = m.data_ptr<acc_t>();
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
    cp.qc = cf.row<acc_t>(GradCoefs::kQ);
    cp.a = cf.row<acc_t>(GradCoefs::kA);
    cp.amu = cf.row<acc_t>(GradCoefs::kAmu);
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
    ip.qc = cf.row<acc_t>(GradCoefs::kQ);
    ip.a = cf.row<acc_t>(GradCoefs::kA);
    ip.amu = cf.row<acc_t>(GradCoefs::kAmu);
    ip.N = shape.N;
    ip.C = C;
    ip.S = shape.S;
    ip.K = K;
    const int sms = num_sms();
    if (st.resp == Resp::kSoft) {
      dispatch_kb(K, [&](auto kb) {
        constexpr int KB = decltype(kb)::value;
        if (shape.interleaved) {
          const size_t smem = sizeof(acc_t) * (K + kWarps * 2 * K);
          allow_smem(grad_input_soft_interleaved_kernel<scalar_t, acc_t, KB>, smem);
          const int64_t blocks = std::min<int64_t>((shape.M() + kWarps - 1) / kWarps, 32 * sms);
          CBN_LAUNCH_KERNEL(grad_input_soft_interleaved_kernel<scalar_t, acc_t, KB>,
                            grid_1d(blocks), kThreads, smem, ip);
        } else {
          const size_t smem = sizeof(acc_t) * (K + 2 * K * kThreads);
          allow_smem(grad_input_soft_planar_kernel<scalar_t, acc_t, KB>, smem);
          const int64_t blocks = std::min<int64_t>((shape.M() + kThreads - 1) / kThreads, 32 * sms);
          CBN_LAUNCH_KERNEL(grad_input_soft_planar_kernel<scalar_t, acc_t, KB>, grid_1d(blocks),
                            kThreads, smem, ip);
        }
      });
    } else {
      const Rows rows = plan_rows(shape);
      CBN_LAUNCH_KERNEL(grad_input_given_kernel<scalar_t, acc_t>, grid_1d(rows_grid(rows)),
                        kThreads, 0, ip, shape.interleaved, rows);
    }
  });
  return grad_input;
}

}  // namespace cuda
}  // namespace cbn_ext
