// The one nvcc translation unit of the cuda backend: the kernels and their launchers
// (kernels.cuh, interface in launch.h). No torch headers here, so it compiles quickly;
// the operator layer (ops.cpp) is compiled by the host compiler.
#include "kernels.cuh"
