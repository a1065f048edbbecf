// Portable build of the CPU fused per-sample-gradient kernels and the run-time choice between
// SIMD variants (the same one the projection uses: active_simd_level()).
#define FA_SIMD_LEVEL 0
#define FA_SIMD_IMPL "cpu/psg_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_PSG
#include "cpu/simd_variant.inc"
#include "cpu/simd.h"

namespace fastattr {
namespace cpu {

void psg_project(float* out, const PsgLayer& layer, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, int threads) {
  if (active_simd_level() == kSimdAmx)
    return amx::psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads);
  FA_SIMD_DISPATCH(psg_project(out, layer, has_bias, w_offset, b_offset, spec, threads))
}

void psg_matmul(float* out, const PsgLayer& layer, const PsgQuery& query, int threads) {
  FA_SIMD_DISPATCH(psg_matmul(out, layer, query, threads))
}

}  // namespace cpu
}  // namespace fastattr
