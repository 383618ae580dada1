// The schemas of the cbn_ext operators (see csrc/cbn_ext.cpp for what each computes),
// defined once for every library that registers them: cbn_ext, and cbn_ext_emu for the
// emulated CUDA backend (csrc/emu/).
#pragma once

#include <torch/library.h>

namespace cbn_ext {

inline void define_operators(torch::Library& m) {
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor? running_prior, Tensor? num_batches_tracked, Tensor? groups, "
      "int num_components, float eps) -> (Tensor out, Tensor tau, Tensor mean, Tensor var, "
      "Tensor count, Tensor mix_mean, Tensor mix_var, Tensor mix_prior)");
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, Tensor? running_prior, Tensor? groups, int num_components, "
      "float eps) -> (Tensor out, Tensor tau)");
  m.def(
      "backward_train(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor tau, "
      "Tensor mean, Tensor var, Tensor count, Tensor mix_mean, Tensor mix_var, bool soft, "
      "float eps, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "backward_eval(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor tau, "
      "Tensor running_mean, Tensor running_var, bool soft, float eps, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_stats(Tensor input, Tensor? running_mean, Tensor? running_var, "
      "Tensor? running_prior, Tensor? num_batches_tracked, Tensor? groups, int num_components, "
      "float eps) -> (Tensor tau, Tensor mean, Tensor var, Tensor count, Tensor mix_mean, "
      "Tensor mix_var, Tensor mix_prior)");
  m.def(
      "normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor tau, Tensor mean, "
      "Tensor var, Tensor? groups, float eps) -> Tensor");
  m.def("grad_sums(Tensor grad_out, Tensor input, Tensor tau, Tensor mean) -> (Tensor sum_g, "
        "Tensor sum_gx)");
  m.def(
      "grad_input(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor tau, "
      "Tensor mean, Tensor var, Tensor count, Tensor mix_mean, Tensor mix_var, Tensor sum_g, "
      "Tensor sum_gx, bool soft, bool batch_stats, float eps) -> Tensor");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? running_prior, Tensor(d!)? num_batches_tracked, Tensor mix_mean, "
      "Tensor mix_var, Tensor mix_prior, Tensor mean, Tensor var, Tensor count, "
      "SymInt num_positions, float? momentum) -> ()");
}

}  // namespace cbn_ext
