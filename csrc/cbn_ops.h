// The cbn_ext operators, composed once from a backend's steps (the CPU backend in
// csrc/cpu/cbn_cpu.cpp, the CUDA one in csrc/cuda/): checks and set-up are shared
// (cbn_common), and so is which step each operator runs. A backend B provides
//
//   using Guard = ...;   // made from the input's device before any step
//   static BatchStats batch_stats(const TrainSetup&, groups, K, eps, replace_inactive,
//                                 weight, bias);   // alpha/delta left undefined, or the
//                                                  // affine coefficients when fused
//   static Tensor normalize(const ApplySetup&, groups, weight, bias, tau, mean, var, eps,
//                           alpha, delta);         // alpha undefined: from mean and var
//   static std::tuple<Tensor, Tensor> forward_eval(const EvalSetup&, weight, bias,
//                                                  running_mean, running_var,
//                                                  running_prior, groups, K, eps);
//   static std::tuple<Tensor, Tensor> grad_sums(const BackwardSetup&, tau, mean);
//   static GradCoefs grad_coefs(const BackwardSetup&, weight, bias, mean, var, count,
//                               mix_mean, mix_var, sum_g, sum_gx, eps, batch_stats);
//   static Tensor grad_input(const BackwardSetup&, tau, mean, const GradCoefs&);
//   static void update_running_stats(running_mean, running_var, running_prior,
//                                    num_batches_tracked, mix_mean, mix_var, mix_prior,
//                                    mean, var, count, num_positions, momentum);
//   static constexpr bool kHostChecksGroupIds;  // else the kernels check them
//   static constexpr bool kDecidesFirstBatchOnDevice;  // else the host reads the counter
//
// and registers them with register_operators<B>(m) in its TORCH_LIBRARY_IMPL block. The
// backends see parameters and statistics in the accumulation dtype only: reduced-precision
// ones (model.half()) are converted here, gradients go back in the parameters' dtype and
// running buffers are updated in float32 and stored in their own dtype.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cbn_common.h"

namespace cbn_ext {

template <typename B>
struct Operators {
  using T3 = std::tuple<Tensor, Tensor, Tensor>;

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
      const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var,
      const OptTensor& running_prior, const OptTensor& num_batches_tracked,
      const OptTensor& groups, int64_t K, double eps) {
    typename B::Guard guard(input.device());
    const TrainSetup st = setup_train(input, weight, bias, running_mean, running_var,
                                      running_prior, num_batches_tracked, groups, K, eps,
                                      /*require_positions=*/true,
                                      B::kDecidesFirstBatchOnDevice);
    if constexpr (B::kHostChecksGroupIds) check_group_values(groups, K);
    const OptTensor w = to_acc(weight, st.acc), b = to_acc(bias, st.acc);
    const BatchStats bs = B::batch_stats(st, groups, K, eps, /*replace_inactive=*/true, w, b);
    const Tensor out = B::normalize(ApplySetup::from(st, K), groups, w, b, bs.tau, bs.mean,
                                    bs.var, eps, bs.alpha, bs.delta);
    return {out, bs.tau, bs.mean, bs.var, bs.count, bs.mix_mean, bs.mix_var, bs.mix_prior};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_stats(
      const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
      const OptTensor& running_prior, const OptTensor& num_batches_tracked,
      const OptTensor& groups, int64_t K, double eps) {
    typename B::Guard guard(input.device());
    const TrainSetup st = setup_train(input, std::nullopt, std::nullopt, running_mean,
                                      running_var, running_prior, num_batches_tracked, groups,
                                      K, eps, /*require_positions=*/false,
                                      B::kDecidesFirstBatchOnDevice);
    if constexpr (B::kHostChecksGroupIds) check_group_values(groups, K);
    const BatchStats bs = B::batch_stats(st, groups, K, eps, /*replace_inactive=*/false,
                                         std::nullopt, std::nullopt);
    return {bs.tau, bs.mean, bs.var, bs.count, bs.mix_mean, bs.mix_var, bs.mix_prior};
  }

  static Tensor normalize(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const Tensor& tau, const Tensor& mean, const Tensor& var,
                          const OptTensor& groups, double eps) {
    typename B::Guard guard(input.device());
    const ApplySetup st = setup_apply(input, weight, bias, tau, mean, var, groups);
    if constexpr (B::kHostChecksGroupIds) check_group_values(groups, st.K);
    const Tensor t = canonical_tau(tau, st.x, st.shape, st.K);
    return B::normalize(st, groups, to_acc(weight, st.acc), to_acc(bias, st.acc), t,
                        to_acc(mean, st.acc), to_acc(var, st.acc), eps, Tensor(), Tensor());
  }

  static std::tuple<Tensor, Tensor> forward_eval(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias,
                                                 const Tensor& running_mean,
                                                 const Tensor& running_var,
                                                 const OptTensor& running_prior,
                                                 const OptTensor& groups, int64_t K,
                                                 double eps) {
    typename B::Guard guard(input.device());
    const EvalSetup st = setup_eval(input, weight, bias, running_mean, running_var,
                                    running_prior, groups, K, eps);
    if constexpr (B::kHostChecksGroupIds) check_group_values(groups, K);
    return B::forward_eval(st, to_acc(weight, st.acc), to_acc(bias, st.acc),
                           to_acc(running_mean, st.acc), to_acc(running_var, st.acc),
                           to_acc(running_prior, st.acc), groups, K, eps);
  }

  // batch_stats: the forward normalized with batch statistics (training), so gradients
  // flow through m and v of active components.
  static T3 backward(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                     const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                     const Tensor& var, const Tensor& count, const Tensor& mix_mean,
                     const Tensor& mix_var, bool soft, double eps,
                     std::array<bool, 3> output_mask, bool batch_stats) {
    typename B::Guard guard(input.device());
    const BackwardSetup st = setup_backward(grad_out, input, weight, bias, tau, mean, soft);
    const Tensor t = canonical_tau(tau, st.x, st.shape, st.K);
    const at::ScalarType acc = st.acc;
    const Tensor m = to_acc(mean, acc), v = to_acc(var, acc);
    Tensor sum_g, sum_gx;
    if (batch_stats || output_mask[1] || output_mask[2])
      std::tie(sum_g, sum_gx) = B::grad_sums(st, t, m);
    const GradCoefs cf =
        B::grad_coefs(st, to_acc(weight, acc), to_acc(bias, acc), m, v, count,
                      to_acc(mix_mean, acc), to_acc(mix_var, acc), sum_g, sum_gx, eps, batch_stats);
    // gradients in the parameters' dtype (float32, or theirs: model.half())
    const auto grad_of = [&](const Tensor& g, const OptTensor& p) {
      return p.has_value() && p->defined() ? g.to(p->scalar_type()) : g;
    };
    const auto aopt = st.x.options().dtype(acc);
    return {output_mask[0] ? B::grad_input(st, t, m, cf) : at::empty({0}, st.x.options()),
            output_mask[1] ? grad_of(cf.dgamma, weight) : at::empty({0}, aopt),
            output_mask[2] ? grad_of(cf.dbeta, bias) : at::empty({0}, aopt)};
  }

  static T3 backward_train(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                           const Tensor& var, const Tensor& count, const Tensor& mix_mean,
                           const Tensor& mix_var, bool soft, double eps,
                           std::array<bool, 3> output_mask) {
    return backward(grad_out, input, weight, bias, tau, mean, var, count, mix_mean, mix_var,
                    soft, eps, output_mask, /*batch_stats=*/true);
  }

  static T3 backward_eval(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                          const OptTensor& bias, const Tensor& tau, const Tensor& running_mean,
                          const Tensor& running_var, bool soft, double eps,
                          std::array<bool, 3> output_mask) {
    return backward(grad_out, input, weight, bias, tau, running_mean, running_var, Tensor(),
                    running_mean, running_var, soft, eps, output_mask, /*batch_stats=*/false);
  }

  static std::tuple<Tensor, Tensor> grad_sums(const Tensor& grad_out, const Tensor& input,
                                              const Tensor& tau, const Tensor& mean) {
    typename B::Guard guard(input.device());
    const BackwardSetup st = setup_backward(grad_out, input, std::nullopt, std::nullopt, tau,
                                            mean, /*soft=*/true);
    return B::grad_sums(st, canonical_tau(tau, st.x, st.shape, st.K), to_acc(mean, st.acc));
  }

  static Tensor grad_input(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                           const Tensor& var, const Tensor& count, const Tensor& mix_mean,
                           const Tensor& mix_var, const Tensor& sum_g, const Tensor& sum_gx,
                           bool soft, bool batch_stats, double eps) {
    typename B::Guard guard(input.device());
    const BackwardSetup st = setup_backward(grad_out, input, weight, bias, tau, mean, soft);
    const at::ScalarType acc = st.acc;
    const Tensor m = to_acc(mean, acc);
    check_sums(sum_g, sum_gx, m);
    const GradCoefs cf =
        B::grad_coefs(st, to_acc(weight, acc), to_acc(bias, acc), m, to_acc(var, acc), count,
                      to_acc(mix_mean, acc), to_acc(mix_var, acc), sum_g, sum_gx, eps, batch_stats);
    return B::grad_input(st, canonical_tau(tau, st.x, st.shape, st.K), m, cf);
  }

  static void update_running_stats(Tensor& running_mean, Tensor& running_var,
                                   const OptTensor& running_prior,
                                   const OptTensor& num_batches_tracked, const Tensor& mix_mean,
                                   const Tensor& mix_var, const Tensor& mix_prior,
                                   const Tensor& mean, const Tensor& var, const Tensor& count,
                                   int64_t num_positions, std::optional<double> momentum) {
    typename B::Guard guard(mean.device());
    check_update_args(running_mean, running_var, running_prior, num_batches_tracked, mean,
                      momentum);
    const at::ScalarType acc = mean.scalar_type();
    if (running_mean.scalar_type() == acc && running_var.scalar_type() == acc &&
        (!running_prior.has_value() || running_prior->scalar_type() == acc)) {
      B::update_running_stats(running_mean, running_var, running_prior, num_batches_tracked,
                              mix_mean, mix_var, mix_prior, mean, var, count, num_positions,
                              momentum);
      return;
    }
    // reduced-precision buffers (model.half()): updated in float32, stored in their dtype
    Tensor rm = running_mean.to(acc), rv = running_var.to(acc);
    OptTensor rp = to_acc(running_prior, acc);
    B::update_running_stats(rm, rv, rp, num_batches_tracked, mix_mean, mix_var, mix_prior, mean,
                            var, count, num_positions, momentum);
    running_mean.copy_(rm);
    running_var.copy_(rv);
    if (running_prior.has_value() && running_prior->defined()) running_prior->copy_(*rp);
  }
};

template <typename B>
void register_operators(torch::Library& m) {
  m.impl("forward_train", &Operators<B>::forward_train);
  m.impl("forward_eval", &Operators<B>::forward_eval);
  m.impl("backward_train", &Operators<B>::backward_train);
  m.impl("backward_eval", &Operators<B>::backward_eval);
  m.impl("update_running_stats", &Operators<B>::update_running_stats);
  m.impl("batch_stats", &Operators<B>::batch_stats);
  m.impl("normalize", &Operators<B>::normalize);
  m.impl("grad_sums", &Operators<B>::grad_sums);
  m.impl("grad_input", &Operators<B>::grad_input);
}

}  // namespace cbn_ext
