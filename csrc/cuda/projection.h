// fastattr CUDA projection kernels: host launch functions.
//
// y[B, k] = sum_l x_l[B, p_l] @ R[off_l : off_l + p_l, :], R generated on the fly from
// csrc/philox.h (never stored), tensor-core MMA with fp32 accumulation. Same op and same
// matrix as csrc/cpu/projection.h.
//
// This header needs no CUDA headers, so that csrc/cuda/bindings.cpp compiles with the plain
// host compiler: the stream is a `CUstream_st*`, which is exactly what cudaStream_t is.
// Every function enqueues work on `stream` and returns; a failed CUDA call or kernel launch
// throws std::runtime_error carrying the CUDA error name and string (never silent zeros).
#pragma once
#include <stdint.h>

#include "projection_types.h"

struct CUstream_st;

namespace fastattr {
namespace cuda {

using fastattr::DType;
using fastattr::Layer;
using fastattr::MatrixSpec;

// out: contiguous float32 [batch, k] device buffer; fully overwritten. Deterministic: no
// float atomics; split-K partial sums are reduced in a fixed order.
void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             CUstream_st* stream);

// out: contiguous float32 [n, k] device buffer, row r = R[rows[r], :]; rows: int64 device array.
void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec,
                 CUstream_st* stream);

// Probes that never throw: the number of visible devices (0 when there is no device or no
// usable driver; device_status() then says why), and versions as CUDA encodes them
// (1000 * major + 10 * minor; driver 0 when no driver is installed).
int device_count();
const char* device_status();
int runtime_version();
int driver_version();
// SASS/PTX targets this module was compiled for, e.g. "800,900" ("" when unknown).
const char* compiled_archs();

}  // namespace cuda
}  // namespace fastattr
