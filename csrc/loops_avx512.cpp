// x86-64 build of the CPU loops with AVX-512F/BW/VL (+ FMA, F16C; CMake sets the flags
// on this file only); used when the CPU reports them (loops.cpp).
#define UFB_ISA avx512
#define UFB_VBYTES 64
#include "loops_table.h"
