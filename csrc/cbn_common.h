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

at::ScalarType acc_type_of(at::ScalarType input);

// Checks shared by every operator; raise ValueError / TypeError / RuntimeError with a
// message that names the argument.
void check_input(const Tensor& input, const char* op);
void check_param(const OptTensor& t, const char* name, const Tensor& input, int64_t K,
                 int64_t C, bool per_channel);
void check_groups(const OptTensor& groups, const Tensor& input, int64_t K);
void check_num_components(int64_t K);

// Checks group ids against [0, K) (reads them: a device sync on a GPU).
void check_group_values(const OptTensor& groups, int64_t K);

// Everything a backend needs before its kernels run, after the shared checks.
struct TrainSetup {
  Tensor x;  // canonical input
  Shape shape;
  Resp resp;
  at::ScalarType acc;
  // the mixture of the E-step: the running one, or the first batch's initialisation
  Tensor mix_mean, mix_var, mix_prior;
};
// require_positions: training needs more than one position (forward_train); the
// building block batch_stats leaves that check to its caller (synced layers check the
// whole process group's batch).
TrainSetup setup_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                       const OptTensor& groups, int64_t K, double eps, bool require_positions);

// The outputs of the E-step and M-step; alpha, delta: the affine coefficients when the
// backend computes them with the statistics (else undefined).
struct BatchStats {
  Tensor tau, mean, var, count;
  Tensor alpha, delta;
};

// Per-(k, c) coefficients of the backward (cbn_math.h): alpha, beta, e1, e2 for dtau;
// p, q, a, amu for dx; dgamma and dbeta. ev: sum_c e2 v per component (the CPU backend:
// (K,); the CUDA one: per-block parts, (K, blocks)).
struct GradCoefs {
  Tensor alpha, beta, e1, e2, ev, p, q, a, amu, dgamma, dbeta;
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
                     const OptTensor& running_prior, const OptTensor& groups, int64_t K);

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
