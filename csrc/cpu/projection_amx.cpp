// AMX build of the CPU projection kernel: y[B, k] = sum_l x_l[B, p_l] @ R[off_l + i, j] on the
// bf16 tile units of Sapphire Rapids and later (selected at run time when the CPU and the OS
// allow it; FASTATTR_CPU_SIMD=avx512 turns it off).
//
// fp32-accurate, not a bf16 approximation: three bf16 numbers carry fp32's 24-bit significand
// exactly (x = x0 + x1 + x2, each part the bf16 rounding of what the earlier parts left), and
// the tile unit multiplies bf16 pairs exactly and accumulates in fp32. So
//   Rademacher: R is +-1 (exact in bf16, the 1/sqrt(k) scale is applied to the fp32 sums):
//               y = sum_s x_s @ R, three bf16 products, no term dropped;
//   Gaussian:   R = R0 + R1 + R2 as well; y = sum over s + t <= 2 of x_s @ R_t (six products;
//               the dropped terms are below 2^-24 relative, under fp32 rounding).
// bf16 inputs need one part, fp16 two (11-bit significand). The tile unit flushes bf16
// subnormals, so parts below 2^-126 (of inputs below ~1e-33) are dropped. Per core a tile
// product runs at up to 16x the AVX-512 fp32 FMA rate, so even six of them beat the fp32
// micro-kernel (benchmarks/RESULTS.md has the measured figures).
//
// Same blocking as projection_impl.inc: for column block jc / layer / input block i0:
//   pack x[:, i0:i0+akc] into bf16 A tiles (16 batch rows x 32 inputs, one per part),
//   generate R[i0:i0+akc, columns] and pack it into VNNI B tiles (16 input pairs x 16 columns),
//   2x2 (or 1x4) blocks of 16x16 fp32 C tiles sum the block's products in the tile
//   registers, then y += scale * C.
// Every output element sees the same sequence of tile products whatever the batch size or the
// thread count, so results are deterministic and identical for any split of the batch.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/projection.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <new>

#include "philox.h"

namespace fastattr {
namespace cpu {

bool amx_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), tile_bf16 = d & (1u << 22);
    const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 17)) && (b & (1u << 31));
    if (!tile || !tile_bf16 || !avx512) return false;
    __get_cpuid_count(7, 1, &a, &b, &c, &d);
    if (!(a & (1u << 5))) return false;  // AVX512_BF16 (the fp32 -> bf16 conversions)
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const unsigned want = (1u << 17) | (1u << 18) | 0xe6u;  // tile config + data, AVX-512 state
    if ((xcr0_lo & want) != want) return false;
    // Linux hands out the 8 KiB tile state only on request (once per process, all threads).
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

}  // namespace cpu
}  // namespace fastattr

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-bf16")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FA_VEC_BYTES 64
#define FA_MR 8
namespace fastattr {
namespace cpu {
namespace amx {

#include "cpu/gemm_tiles.inc"

// Inputs per block (a multiple of 32, the tile depth) and the columns a thread generates at a
// time. Deeper blocks amortise the C tile stores; the B tiles of one stretch should stay in
// the thread's L2 (2 MiB here): Rademacher 512 inputs x its whole share of a 2048-column tile
// (one part: 1 MiB), Gaussian 1024 inputs x 256 columns (three parts: 1.5 MiB). Tuned on the
// acceptance shape of benchmarks/bench_projection.py.
static constexpr int64_t AKC_RADEMACHER = 512;
static constexpr int64_t AKC_GAUSSIAN = 1024;
static constexpr int64_t GAUSS_STRETCH = 256;
static constexpr int64_t ANCB = 2048;  // columns of one generated tile (multiple of 128)
static constexpr int TILE = 512;       // bf16 elements of one A or B tile (16 x 64 bytes)

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile register is 16 rows of 64 bytes: C tiles 0-3 (16 x 16 fp32), A / B tiles 4-7.
static void configure_tiles() {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// fp32 bits rounded to the nearest bf16 (ties to even), still as fp32 bits (low half zero).
// Integer ops: a short dependency chain, unlike a convert-and-widen round trip.
static inline __m512i round_to_bf16(__m512i u) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u));
}

// The first n of v's three bf16 parts, as fp32 bits with a zero low half: v == u[0] + u[1] +
// u[2] exactly for n = 3 (each part is the bf16 rounding of what the earlier ones left; the
// subtractions are exact; an input's NaN or infinity makes the sum NaN or infinite too).
static inline void split_bf16(__m512 v, int n, __m512i* u) {
  for (int s = 0; s < n; ++s) {
    u[s] = round_to_bf16(_mm512_castps_si512(v));
    if (s + 1 < n) v = _mm512_sub_ps(v, _mm512_castsi512_ps(u[s]));
  }
}

// The A tiles of 16-row block rb for inputs [i0, i0 + kc) of layer L: tile (ks, s) holds part s
// of x[rb*16 + r, i0 + 32*ks + t] at row r, element t; zeros past the batch and past kc.
static void pack_a_block(const Layer& L, int64_t batch, int64_t rb, int64_t i0, int64_t kc,
                         int nks, int nsx, uint16_t* ap) {
  alignas(64) float buf[32];
  for (int r = 0; r < 16; ++r) {
    const int64_t b = rb * 16 + r;
    for (int ks = 0; ks < nks; ++ks) {
      const int64_t n = b < batch ? min64(32, kc - 32 * ks) : 0;
      const int64_t base = b * L.stride_b + (i0 + 32 * ks) * L.stride_p;
      if (L.stride_p == 1) {
        load_run(L.data, L.dtype, base, n, buf);
      } else if (L.dtype == kFloat32) {
        for (int64_t t = 0; t < n; ++t) buf[t] = ((const float*)L.data)[base + t * L.stride_p];
      } else if (L.dtype == kBFloat16) {
        for (int64_t t = 0; t < n; ++t) buf[t] = bf16_to_float(((const uint16_t*)L.data)[base + t * L.stride_p]);
      } else {
        for (int64_t t = 0; t < n; ++t) buf[t] = f16_to_float(((const uint16_t*)L.data)[base + t * L.stride_p]);
      }
      for (int64_t t = n; t < 32; ++t) buf[t] = 0.0f;
      uint16_t* dst = ap + (int64_t)ks * 3 * TILE + r * 32;
      for (int h = 0; h < 2; ++h) {
        __m512i u[3];
        split_bf16(_mm512_load_ps(buf + 16 * h), nsx, u);
        for (int s = 0; s < nsx; ++s)  // the high halves are the bf16 numbers
          _mm256_storeu_si256((__m256i*)(dst + s * TILE + 16 * h), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u[s], 16)));
      }
    }
  }
}

// B tile (ks, column tile c, part s) of a block nks tiles deep: one column tile's tiles are
// adjacent (48 KiB at most), so a kernel's tile loads stay within a few pages (with depth-major
// tiles, each load was a TLB miss).
static inline int64_t b_tile_at(int64_t ks, int64_t c, int s, int64_t nks, int nsr) {
  return ((c * nks + ks) * nsr + s) * TILE;
}

// VNNI pairs from two vectors of bf16-exact floats: dword j = (bf16 of lo[j], bf16 of hi[j]).
static inline __m512i vnni_pair(__m512i lo, __m512i hi) {
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 16), hi, _mm512_set1_epi32((int)0xffff0000u),
                                   0xf8);  // lo >> 16 | (hi & mask)
}

// VNNI B tiles from rows 2q and 2q+1 (row0, row1: `width` columns, a multiple of 16, starting
// at column tile c0) of the current block (nks tiles deep): tile (ks = q / 16, column tile c0 + c, part s)
// gets, at row q % 16, the pairs (part s of row0[16c + j], part s of row1[16c + j]), j < 16.
// nsr == 1: the entries are bf16-exact (+-1); nsr == 3: their split_bf16 parts.
static void pack_b_pair(const float* row0, const float* row1, int64_t width, int64_t q, int64_t c0,
                        int64_t nks, int nsr, uint16_t* bp) {
  const int64_t ks = q / 16, qq = q % 16;
  uint16_t* dst = bp + b_tile_at(ks, c0, 0, nks, nsr) + qq * 32;
  const int64_t step = nks * nsr * TILE;  // the next column tile
  if (nsr == 1) {
    for (int64_t c = 0; c < width / 16; ++c)
      _mm512_storeu_si512(dst + c * step, vnni_pair(_mm512_loadu_si512(row0 + 16 * c),
                                                    _mm512_loadu_si512(row1 + 16 * c)));
    return;
  }
  for (int64_t c = 0; c < width / 16; ++c) {
    __m512i u0[3], u1[3];
    split_bf16(_mm512_loadu_ps(row0 + 16 * c), 3, u0);
    split_bf16(_mm512_loadu_ps(row1 + 16 * c), 3, u1);
    for (int t = 0; t < 3; ++t) _mm512_storeu_si512(dst + c * step + t * TILE, vnni_pair(u0[t], u1[t]));
  }
}

// Rows 2q, 2q+1 of input block [i0, i0 + kc) of layer L (zeros past kc), columns
// [jc + c0, jc + c0 + w), generated into row0 / row1 and packed into B tiles.
static void gen_b_pair(const MatrixSpec& gen, const Layer& L, int64_t i0, int64_t kc, int64_t jc,
                       int64_t q, int64_t c0, int64_t w, int nks, int nsr, float* row0, float* row1,
                       uint16_t* bp) {
  float* rows[2] = {row0, row1};
  for (int e = 0; e < 2; ++e) {
    if (2 * q + e < kc) gen_row(gen, L.offset + i0 + 2 * q + e, jc + c0, w, rows[e]);
    else memset(rows[e], 0, (size_t)w * 4);
  }
  pack_b_pair(row0, row1, w, q, c0 / 16, nks, nsr, bp);
}

// The (x part, R part) products to sum, in a fixed order.
struct Products {
  int n;
  uint8_t sx[6], sr[6];
};

static Products products_for(int nsx, int nsr) {
  Products P{};
  for (int t = 0; t < nsr; ++t)
    for (int s = 0; s < nsx; ++s)
      if (s + t <= 2) {
        P.sx[P.n] = (uint8_t)s;
        P.sr[P.n] = (uint8_t)t;
        ++P.n;
      }
  return P;
}

// C tiles 0-3 start at zero for each block of inputs and are added to the output afterwards
// (summing a block in fresh accumulators keeps the rounding error of the long sum small).
#define FA_ZERO_C() \
  _tile_zero(0);    \
  _tile_zero(1);    \
  _tile_zero(2);    \
  _tile_zero(3)
#define FA_STORE_C(scratch)              \
  _tile_stored(0, scratch, 64);          \
  _tile_stored(1, scratch + 256, 64);    \
  _tile_stored(2, scratch + 512, 64);    \
  _tile_stored(3, scratch + 768, 64)

// scratch tiles 0-3 = rows of A blocks a0, a1 x B column tiles ct, ct+1 (a 2 x 2 block) over
// nks tile depths and the products P (grouped by R part: a B tile is loaded once per part).
static inline void kernel_2x2(int nks, const Products& P, int nsr, const uint16_t* a0,
                              const uint16_t* a1, const uint16_t* bp, int64_t ct, float* scratch) {
  FA_ZERO_C();
  for (int ks = 0; ks < nks; ++ks)
    for (int p = 0; p < P.n; ++p) {
      const int64_t ao = ((int64_t)ks * 3 + P.sx[p]) * TILE;
      _tile_loadd(4, a0 + ao, 64);
      _tile_loadd(5, a1 + ao, 64);
      if (p == 0 || P.sr[p] != P.sr[p - 1]) {
        _tile_loadd(6, bp + b_tile_at(ks, ct, P.sr[p], nks, nsr), 64);
        _tile_loadd(7, bp + b_tile_at(ks, ct + 1, P.sr[p], nks, nsr), 64);
      }
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  FA_STORE_C(scratch);
}

// scratch tiles 0-3 = rows of A block a0 x B column tiles ct .. ct+3 (1 x 4); per element the
// same sequence of products as kernel_2x2.
static inline void kernel_1x4(int nks, const Products& P, int nsr, const uint16_t* a0,
                              const uint16_t* bp, int64_t ct, float* scratch) {
  FA_ZERO_C();
  for (int ks = 0; ks < nks; ++ks)
    for (int p = 0; p < P.n; ++p) {
      const int64_t ao = ((int64_t)ks * 3 + P.sx[p]) * TILE;
      const uint16_t* b = bp + b_tile_at(ks, ct, P.sr[p], nks, nsr);
      const int64_t next = (int64_t)nks * nsr * TILE;  // the next column tile, same depth and part
      _tile_loadd(4, a0 + ao, 64);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + next, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 2 * next, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 3 * next, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  FA_STORE_C(scratch);
}

#undef FA_ZERO_C
#undef FA_STORE_C

// out[r, j] += scale * tile[r, j] for the rows and columns that exist (columns past k are
// padding: cols <= 0 writes nothing).
static inline void add_tile(const float* tile, float scale, float* out, int64_t ldo, int64_t rows,
                            int64_t cols) {
  const __mmask16 m = (__mmask16)(cols >= 16 ? 0xffffu : cols <= 0 ? 0u : (1u << cols) - 1u);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < min64(rows, 16); ++r) {
    const __m512 o = _mm512_maskz_loadu_ps(m, out + r * ldo);
    _mm512_mask_storeu_ps(out + r * ldo, m, _mm512_fmadd_ps(s, _mm512_load_ps(tile + 16 * r), o));
  }
}

// One 64-column chunk (column tiles 4cq .. 4cq+3 of the tile, global columns jc + 64cq ...)
// for row group rg (16-row blocks 2rg and 2rg+1, or only 2rg at the end).
static void compute_chunk(int64_t cq, int64_t rg, int64_t n_rb, int nks, const Products& P, int nsr,
                          const uint16_t* ap, const uint16_t* bp, float* out,
                          int64_t batch, int64_t k, int64_t jc, int64_t nc, float scale,
                          float* scratch) {
  const int64_t a_block = (int64_t)nks * 3 * TILE;
  const int64_t rb = 2 * rg;
  if (rb + 1 < n_rb) {
    for (int half = 0; half < 2; ++half) {
      kernel_2x2(nks, P, nsr, ap + rb * a_block, ap + (rb + 1) * a_block, bp, 4 * cq + 2 * half,
                 scratch);
      for (int t = 0; t < 4; ++t) {
        const int64_t row = (rb + t / 2) * 16, col = 64 * cq + 16 * (2 * half + t % 2);
        add_tile(scratch + 256 * t, scale, out + row * k + jc + col, k, batch - row, nc - col);
      }
    }
  } else {
    kernel_1x4(nks, P, nsr, ap + rb * a_block, bp, 4 * cq, scratch);
    for (int t = 0; t < 4; ++t) {
      const int64_t row = rb * 16, col = 64 * cq + 16 * t;
      add_tile(scratch + 256 * t, scale, out + row * k + jc + col, k, batch - row, nc - col);
    }
  }
}

static int parts_of(int dtype) { return dtype == kBFloat16 ? 1 : dtype == kFloat16 ? 2 : 3; }

void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads) {
  const int64_t k = spec.k;
  if (threads <= 0) threads = omp_get_max_threads();
  const bool rademacher = spec.kind == kRademacher;
  const int nsr = rademacher ? 1 : 3;
  MatrixSpec gen = spec;  // Rademacher tiles hold +-1; the scale is applied to the sums
  if (rademacher) gen.scale = 1.0f;
  const float out_scale = rademacher ? spec.scale : 1.0f;
  const int64_t n_rb = (batch + 15) / 16, n_rg = (n_rb + 1) / 2;
  const int64_t akc = rademacher ? AKC_RADEMACHER : AKC_GAUSSIAN;
  const int nks_max = (int)(akc / 32);
  const int64_t tile_cols = round_up(min64(ANCB, k), 64);
  const int64_t rowbuf_len = ANCB + 128;
  uint16_t* ap = (uint16_t*)alloc_aligned(n_rb * nks_max * 3 * TILE * 2);
  uint16_t* bp = (uint16_t*)alloc_aligned(tile_cols / 16 * nks_max * nsr * TILE * 2);
  float* rowbufs = (float*)alloc_aligned(threads * 2 * rowbuf_len * 4);
  float* scratches = (float*)alloc_aligned(threads * 1024 * 4);
  if (!ap || !bp || !rowbufs || !scratches) {
    free(ap);
    free(bp);
    free(rowbufs);
    free(scratches);
    throw std::bad_alloc();
  }
#pragma omp parallel num_threads(threads)
  {
    configure_tiles();
    const int n_threads = omp_get_num_threads(), tid = omp_get_thread_num();
    float* row0 = rowbufs + tid * 2 * rowbuf_len;
    float* row1 = row0 + rowbuf_len;
    float* scratch = scratches + tid * 1024;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) memset(out + b * k, 0, (size_t)k * 4);
    for (int64_t jc = 0; jc < k; jc += ANCB) {
      const int64_t nc = min64(ANCB, k - jc);
      const int64_t nc_pad = round_up(nc, 64);
      const int64_t n_cq = nc_pad / 64;
      // As in projection_impl.inc: with a 128-column group per thread each thread generates
      // and consumes its own columns; otherwise all generate the shared tile, then split it.
      const int64_t n_groups = (nc + 127) / 128;
      const bool by_columns = n_groups >= n_threads;
      const int64_t col_lo = n_groups * tid / n_threads * 128;
      const int64_t col_hi = min64(n_groups * (tid + 1) / n_threads * 128, nc_pad);
      for (int l = 0; l < n_layers; ++l) {
        const Layer& L = layers[l];
        const int nsx = parts_of(L.dtype);
        const Products P = products_for(nsx, nsr);
        for (int64_t i0 = 0; i0 < L.p; i0 += akc) {
          const int64_t kc = min64(akc, L.p - i0);
          const int nks = (int)((kc + 31) / 32);
          const int64_t a_block = (int64_t)nks * 3 * TILE;
#pragma omp for schedule(static)
          for (int64_t rb = 0; rb < n_rb; ++rb) pack_a_block(L, batch, rb, i0, kc, nks, nsx, ap + rb * a_block);
          if (by_columns) {
            // Gaussian B tiles hold three parts: a thread works through its columns in
            // stretches whose tiles stay in its L2
            const int64_t stretch = rademacher ? col_hi - col_lo : GAUSS_STRETCH;
            for (int64_t s0 = col_lo; s0 < col_hi; s0 += stretch) {
              const int64_t s1 = min64(s0 + stretch, col_hi);
              for (int64_t q = 0; q < 16 * nks; ++q) gen_b_pair(gen, L, i0, kc, jc, q, s0, s1 - s0, nks, nsr, row0, row1, bp);
              // row groups outside: a group's A tiles stay in L1 while the B tiles stream by
              for (int64_t rg = 0; rg < n_rg; ++rg)
                for (int64_t cq = s0 / 64; cq < s1 / 64; ++cq)
                  compute_chunk(cq, rg, n_rb, nks, P, nsr, ap, bp, out, batch, k, jc, nc, out_scale,
                                scratch);
            }
#pragma omp barrier
          } else {
#pragma omp for schedule(static)
            for (int64_t q = 0; q < 16 * nks; ++q) gen_b_pair(gen, L, i0, kc, jc, q, 0, nc_pad, nks, nsr, row0, row1, bp);
#pragma omp for schedule(static)
            for (int64_t w = 0; w < n_cq * n_rg; ++w)
              compute_chunk(w / n_rg, w % n_rg, n_rb, nks, P, nsr, ap, bp, out, batch, k, jc,
                            nc, out_scale, scratch);
          }
        }
      }
    }
    _tile_release();
  }
  free(ap);
  free(bp);
  free(rowbufs);
  free(scratches);
}

}  // namespace amx
}  // namespace cpu
}  // namespace fastattr
#pragma GCC pop_options

#else  // no x86 tile units: never selected, kept so the dispatch links everywhere

namespace fastattr {
namespace cpu {
bool amx_usable() { return false; }
namespace amx {
void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads) {
  generic::project(out, batch, layers, n_layers, spec, threads);
}
}  // namespace amx
}  // namespace cpu
}  // namespace fastattr

#endif
