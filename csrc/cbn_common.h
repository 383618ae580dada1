// Device-agnostic pieces of the operators: argument checks, the choice of layout, the
// allocation of the outputs, and the first-batch initialisation of the mixture.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "cbn_resp.h"

namespace cbn_ext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Shape of an input viewed as (N, C, S) and the layout the kernels walk.
struct Shape {
  int64_t N;
  int64_t C;
  int64_t S;
  bool interleaved;  // channels innermost (NHWC-like, or S == 1); else planar (NCHW)
  int64_t M() const { return N * S; }
};

// The input in a layout the kernels handle: unchanged when it is contiguous or has its
// channels innermost with dense positions (channels_last, channels_last_3d, (N, C)),
// otherwise a contiguous copy. Fills `shape`.
Tensor canonical_input(const Tensor& input, Shape& shape);

// Same strides as the canonical input (the output keeps the input's memory format).
Tensor empty_like_input(const Tensor& x);

// (N, K, *S) with the layout of x (channels innermost <-> components innermost); an empty
// tensor when K == 1, where tau is identically 1.
Tensor empty_tau(const Tensor& x, const Shape& shape, int64_t K, at::ScalarType acc);

// tau of shape (N, K, *S) (the input's with C -> K) in the accumulation dtype, or raises.
void check_tau(const Tensor& tau, const Tensor& input, int64_t K, at::ScalarType acc);

// tau (checked by check_tau) as the kernels index it, the layout empty_tau gives: itself,
// or a copy when the caller's is another layout.
Tensor canonical_tau(const Tensor& tau, const Tensor& x, const Shape& shape, int64_t K);

at::ScalarType acc_type_of(at::ScalarType input);

// t in the accumulation dtype: itself, or a converted copy (reduced-precision parameters
// and buffers, model.half()); undefined stays undefined.
Tensor to_acc(const Tensor& t, at::ScalarType acc);
OptTensor to_acc(const OptTensor& t, at::ScalarType acc);

// A device guard for backends that need none.
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// Checks shared by every operator; raise ValueError / TypeError / RuntimeError with a
// message that names the argument.
void check_input(const Tensor& input, const char* op);
void check_param(const OptTensor& t, const char* name, const Tensor& input, int64_t K,
                 int64_t C, bool per_channel);
void check_groups(const OptTensor& groups, const Tensor& input, int64_t K);
void check_num_components(int64_t K);

// Checks group ids (CPU tensors) against [0, K). The CPU backend does; the CUDA backend
// leaves it to its kernels (a device-side assert), so that the host never reads device
// memory.
void check_group_values(const OptTensor& groups, int64_t K);

// Everything a backend needs before its kernels run, after the shared checks.
struct TrainSetup {
  Tensor x;  // canonical input
  Shape shape;
  Resp resp;
  at::ScalarType acc;
  // The mixture of the E-step (contiguous): the running buffers themselves (read only), or
  // tensors of this call (owned: the first batch's initialisation, a float32 copy of a
  // reduced-precision buffer), each on its own.
  Tensor mix_mean, mix_var, mix_prior;
  bool owned_mean = false, owned_var = false, owned_prior = false;
  bool all_owned() const { return owned_mean && owned_var && owned_prior; }
};
// require_positions: training needs more than one position (forward_train); the
// building block batch_stats leaves that check to its caller (synced layers check the
// whole process group's batch).
// decide_on_device: the first-batch question (num_batches_tracked == 0) answered on the
// device, without a host read (the CUDA backend, emulated or not); else read on the host.
TrainSetup setup_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                       const OptTensor& groups, int64_t K, double eps, bool require_positions,
                       bool decide_on_device);

// The outputs of the E-step and M-step; alpha, delta: the affine coefficients when the
// backend computes them with the statistics (else undefined). mix_*: the mixture of the
// E-step as the operators return it (mix_outputs below).
struct BatchStats {
  Tensor tau, mean, var, count;
  Tensor alpha, delta;
  Tensor mix_mean, mix_var, mix_prior;
};

// The mixture the operators return for the backward and the running update: with soft
// responsibilities the E-step's mixture (copies of the running buffers, which the running
// update then overwrites, or the tensors of this call); otherwise nothing (empty tensors:
// neither the backward nor the running update needs more than the running buffers).
// `copies` are the backend's copies of st.mix_* (made with the E-step coefficients), used
// when the mixture is the running buffers.
void mix_outputs(const TrainSetup& st, BatchStats& out, Tensor copy_mean, Tensor copy_var,
                 Tensor copy_prior);

// Per-(k, c) coefficients of the backward (cbn_math.h), as rows of K x C values in one
// allocation: alpha, beta, e1, e2 for dtau; p, a, mu for dx; then ev, sum_c e2 v per
// component (the CPU backend: K values; the CUDA one: per-block parts, K x ev_cols).
// dgamma and dbeta: the parameter gradients (K, C).
struct GradCoefs {
  enum Row : int { kAlpha, kBeta, kE1, kE2, kP, kA, kMu, kRows };
  Tensor buf;
  int64_t kc = 0, ev_cols = 1;
  Tensor dgamma, dbeta;

  static GradCoefs make(int64_t K, int64_t C, int64_t ev_cols, const at::TensorOptions& opts);
  template <typename T>
  T* row(Row r) const {
    return buf.data_ptr<T>() + r * kc;
  }
  template <typename T>
  T* ev() const {
    return buf.data_ptr<T>() + kRows * kc;
  }
  void* row_ptr(Row r) const {
    return static_cast<char*>(buf.data_ptr()) + r * kc * buf.element_size();
  }
  void* ev_ptr() const { return row_ptr(kRows); }
};

// Applying given statistics (the normalize operator).
struct ApplySetup {
  Tensor x;
  Shape shape;
  Resp resp;
  at::ScalarType acc;
  int64_t K;
  static ApplySetup from(const TrainSetup& st, int64_t K) {
    return ApplySetup{st.x, st.shape, st.resp, st.acc, K};
  }
};
ApplySetup setup_apply(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const Tensor& tau, const Tensor& mean, const Tensor& var,
                       const OptTensor& groups);

// Sums of the backward given to grad_input: (K, C), like mean.
void check_sums(const Tensor& sum_g, const Tensor& sum_gx, const Tensor& mean);

struct EvalSetup {
  Tensor x;
  Shape shape;
  Resp resp;
  at::ScalarType acc;
};
EvalSetup setup_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const Tensor& running_mean, const Tensor& running_var,
                     const OptTensor& running_prior, const OptTensor& groups, int64_t K,
                     double eps);

struct BackwardSetup {
  Tensor x;     // canonical input
  Tensor grad;  // grad_out with the strides of x
  Shape shape;
  Resp resp;
  at::ScalarType acc;
  int64_t K;
};
BackwardSetup setup_backward(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                             const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                             bool soft);

void check_update_args(const Tensor& running_mean, const Tensor& running_var,
                       const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                       const Tensor& mean, std::optional<double> momentum);

// The first-batch initialisation of the running mixture (SPEC "Initialisation"), with
// ATen operations so it runs on any device. x is the canonical input. Returns mean (K, C),
// var (K, C), prior (K,) in the accumulation dtype.
std::tuple<Tensor, Tensor, Tensor> initial_mixture(const Tensor& x, int64_t K, double eps);

}  // namespace cbn_ext
