// The storage dtype of one array, decided at run time: the one enum the operator layers of
// both C++ backends route with (csrc/kk_checks.h maps ATen dtypes onto it) and their kernels
// read (csrc/cpu/kernels_impl.h through kk_kernels.h, csrc/cuda/kernels.cuh through
// launch.h). Plain C++, no torch: kernel translation units stay light and nvcc never sees
// ATen (docs/design.md, 4.3 and 7).
#pragma once
#include <cstdint>

namespace kalman_kernels {

enum class KKType : int32_t { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

}  // namespace kalman_kernels
