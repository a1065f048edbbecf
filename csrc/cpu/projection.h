// fastattr CPU projection kernels: y[B, k] = sum_l x_l[B, p_l] @ R[off_l : off_l + p_l, :].
// R is generated tile by tile from csrc/philox.h and never stored.
#pragma once
#include <stdint.h>

namespace fastattr {
namespace cpu {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One layer of the input: a strided [B, p] matrix of dtype `dtype` whose columns are input
// indices [offset, offset + p) of R.
struct Layer {
  const void* data;
  int dtype;
  int64_t p;
  int64_t stride_b;  // elements
  int64_t stride_p;  // elements
  int64_t offset;
};

struct MatrixSpec {
  int64_t k;
  int kind;  // fastattr::Kind
  uint32_t key0, key1, stream;
  float scale;
};

// out: contiguous float32 [batch, k]; fully overwritten.
void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads);

// out: contiguous float32 [n, k], row r = R[rows[r], :].
void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec, int threads);

// Which SIMD variant `project` runs: "avx512", "avx2" or "generic". FASTATTR_CPU_SIMD
// (same names) forces a lower one, for testing every variant on one machine.
const char* simd_level();

// Per-ISA entry points (projection_impl.inc compiled once per target).
#define FA_DECLARE_ISA(ns)                                                                    \
  namespace ns {                                                                              \
  void project(float* out, int64_t batch, const Layer* layers, int n_layers,                  \
               const MatrixSpec& spec, int threads);                                          \
  void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec,        \
                   int threads);                                                              \
  }
FA_DECLARE_ISA(avx512)
FA_DECLARE_ISA(avx2)
FA_DECLARE_ISA(generic)
#undef FA_DECLARE_ISA

}  // namespace cpu
}  // namespace fastattr
