// The per-element and per-(component, channel) math of Compound Batch Normalization,
// shared by the CPU and the CUDA kernels (../shared/SPEC.md is the contract).
//
// Every function is always-inlined and host-device. The element-wise formulas are
// templates over the value type T so that the CPU kernels call them on whole SIMD vectors
// (GCC vector extensions) and the CUDA kernels on single values: the CPU tests then check
// the very formulas the GPU runs. Always-inlining also keeps these templates from being
// emitted out of line with a per-file instruction set (the CPU kernels are compiled once
// per instruction set, see csrc/cpu/).
//
// Notation (SPEC): x[p,c] input, tau[p,k] responsibilities, m/v batch (or running) mean
// and variance, r = 1/sqrt(v + eps), alpha = gamma r, delta = beta - alpha m,
// mu/a = running mean and precision 1/(running_var + eps) of the E-step mixture.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#define CBN_INLINE C10_HOST_DEVICE C10_ALWAYS_INLINE

namespace cbn_ext {
namespace math {

// Responsibilities use log(max(prior, kMinPrior)) so that an emptied component keeps a
// finite log-likelihood.
constexpr double kMinPrior = 1e-6;

// ---------------------------------------------------------------------------------------
// E-step: l[p,k] = b_k - 1/2 sum_c a_kc (x[p,c] - mu_kc)^2, tau = softmax_k(l).
// ---------------------------------------------------------------------------------------

// Per (k, c): 1/2 a_kc, the weight of the squared distance in the log-likelihood.
template <typename acc_t>
CBN_INLINE acc_t half_precision(acc_t var, acc_t eps) {
  return acc_t(0.5) / (var + eps);
}

// Per (k, c): the channel's share of b_k, -1/2 log(var_kc + eps).
template <typename acc_t>
CBN_INLINE acc_t neg_half_log_var(acc_t var, acc_t eps) {
  using std::log;
  return acc_t(-0.5) * log(var + eps);
}

// Per k: the prior's share of b_k, log(max(prior_k, 1e-6)).
template <typename acc_t>
CBN_INLINE acc_t log_prior(acc_t prior) {
  using std::log;
  const acc_t floor = acc_t(kMinPrior);
  return log(prior > floor ? prior : floor);
}

// Per element: 1/2 a (x - mu)^2. Written on the difference (never as a x^2 - 2 a mu x
// + a mu^2), so inputs with a large mean keep their precision.
template <typename T, typename P>
CBN_INLINE T mahalanobis_term(T x, P mu, P half_a) {
  const T d = x - mu;
  return half_a * d * d;
}

// Per element, two components (K = 2): the channel's share of l_0 - l_1 with the sign
// turned, 1/2 a_0 (x - mu_0)^2 - 1/2 a_1 (x - mu_1)^2, up to a constant, as d (A d + B)
// with d = x - m, expanded about the midpoint m of the two means (pair_coefs). One
// subtraction and two fused multiply-adds, against two subtractions, two products and
// two multiply-adds. Between two components far apart the terms of l_0 - l_1 are
// smaller than l_0's and l_1's, which the two-sum form computed apart and subtracted: at
// positions where the responsibilities are neither 0 nor 1, the evaluation's y and dx
// came out 1.6-49x closer to float64 (tests/test_separated.py, boundary_case, 30 to 10^4
// nats). An infinite x gives l_0 - l_1 = -inf or
// +inf (A != 0), so responsibilities 0 and 1, where the two-sum form gave NaN (inf - inf);
// A = 0 (equal variances) still gives NaN; a NaN x gives NaN.
template <typename T, typename P>
CBN_INLINE T pair_term(T x, P m, P A, P B) {
  const T d = x - m;
  return d * (A * d + B);
}

// The point that the two-component expansions (pair_coefs, dtau_pair_coefs) are taken
// about: the midpoint of two means rounded to acc_t (it need not be exact: an expansion
// holds about any point), and the means' offsets from it, in double.
template <typename acc_t>
struct PairMid {
  acc_t mid;
  double off0, off1;
};

template <typename acc_t>
CBN_INLINE PairMid<acc_t> pair_mid(acc_t a0, acc_t a1) {
  const acc_t mid = a0 + (a1 - a0) * acc_t(0.5);
  return PairMid<acc_t>{mid, double(a0) - double(mid), double(a1) - double(mid)};
}

// Per channel: m, A, B of pair_term from mu_0, mu_1, 1/2 a_0, 1/2 a_1, in double (m:
// pair_mid, with e_k = mu_k - m), and the channel's share of the constant,
// 1/2 a_0 e_0^2 - 1/2 a_1 e_1^2.
template <typename acc_t>
CBN_INLINE double pair_coefs(acc_t mu0, acc_t mu1, acc_t h0, acc_t h1, acc_t* m, acc_t* A,
                             acc_t* B) {
  const PairMid<acc_t> pm = pair_mid(mu0, mu1);
  const double e0 = pm.off0, e1 = pm.off1;
  *m = pm.mid;
  *A = acc_t(double(h0) - double(h1));
  *B = acc_t(-2.0 * (double(h0) * e0 - double(h1) * e1));
  return double(h0) * e0 * e0 - double(h1) * e1 * e1;
}

template <typename T>
CBN_INLINE T max_of(T a, T b) {
  return a > b ? a : b;  // element-wise on GCC vectors, NaN-propagating from b
}

// In place over K log-likelihoods l[0..K): tau_k = exp(l_k - max) / sum_j exp(l_j - max).
// `stride` separates consecutive components; exp_fn is exp on T.
template <typename T, typename Exp>
CBN_INLINE void softmax_in_place(T* l, int64_t K, int64_t stride, Exp exp_fn) {
  T mx = l[0];
  for (int64_t k = 1; k < K; ++k) mx = max_of(mx, l[k * stride]);
  T sum = exp_fn(l[0] - mx);
  l[0] = sum;
  for (int64_t k = 1; k < K; ++k) {
    const T e = exp_fn(l[k * stride] - mx);
    l[k * stride] = e;
    sum = sum + e;
  }
  const T inv = 1 / sum;
  for (int64_t k = 0; k < K; ++k) l[k * stride] = l[k * stride] * inv;
}

// ---------------------------------------------------------------------------------------
// M-step: per-component weighted mean and sum of squared deviations (M2), merged over
// tiles with Chan's count-weighted formula, so no E[x^2] - E[x]^2 cancellation.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct WeightedMoments {
  acc_t n;     // sum of weights
  acc_t mean;  // weighted mean
  acc_t m2;    // weighted sum of squared deviations from mean
};

// The weighted mean sum / n of a tile or a component; 0 when n is 0 (no weight, so the sum
// is 0 too). By division, never by a reciprocal: a component far from every position of a
// tile holds tiny responsibilities there, subnormal ones included, and 1 / n overflows
// once n < 1 / FLT_MAX (1 / DBL_MAX), while sum / n stays a finite weighted average.
// T may be a SIMD vector of sums (one count for every lane).
template <typename T, typename acc_t>
CBN_INLINE T weighted_mean(T sum, acc_t n) {
  return n > acc_t(0) ? sum / n : T{};
}

// Merge b into a (Chan et al.): exact for any split of the positions. Finite whatever the
// counts (tiny, subnormal or zero): b's weight is the ratio b.n / (a.n + b.n) <= 1.
template <typename acc_t>
CBN_INLINE acc_t merge_weight(acc_t an, acc_t bn) {
  return bn == acc_t(0) ? acc_t(0) : bn / (an + bn);
}

// chan_merge with b's weight wb = merge_weight(a.n, b.n) given: merges that share their
// counts (the channels of one component) then share one division.
template <typename acc_t>
CBN_INLINE void chan_merge_weighted(WeightedMoments<acc_t>& a, const WeightedMoments<acc_t>& b,
                                    acc_t wb) {
  if (b.n == acc_t(0)) return;
  if (a.n == acc_t(0)) {
    a = b;
    return;
  }
  const acc_t delta = b.mean - a.mean;
  a.mean = a.mean + delta * wb;
  a.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  a.n = a.n + b.n;
}

template <typename acc_t>
CBN_INLINE void chan_merge(WeightedMoments<acc_t>& a, const WeightedMoments<acc_t>& b) {
  chan_merge_weighted(a, b, merge_weight(a.n, b.n));
}

// chan_merge of the moments of several channels that share their counts (the means and
// M2 of one component in a SIMD vector T, one count): the same arithmetic lane by lane,
// with one division for all of them. splat(s): a T of lanes s.
template <typename T, typename acc_t, typename Splat>
CBN_INLINE void chan_merge_shared(acc_t& an, T& amean, T& am2, acc_t bn, const T& bmean,
                                  const T& bm2, Splat&& splat) {
  const acc_t n = an + bn;
  if (bn == acc_t(0)) return;
  if (an == acc_t(0)) {
    an = bn;
    amean = bmean;
    am2 = bm2;
    return;
  }
  const T delta = bmean - amean;
  const T wb = splat(bn / n), av = splat(an);
  amean = amean + delta * wb;
  am2 = am2 + bm2 + delta * delta * av * wb;
  an = n;
}

// A component takes part in the M-step (and the running update) when it holds more
// than one position's worth of responsibility.
template <typename acc_t>
CBN_INLINE bool is_active(acc_t count) {
  return count > acc_t(1);
}

// ---------------------------------------------------------------------------------------
// Normalization: y[p,c] = sum_k tau[p,k] (alpha_kc x[p,c] + delta_kc).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
CBN_INLINE acc_t inv_std(acc_t var, acc_t eps) {
  using std::sqrt;
  return acc_t(1) / sqrt(var + eps);
}

// alpha = gamma r, delta = beta - alpha m.
template <typename acc_t>
CBN_INLINE void affine_coefs(acc_t gamma, acc_t beta, acc_t mean, acc_t var, acc_t eps,
                             acc_t& alpha, acc_t& delta) {
  alpha = gamma * inv_std(var, eps);
  delta = beta - alpha * mean;
}

template <typename T, typename P>
CBN_INLINE T normalize_term(T x, P alpha, P delta) {
  return alpha * x + delta;
}

// ---------------------------------------------------------------------------------------
// Running update (active components; the prior for every component).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
CBN_INLINE acc_t ema(acc_t running, acc_t batch, acc_t eta) {
  return (acc_t(1) - eta) * running + eta * batch;
}

// Unbiased variance from the biased one: v N / (N - 1).
template <typename acc_t>
CBN_INLINE acc_t unbiased_var(acc_t var, acc_t count) {
  return var * count / (count - acc_t(1));
}

// ---------------------------------------------------------------------------------------
// Backward. With D = x - m, Sg = sum_p g tau, Sgx = sum_p g tau D:
//   dbeta = Sg, dgamma = Sgx r, Dm = -r gamma Sg, Dv = -1/2 r^3 gamma Sgx,
//   e1 = Dm / N, e2 = Dv / N                       (0 for inactive k and at eval)
//   dtau[p,k] = sum_c [ g (alpha D + beta) + D (e1 + e2 D) ] - sum_c e2 v
//   dl[p,k]   = tau_k (dtau_k - sum_j tau_j dtau_j)
//   dx[p,c]   = sum_k tau_k (alpha g + e1 + 2 e2 D) - sum_k dl_k a_kc (x - mu_kc)
// The kernels take this formula as it stands, every term on its own component's means
// (x - m_k, x - mu_k; but for two components the CPU kernels sum dtau_0 - dtau_1 about
// the midpoint of m_0 and m_1, channels-last and NCHW rows under 512 positions:
// dtau_pair_coefs). With soft responsibilities dx = g A + E, summing per component
//   A += tau alpha,  E += tau (e1 + P (x - m)) - dl a (x - mu),  P = 2 e2
// (dx_accumulate_soft); with one component per position (given groups, K = 1) dx = g A +
// (x - m) B + E with A = alpha, B = P, E = e1 (dx_accumulate, dx_combine). Factored
// against one shift s per channel (x B + E, sums of tau P and tau (e1 - P (m - s)), and
// of dl a and dl a (mu - s)), the sums cancelled to |m_k - s| (or |mu_k - s|) times the
// float epsilon when the components are far apart: dx 1e-5 to 2.3e-5 from float64 at
// (40, 70), K = 9, and up to 2.9e-5 for an input between two components 2000 apart.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct GradCoefs {
  acc_t alpha;   // gamma r
  acc_t e1;      // Dm / N
  acc_t e2;      // Dv / N
  acc_t dgamma;  // Sgx r
  acc_t dbeta;   // Sg
};

template <typename acc_t>
CBN_INLINE GradCoefs<acc_t> grad_coefs(acc_t gamma, acc_t var, acc_t count, acc_t sum_g,
                                       acc_t sum_gx, acc_t eps, bool batch_stats) {
  const acc_t r = inv_std(var, eps);
  GradCoefs<acc_t> out;
  out.alpha = gamma * r;
  out.dgamma = sum_gx * r;
  out.dbeta = sum_g;
  if (batch_stats && is_active(count)) {
    const acc_t dm = -r * gamma * sum_g;
    const acc_t dv = acc_t(-0.5) * r * r * r * gamma * sum_gx;
    out.e1 = dm / count;
    out.e2 = dv / count;
  } else {
    out.e1 = acc_t(0);
    out.e2 = acc_t(0);
  }
  return out;
}

// Per element of dtau, without the constant -e2 v (summed over c separately):
// g (alpha D + beta) + D (e1 + e2 D).
template <typename T, typename P>
CBN_INLINE T dtau_term(T g, T d, P alpha, P beta, P e1, P e2) {
  return g * (alpha * d + beta) + d * (e1 + e2 * d);
}

// Two components (K = 2), soft responsibilities: dl_0 = tau_0 (dtau_0 - tau_0 dtau_0 -
// tau_1 dtau_1) = tau_0 tau_1 (dtau_0 - dtau_1) = -dl_1 (tau_0 + tau_1 = 1), and the
// per-element terms of dtau_0 - dtau_1 are one dtau_term about the midpoint s of the two
// batch means, dtau_term(g, x - s, P, Q, U, R), so that the sum over channels is one sum
// (one subtraction, three multiply-adds and a product an element, against twice that).
// Its terms carry the half distance |m_0 - m_1| / 2 where each component's own term
// carried |x - m_k|; dl_0 weighs the sum by tau_0 tau_1. dx stays within the SPEC's rule
// at positions on the boundary of two components 200 and 2000 nats apart with gamma_0
// about 64 gamma_1 (batch means close together), and with two far clusters around those
// positions (batch means far apart) (tests/test_separated.py).
// With f_k = m_k - s (x - m_k = d - f_k, d = x - s), in double:
//   P = alpha_0 - alpha_1,  Q = (beta_0 - alpha_0 f_0) - (beta_1 - alpha_1 f_1),
//   U = (e1_0 - 2 e2_0 f_0) - (e1_1 - 2 e2_1 f_1),  R = e2_0 - e2_1,
// and the channel's share of the constant, (e2_0 f_0^2 - e1_0 f_0) - (e2_1 f_1^2 -
// e1_1 f_1), is returned. Rows of 2 x C values: m (batch means), alpha, beta, e1, e2.
template <typename acc_t>
CBN_INLINE double dtau_pair_coefs(const acc_t* m, const acc_t* alpha, const acc_t* beta,
                                  const acc_t* e1, const acc_t* e2, int64_t C, int64_t c,
                                  acc_t* s, acc_t* P, acc_t* Q, acc_t* U, acc_t* R) {
  const int64_t i0 = c, i1 = C + c;
  const PairMid<acc_t> pm = pair_mid(m[i0], m[i1]);
  const double f0 = pm.off0, f1 = pm.off1;
  const double a0 = alpha[i0], a1 = alpha[i1], b0 = beta[i0], b1 = beta[i1];
  const double u0 = e1[i0], u1 = e1[i1], r0 = e2[i0], r1 = e2[i1];
  *s = pm.mid;
  *P = acc_t(a0 - a1);
  *Q = acc_t((b0 - a0 * f0) - (b1 - a1 * f1));
  *U = acc_t((u0 - 2.0 * r0 * f0) - (u1 - 2.0 * r1 * f1));
  *R = acc_t(r0 - r1);
  return (r0 * f0 * f0 - u0 * f0) - (r1 * f1 * f1 - u1 * f1);
}

// Per (k, c): the coefficients of dx (see above).
template <typename acc_t>
struct DxCoefs {
  acc_t alpha;  // gamma r
  acc_t p;      // 2 e2
  acc_t a;      // E-step precision 1 / (running_var + eps)
  acc_t mu;     // E-step mean
};

template <typename acc_t>
CBN_INLINE DxCoefs<acc_t> dx_coefs(acc_t alpha, acc_t e2, acc_t a, acc_t mu) {
  DxCoefs<acc_t> out;
  out.alpha = alpha;
  out.p = e2 + e2;
  out.a = a;
  out.mu = mu;
  return out;
}

// Component k's share of A and E at an element (soft responsibilities tau_k, dl_k):
// d = x - m_k, dmu = x - mu_k.
template <typename T, typename S, typename P>
CBN_INLINE void dx_accumulate_soft(S tau, S dl, P alpha, P p, P e1, T d, P a, T dmu, T& A,
                                   T& E) {
  A = A + tau * alpha;
  E = E + tau * (e1 + p * d);
  E = E - (dl * a) * dmu;
}

// Given or single responsibilities (one component per position, dl = 0): A += tau alpha,
// B += tau p, E += tau q, for dx = g A + (x - m) B + E (dx_combine) with q = e1.
template <typename T, typename S, typename P>
CBN_INLINE void dx_accumulate(S tau, P alpha, P p, P q, T& A, T& B, T& E) {
  A = A + tau * alpha;
  B = B + tau * p;
  E = E + tau * q;
}

// dx from the sums; d = x - m of the position's component (one component per position).
template <typename T>
CBN_INLINE T dx_combine(T g, T d, T A, T B, T E) {
  return g * A + d * B + E;
}

}  // namespace math
}  // namespace cbn_ext
