// fastattr CUDA fused per-sample-gradient kernels: host launch functions.
//
// For one Linear / Conv2d call with inputs a and output gradients g, the per-sample weight
// gradient of segment (sample) b is G_b[o, f] = sum_{r in b, s} g[r, o, s] A[r, f, s], flattened
// [d_out, F]; the bias gradient is sum_{r in b, s} g[r, o, s]. These kernels multiply G_b (and
// the bias gradient) straight into a right-hand matrix without ever writing G_b to memory:
//
//   psg_project: out[b, j] = scale * (sum_{o,f} G_b[o,f] Z[w_offset + o F + f, j]
//                                     + sum_o bias_b[o] Z[b_offset + o, j]),
//                Z the unscaled Philox matrix of csrc/philox.h (the projection's matrix);
//   psg_matmul:  out[b, j] = sum_{o,f} G_b[o,f] Q[j, o, f] + sum_o bias_b[o] Qb[j, o].
//
// Same contract as csrc/cuda/projection.h: no CUDA headers here (bindings.cpp compiles with the
// host compiler), raw device pointers, work enqueued on `stream`, invalid arguments throw
// std::invalid_argument, a failed CUDA call or launch throws std::runtime_error. Deterministic:
// no float atomics; split partial sums are reduced in a fixed order.
#pragma once
#include <stdint.h>

#include "projection_types.h"

struct CUstream_st;

namespace fastattr {
namespace cuda {

// One layer call, contiguous tensors (fastattr/psg.py makes them so):
//   linear (conv_ndim == 0): a [n_rows, T, d_in], g [n_rows, T, d_out];
//   conv2d (conv_ndim == 9): a [n_rows, C_in, H, W], g [n_rows, C_out, H_out, W_out] (NCHW),
//                            conv = (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
//                            groups).
// Segments: rows of segment b are order[seg_ptr[b] : seg_ptr[b + 1]] (int64 device arrays,
// seg_ptr has batch + 1 entries, non-decreasing, order entries in [0, n_rows): not checked).
struct PsgInput {
  const void* a;
  int a_dtype;  // DType code (projection_types.h)
  const void* g;
  int g_dtype;
  int64_t a_shape[4];  // 3 used for linear
  int64_t g_shape[4];
  int is_conv;
  int conv[9];
  const int64_t* seg_ptr;
  const int64_t* order;
  int64_t batch;  // segments
};

// out: contiguous float32 [batch, spec.k] device buffer, fully overwritten. The bias gradient
// is included when has_bias (at rows [b_offset, b_offset + d_out) of Z).
void psg_project(float* out, const PsgInput& in, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, CUstream_st* stream);

// out: contiguous float32 [batch, q] device buffer, fully overwritten. q_weight: contiguous
// [q, d_out, F]; q_bias: contiguous [q, d_out] or nullptr (no bias term).
void psg_matmul(float* out, const PsgInput& in, const void* q_weight, int q_dtype, int64_t q,
                const void* q_bias, int q_bias_dtype, CUstream_st* stream);

}  // namespace cuda
}  // namespace fastattr
