// The CPU kernels for the compiler's default instruction set (x86-64: SSE2), the
// fallback where AVX2 and FMA are missing, and the only variant on other processors.
#include "kernels_deps.h"

#define CBN_CPU_ISA baseline
#include "kernels_impl.h"
