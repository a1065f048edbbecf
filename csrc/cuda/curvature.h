// fastattr CUDA curvature (K-FAC / EK-FAC) accumulation kernels: host launch functions.
//
//   covariance:   S[g] = sum_v v_g v_g^T and s[g] = sum_v v_g over the rows v of a layer input
//                 or output gradient (conv: patch vectors gathered in-kernel from NCHW, per
//                 channel group; reduce: one row per (n, group), the sum over its positions);
//   ekfac_lambda: L[o, f] = sum_n (sum_p g[n, p, o] a[n, p, f])^2, never forming g_n^T a_n.
//
// The exact definitions are fastattr/reference/curvature.py. Same contract as psg.h: no CUDA
// headers here (bindings.cpp compiles with the host compiler), raw device pointers of
// contiguous tensors, work enqueued on `stream`, invalid arguments throw std::invalid_argument,
// a failed CUDA call or launch throws std::runtime_error. Outputs are fully overwritten.
// Deterministic: no float atomics; split partial sums are reduced in a fixed order.
#pragma once
#include <stdint.h>

#include "projection_types.h"

struct CUstream_st;

namespace fastattr {
namespace cuda {

// x: [N, T, F] (is_conv == 0) or NCHW [N, C, H, W] (is_conv != 0, conv = kh, kw, stride_h,
// stride_w, pad_h, pad_w, dil_h, dil_w, groups), dtype a DType code (projection_types.h).
// S: float32 [G, F, F] (exactly symmetric), s: float32 [G, F]; G = 1 for linear, else groups,
// F = d_in for linear, else C / groups * kh * kw.
void covariance(float* S, float* s, const void* x, int x_dtype, const int64_t* x_shape,
                int is_conv, const int* conv, bool reduce, CUstream_st* stream);

// a: [n, p, f], g: [n, p, o] (dtype codes a_dtype, g_dtype); out: float32 [o, f].
void ekfac_lambda(float* out, const void* a, int a_dtype, const void* g, int g_dtype, int64_t n,
                  int64_t p, int64_t f, int64_t o, CUstream_st* stream);

}  // namespace cuda
}  // namespace fastattr
