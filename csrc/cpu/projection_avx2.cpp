// AVX2 + FMA build of the CPU projection kernel (selected at run time when the CPU has it).
#define FA_SIMD_LEVEL 1
#define FA_SIMD_IMPL "cpu/projection_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_PROJECTION
#include "cpu/simd_variant.inc"
