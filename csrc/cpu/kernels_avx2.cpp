// The CPU kernels compiled for one instruction set; setup.py passes the flags and
// -DCPU_CAPABILITY=AVX2 for this file (see kernels_impl.h).
#include "kernels_impl.h"
