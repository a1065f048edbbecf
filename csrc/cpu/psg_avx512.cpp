// AVX-512 build of the CPU fused per-sample-gradient kernels (selected at run time when the
// CPU has it).
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#include "cpu/projection.h"
#include "cpu/psg.h"
#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
// GCC 12 flags the intentionally undefined vectors inside its own AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FA_VEC_BYTES 64
#define FA_MR 8
namespace fastattr {
namespace cpu {
namespace avx512 {
#include "cpu/psg_impl.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace fastattr
#pragma GCC pop_options
#else
namespace fastattr {
namespace cpu {
namespace avx512 {  // no x86 SIMD variants on this target: forward to the generic build
void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads) {
  generic::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
}
void psg_matmul(float* out, const PsgLayer& layer, const PsgQuery& query, int threads) {
  generic::psg_matmul(out, layer, query, threads);
}
}  // namespace avx512
}  // namespace cpu
}  // namespace fastattr
#endif
