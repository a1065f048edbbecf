// Portable build of the CPU projection kernel and the run-time choice between SIMD variants.
#define FA_SIMD_LEVEL 0
#define FA_SIMD_IMPL "cpu/projection_impl.inc"
#define FA_SIMD_FORWARD FA_FORWARD_PROJECTION
#include "cpu/simd_variant.inc"
#include "cpu/simd.h"

namespace fastattr {
namespace cpu {

namespace {
SimdLevel hardware_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return amx_usable() ? kSimdAmx : kSimdAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kSimdAvx2;
#endif
  return kSimdGeneric;
}
}  // namespace

SimdLevel active_simd_level() {
  static const SimdLevel hw = hardware_level();
  const char* env = getenv("FASTATTR_CPU_SIMD");
  SimdLevel want = hw;
  if (env && strcmp(env, "generic") == 0) want = kSimdGeneric;
  if (env && strcmp(env, "avx2") == 0) want = kSimdAvx2;
  if (env && strcmp(env, "avx512") == 0) want = kSimdAvx512;
  return want < hw ? want : hw;
}

const char* simd_level() {
  switch (active_simd_level()) {
    case kSimdAmx: return "amx";
    case kSimdAvx512: return "avx512";
    case kSimdAvx2: return "avx2";
    default: return "generic";
  }
}

void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads) {
  if (active_simd_level() == kSimdAmx) return amx::project(out, batch, layers, n_layers, spec, threads);
  FA_SIMD_DISPATCH(project(out, batch, layers, n_layers, spec, threads))
}

void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec, int threads) {
  FA_SIMD_DISPATCH(materialize(out, rows, n, spec, threads))
}

}  // namespace cpu
}  // namespace fastattr
