// Types shared by the CPU and CUDA projection kernels (no CUDA or torch headers).
#pragma once
#include <stdint.h>

namespace fastattr {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One layer of the input: a strided [B, p] matrix of dtype `dtype` whose columns are input
// indices [offset, offset + p) of R. Strides are in elements (any values, 64-bit).
struct Layer {
  const void* data;
  int dtype;
  int64_t p;
  int64_t stride_b;
  int64_t stride_p;
  int64_t offset;
};

// The matrix R: k columns, Kind (philox.h), Philox key and stream, entry scale 1/sqrt(k).
struct MatrixSpec {
  int64_t k;
  int kind;
  uint32_t key0, key1, stream;
  float scale;
};

}  // namespace fastattr
