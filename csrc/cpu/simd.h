// Run-time choice between the SIMD builds of the CPU kernels (simd_variant.inc), shared by the
// projection (projection.cpp) and the per-sample-gradient kernels (psg.cpp).
#pragma once

namespace fastattr {
namespace cpu {

// kSimdAmx: AVX-512 plus the bf16 tile units (projection_amx.cpp, and psg_amx.cpp for
// psg_project); the other kernels run their AVX-512 build there.
enum SimdLevel { kSimdGeneric = 0, kSimdAvx2 = 1, kSimdAvx512 = 2, kSimdAmx = 3 };

// The hardware level, lowered by FASTATTR_CPU_SIMD=generic|avx2|avx512 (never raised); simd_level()
// (projection.h) names it. Defined in projection.cpp.
SimdLevel active_simd_level();

}  // namespace cpu
}  // namespace fastattr

// `return isa::call;` for the active level's namespace (avx512, avx2 or generic), inside
// namespace fastattr::cpu: FA_SIMD_DISPATCH(project(out, batch, layers, n_layers, spec, threads))
#define FA_SIMD_DISPATCH(call)                                                                \
  switch (active_simd_level()) {                                                              \
    case kSimdAmx:                                                                            \
    case kSimdAvx512: return avx512::call;                                                    \
    case kSimdAvx2: return avx2::call;                                                        \
    default: return generic::call;                                                            \
  }
