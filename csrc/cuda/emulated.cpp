// Test tooling, not part of the package: the cuda backend's kernels (kernels.cuh) and
// operator layer (ops_impl.h) compiled with a host compiler against the CPU emulator of
// emulate.h, registered for the CPU dispatch key of a separate namespace,
// kalman_kernels_cuda_emulated::* (schemas from kalman_kernels/backends/library.py, defined
// by tests/cuda_emulation.py before it loads this library). Lets the per-op tests run the
// CUDA kernels' code on machines without a GPU.
#ifndef KK_CUDA_EMULATE
#define KK_CUDA_EMULATE 1
#endif

#include "kernels.cuh"

#include <c10/core/Device.h>

namespace kk_ops_env {
inline void* stream(const c10::Device&) { return nullptr; }
// A small multiprocessor count: grids of a few blocks, so that multi-chunk and
// multi-split paths run at test sizes.
inline int sms(const c10::Device&) { return 2; }
}  // namespace kk_ops_env

#define KK_OPS_DEVICE_TYPE c10::DeviceType::CPU
#define KK_OPS_LABEL "cuda (emulated on CPU)"
#include "ops_impl.h"

TORCH_LIBRARY_IMPL(kalman_kernels_cuda_emulated, CPU, m) {
  kalman_kernels::cuda_ops::register_kernels(m);
}
