// fastattr CPU projection kernels: y[B, k] = sum_l x_l[B, p_l] @ R[off_l : off_l + p_l, :].
// R is generated tile by tile from csrc/philox.h and never stored.
#pragma once
#include <stdint.h>

#include "projection_types.h"

namespace fastattr {
namespace cpu {

using fastattr::DType;
using fastattr::Layer;
using fastattr::MatrixSpec;

// out: contiguous float32 [batch, k]; fully overwritten.
void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads);

// out: contiguous float32 [n, k], row r = R[rows[r], :].
void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec, int threads);

// Which SIMD variant `project` runs: "amx", "avx512", "avx2" or "generic". FASTATTR_CPU_SIMD
// (same names) forces a lower one, for testing every variant on one machine.
const char* simd_level();

// Whether the CPU has the bf16 tile units and the OS granted this process their state
// (projection_amx.cpp; asks Linux for it on the first call).
bool amx_usable();

// Per-ISA entry points (projection_impl.inc compiled once per target).
#define FA_DECLARE_ISA(ns)                                                                    \
  namespace ns {                                                                              \
  void project(float* out, int64_t batch, const Layer* layers, int n_layers,                  \
               const MatrixSpec& spec, int threads);                                          \
  void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec,        \
                   int threads);                                                              \
  }
FA_DECLARE_ISA(avx512)
namespace amx {  // projection_amx.cpp: project only
void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads);
}
FA_DECLARE_ISA(avx2)
FA_DECLARE_ISA(generic)
#undef FA_DECLARE_ISA

}  // namespace cpu
}  // namespace fastattr
