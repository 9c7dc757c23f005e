// One instruction-set build of the CPU loops: every family, and the table that
// loops.cpp chooses among. Included once by each of loops_avx512.cpp, loops_avx2.cpp and
// loops_generic.cpp after they define UFB_ISA and UFB_VBYTES.
#include "loops_attention.h"
#include "loops_fff.h"
#include "loops_norm.h"
#include "loops_vec.h"

namespace ufb {
namespace UFB_ISA {

#define UFB_STR2(s) #s
#define UFB_STR(s) UFB_STR2(s)
extern const LoopTable kTable = {
    UFB_STR(UFB_ISA),
    forward_scratch,
    forward,
    backward_tokens_scratch,
    backward_tokens,
    backward_rows,
    gelu_loop,
    gelu_vjp_loop,
    layer_norm_rows,
    layer_norm_vjp_scratch,
    layer_norm_vjp_rows,
    attention_forward_scratch,
    attention_forward,
    attention_backward_scratch,
    attention_backward,
};
#undef UFB_STR
#undef UFB_STR2

}  // namespace UFB_ISA
}  // namespace ufb
