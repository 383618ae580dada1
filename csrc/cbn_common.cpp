#include "cbn_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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
  const auto acc = acc_type_of(input.scalar_type());
  TORCH_CHECK_TYPE(p.scalar_type() == acc, "expected ", name, " of dtype ", dtype_name(acc),
                   " for ", dtype_name(input.scalar_type()), " input, got ",
                   dtype_name(p.scalar_type()),
                   " (parameters and buffers are float64 for float64 input, else float32)");
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
