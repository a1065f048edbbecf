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
#include "cpu/amx_tiles.inc"

// Inputs per block (a multiple of 32, the tile depth) and the columns a thread generates at a
// time. Deeper blocks amortise the C tile stores; the B tiles of one stretch should stay in
// the thread's L2 (2 MiB here): Rademacher 512 inputs x its whole share of a 2048-column tile
// (one part: 1 MiB), Gaussian 1024 inputs x 256 columns (three parts: 1.5 MiB). Tuned on the
// acceptance shape of benchmarks/bench_projection.py.
static constexpr int64_t AKC_RADEMACHER = 512;
static constexpr int64_t AKC_GAUSSIAN = 1024;
static constexpr int64_t GAUSS_STRETCH = 256;
static constexpr int64_t ANCB = 2048;  // columns of one generated tile (multiple of 128)

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
      for (int h = 0; h < 2; ++h) store_parts(_mm512_load_ps(buf + 16 * h), nsx, 0xffff, dst + 16 * h);
    }
  }
}

// bf16 parts that carry an input dtype exactly.
static int parts_of(int dtype) { return dtype == kBFloat16 ? 1 : dtype == kFloat16 ? 2 : 3; }

// The rows of R behind depth tile ks of input block [i0, i0 + kc) of layer L; -1 (a zero
// row) past kc.
static inline void input_rows(const Layer& L, int64_t i0, int64_t kc, int64_t ks, int64_t rows[32]) {
  for (int r = 0; r < 32; ++r) rows[r] = 32 * ks + r < kc ? L.offset + i0 + 32 * ks + r : -1;
}

void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             int threads) {
  const int64_t k = spec.k;
  if (threads <= 0) threads = omp_get_max_threads();
  const bool rademacher = spec.kind == kRademacher;
  const int nsr = r_parts(spec);
  const float out_scale = rademacher ? spec.scale : 1.0f;  // Rademacher tiles hold +-1
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
              for (int64_t ks = 0; ks < nks; ++ks) {
                int64_t rows[32];
                input_rows(L, i0, kc, ks, rows);
                gen_b_tile(spec, rows, jc + s0, s1 - s0, ks, s0 / 16, nks, row0, row1, bp);
              }
              // row groups outside: a group's A tiles stay in L1 while the B tiles stream by
              for (int64_t rg = 0; rg < n_rg; ++rg)
                for (int64_t cq = s0 / 64; cq < s1 / 64; ++cq)
                  compute_chunk(cq, rg, n_rb, nks, P, nsr, ap, a_block, bp, out + jc, k, batch, nc,
                                out_scale, scratch);
            }
#pragma omp barrier
          } else {
#pragma omp for schedule(static)
            for (int64_t ks = 0; ks < nks; ++ks) {
              int64_t rows[32];
              input_rows(L, i0, kc, ks, rows);
              gen_b_tile(spec, rows, jc, nc_pad, ks, 0, nks, row0, row1, bp);
            }
#pragma omp for schedule(static)
            for (int64_t w = 0; w < n_cq * n_rg; ++w)
              compute_chunk(w / n_rg, w % n_rg, n_rb, nks, P, nsr, ap, a_block, bp, out + jc, k, batch,
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
