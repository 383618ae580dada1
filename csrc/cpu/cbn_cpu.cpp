// The CPU backend of the cbn_ext operators (composed in csrc/cbn_ops.h): the small
// per-(k, c) steps (E-step coefficients, merging per-tile partials, affine and gradient
// coefficients, running update) and the calls into the fused kernels of the instruction
// set this processor supports.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../cbn_common.h"
#include "../cbn_math.h"
#include "../cbn_ops.h"
#include "cpu_kernels.h"

namespace cbn_ext {
namespace cpu {

TilePlan make_tile_plan(const Geometry& g) {
  // About 16k elements (64 KiB of float) per tile: the kernels pass over a tile two or
  // three times while it sits in the L2 cache.
  constexpr int64_t kTileElems = 16384;
  TilePlan p{};
  const int64_t M = g.N * g.S;
  if (M == 0) return p;
  if (g.interleaved) {
    int64_t len = kTileElems / std::max<int64_t>(g.C, 1);
    len = std::max<int64_t>(16, std::min<int64_t>(len, 4096));
    p.len = len;
    p.segs = 1;
    p.chunks = 1;
    p.num_tiles = (M + len - 1) / len;
    return p;
  }
  const int64_t per_sample = g.S * g.C;
  const int64_t target_len = std::max<int64_t>(64, kTileElems / std::max<int64_t>(g.C, 1));
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

namespace {

// ---------------------------------------------------------------------------------------
// Which compiled variant of the kernels runs on this processor.
// ---------------------------------------------------------------------------------------

bool use_avx2() {
#if defined(CBN_HAVE_AVX2_KERNELS)
  static const bool ok = [] {
    const char* env = std::getenv("CBN_EXT_CPU_ISA");
    if (env != nullptr && std::string(env) == "baseline") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

#if defined(CBN_HAVE_AVX2_KERNELS)
#define CBN_CALL_KERNEL(name, args) \
  (use_avx2() ? ::cbn_ext::cpu::avx2::name(args) : ::cbn_ext::cpu::baseline::name(args))
#else
#define CBN_CALL_KERNEL(name, args) ::cbn_ext::cpu::baseline::name(args)
#endif

Geometry geometry_of(const Shape& s) { return Geometry{s.N, s.C, s.S, s.interleaved}; }

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// E-step coefficients of the mixture: mu, 1/2 a = 1/2 / (var + eps),
// b_k = log(max(prior_k, 1e-6)) - 1/2 sum_c log(var_kc + eps).
std::tuple<Tensor, Tensor, Tensor> estep_coefs(const Tensor& mix_mean, const Tensor& mix_var,
                                               const Tensor& mix_prior, double eps) {
  const int64_t K = mix_mean.size(0), C = mix_mean.size(1);
  Tensor mu = mix_mean.contiguous();
  Tensor ha = at::empty_like(mu);
  Tensor b = at::empty({K}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "cbn_estep_coefs", [&] {
    const Tensor var = mix_var.contiguous();
    const Tensor prior = mix_prior.contiguous();
    const scalar_t* v = var.data_ptr<scalar_t>();
    const scalar_t* pr = prior.data_ptr<scalar_t>();
    scalar_t* h = ha.data_ptr<scalar_t>();
    scalar_t* bb = b.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t k = 0; k < K; ++k) {
      scalar_t acc = math::log_prior(pr[k]);
      for (int64_t c = 0; c < C; ++c) {
        h[k * C + c] = math::half_precision(v[k * C + c], e);
        acc += math::neg_half_log_var(v[k * C + c], e);
      }
      bb[k] = acc;
    }
  });
  return {mu, ha, b};
}

// alpha = gamma r, delta = beta - alpha m (K x C).
std::tuple<Tensor, Tensor> affine_coefs(const OptTensor& weight, const OptTensor& bias,
                                        const Tensor& mean, const Tensor& var, double eps) {
  const int64_t K = mean.size(0), C = mean.size(1);
  Tensor alpha = at::empty({K, C}, mean.options());
  Tensor delta = at::empty({K, C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbn_affine_coefs", [&] {
    const Tensor m = mean.contiguous(), v = var.contiguous();
    const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
    const Tensor bb = defined(bias) ? bias->contiguous() : Tensor();
    const scalar_t* pm = m.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pw = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb = bb.defined() ? bb.data_ptr<scalar_t>() : nullptr;
    scalar_t* pa = alpha.data_ptr<scalar_t>();
    scalar_t* pd = delta.data_ptr<scalar_t>();
    for (int64_t i = 0; i < K * C; ++i) {
      math::affine_coefs<scalar_t>(pw ? pw[i] : scalar_t(1), pb ? pb[i] : scalar_t(0), pm[i],
                                   pv[i], static_cast<scalar_t>(eps), pa[i], pd[i]);
    }
  });
  return {alpha, delta};
}

// Merge the per-tile partials in tile order: biased mean and variance per (k, c) and the
// count per k. replace_inactive: inactive components (count <= 1) take the mixture's
// statistics; else the raw moments are kept (0 for an empty component).
void merge_moments(const Tensor& part_n, const Tensor& part_mean, const Tensor& part_m2,
                   const Tensor& mix_mean, const Tensor& mix_var, Tensor& mean, Tensor& var,
                   Tensor& count, bool replace_inactive) {
  const int64_t tiles = part_n.size(0), K = part_n.size(1), C = part_mean.size(2);
  AT_DISPATCH_FLOATING_TYPES(part_mean.scalar_type(), "cbn_merge_moments", [&] {
    const scalar_t* pn = part_n.data_ptr<scalar_t>();
    const scalar_t* pmean = part_mean.data_ptr<scalar_t>();
    const scalar_t* pm2 = part_m2.data_ptr<scalar_t>();
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
    at::parallel_for(0, K * C, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = i / C, c = i % C;
        math::WeightedMoments<scalar_t> acc{0, 0, 0};
        for (int64_t t = 0; t < tiles; ++t) {
          const math::WeightedMoments<scalar_t> part{pn[t * K + k], pmean[(t * K + k) * C + c],
                                                     pm2[(t * K + k) * C + c]};
          math::chan_merge(acc, part);
        }
        if (!replace_inactive || math::is_active(on[k])) {
          om[i] = acc.mean;
          ov[i] = acc.n > scalar_t(0) ? acc.m2 / acc.n : scalar_t(0);
        } else {
          om[i] = pmm[i];
          ov[i] = pmv[i];
        }
      }
    });
  });
}

// Sum per-tile partial sums (tiles, K, C) in tile order.
Tensor sum_partials(const Tensor& part) {
  const int64_t tiles = part.size(0), KC = part.size(1) * part.size(2);
  Tensor out = at::zeros({part.size(1), part.size(2)}, part.options());
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "cbn_sum_partials", [&] {
    const scalar_t* p = part.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, KC, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t s = 0;
        for (int64_t t = 0; t < tiles; ++t) s += p[t * KC + i];
        o[i] = s;
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
  const TilePlan plan = make_tile_plan(geo);
  BatchStats out;
  out.tau = empty_tau(x, shape, K, st.acc);
  Tensor part_n = at::empty({plan.num_tiles, K}, aopt);
  Tensor part_mean = at::empty({plan.num_tiles, K, C}, aopt);
  Tensor part_m2 = at::empty({plan.num_tiles, K, C}, aopt);
  Tensor mu, ha, b;
  if (st.resp == Resp::kSoft)
    std::tie(mu, ha, b) = estep_coefs(st.mix_mean, st.mix_var, st.mix_prior, eps);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  StatsArgs sa{};
  sa.geo = geo;
  sa.plan = plan;
  sa.K = K;
  sa.resp = st.resp;
  sa.dtype = x.scalar_type();
  sa.x = x.data_ptr();
  sa.groups = grp.defined() ? grp.data_ptr<int64_t>() : nullptr;
  sa.mu = mu.defined() ? mu.data_ptr() : nullptr;
  sa.half_a = ha.defined() ? ha.data_ptr() : nullptr;
  sa.b = b.defined() ? b.data_ptr() : nullptr;
  sa.tau = out.tau.numel() > 0 ? out.tau.data_ptr() : nullptr;
  sa.part_n = part_n.data_ptr();
  sa.part_mean = part_mean.data_ptr();
  sa.part_m2 = part_m2.data_ptr();
  if (plan.num_tiles > 0) CBN_CALL_KERNEL(collect_mixture_stats, sa);
  out.mean = at::empty({K, C}, aopt);
  out.var = at::empty({K, C}, aopt);
  out.count = at::empty({K}, aopt);
  merge_moments(part_n, part_mean, part_m2, st.mix_mean, st.mix_var, out.mean, out.var, out.count,
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
  const TilePlan plan = make_tile_plan(geo);
  if (plan.num_tiles == 0) return out;
  Tensor alpha, delta;
  std::tie(alpha, delta) = affine_coefs(weight, bias, mean, var, eps);
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
  na.alpha = alpha.data_ptr();
  na.delta = delta.data_ptr();
  na.y = out.data_ptr();
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
  const TilePlan plan = make_tile_plan(geo);
  Tensor part_sg = at::empty({plan.num_tiles, K, C}, aopt);
  Tensor part_sgx = at::empty({plan.num_tiles, K, C}, aopt);
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
  ga.part_sg = part_sg.data_ptr();
  ga.part_sgx = part_sgx.data_ptr();
  if (plan.num_tiles > 0) CBN_CALL_KERNEL(collect_grad_stats, ga);
  return {sum_partials(part_sg), sum_partials(part_sgx)};
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
  GradCoefs out;
  out.alpha = at::empty({K, C}, aopt);
  out.e1 = at::empty({K, C}, aopt);
  out.e2 = at::empty({K, C}, aopt);
  out.ev = at::empty({K}, aopt);
  out.p = at::empty({K, C}, aopt);
  out.q = at::empty({K, C}, aopt);
  out.a = at::zeros({K, C}, aopt);
  out.amu = at::zeros({K, C}, aopt);
  out.dgamma = at::empty({K, C}, aopt);
  out.dbeta = at::empty({K, C}, aopt);
  out.beta = defined(bias) ? bias->contiguous() : at::zeros({K, C}, aopt);
  const bool soft = st.resp == Resp::kSoft;
  AT_DISPATCH_FLOATING_TYPES(st.acc, "cbn_grad_coefs", [&] {
    const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
    const Tensor v = var.contiguous(), m = mean.contiguous();
    const Tensor n = count.defined() && count.numel() == K ? count.contiguous() : Tensor();
    const Tensor mm = soft ? mix_mean.contiguous() : Tensor();
    const Tensor mv = soft ? mix_var.contiguous() : Tensor();
    const Tensor sg = sum_g.defined() ? sum_g.contiguous() : Tensor();
    const Tensor sgx = sum_gx.defined() ? sum_gx.contiguous() : Tensor();
    const scalar_t* pw = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pm = m.data_ptr<scalar_t>();
    const scalar_t* pn = n.defined() ? n.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pmm = mm.defined() ? mm.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pmv = mv.defined() ? mv.data_ptr<scalar_t>() : nullptr;
    const scalar_t* psg = sg.defined() ? sg.data_ptr<scalar_t>() : nullptr;
    const scalar_t* psgx = sgx.defined() ? sgx.data_ptr<scalar_t>() : nullptr;
    const scalar_t e = static_cast<scalar_t>(eps);
    scalar_t* pa = out.alpha.data_ptr<scalar_t>();
    scalar_t* p1 = out.e1.data_ptr<scalar_t>();
    scalar_t* p2 = out.e2.data_ptr<scalar_t>();
    scalar_t* pev = out.ev.data_ptr<scalar_t>();
    scalar_t* pp = out.p.data_ptr<scalar_t>();
    scalar_t* pq = out.q.data_ptr<scalar_t>();
    scalar_t* pac = out.a.data_ptr<scalar_t>();
    scalar_t* pamu = out.amu.data_ptr<scalar_t>();
    scalar_t* pdg = out.dgamma.data_ptr<scalar_t>();
    scalar_t* pdb = out.dbeta.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      scalar_t acc_ev = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = k * C + c;
        const auto gc = math::grad_coefs<scalar_t>(
            pw ? pw[i] : scalar_t(1), pv[i], pn ? pn[k] : scalar_t(0), psg ? psg[i] : scalar_t(0),
            psgx ? psgx[i] : scalar_t(0), e, batch_stats);
        // the E-step precision: only soft responsibilities depend on x through it
        const scalar_t a = pmv ? scalar_t(2) * math::half_precision(pmv[i], e) : scalar_t(0);
        const auto dc = math::dx_coefs<scalar_t>(gc.alpha, gc.e1, gc.e2, pm[i], a,
                                                 pmm ? pmm[i] : scalar_t(0));
        pa[i] = gc.alpha;
        p1[i] = gc.e1;
        p2[i] = gc.e2;
        pdg[i] = gc.dgamma;
        pdb[i] = gc.dbeta;
        pp[i] = dc.p;
        pq[i] = dc.q;
        pac[i] = dc.a;
        pamu[i] = dc.amu;
        acc_ev += gc.e2 * pv[i];
      }
      pev[k] = acc_ev;
    }
  });
  return out;
}

Tensor grad_input_impl(const BackwardSetup& st, const Tensor& tau, const Tensor& mean,
                       const GradCoefs& cf) {
  const Tensor& x = st.x;
  Tensor dx = empty_like_input(x);
  const Geometry geo = geometry_of(st.shape);
  const TilePlan plan = make_tile_plan(geo);
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
  ia.alpha = cf.alpha.data_ptr();
  ia.beta = cf.beta.data_ptr();
  ia.e1 = cf.e1.data_ptr();
  ia.e2 = cf.e2.data_ptr();
  ia.ev = cf.ev.data_ptr();
  ia.p = cf.p.data_ptr();
  ia.q = cf.q.data_ptr();
  ia.a = cf.a.data_ptr();
  ia.amu = cf.amu.data_ptr();
  ia.dx = dx.data_ptr();
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
  const TilePlan plan = make_tile_plan(geo);
  Tensor tau = empty_tau(x, shape, K, st.acc);
  Tensor out = empty_like_input(x);
  if (shape.M() == 0) return {out, tau};
  Tensor mu, ha, b;
  if (resp == Resp::kSoft)
    std::tie(mu, ha, b) = estep_coefs(running_mean, running_var, *running_prior, eps);
  Tensor alpha, delta;
  std::tie(alpha, delta) = affine_coefs(weight, bias, running_mean, running_var, eps);
  const Tensor grp = defined(groups) ? groups->contiguous() : Tensor();
  NormalizeArgs na{};
  na.geo = geo;
  na.plan = plan;
  na.K = K;
  na.resp = resp;
  na.dtype = x.scalar_type();
  na.x = x.data_ptr();
  na.groups = grp.defined() ? grp.data_ptr<int64_t>() : nullptr;
  na.mu = mu.defined() ? mu.data_ptr() : nullptr;
  na.half_a = ha.defined() ? ha.data_ptr() : nullptr;
  na.b = b.defined() ? b.data_ptr() : nullptr;
  na.tau = tau.numel() > 0 ? tau.data_ptr() : nullptr;
  na.alpha = alpha.data_ptr();
  na.delta = delta.data_ptr();
  na.y = out.data_ptr();
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
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbn_update_running_stats", [&] {
    const Tensor m = mean.contiguous(), v = var.contiguous(), n = count.contiguous();
    const Tensor mm = mix_mean.contiguous(), mv = mix_var.contiguous(), mp = mix_prior.contiguous();
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
      scalar_t* rp = running_prior->data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k)
        rp[k] = math::ema(pmp[k], pn[k] / static_cast<scalar_t>(num_positions), eta);
    }
    if (nbt != nullptr) *nbt += 1;
  });
}

struct CpuBackend {
  using Guard = NoGuard;
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

const char* cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace cpu
}  // namespace cbn_ext
