#include "cbn_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace cbn_ext {

namespace {

// Channels innermost with dense positions: x[n, c, s...] at ((n S + s) C + c).
bool channels_innermost(const Tensor& x) {
  if (x.stride(1) != 1 && x.size(1) != 1) return false;
  std::vector<int64_t> perm;
  perm.push_back(0);
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

}  // namespace

at::ScalarType acc_type_of(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor to_acc(const Tensor& t, at::ScalarType acc) {
  return !t.defined() || t.scalar_type() == acc ? t : t.to(acc);
}

OptTensor to_acc(const OptTensor& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined() || t->scalar_type() == acc) return t;
  return t->to(acc);
}

Tensor canonical_input(const Tensor& input, Shape& shape) {
  shape.N = input.size(0);
  shape.C = input.size(1);
  shape.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) shape.S *= input.size(d);
  if (input.is_contiguous()) {
    shape.interleaved = shape.S == 1;
    return input;
  }
  if (channels_innermost(input)) {
    shape.interleaved = true;
    return input;
  }
  shape.interleaved = shape.S == 1;
  return input.contiguous();
}

Tensor empty_like_input(const Tensor& x) {
  return at::empty_strided(x.sizes(), x.strides(), x.options());
}

Tensor empty_tau(const Tensor& x, const Shape& shape, int64_t K, at::ScalarType acc) {
  auto opts = x.options().dtype(acc);
  if (K == 1) return at::empty({0}, opts);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[1] = K;
  if (!shape.interleaved || x.dim() == 2) return at::empty(sizes, opts);
  // components innermost: allocate (N, *S, K) and view it as (N, K, *S)
  std::vector<int64_t> inner{sizes[0]};
  for (int64_t d = 2; d < x.dim(); ++d) inner.push_back(sizes[d]);
  inner.push_back(K);
  std::vector<int64_t> perm{0, x.dim() - 1};
  for (int64_t d = 1; d < x.dim() - 1; ++d) perm.push_back(d);
  return at::empty(inner, opts).permute(perm);
}

void check_tau(const Tensor& tau, const Tensor& input, int64_t K, at::ScalarType acc) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes[1] = K;
  TORCH_CHECK_VALUE(tau.sizes() == at::IntArrayRef(sizes), "tau has shape ", tau.sizes(),
                    ", expected ", at::IntArrayRef(sizes), " (the input's, with C -> K)");
  TORCH_CHECK_TYPE(tau.scalar_type() == acc, "tau has dtype ", dtype_name(tau.scalar_type()),
                   ", expected ", dtype_name(acc), " (the input's accumulation type)");
}

Tensor canonical_tau(const Tensor& tau, const Tensor& x, const Shape& shape, int64_t K) {
  if (K == 1) return tau;  // identically 1, never read
  const bool inner = shape.interleaved && x.dim() > 2;
  if (inner ? tau.movedim(1, -1).is_contiguous() : tau.is_contiguous()) return tau;
  // another layout (tau.contiguous() of a channels-last forward's, say): the kernels index
  // tau with the layout of x, so a copy in that layout
  Tensor out = empty_tau(x, shape, K, tau.scalar_type());
  out.copy_(tau);
  return out;
}

void check_input(const Tensor& input, const char* op) {
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   op, ": expected a float32, float64, float16 or bfloat16 input, got ",
                   dtype_name(t));
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": expected an input of shape (N, C, *), got ",
                    input.dim(), "D input");
  TORCH_CHECK_VALUE(input.size(1) > 0, op, ": the input has no channels");
}

void check_num_components(int64_t K) {
  TORCH_CHECK_VALUE(K >= 1, "num_components must be at least 1, got ", K);
}

void check_param(const OptTensor& t, const char* name, const Tensor& input, int64_t K,
                 int64_t C, bool per_channel) {
  if (!t.has_value() || !t->defined()) return;
  const Tensor& p = *t;
  TORCH_CHECK(p.device() == input.device(), "expected ", name, " on ", input.device(),
              " (the input's device), got ", p.device());
  const auto in = input.scalar_type();
  const auto acc = acc_type_of(in);
  // SPEC: float16 / bfloat16 input may come with parameters and buffers in its own dtype
  // (model.half()); otherwise they are float32 (float64 for float64 input)
  const bool reduced = in == at::kHalf || in == at::kBFloat16;
  TORCH_CHECK_TYPE(p.scalar_type() == acc || (reduced && p.scalar_type() == in), "expected ",
                   name, " of dtype ", dtype_name(acc),
                   reduced ? (std::string(" or ") + dtype_name(in)).c_str() : "", " for ",
                   dtype_name(in), " input, got ", dtype_name(p.scalar_type()),
                   " (parameters and buffers are float64 for float64 input, float32 for "
                   "float32 input, and float32 or the input's dtype for float16 and bfloat16 "
                   "input)");
  if (per_channel) {
    TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == K && p.size(1) == C, "expected ", name,
                      " of shape (", K, ", ", C, ") for ", K, " components and an input with ",
                      C, " channels, got ", p.sizes());
  } else {
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == K, "expected ", name, " of shape (", K,
                      ",), got ", p.sizes());
  }
}

void check_groups(const OptTensor& groups, const Tensor& input, int64_t K) {
  if (!groups.has_value() || !groups->defined()) return;
  const Tensor& g = *groups;
  TORCH_CHECK(g.device() == input.device(), "expected groups on ", input.device(),
              " (the input's device), got ", g.device());
  TORCH_CHECK_TYPE(g.scalar_type() == at::kLong, "expected groups of dtype int64, got ",
                   dtype_name(g.scalar_type()));
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == input.size(0),
                    "expected groups of shape (", input.size(0), ",) (one group per sample), got ",
                    g.sizes());
}

namespace {

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

Resp resp_of(int64_t K, const OptTensor& groups) {
  if (K == 1) return Resp::kOne;  // given groups are then all 0: tau == 1 either way
  return defined(groups) ? Resp::kGiven : Resp::kSoft;
}

Tensor grad_like(const Tensor& grad, const Tensor& x) {
  if (grad.sizes() == x.sizes() && grad.strides() == x.strides() &&
      grad.scalar_type() == x.scalar_type())
    return grad;
  Tensor g = empty_like_input(x);
  g.copy_(grad);
  return g;
}

}  // namespace

void check_group_values(const OptTensor& groups, int64_t K) {
  if (!defined(groups) || groups->numel() == 0) return;
  const Tensor g = groups->contiguous();
  const int64_t* p = g.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < K, "expected group ids in [0, ", K, "), got ", p[i],
                      " for sample ", i);
  }
}

TrainSetup setup_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                       const OptTensor& groups, int64_t K, double eps, bool require_positions,
                       bool decide_on_device) {
  check_input(input, "compound_batch_norm");
  check_num_components(K);
  // as F.batch_norm
  TORCH_CHECK_VALUE(eps > 0, "compound_batch_norm eps must be positive during training, but got ",
                    eps);
  TrainSetup st;
  st.x = canonical_input(input, st.shape);
  const int64_t C = st.shape.C;
  TORCH_CHECK_VALUE(!require_positions || st.shape.M() > 1,
                    "Expected more than 1 value per channel when training, got input size ",
                    input.sizes());
  check_param(weight, "weight", input, K, C, true);
  check_param(bias, "bias", input, K, C, true);
  check_param(running_mean, "running_mean", input, K, C, true);
  check_param(running_var, "running_var", input, K, C, true);
  check_param(running_prior, "running_prior", input, K, C, false);
  if (defined(num_batches_tracked)) {
    TORCH_CHECK(num_batches_tracked->device() == input.device() &&
                    num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->numel() == 1,
                "expected num_batches_tracked as an int64 scalar on ", input.device());
  }
  check_groups(groups, input, K);
  st.resp = resp_of(K, groups);
  const bool have_running = defined(running_mean) && defined(running_var);
  TORCH_CHECK_VALUE(have_running || K == 1, "compound_batch_norm with ", K,
                    " components needs running_mean and running_var (the E-step uses the "
                    "running mixture)");
  TORCH_CHECK_VALUE(st.resp != Resp::kSoft || defined(running_prior), "compound_batch_norm with ",
                    K, " components needs running_prior");
  st.acc = acc_type_of(input.scalar_type());
  const auto aopt = st.x.options().dtype(st.acc);
  // The mixture of the E-step: the running one, read in place (the backend returns copies
  // where the backward needs them), or at the first batch (num_batches_tracked == 0, soft
  // E-step) its initialisation from the batch.
  if (have_running) {
    // reduced-precision buffers (model.half()): a float32 copy, which the op may return
    st.mix_mean = to_acc(*running_mean, st.acc).contiguous();
    st.mix_var = to_acc(*running_var, st.acc).contiguous();
    st.owned_mean = !st.mix_mean.is_same(*running_mean);
    st.owned_var = !st.mix_var.is_same(*running_var);
  } else {  // K = 1 without running statistics: never used, as the component is active
    st.mix_mean = at::zeros({K, C}, aopt);
    st.mix_var = at::ones({K, C}, aopt);
    st.owned_mean = st.owned_var = true;
  }
  if (defined(running_prior)) {
    st.mix_prior = to_acc(*running_prior, st.acc).contiguous();
    st.owned_prior = !st.mix_prior.is_same(*running_prior);
  } else {
    st.mix_prior = at::full({K}, 1.0 / static_cast<double>(K), aopt);
    st.owned_prior = true;
  }
  if (st.resp == Resp::kSoft && defined(num_batches_tracked) && st.shape.M() > 0) {
    if (!decide_on_device) {
      // a free read on the CPU
      if (num_batches_tracked->item<int64_t>() == 0) {
        std::tie(st.mix_mean, st.mix_var, st.mix_prior) = initial_mixture(st.x, K, eps);
        st.owned_mean = st.owned_var = st.owned_prior = true;
      }
    } else {
      // decided on the device, without a host-device sync: the initialisation where
      // num_batches_tracked == 0 (callers that know the mixture is initialised pass no
      // num_batches_tracked and skip this work)
      Tensor im, iv, ip;
      std::tie(im, iv, ip) = initial_mixture(st.x, K, eps);
      const Tensor first = num_batches_tracked->reshape({}).eq(0);
      st.mix_mean = at::where(first, im, st.mix_mean);
      st.mix_var = at::where(first, iv, st.mix_var);
      st.mix_prior = at::where(first, ip, st.mix_prior);
      st.owned_mean = st.owned_var = st.owned_prior = true;
    }
  }
  return st;
}

GradCoefs GradCoefs::make(int64_t K, int64_t C, int64_t ev_cols, const at::TensorOptions& opts) {
  GradCoefs g;
  g.kc = K * C;
  g.ev_cols = ev_cols;
  g.buf = at::empty({kRows * K * C + K * ev_cols}, opts);
  g.dgamma = at::empty({K, C}, opts);
  g.dbeta = at::empty({K, C}, opts);
  return g;
}

void mix_outputs(const TrainSetup& st, BatchStats& out, Tensor copy_mean, Tensor copy_var,
                 Tensor copy_prior) {
  if (st.resp != Resp::kSoft) {
    const auto aopt = st.x.options().dtype(st.acc);
    out.mix_mean = at::empty({0}, aopt);  // three tensors: outputs must not alias
    out.mix_var = at::empty({0}, aopt);
    out.mix_prior = at::empty({0}, aopt);
    return;
  }
  // each its own: a buffer is returned as the backend's copy, never as itself
  out.mix_mean = st.owned_mean ? st.mix_mean : std::move(copy_mean);
  out.mix_var = st.owned_var ? st.mix_var : std::move(copy_var);
  out.mix_prior = st.owned_prior ? st.mix_prior : std::move(copy_prior);
}

EvalSetup setup_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const Tensor& running_mean, const Tensor& running_var,
                     const OptTensor& running_prior, const OptTensor& groups, int64_t K,
                     double eps) {
  check_input(input, "compound_batch_norm");
  check_num_components(K);
  TORCH_CHECK_VALUE(eps >= 0, "compound_batch_norm eps must be non-negative, but got ", eps);
  EvalSetup st;
  st.x = canonical_input(input, st.shape);
  const int64_t C = st.shape.C;
  check_param(weight, "weight", input, K, C, true);
  check_param(bias, "bias", input, K, C, true);
  check_param(running_mean, "running_mean", input, K, C, true);
  check_param(running_var, "running_var", input, K, C, true);
  check_param(running_prior, "running_prior", input, K, C, false);
  check_groups(groups, input, K);
  st.resp = resp_of(K, groups);
  TORCH_CHECK_VALUE(st.resp != Resp::kSoft || defined(running_prior), "compound_batch_norm with ",
                    K, " components needs running_prior");
  st.acc = acc_type_of(input.scalar_type());
  return st;
}

BackwardSetup setup_backward(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                             const OptTensor& bias, const Tensor& tau, const Tensor& mean,
                             bool soft) {
  check_input(input, "compound_batch_norm_backward");
  BackwardSetup st;
  st.x = canonical_input(input, st.shape);
  st.K = mean.size(0);
  const int64_t K = st.K, C = st.shape.C;
  check_param(weight, "weight", input, K, C, true);
  check_param(bias, "bias", input, K, C, true);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out has shape ", grad_out.sizes(),
              ", expected ", input.sizes());
  TORCH_CHECK(grad_out.device() == input.device() && tau.device() == input.device(),
              "grad_out and tau must be on the input's device");
  st.resp = K == 1 ? Resp::kOne : (soft ? Resp::kSoft : Resp::kGiven);
  st.acc = acc_type_of(input.scalar_type());
  if (st.resp != Resp::kOne) check_tau(tau, input, K, st.acc);
  st.grad = grad_like(grad_out, st.x);
  return st;
}

ApplySetup setup_apply(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const Tensor& tau, const Tensor& mean, const Tensor& var,
                       const OptTensor& groups) {
  check_input(input, "compound_batch_norm");
  ApplySetup st;
  st.x = canonical_input(input, st.shape);
  st.K = mean.dim() == 2 ? mean.size(0) : 0;
  const int64_t K = st.K, C = st.shape.C;
  check_num_components(K);
  check_param(weight, "weight", input, K, C, true);
  check_param(bias, "bias", input, K, C, true);
  check_param(mean, "mean", input, K, C, true);
  check_param(var, "var", input, K, C, true);
  check_groups(groups, input, K);
  st.acc = acc_type_of(input.scalar_type());
  st.resp = K == 1 ? Resp::kOne : (defined(groups) ? Resp::kGiven : Resp::kSoft);
  if (st.resp != Resp::kOne) {
    TORCH_CHECK(tau.device() == input.device(), "tau must be on the input's device");
    check_tau(tau, input, K, st.acc);
  }
  return st;
}

void check_sums(const Tensor& sum_g, const Tensor& sum_gx, const Tensor& mean) {
  TORCH_CHECK(sum_g.sizes() == mean.sizes() && sum_gx.sizes() == mean.sizes() &&
                  sum_g.scalar_type() == mean.scalar_type() &&
                  sum_gx.scalar_type() == mean.scalar_type() &&
                  sum_g.device() == mean.device() && sum_gx.device() == mean.device(),
              "sum_g and sum_gx must be like mean: ", mean.sizes(), " ", mean.scalar_type());
}

void check_update_args(const Tensor& running_mean, const Tensor& running_var,
                       const OptTensor& running_prior, const OptTensor& num_batches_tracked,
                       const Tensor& mean, std::optional<double> momentum) {
  const int64_t K = mean.size(0);
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "running_mean and running_var must be contiguous");
  TORCH_CHECK(running_mean.sizes() == mean.sizes() && running_var.sizes() == mean.sizes(),
              "running statistics of shape ", running_mean.sizes(), " do not match ",
              mean.sizes());
  // float32 statistics may update float16 / bfloat16 buffers (model.half())
  const auto ok_dtype = [&](at::ScalarType t) {
    return t == mean.scalar_type() ||
           (mean.scalar_type() == at::kFloat && (t == at::kHalf || t == at::kBFloat16));
  };
  TORCH_CHECK_TYPE(ok_dtype(running_mean.scalar_type()) && ok_dtype(running_var.scalar_type()),
                   "running statistics must have dtype ", dtype_name(mean.scalar_type()),
                   " (or, for float32 statistics, float16 or bfloat16), got ",
                   dtype_name(running_mean.scalar_type()), " and ",
                   dtype_name(running_var.scalar_type()));
  TORCH_CHECK(running_mean.device() == mean.device() && running_var.device() == mean.device(),
              "running statistics must be on ", mean.device());
  TORCH_CHECK_VALUE(momentum.has_value() || defined(num_batches_tracked),
                    "momentum=None (a cumulative average) needs num_batches_tracked");
  if (defined(running_prior)) {
    TORCH_CHECK(running_prior->is_contiguous() && running_prior->numel() == K &&
                    ok_dtype(running_prior->scalar_type()) &&
                    running_prior->device() == mean.device(),
                "running_prior must be a contiguous (", K, ",) tensor of dtype ",
                mean.scalar_type(), " on ", mean.device());
  }
  if (defined(num_batches_tracked)) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->device() == mean.device(),
                "num_batches_tracked must be an int64 scalar on ", mean.device());
  }
}

std::tuple<Tensor, Tensor, Tensor> initial_mixture(const Tensor& x, int64_t K, double eps) {
  const int64_t C = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  const Tensor xp = x.movedim(1, -1).reshape({-1, C}).to(acc);  // (M, C), p = n S + s
  const Tensor m = xp.mean(0);
  const Tensor v = xp.var(0, /*unbiased=*/false);
  const Tensor z = ((xp - m) / (v + eps).sqrt()).mean(1);
  const Tensor order = std::get<1>(z.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  std::vector<Tensor> means;
  for (const Tensor& chunk : order.tensor_split(K)) {
    // an empty chunk (M < K) takes the batch mean
    means.push_back(chunk.numel() > 0 ? xp.index_select(0, chunk).mean(0) : m);
  }
  Tensor mean = at::stack(means);
  Tensor var = v.unsqueeze(0).expand({K, C}).clone();
  Tensor prior = at::full({K}, 1.0 / static_cast<double>(K), xp.options());
  return {mean, var, prior};
}

}  // namespace cbn_ext
