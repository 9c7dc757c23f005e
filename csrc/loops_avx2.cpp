// x86-64 build of the CPU loops with AVX2 + FMA + F16C (CMake sets -mavx2 -mfma -mf16c
// on this file only); used when the CPU reports all three (loops.cpp).
#define UFB_ISA avx2
#define UFB_VBYTES 32
#include "loops_table.h"
