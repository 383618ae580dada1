// Autograd of the cbn_ext operators, in C++ (a torch::autograd::Function per forward
// operator, registered under the Autograd dispatch key, as torchvision's ops do): a call
// costs microseconds, not a Python round trip. The backward of forward_train and
// forward_eval calls backward_train / backward_eval of the same library; gradients that no
// one asked for are neither materialised nor computed. A second derivative is not
// implemented: backward_train and backward_eval raise when differentiated.
//
// register_autograd<kNs>(m) in a TORCH_LIBRARY_IMPL(<ns>, Autograd, m) block registers
// them for library <ns> (cbn_ext, and cbn_ext_emu for the emulated CUDA backend).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace cbn_ext {

namespace autograd_detail {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using T8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

using ForwardTrainSig = T8(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           int64_t, double);
using ForwardEvalSig = T2(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                          const Tensor&, const OptTensor&, const OptTensor&, int64_t, double);
using BackwardTrainSig = T3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                            const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, bool, double, std::array<bool, 3>);
using BackwardEvalSig = T3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                           const Tensor&, const Tensor&, const Tensor&, bool, double,
                           std::array<bool, 3>);

// The typed handle of operator <ns>::<name>, looked up once.
template <const char* kNs, typename Sig>
const c10::TypedOperatorHandle<Sig>& op(const char* name) {
  // one static per (library, signature): each signature belongs to one operator
  static const c10::TypedOperatorHandle<Sig> handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string(kNs) + "::" + name).c_str(), "")
          .template typed<Sig>();
  return handle;
}

// What the forward operators take besides the differentiable input, weight and bias:
// passed to Function::apply as one non-tensor argument, so that autograd does not track
// them.
struct TrainArgs {
  OptTensor running_mean, running_var, running_prior, num_batches_tracked, groups;
  int64_t K;
  double eps;
};
struct EvalArgs {
  Tensor running_mean, running_var;
  OptTensor running_prior, groups;
  int64_t K;
  double eps;
};

inline Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
inline OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// What the backward needs besides tensors, in one saved value: whether the
// responsibilities are soft, and the autograd edges of weight and bias (only defined
// tensors have one; the input's is 0).
inline void save_flags(AutogradContext* ctx, bool soft, double eps, const OptTensor& weight,
                       const OptTensor& bias) {
  const bool w = weight.has_value() && weight->defined();
  const bool b = bias.has_value() && bias->defined();
  const int64_t w_edge = w ? 1 : 0, b_edge = b ? (w ? 2 : 1) : 0;  // 0: none
  ctx->saved_data["flags"] = static_cast<int64_t>(soft) | (w_edge << 1) | (b_edge << 3);
  ctx->saved_data["eps"] = eps;
}

inline bool saved_soft(AutogradContext* ctx) { return ctx->saved_data["flags"].toInt() & 1; }

inline std::array<bool, 3> output_mask(AutogradContext* ctx) {
  const int64_t f = ctx->saved_data["flags"].toInt();
  const int64_t w = (f >> 1) & 3, b = (f >> 3) & 3;
  return {ctx->needs_input_grad(0), w > 0 && ctx->needs_input_grad(static_cast<size_t>(w)),
          b > 0 && ctx->needs_input_grad(static_cast<size_t>(b))};
}

// Whether a call must be recorded for autograd; otherwise it goes straight to the kernel.
inline bool needs_autograd(const Tensor& a, const OptTensor& b, const OptTensor& c) {
  if (!at::GradMode::is_enabled()) return false;
  const auto rg = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return a.requires_grad() || rg(b) || rg(c);
}

// One gradient per argument of forward (input, weight, bias, the rest).
inline variable_list grads(const std::array<bool, 3>& mask, const T3& g) {
  return {mask[0] ? std::get<0>(g) : Tensor(), mask[1] ? std::get<1>(g) : Tensor(),
          mask[2] ? std::get<2>(g) : Tensor(), Tensor()};
}

template <const char* kNs>
struct ForwardTrain : public torch::autograd::Function<ForwardTrain<kNs>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const TrainArgs& a) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, tau, mean, var, count, mix_mean, mix_var, mix_prior] =
        op<kNs, ForwardTrainSig>("forward_train")
            .call(input, weight, bias, a.running_mean, a.running_var, a.running_prior,
                  a.num_batches_tracked, a.groups, a.K, a.eps);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({tau, mean, var, count, mix_mean, mix_var, mix_prior});
    ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias), tau, mean,
                            var, count, mix_mean, mix_var});
    save_flags(ctx, a.K > 1 && !(a.groups.has_value() && a.groups->defined()), a.eps, weight,
               bias);
    return {out, tau, mean, var, count, mix_mean, mix_var, mix_prior};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& g = grad_outputs[0];
    const std::array<bool, 3> mask = output_mask(ctx);
    if (!g.defined() || !(mask[0] || mask[1] || mask[2]))
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list s = ctx->get_saved_variables();
    const T3 r = op<kNs, BackwardTrainSig>("backward_train")
                     .call(g, s[0], as_optional(s[1]), as_optional(s[2]), s[3], s[4], s[5], s[6],
                           s[7], s[8], saved_soft(ctx), ctx->saved_data["eps"].toDouble(),
                           mask);
    return grads(mask, r);
  }
};

template <const char* kNs>
struct ForwardEval : public torch::autograd::Function<ForwardEval<kNs>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const EvalArgs& a) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, tau] = op<kNs, ForwardEvalSig>("forward_eval")
                          .call(input, weight, bias, a.running_mean, a.running_var,
                                a.running_prior, a.groups, a.K, a.eps);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({tau});
    ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias), tau,
                            a.running_mean, a.running_var});
    save_flags(ctx, a.K > 1 && !(a.groups.has_value() && a.groups->defined()), a.eps, weight,
               bias);
    return {out, tau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& g = grad_outputs[0];
    const std::array<bool, 3> mask = output_mask(ctx);
    if (!g.defined() || !(mask[0] || mask[1] || mask[2]))
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list s = ctx->get_saved_variables();
    const T3 r = op<kNs, BackwardEvalSig>("backward_eval")
                     .call(g, s[0], as_optional(s[1]), as_optional(s[2]), s[3], s[4], s[5],
                           saved_soft(ctx), ctx->saved_data["eps"].toDouble(), mask);
    return grads(mask, r);
  }
};

// backward_train / backward_eval under autograd: computed, but not differentiable again.
template <const char* kNs, typename Sig>
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward<kNs, Sig>> {
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const char* name, Args&&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["name"] = std::string(name);
    auto [gi, gw, gb] = op<kNs, Sig>(name).call(std::forward<Args>(args)...);
    return {gi, gw, gb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "cbn_ext: double backward (differentiating ",
                ctx->saved_data["name"].toStringRef(), ") is not supported");
  }
};

template <const char* kNs>
T8 forward_train_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                          const OptTensor& groups, int64_t K, double eps) {
  if (!needs_autograd(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op<kNs, ForwardTrainSig>("forward_train")
        .call(input, weight, bias, running_mean, running_var, running_prior, num_batches_tracked,
              groups, K, eps);
  }
  const variable_list r = ForwardTrain<kNs>::apply(
      input, weight, bias,
      TrainArgs{running_mean, running_var, running_prior, num_batches_tracked, groups, K, eps});
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}

template <const char* kNs>
T2 forward_eval_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const Tensor& running_mean, const Tensor& running_var,
                         const OptTensor& running_prior, const OptTensor& groups, int64_t K,
                         double eps) {
  if (!needs_autograd(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op<kNs, ForwardEvalSig>("forward_eval")
        .call(input, weight, bias, running_mean, running_var, running_prior, groups, K, eps);
  }
  const variable_list r = ForwardEval<kNs>::apply(
      input, weight, bias, EvalArgs{running_mean, running_var, running_prior, groups, K, eps});
  return {r[0], r[1]};
}

template <const char* kNs>
T3 backward_train_autograd(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                           const Tensor& var, const Tensor& count, const Tensor& mix_mean,
                           const Tensor& mix_var, bool soft, double eps,
                           std::array<bool, 3> output_mask) {
  if (!needs_autograd(grad_out, input, weight) && !needs_autograd(tau, bias, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op<kNs, BackwardTrainSig>("backward_train")
        .call(grad_out, input, weight, bias, tau, mean, var, count, mix_mean, mix_var, soft, eps,
              output_mask);
  }
  const variable_list r = NoDoubleBackward<kNs, BackwardTrainSig>::apply(
      "backward_train", grad_out, input, weight, bias, tau, mean, var, count, mix_mean, mix_var,
      soft, eps, output_mask);
  return {r[0], r[1], r[2]};
}

template <const char* kNs>
T3 backward_eval_autograd(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                          const OptTensor& bias, const Tensor& tau, const Tensor& running_mean,
                          const Tensor& running_var, bool soft, double eps,
                          std::array<bool, 3> output_mask) {
  if (!needs_autograd(grad_out, input, weight) && !needs_autograd(tau, bias, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op<kNs, BackwardEvalSig>("backward_eval")
        .call(grad_out, input, weight, bias, tau, running_mean, running_var, soft, eps,
              output_mask);
  }
  const variable_list r = NoDoubleBackward<kNs, BackwardEvalSig>::apply(
      "backward_eval", grad_out, input, weight, bias, tau, running_mean, running_var, soft, eps,
      output_mask);
  return {r[0], r[1], r[2]};
}

}  // namespace autograd_detail

template <const char* kNs>
void register_autograd(torch::Library& m) {
  m.impl("forward_train", &autograd_detail::forward_train_autograd<kNs>);
  m.impl("forward_eval", &autograd_detail::forward_eval_autograd<kNs>);
  m.impl("backward_train", &autograd_detail::backward_train_autograd<kNs>);
  m.impl("backward_eval", &autograd_detail::backward_eval_autograd<kNs>);
}

}  // namespace cbn_ext
