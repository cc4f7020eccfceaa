// The CPU kernels compiled for one instruction set; setup.py passes the flags and
// -DCPU_CAPABILITY=DEFAULT for this file (see kernels_impl.h).
#include "kernels_impl.h"
