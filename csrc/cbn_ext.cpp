// The cbn_ext operator library: schemas (one TORCH_LIBRARY block, csrc/cbn_schemas.h),
// autograd (csrc/cbn_autograd.h) and the Python module that loads them. Backends register
// their kernels with TORCH_LIBRARY_IMPL in csrc/cpu/cbn_cpu.cpp and csrc/cuda/.
//
// Operators (SPEC notation; K components, C channels, M positions):
//   forward_train: E-step (or given groups), M-step and normalization with batch
//     statistics. Returns the output, tau (layout of the input, C -> K; empty for K = 1),
//     the batch mean and biased variance (K, C) (the mixture's for inactive components),
//     the counts N_k (K,), and the mixture the E-step used (mean, var, prior), which is
//     the running one or, at the first batch (num_batches_tracked == 0, soft E-step),
//     its initialisation. Pure: the running buffers are updated by update_running_stats.
//   forward_eval: E-step (or given groups) and normalization with the running statistics.
//   backward_train / backward_eval: gradients of the input, weight and bias.
//   update_running_stats: the running update from forward_train's statistics, in place;
//     nothing changes when an active statistic is not finite.
// Building blocks (no autograd), for layers that combine statistics across processes:
//   batch_stats: forward_train's E-step and M-step without the normalization (and without
//     its check that there is more than one position), returning the raw moments: the
//     weighted mean and biased variance of every component, even an inactive one (0 for
//     an empty one), so that callers can merge them across processes;
//   normalize: y = sum_k tau_k (gamma (x - mean) / sqrt(var + eps) + beta), given tau and
//     the statistics;
//   grad_sums: Sg = sum_p g tau and Sgx = sum_p g tau (x - mean), (K, C) each;
//   grad_input: the input gradient of backward_train (batch_stats=True) or backward_eval,
//     given the sums (those of the whole process group).
// The backward operators and grad_input take tau as the forward gave it: soft
// responsibilities sum to 1 over the components at every position (the CPU kernels of
// two components rely on it: dl_1 = -dl_0, cbn_math.h dtau_pair_coefs).
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "cbn_autograd.h"
#include "cbn_schemas.h"

#if defined(CBN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif
#include <torch/csrc/api/include/torch/version.h>

namespace cbn_ext {
namespace cpu {
const char* cpu_isa();
int64_t stream_min_bytes();
int64_t streamed_output_count();
}
}  // namespace cbn_ext

TORCH_LIBRARY(cbn_ext, m) { cbn_ext::define_operators(m); }

namespace {
constexpr char kLibrary[] = "cbn_ext";
}  // namespace

TORCH_LIBRARY_IMPL(cbn_ext, Autograd, m) { cbn_ext::register_autograd<kLibrary>(m); }

namespace {

#define CBN_STR2(x) #x
#define CBN_STR(x) CBN_STR2(x)

// What this binary was built with: {"cpu": True, "cuda": bool, "torch": str,
// "cuda_version": str | None, "cuda_archs": str | None, "cpu_isa": str,
// "cpu_stream_min_bytes": int | None}.
PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  auto set = [&](const char* key, PyObject* value) {
    PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
  };
  set("cpu", PyBool_FromLong(1));
#if defined(CBN_WITH_CUDA)
  set("cuda", PyBool_FromLong(1));
  const std::string cuda = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string((CUDART_VERSION % 1000) / 10);
  set("cuda_version", PyUnicode_FromString(cuda.c_str()));
  set("cuda_archs", PyUnicode_FromString(CBN_STR(CBN_CUDA_ARCHS)));
#else
  set("cuda", PyBool_FromLong(0));
  Py_INCREF(Py_None);
  set("cuda_version", Py_None);
  Py_INCREF(Py_None);
  set("cuda_archs", Py_None);
#endif
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                    std::to_string(TORCH_VERSION_MINOR) + "." +
                                    std::to_string(TORCH_VERSION_PATCH);
  set("torch", PyUnicode_FromString(torch_version.c_str()));
  set("cpu_isa", PyUnicode_FromString(cbn_ext::cpu::cpu_isa()));
  // None where nothing is streamed, or where CBN_EXT_STREAM_MIN_BYTES is not a number
  // (then the CPU operators raise, saying so; build_info itself does not)
  int64_t stream = INT64_MAX;
  try {
    stream = cbn_ext::cpu::stream_min_bytes();
  } catch (...) {
  }
  if (stream == INT64_MAX) {
    Py_INCREF(Py_None);
    set("cpu_stream_min_bytes", Py_None);
  } else {
    set("cpu_stream_min_bytes", PyLong_FromLongLong(stream));
  }
  return d;
}

// How many outputs the CPU kernels have written by non-temporal stores in this process.
PyObject* stream_count(PyObject*, PyObject*) {
  return PyLong_FromLongLong(cbn_ext::cpu::streamed_output_count());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this binary was built with."},
    {"_stream_count", stream_count, METH_NOARGS,
     "How many outputs the CPU kernels have written by non-temporal stores (tests)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

// Importing cbn_ext._C loads this library, which registers the operators.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
