// x86-64 build of kernels_impl.h with AVX-512F/BW/VL (+ FMA, F16C; CMake sets the flags
// on this file only); used when the CPU reports them (kernels.cpp).
#define UFB_ISA avx512
#define UFB_VBYTES 64
#include "kernels_impl.h"
