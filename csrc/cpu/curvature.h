// fastattr CPU curvature (K-FAC / EK-FAC) accumulation kernels.
//
//   covariance:   S[g] = sum_v v_g v_g^T (upper triangle computed, mirrored) and s[g] = sum_v v_g
//                 over the rows v of a linear input [N, T, F] or of the patch vectors of an NCHW
//                 conv input (formed in the kernel, never unfolded whole); reduce: one row per
//                 (n, group), the sum over its tokens / positions.
//   ekfac_lambda: L[o, f] = sum_n (sum_p g[n, p, o] a[n, p, f])^2, each datum's O x F product
//                 formed tile by tile in cache, never written out.
// Exact definitions: fastattr/reference/curvature.py.
#pragma once
#include <stdint.h>

namespace fastattr {
namespace cpu {

// One covariance input, a raw pointer into a contiguous tensor.
//   linear (conv == 0): x [n, h, channels] (h = tokens, w = h_out = w_out = 1), groups = 1
//   conv2d (conv == 1): x [n, channels, h, w], geometry kh..groups, output h_out x w_out
struct CovInput {
  const void* x;
  int dtype;  // DType
  int conv;
  int reduce;
  int64_t n, channels, h, w, h_out, w_out;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

// acc == nullptr: S (contiguous float32 [groups, F, F], symmetric) and s ([groups, F]) fully
// overwritten. acc != nullptr: S and s are unused (may be null) and the call instead adds, in
// float64, its upper triangle packed row by row into acc [groups, F(F+1)/2] (row i's entries
// j >= i at i*F - i*(i-1)/2 + j - i) and its sums into acc_s [groups, F].
void covariance(float* S, float* s, double* acc, double* acc_s, const CovInput& in, int threads);

// L: contiguous float32 [o, f], fully overwritten; a [n, p, f], g [n, p, o] contiguous.
void ekfac_lambda(float* L, const void* a, int a_dtype, const void* g, int g_dtype, int64_t n,
                  int64_t p, int64_t f, int64_t o, int threads);

// Per-ISA entry points (curvature_impl.inc compiled once per target).
#define FA_DECLARE_CURVATURE_ISA(ns)                                                          \
  namespace ns {                                                                              \
  void covariance(float* S, float* s, double* acc, double* acc_s, const CovInput& in,      \
                  int threads);                                                              \
  void ekfac_lambda(float* L, const void* a, int a_dtype, const void* g, int g_dtype,        \
                    int64_t n, int64_t p, int64_t f, int64_t o, int threads);                \
  }
FA_DECLARE_CURVATURE_ISA(avx512)
FA_DECLARE_CURVATURE_ISA(avx2)
FA_DECLARE_CURVATURE_ISA(generic)
#undef FA_DECLARE_CURVATURE_ISA

}  // namespace cpu
}  // namespace fastattr

// simd_variant.inc's FA_SIMD_FORWARD for this family: where no x86 SIMD build exists, the
// AVX2 / AVX-512 entry points forward to the generic one.
#define FA_FORWARD_CURVATURE(ns)                                                              \
  namespace fastattr {                                                                        \
  namespace cpu {                                                                             \
  namespace ns {                                                                              \
  void covariance(float* S, float* s, double* acc, double* acc_s, const CovInput& in,        \
                  int threads) {                                                              \
    generic::covariance(S, s, acc, acc_s, in, threads);                                       \
  }                                                                                           \
  void ekfac_lambda(float* L, const void* a, int a_dtype, const void* g, int g_dtype,        \
                    int64_t n, int64_t p, int64_t f, int64_t o, int threads) {               \
    generic::ekfac_lambda(L, a, a_dtype, g, g_dtype, n, p, f, o, threads);                    \
  }                                                                                           \
  }                                                                                           \
  }                                                                                           \
  }
