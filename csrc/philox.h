// fastattr: the one definition of the random projection matrix for host and device code.
//
// Philox4x32-10 (Salmon et al. 2011; the generator of Random123 and cuRAND), the key
// derivation and the fp32 Rademacher / Gaussian entry formulas of shared/DESIGN.md.
// Everything here is branch-free scalar code so that it inlines into CUDA kernels and
// auto-vectorises in the CPU loops (which call it lane by lane).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD static inline
#endif

namespace fastattr {

// Streams separate the uses of one seed (DESIGN.md).
enum Stream : uint32_t {
  kStreamProjection = 0,
  kStreamNoise = 1,
  kStreamOutput = 2,
  kStreamKronLeft = 3,
  kStreamKronRight = 4,
};

enum Kind : int { kRademacher = 0, kGaussian = 1 };

static constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
static constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
static constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
static constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10: counter (c0..c3), key (k0, k1) -> (o0..o3). Scalar outputs by reference so
// that CPU lane loops vectorise (an output array would become a scatter store).
FA_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                         uint32_t k1, uint32_t& o0, uint32_t& o1, uint32_t& o2, uint32_t& o3) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)  // nvcc's front end rejects GCC pragmas
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = (uint64_t)kPhiloxM0 * c0;
    const uint64_t p1 = (uint64_t)kPhiloxM1 * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  o0 = c0;
  o1 = c1;
  o2 = c2;
  o3 = c3;
}

FA_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                         uint32_t k1, uint32_t out[4]) {
  philox4x32_10(c0, c1, c2, c3, k0, k1, out[0], out[1], out[2], out[3]);
}

// splitmix64 finaliser.
FA_HD uint64_t splitmix64_mix(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

// Philox key of (seed, ensemble_id): mix(seed ^ mix(ensemble_id)); k0 = low 32 bits.
FA_HD uint64_t philox_key(uint64_t seed, uint64_t ensemble_id) {
  return splitmix64_mix(seed ^ splitmix64_mix(ensemble_id));
}

FA_HD float fa_uint_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

FA_HD uint32_t fa_float_as_uint(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

// -2 ln(u) for the uniform u = ((w >> 8) + 0.5) * 2^-24 of DESIGN.md, in fp32, accurate to a
// few ulp for every w. u = (2m+1) 2^-25 needs 25 bits; it is only rounded where that is
// harmless:
//   u <= sqrt(1/2): v = fl(u) (exact below 1/2, relative error 2^-25 above, where |ln u| >
//                   0.34 keeps the result's relative error below 1e-7); v = 2^e f with f in
//                   [sqrt(1/2), sqrt(2)) and ln u = e ln2 + 2 atanh((f-1)/(f+1));
//   u >  sqrt(1/2): y = 1 - u = (2^25 - 2m - 1) 2^-25 is exact (an odd integer < 2^24), and
//                   ln u = 2 atanh(-y / (2 - y)), free of the cancellation of ln(fl(u)).
// Either way |s| <= 0.1716 and the atanh series to s^9 is exact to < 3e-9 relative.
FA_HD float fa_neg2log_uniform(uint32_t w) {
  const uint32_t m = w >> 8;
  const bool upper = m >= 11863283u;  // (2m+1) 2^-25 > sqrt(1/2)
  const int32_t n = upper ? (int32_t)((1u << 25) - 2u * m - 1u) : (int32_t)(2u * m + 1u);
  const float v = (float)n * 0x1p-25f;  // y when upper, else u
  const uint32_t bits = fa_float_as_uint(v);
  int e = (int)((bits >> 23) & 0xffu) - 127;
  float f = fa_uint_as_float((bits & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = f > 1.41421356f;
  f = big ? 0.5f * f : f;
  e += big ? 1 : 0;
  const float num = upper ? -v : f - 1.0f;
  const float den = upper ? 2.0f - v : f + 1.0f;
  const float ef = upper ? 0.0f : (float)e;
  const float s = num / den;
  const float s2 = s * s;
  float poly = 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  const float atanh2 = 2.0f * s + 2.0f * s * s2 * poly;
  const float ln2_hi = 0.693145751953125f;          // 11 significant bits: e*ln2_hi is exact
  const float ln2_lo = 1.42860682030941723212e-6f;  // ln2 - ln2_hi
  const float ln_u = ef * ln2_hi + (ef * ln2_lo + atanh2);
  return -2.0f * ln_u;
}

// sin and cos of 2*pi*u, u = ((w >> 8) + 0.5) * 2^-24. Range reduction is done on the integer:
// 4u = (2m+1) 2^-23 quarter turns = q + r 2^-23 with q the nearest integer and |r| <= 2^22,
// so x = r 2^-23 * pi/2 lies in [-pi/4, pi/4]; Taylor polynomials finish it (to x^9 and
// x^10: the next terms are below 2e-9).
FA_HD void fa_sincos_2pi_uniform(uint32_t w, float* s_out, float* c_out) {
  const uint32_t m = w >> 8;
  const uint32_t q = (m + (1u << 21)) >> 22;  // 0..4
  const int32_t r = (int32_t)(2u * m + 1u) - (int32_t)(q << 23);
  const float x = (float)r * (1.57079632679489662f * 0x1p-23f);
  const float x2 = x * x;
  float sp = 1.0f / 362880.0f;
  sp = sp * x2 - 1.0f / 5040.0f;
  sp = sp * x2 + 1.0f / 120.0f;
  sp = sp * x2 - 1.0f / 6.0f;
  const float sx = x + x * x2 * sp;
  float cp = -1.0f / 3628800.0f;
  cp = cp * x2 + 1.0f / 40320.0f;
  cp = cp * x2 - 1.0f / 720.0f;
  cp = cp * x2 + 1.0f / 24.0f;
  cp = cp * x2 - 0.5f;
  const float cx = 1.0f + x2 * cp;
  // sin(q pi/2 + x), cos(q pi/2 + x): odd q swaps sin and cos; sin is negated for q = 2, 3 and
  // cos for q = 1, 2 (sign flips as bit operations keep the code branch-free).
  const uint32_t odd = q & 1u;
  const float sv = odd ? cx : sx;
  const float cv = odd ? sx : cx;
  const uint32_t sin_neg = ((q >> 1) & 1u) << 31;
  const uint32_t cos_neg = ((q ^ (q >> 1)) & 1u) << 31;
  *s_out = fa_uint_as_float(fa_float_as_uint(sv) ^ sin_neg);
  *c_out = fa_uint_as_float(fa_float_as_uint(cv) ^ cos_neg);
}

// The four Gaussian entries (unscaled) of one Philox output: Box-Muller on words (0,1), (2,3).
// `scale` multiplies the radius (1 for the unscaled entries).
FA_HD void fa_gaussian4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float& z0, float& z1,
                        float& z2, float& z3, float scale = 1.0f) {
  const float r0 = sqrtf(fa_neg2log_uniform(w0)) * scale;
  const float r1 = sqrtf(fa_neg2log_uniform(w2)) * scale;
  float s0, c0, s1, c1;
  fa_sincos_2pi_uniform(w1, &s0, &c0);
  fa_sincos_2pi_uniform(w3, &s1, &c1);
  z0 = r0 * c0;
  z1 = r0 * s0;
  z2 = r1 * c1;
  z3 = r1 * s1;
}

FA_HD void fa_gaussian4(const uint32_t w[4], float z[4]) {
  fa_gaussian4(w[0], w[1], w[2], w[3], z[0], z[1], z[2], z[3]);
}

}  // namespace fastattr
