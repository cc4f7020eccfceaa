// The cuda backend's extension module kalman_kernels._cuda: registers the kernels of
// ops_impl.h for the CUDA dispatch key of the kalman_kernels::* ops. The ops themselves
// (schemas, fakes, the default kernel and the one wrapper) are defined from Python by
// kalman_kernels/backends/library.py, which kalman_kernels/backends/cuda_backend.py calls
// before importing this module.
#include <Python.h>

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "launch.h"

namespace kk_ops_env {

inline void* stream(const c10::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// Multiprocessor count of the device (sizes the grids), cached per device.
inline int sms(const c10::Device& device) {
  static std::array<std::atomic<int>, 64> cache{};
  const int index = device.index() < 0 ? 0 : device.index();
  if (index < 64) {
    const int cached = cache[index].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, index) != cudaSuccess ||
      value <= 0) {
    (void)cudaGetLastError();  // clear the sticky error state of this query
    value = 108;               // an A100's count: only grid sizes depend on it
  }
  if (index < 64) cache[index].store(value, std::memory_order_relaxed);
  return value;
}

}  // namespace kk_ops_env

#define KK_OPS_DEVICE_TYPE c10::DeviceType::CUDA
#define KK_OPS_LABEL "cuda"
#include "ops_impl.h"

TORCH_LIBRARY_IMPL(kalman_kernels, CUDA, m) { kalman_kernels::cuda_ops::register_kernels(m); }

// `import kalman_kernels._cuda` loads this library, which runs the registration above.
static PyObject* kk_cuda_archs(PyObject*, PyObject*) {
  return PyUnicode_FromString(kalman_kernels::cuda::compiled_archs());
}

static PyMethodDef kk_cuda_methods[] = {
    {"compiled_archs", kk_cuda_archs, METH_NOARGS,
     "The GPU architectures the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kk_cuda_module = {
    PyModuleDef_HEAD_INIT, "_cuda",
    "kalman_kernels CUDA kernels (registered for the CUDA dispatch key of torch.ops.kalman_kernels)",
    -1, kk_cuda_methods};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&kk_cuda_module); }
