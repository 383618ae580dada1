// Where the responsibilities of a forward come from; shared by every backend.
#pragma once

#include <cstdint>

namespace cbn_ext {

enum class Resp : int32_t {
  kOne = 0,    // K = 1: tau == 1, nothing stored
  kSoft = 1,   // E-step from the running mixture
  kGiven = 2,  // split path: tau[p, k] = (groups[n(p)] == k)
};

}  // namespace cbn_ext
