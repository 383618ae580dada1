// The emulated CUDA backend: the CUDA backend's steps (csrc/cuda/*.cu, compiled as host
// C++ against cuda_emu.h) composed into the same operators, with the same schemas, as
// torch.ops.cbn_ext_emu.* on CPU tensors; and the Python module cbn_ext._emu, which loads
// them and sets the emulation's schedule.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <map>
#include <tuple>

#include <string>
#include <vector>

#include "../cbn_autograd.h"
#include "../cbn_ops.h"
#include "../cbn_schemas.h"
#include "../cuda/cuda_backend.h"
#include "../cuda/cuda_utils.cuh"

namespace cbn_ext {
namespace emu {
void set_seed(uint64_t seed);
uint64_t get_seed();
int set_multiprocessors(int n);
std::tuple<uint64_t, uint64_t, uint64_t> stats();
std::map<std::string, uint64_t> launched();
size_t shared_variables();

// Kernels with planted defects, for the self-test: each must be caught.
namespace selftest {

__global__ void static_smem_kernel(uint32_t* out, bool write) {
  CBN_STATIC_SMEM(uint32_t[2], v);
  if (write) {
    v[threadIdx.x % 2] = 7u;
  } else if (threadIdx.x == 0) {
    out[blockIdx.x] = v[blockIdx.x % 2];  // never written in this launch
  }
}

__global__ void dynamic_smem_kernel(float* out, int past_end) {
  CBN_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x + past_end] = 1.0f;  // one past the end for the last thread if past_end
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buf[0];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Sum of x over the block; without the barrier between the warps' partial sums and
// their use, the result depends on the order in which threads run.
__global__ void block_sum_kernel(const float* x, float* out, bool barrier) {
  CBN_STATIC_SMEM(float[8], part);
  float v = x[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  if (barrier) __syncthreads();
  float t = (threadIdx.x & 31) < 8 ? part[threadIdx.x & 31] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  if (threadIdx.x == 0) out[0] = t;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace selftest
}  // namespace emu
}  // namespace cbn_ext

TORCH_LIBRARY(cbn_ext_emu, m) { cbn_ext::define_operators(m); }

TORCH_LIBRARY_IMPL(cbn_ext_emu, CPU, m) {
  cbn_ext::register_operators<cbn_ext::cuda::CudaBackend>(m);
}

namespace {
constexpr char kLibrary[] = "cbn_ext_emu";
}  // namespace

TORCH_LIBRARY_IMPL(cbn_ext_emu, Autograd, m) { cbn_ext::register_autograd<kLibrary>(m); }

namespace {

// set_seed(seed): the order in which threads resume after barriers and warp operations
// (0: always in thread order); returns the previous seed.
PyObject* set_seed(PyObject*, PyObject* arg) {
  const unsigned long long seed = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  const uint64_t old = cbn_ext::emu::get_seed();
  cbn_ext::emu::set_seed(seed);
  return PyLong_FromUnsignedLongLong(old);
}

// set_multiprocessors(n): the emulated device's multiprocessor count, which the tile
// plans and grids follow (132 by default, an H100/H200); returns the previous count.
PyObject* set_multiprocessors(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (n < 1 || n > 1024) {
    PyErr_SetString(PyExc_ValueError, "set_multiprocessors: expected a count in [1, 1024]");
    return nullptr;
  }
  return PyLong_FromLong(cbn_ext::emu::set_multiprocessors(static_cast<int>(n)));
}

// stats() -> {"launches", "blocks", "switches"} since the library was loaded.
PyObject* stats(PyObject*, PyObject*) {
  const auto s = cbn_ext::emu::stats();
  return Py_BuildValue("{s:K,s:K,s:K}", "launches", (unsigned long long)std::get<0>(s), "blocks",
                       (unsigned long long)std::get<1>(s), "switches",
                       (unsigned long long)std::get<2>(s));
}

// launched() -> {kernel name: launches} since the library was loaded: which of csrc/cuda's
// kernels a workload runs (gpu_smoke's quick cases must run them all: the sanitizers on a
// GPU check only the kernels those cases launch).
PyObject* launched(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (const auto& [name, n] : cbn_ext::emu::launched()) {
    PyObject* v = PyLong_FromUnsignedLongLong(n);
    const int rc = v == nullptr ? -1 : PyDict_SetItemString(d, name.c_str(), v);
    Py_XDECREF(v);
    if (rc != 0) {
      Py_DECREF(d);
      return nullptr;
    }
  }
  return d;
}

// device() -> the emulated device's properties.
PyObject* device(PyObject*, PyObject*) {
  const auto& p = cbn_ext::emu::device_props();
  return Py_BuildValue("{s:i,s:n,s:n,s:i}", "multi_processor_count", p.multiProcessorCount,
                       "shared_memory_per_block", (Py_ssize_t)p.sharedMemPerBlock,
                       "shared_memory_per_block_optin", (Py_ssize_t)p.sharedMemPerBlockOptin,
                       "max_threads_per_block", p.maxThreadsPerBlock);
}

// self_test() -> what the emulation reports for kernels with planted defects.
PyObject* self_test(PyObject*, PyObject*) {
  using namespace cbn_ext::emu::selftest;
  PyObject* d = PyDict_New();
  auto set = [&](const char* key, PyObject* value) {
    PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
  };
  std::vector<uint32_t> u(2, 0);
  std::vector<float> f(64, 0.0f);
  std::vector<int> i(64, 0);
  const std::string e0 = error_of([&] {
    CBN_LAUNCH_KERNEL(static_smem_kernel, 2, 32, 0, u.data(), true);
    CBN_LAUNCH_KERNEL(static_smem_kernel, 2, 32, 0, u.data(), false);
  });
  set("static_smem_read_before_write", PyLong_FromUnsignedLong(e0.empty() ? u[0] : 0));
  set("static_smem_read_before_write_2", PyLong_FromUnsignedLong(e0.empty() ? u[1] : 0));
  set("shared_variables", PyLong_FromSize_t(cbn_ext::emu::shared_variables()));
  set("dynamic_smem_in_bounds", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(dynamic_smem_kernel, 1, 64, 64 * sizeof(float), f.data(), 0);
      }).c_str()));
  set("dynamic_smem_past_end", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(dynamic_smem_kernel, 1, 64, 64 * sizeof(float), f.data(), 1);
      }).c_str()));
  set("divergent_barrier", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(divergent_barrier_kernel, 1, 64, 0, i.data());
      }).c_str()));
  set("partial_warp", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(partial_warp_kernel, 1, 48, 0, f.data());
      }).c_str()));
  set("too_many_threads", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(partial_warp_kernel, 1, 2048, 0, f.data());
      }).c_str()));
  set("smem_without_opt_in", PyUnicode_FromString(error_of([&] {
        CBN_LAUNCH_KERNEL(dynamic_smem_kernel, 1, 64, 64 * 1024, f.data(), 0);
      }).c_str()));
  // the sum of 256 ones, with and without the barrier, under several schedules
  std::vector<float> ones(256, 1.0f), out(1, 0.0f);
  PyObject* with = PyList_New(0);
  PyObject* without = PyList_New(0);
  const uint64_t old_seed = cbn_ext::emu::get_seed();
  for (uint64_t seed : {0ull, 1ull, 2ull, 3ull, 4ull, 5ull}) {
    cbn_ext::emu::set_seed(seed);
    for (bool barrier : {true, false}) {
      CBN_LAUNCH_KERNEL(block_sum_kernel, 1, 256, 0, ones.data(), out.data(), barrier);
      PyObject* v = PyFloat_FromDouble(out[0]);
      PyList_Append(barrier ? with : without, v);
      Py_DECREF(v);
    }
  }
  cbn_ext::emu::set_seed(old_seed);
  set("block_sum_with_barrier", with);
  set("block_sum_without_barrier", without);
  return d;
}

PyMethodDef methods[] = {
    {"self_test", self_test, METH_NOARGS, "Kernels with planted defects and what is reported."},
    {"set_seed", set_seed, METH_O, "Set the emulation's schedule seed; returns the old one."},
    {"set_multiprocessors", set_multiprocessors, METH_O,
     "Set the emulated device's multiprocessor count; returns the old one."},
    {"stats", stats, METH_NOARGS, "Launches, blocks and fiber switches so far."},
    {"launched", launched, METH_NOARGS, "Launches per kernel name so far."},
    {"device", device, METH_NOARGS, "The emulated device's properties."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__emu(void) { return PyModule_Create(&module_def); }
