// The CPU kernels compiled for AVX2, FMA and F16C plus AVX-512 (F, VL, BW, DQ and BF16),
// selected at run time when the processor has them all (cbn_cpu.cpp). The vectors stay
// 32 bytes wide (the same code as kernels_avx2.cpp; prefer-vector-width=256 keeps GCC
// from vectorizing scalar loops with 64-byte registers, which lower the clock of some
// Intel processors; it still copies small arrays by 64-byte moves): what AVX-512 adds is
// the EVEX encoding (32 vector registers, mask registers, ternary logic, embedded
// broadcasts) and the bfloat16 conversion instructions (kernels_impl.h, CBN_CPU_AVX512).
// The pragma comes after every external header, as in kernels_avx2.cpp.
#include "kernels_deps.h"

#if defined(CBN_HAVE_AVX512_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,prefer-vector-width=256")
#define CBN_CPU_ISA avx512
#define CBN_CPU_F16C 1
#define CBN_CPU_AVX2 1
#define CBN_CPU_AVX512 1
#include "kernels_impl.h"
#pragma GCC pop_options
#endif
