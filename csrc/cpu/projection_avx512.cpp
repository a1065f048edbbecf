// AVX-512 build of the CPU projection kernel (selected at run time when the CPU has it).
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#include "cpu/projection.h"
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
#include "cpu/projection_impl.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace fastattr
#pragma GCC pop_options
#else
#include "cpu/projection_forward.inc"
FA_FORWARD_TO_GENERIC(avx512)
#endif
