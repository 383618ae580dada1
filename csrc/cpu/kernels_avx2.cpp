// The CPU kernels compiled for AVX2, FMA and F16C, selected at run time when the
// processor has them (cbn_cpu.cpp). The pragma comes after every external header, so only the kernels
// defined below are compiled for AVX2: no inline function shared with other translation
// units can end up with AVX2 instructions.
#include "kernels_deps.h"

#if defined(CBN_HAVE_AVX2_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CBN_CPU_ISA avx2
#define CBN_CPU_F16C 1
#define CBN_CPU_AVX2 1
#include "kernels_impl.h"
#pragma GCC pop_options
#endif
