// Portable build of the CPU curvature kernels and the run-time choice between SIMD variants
// (the same one the projection and psg kernels use: active_simd_level()).
#include "cpu/curvature.h"
#define FA_SIMD_LEVEL 0
#define FA_SIMD_IMPL "cpu/curvature_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_CURVATURE
#include "cpu/simd_variant.inc"
#include "cpu/simd.h"

namespace fastattr {
namespace cpu {

void covariance(float* S, float* s, double* acc, double* acc_s, const CovInput& in,
                int threads) {
  FA_SIMD_DISPATCH(covariance(S, s, acc, acc_s, in, threads))
}

void ekfac_lambda(float* L, const void* a, int a_dtype, const void* g, int g_dtype, int64_t n,
                  int64_t p, int64_t f, int64_t o, int threads) {
  FA_SIMD_DISPATCH(ekfac_lambda(L, a, a_dtype, g, g_dtype, n, p, f, o, threads))
}

}  // namespace cpu
}  // namespace fastattr
