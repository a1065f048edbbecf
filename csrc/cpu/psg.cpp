// Portable build of the CPU fused per-sample-gradient kernels and the run-time choice between
// SIMD variants (the same one the projection uses: simd_level()).
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#include "cpu/projection.h"
#include "cpu/psg.h"
#include "philox.h"

#define FA_VEC_BYTES 16
#define FA_MR 4
namespace fastattr {
namespace cpu {
namespace generic {
#include "cpu/psg_impl.inc"
}  // namespace generic

void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads) {
  const char* level = simd_level();
  if (strcmp(level, "avx512") == 0)
    return avx512::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
  if (strcmp(level, "avx2") == 0)
    return avx2::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
  return generic::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
}

void psg_matmul(float* out, const PsgLayer& layer, const PsgQuery& query, int threads) {
  const char* level = simd_level();
  if (strcmp(level, "avx512") == 0) return avx512::psg_matmul(out, layer, query, threads);
  if (strcmp(level, "avx2") == 0) return avx2::psg_matmul(out, layer, query, threads);
  return generic::psg_matmul(out, layer, query, threads);
}

}  // namespace cpu
}  // namespace fastattr
