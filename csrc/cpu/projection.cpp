// Portable build of the CPU projection kernel and the run-time choice between SIMD variants.
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#include "cpu/projection.h"
#include "philox.h"

#define FA_VEC_BYTES 16
#define FA_MR 4
namespace fastattr {
namespace cpu {
namespace generic {
#include "cpu/projection_impl.inc"
}  // namespace generic

namespace {
enum Level { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Level hardware_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

// The hardware level, lowered by FASTATTR_CPU_SIMD=generic|avx2 (never raised).
Level active_level() {
  static const Level hw = hardware_level();
  const char* env = getenv("FASTATTR_CPU_SIMD");
  Level want = hw;
  if (env && strcmp(env, "generic") == 0) want = kGeneric;
  if (env && strcmp(env, "avx2") == 0) want = kAvx2;
  return want < hw ? want : hw;
}
}  // namespace

const char* simd_level() {
  switch (active_level()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads) {
  switch (active_level()) {
    case kAvx512: return avx512::project(out, batch, layers, n_layers, spec, threads);
    case kAvx2: return avx2::project(out, batch, layers, n_layers, spec, threads);
    default: return generic::project(out, batch, layers, n_layers, spec, threads);
  }
}

void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec, int threads) {
  switch (active_level()) {
    case kAvx512: return avx512::materialize(out, rows, n, spec, threads);
    case kAvx2: return avx2::materialize(out, rows, n, spec, threads);
    default: return generic::materialize(out, rows, n, spec, threads);
  }
}

}  // namespace cpu
}  // namespace fastattr
