// Portable build of the CPU loops: 16-byte vectors (NEON on Apple Silicon / arm64,
// SSE2 on any x86-64), compiled with the compiler's default target flags.
#define UFB_ISA generic
#define UFB_VBYTES 16
#include "loops_table.h"
