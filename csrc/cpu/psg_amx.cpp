// AMX build of psg_project (psg_impl.inc with FA_PSG_AMX): the per-sample gradient blocks
// are formed in fp32 as in the AVX-512 build, split exactly into three bf16 parts and
// multiplied into R on the tile units (amx_tiles.inc). Selected at run time with the
// projection's AMX kernel (FASTATTR_CPU_SIMD=avx512 turns both off); psg_matmul runs the
// AVX-512 build.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/psg.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <omp.h>

#include <new>

#include "cpu/projection.h"
#include "philox.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-bf16")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FA_VEC_BYTES 64
#define FA_MR 8
#define FA_PSG_AMX 1
namespace fastattr {
namespace cpu {
namespace amx {
#include "cpu/psg_impl.inc"
}  // namespace amx
}  // namespace cpu
}  // namespace fastattr
#pragma GCC pop_options

#else  // no x86 tile units: never selected, kept so the dispatch links everywhere

namespace fastattr {
namespace cpu {
namespace amx {
void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads) {
  generic::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
}
}  // namespace amx
}  // namespace cpu
}  // namespace fastattr

#endif
