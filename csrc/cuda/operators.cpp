// Registers the CUDA backend's operators (composed in csrc/cbn_ops.h).
#include <torch/library.h>

#include "../cbn_ops.h"
#include "cuda_backend.h"

TORCH_LIBRARY_IMPL(cbn_ext, CUDA, m) {
  cbn_ext::register_operators<cbn_ext::cuda::CudaBackend>(m);
}
