// Every external header the CPU kernels need, included before an instruction-set pragma
// so that nothing declared in them is compiled for that instruction set
// (kernels_avx2.cpp). ../cbn_math.h is not here: kernels_impl.h includes it after the
// pragma, since its always-inline formulas must take the kernels' instruction set (they
// call back into the kernels' vector functions). Being always inlined, they are never
// emitted out of line, so no translation unit shares a copy of them.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "cpu_kernels.h"
