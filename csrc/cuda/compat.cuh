// The few device-language primitives the kernels of csrc/cuda/ use, spelled once so that
// the same kernel source compiles with nvcc (the cuda backend) and, with KK_CUDA_EMULATE
// defined, with a host C++ compiler against the CPU emulator of emulate.h (tests only).
//
//   KK_GLOBAL            a kernel                 KK_DEVICE     a device function
//   KK_SHARED(T, a, [n]) a block-shared array     kk_sync()     __syncthreads()
//   kk_tid(), kk_bid_x/y/z(), kk_grid_x()         kk_shfl_xor() a full-warp xor shuffle
//   kk_half / kk_bf16    16-bit storage types     kk_to_float / kk_from_float: conversions
//   kk_launch(kernel, grid, threads, stream, args...) -> a launch, errors thrown
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(KK_CUDA_EMULATE)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "emulate.h"

#define KK_GLOBAL
#define KK_DEVICE inline
#define KK_SHARED(type, name, dims)  \
  static type name dims;             \
  static const bool name##_kk_registered = ::kk_emu::register_shared(name, sizeof(name)); \
  (void)name##_kk_registered

using kk_half = c10::Half;
using kk_bf16 = c10::BFloat16;
using KkDim3 = kk_emu::Dim3;

KK_DEVICE int kk_tid() { return static_cast<int>(kk_emu::current().tid); }
KK_DEVICE int kk_bid_x() { return static_cast<int>(kk_emu::state().block_idx.x); }
KK_DEVICE int kk_bid_y() { return static_cast<int>(kk_emu::state().block_idx.y); }
KK_DEVICE int kk_bid_z() { return static_cast<int>(kk_emu::state().block_idx.z); }
KK_DEVICE int kk_grid_x() { return static_cast<int>(kk_emu::state().grid_dim.x); }
KK_DEVICE void kk_sync() { kk_emu::sync_threads(); }
template <typename T>
KK_DEVICE T kk_shfl_xor(T v, int lane_mask) {
  return kk_emu::shfl_xor(v, lane_mask);
}
KK_DEVICE float kk_to_float(kk_half x) { return static_cast<float>(x); }
KK_DEVICE float kk_to_float(kk_bf16 x) { return static_cast<float>(x); }
KK_DEVICE kk_half kk_half_from_float(float x) { return kk_half(x); }
KK_DEVICE kk_bf16 kk_bf16_from_float(float x) { return kk_bf16(x); }
KK_DEVICE void kk_check_aligned(const void* p, size_t bytes, const char* what) {
  kk_emu::check_aligned(p, bytes, what);
}

template <typename... KArgs, typename... Args>
inline void kk_launch(void (*kernel)(KArgs...), KkDim3 grid, unsigned threads, void* /*stream*/,
                      Args... args) {
  kk_emu::launch(kernel, grid, threads, args...);
}

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define KK_GLOBAL __global__
#define KK_DEVICE __device__ __forceinline__
#define KK_SHARED(type, name, dims) __shared__ type name dims

using kk_half = __half;
using kk_bf16 = __nv_bfloat16;
using KkDim3 = dim3;

KK_DEVICE int kk_tid() { return static_cast<int>(threadIdx.x); }
KK_DEVICE int kk_bid_x() { return static_cast<int>(blockIdx.x); }
KK_DEVICE int kk_bid_y() { return static_cast<int>(blockIdx.y); }
KK_DEVICE int kk_bid_z() { return static_cast<int>(blockIdx.z); }
KK_DEVICE int kk_grid_x() { return static_cast<int>(gridDim.x); }
KK_DEVICE void kk_sync() { __syncthreads(); }
template <typename T>
KK_DEVICE T kk_shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
KK_DEVICE float kk_to_float(kk_half x) { return __half2float(x); }
KK_DEVICE float kk_to_float(kk_bf16 x) { return __bfloat162float(x); }
KK_DEVICE kk_half kk_half_from_float(float x) { return __float2half_rn(x); }
KK_DEVICE kk_bf16 kk_bf16_from_float(float x) { return __float2bfloat16_rn(x); }
KK_DEVICE void kk_check_aligned(const void*, size_t, const char*) {}

template <typename... KArgs, typename... Args>
inline void kk_launch(void (*kernel)(KArgs...), KkDim3 grid, unsigned threads, void* stream,
                      Args... args) {
  kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(args...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kalman_kernels cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

#endif
