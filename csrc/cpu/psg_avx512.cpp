// AVX-512 build of the CPU fused per-sample-gradient kernels (selected at run time when the
// CPU has it).
#define FA_SIMD_LEVEL 2
#define FA_SIMD_IMPL "cpu/psg_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_PSG
#include "cpu/simd_variant.inc"
