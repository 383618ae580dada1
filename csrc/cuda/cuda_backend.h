// The CUDA backend's steps (csrc/cbn_ops.h composes them into the operators): defined in
// forward.cu and backward.cu, registered by operators.cpp (and, emulated on the CPU, by
// csrc/emu/operators_emu.cpp).
#pragma once

#if !defined(CBN_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#endif

#include <optional>
#include <tuple>

#include "../cbn_common.h"

namespace cbn_ext {
namespace cuda {

struct CudaBackend {
#if defined(CBN_CUDA_EMULATION)
  using Guard = NoGuard;  // CPU tensors
#else
  using Guard = c10::cuda::CUDAGuard;
#endif
  // the kernels check group ids (a device-side assert): the host never reads device memory
  static constexpr bool kHostChecksGroupIds = false;
  // the first-batch question answered on the device (no host read), emulated or not
  static constexpr bool kDecidesFirstBatchOnDevice = true;

  // With replace_inactive (the forward's own statistics), the affine coefficients come
  // out of the merge too (alpha, delta).
  static BatchStats batch_stats(const TrainSetup& st, const OptTensor& groups, int64_t K,
                                double eps, bool replace_inactive, const OptTensor& weight,
                                const OptTensor& bias);
  static Tensor normalize(const ApplySetup& st, const OptTensor& groups, const OptTensor& weight,
                          const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                          const Tensor& var, double eps, const Tensor& alpha,
                          const Tensor& delta);
  static std::tuple<Tensor, Tensor> forward_eval(const EvalSetup& st, const OptTensor& weight,
                                                 const OptTensor& bias,
                                                 const Tensor& running_mean,
                                                 const Tensor& running_var,
                                                 const OptTensor& running_prior,
                                                 const OptTensor& groups, int64_t K, double eps);
  static void update_running_stats(Tensor& running_mean, Tensor& running_var,
                                   const OptTensor& running_prior,
                                   const OptTensor& num_batches_tracked, const Tensor& mix_mean,
                                   const Tensor& mix_var, const Tensor& mix_prior,
                                   const Tensor& mean, const Tensor& var, const Tensor& count,
                                   int64_t num_positions, std::optional<double> momentum);
  static std::tuple<Tensor, Tensor> grad_sums(const BackwardSetup& st, const Tensor& tau,
                                              const Tensor& mean);
  static GradCoefs grad_coefs(const BackwardSetup& st, const OptTensor& weight,
                              const OptTensor& bias, const Tensor& mean, const Tensor& var,
                              const Tensor& count, const Tensor& mix_mean, const Tensor& mix_var,
                              const Tensor& sum_g, const Tensor& sum_gx, double eps,
                              bool batch_stats);
  static Tensor grad_input(const BackwardSetup& st, const Tensor& tau, const Tensor& mean,
                           const GradCoefs& cf);
};

}  // namespace cuda
}  // namespace cbn_ext
