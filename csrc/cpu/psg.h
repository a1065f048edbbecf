// fastattr CPU fused per-sample-gradient kernels (issue 3).
//
// For one Linear / Conv2d call, the per-sample weight gradient G_b = sum_{r in b} g_r a_r^T
// (conv: over output positions, patches formed from the NCHW input) is formed block by block
// in cache and multiplied straight into the right-hand side, never written out whole:
//   psg_project: out[B, k] = vec(G_b) @ R[w_offset + i, :] (+ bias_b @ R[b_offset + o, :])
//   psg_matmul:  out[B, q] = <G_b, Q_j>                    (+ <bias_b, Qbias_j>)
#pragma once
#include <stdint.h>

#include "projection_types.h"

namespace fastattr {
namespace cpu {

// One layer call, raw pointers into contiguous tensors, and its segments (samples).
//   linear: a [N, T, d_in], g [N, T, d_out]          (conv == 0; h = T, w = h_out = w_out = 1)
//   conv2d: a [N, d_in, h, w], g [N, d_out, h_out, w_out], geometry kh..groups (conv == 1)
// Rows of sample b are order[seg_ptr[b] .. seg_ptr[b + 1]).
struct PsgLayer {
  const void* a;
  int a_dtype;  // DType
  const void* g;
  int g_dtype;
  int64_t n_rows;
  const int64_t* seg_ptr;  // [batch + 1]
  const int64_t* order;    // [n_rows]
  int64_t batch;
  int conv;
  int64_t d_in, d_out;
  int64_t h, w, h_out, w_out;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

// The loaded right-hand side of psg_matmul: weight [q, d_out * F] (the parameter's flat
// layout), bias [q, d_out] or null.
struct PsgQuery {
  const void* weight;
  int weight_dtype;
  const void* bias;
  int bias_dtype;
  int64_t q;
};

// out: contiguous float32 [batch, spec.k], fully overwritten.
void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads);

// out: contiguous float32 [batch, query.q], fully overwritten.
void psg_matmul(float* out, const PsgLayer& layer, const PsgQuery& query, int threads);

// Per-ISA entry points (psg_impl.inc compiled once per target).
#define FA_DECLARE_PSG_ISA(ns)                                                                \
  namespace ns {                                                                              \
  void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,        \
                   int64_t b_offset, const MatrixSpec& spec, int threads);                    \
  void psg_matmul(float* out, const PsgLayer& layer, const PsgQuery& query, int threads);     \
  }
FA_DECLARE_PSG_ISA(avx512)
FA_DECLARE_PSG_ISA(avx2)
FA_DECLARE_PSG_ISA(generic)
#undef FA_DECLARE_PSG_ISA

// The tile-unit build of psg_project (psg_amx.cpp); psg_matmul has none.
namespace amx {
void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads);
}

}  // namespace cpu
}  // namespace fastattr
