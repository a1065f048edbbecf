// AVX2 + FMA build of the CPU curvature kernels (selected at run time when the CPU has it).
#include "cpu/curvature.h"
#define FA_SIMD_LEVEL 1
#define FA_SIMD_IMPL "cpu/curvature_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_CURVATURE
#include "cpu/simd_variant.inc"
