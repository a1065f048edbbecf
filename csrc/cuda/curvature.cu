// fastattr CUDA curvature accumulation kernels (see curvature.h for the contract).
//
// Both ops are Gram-type products summed over a long row dimension into a small output, so both
// use one SIMT tile scheme: a block of 256 threads owns a 64 x 64 output tile; it walks its rows
// in chunks of kKC = 16, gathers each chunk's two [16 x 64] operand slices into shared memory
// (upcast to fp32 on load), and every thread adds a 4 x 4 micro-tile of products with fp32 FMA.
// Operands are prefetched into registers one chunk ahead, so the global loads of chunk c + 1
// are in flight while chunk c is multiplied.
//
// covariance (S [G, F, F], s [G, F])
//   grid.x = (group, i-tile, j-tile) with j-tile >= i-tile only: the lower triangle is never
//   computed; the block writes each upper entry to both (i, j) and (j, i), so S is exactly
//   symmetric (in a diagonal tile, entries with j < i are left to their mirror).
//   Rows: linear x [N, T, F]: the N*T token vectors, read straight from x (one 64-float row
//   segment per pair of warps: coalesced). Conv: the patch vectors of every output position,
//   gathered in-kernel from NCHW with computed indices (zero padding): each block tabulates,
//   once, the (channel offset, ky*dh, kx*dw) of its 2 x 64 features in shared memory, and a
//   thread follows one output position per chunk (consecutive lanes: consecutive positions, so
//   a kernel tap reads consecutive input columns for stride 1), never an unfold.
//   reduce=True: a first kernel sums each (n, group)'s positions / tokens into a [G, N, F]
//   buffer (the reduced rows themselves: N*F floats per group, not the N*P*F patches), then the
//   tile kernel reads those rows as in the linear case. Recomputing the sums inside every
//   (i, j) tile would repeat O(P) work F/64 times.
//   s: diagonal blocks (i-tile == j-tile) also add their operand's columns.
//
// ekfac_lambda (L [O, F] = sum_n (g_n^T a_n)^2)
//   grid (f-tiles, o-tiles, split slices of n). The rows are the (n, p) pairs, chunked across
//   data boundaries (so P = 1 wastes nothing): before the products of a row that starts a new
//   datum, each thread squares its per-datum micro-tile into the running sum and clears it.
//   Which rows start a datum is the same for every thread and is derived incrementally per chunk.
//   [N, O, F] is never formed; the per-datum tile lives in registers only.
//
// Splits: when the output tiles alone cannot fill the device, the rows (covariance) or the data
// (ekfac_lambda, whole data only: squares do not add) are cut into slices, one block per
// (tile, slice), partial results go to a workspace, and reduce_splits (common.cuh) adds the
// slices in slot order. The mirrored covariance partials are symmetric, so their sums are too.
//
// Precision: fp32 throughout (bf16 / fp16 inputs convert exactly); every product is one fp32 FMA,
// no tensor cores, so fp32 input keeps fp32 accuracy: error ~ rows * 2^-24 relative to
// sum |v_i v_j| (covariance) or to sum_n (sum_p |g a|)^2 (ekfac_lambda).
//
// Determinism: no atomics; each thread sums in a fixed order, slices are reduced in slot order.
// The split count depends on the SM count and the shape, so results are bitwise reproducible
// for a given GPU model and shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "cuda/common.cuh"
#include "cuda/curvature.h"

namespace fastattr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 64;        // output tile edge
constexpr int kMicro = 4;        // micro-tile edge per thread: (64 / 4)^2 = 256 threads
constexpr int kKC = 16;          // rows per chunk
constexpr int kLd = kTile + 4;   // operand row stride in floats: keeps float4 reads aligned
constexpr int kLoads = kKC * kTile / kThreads;  // operand values per thread per slice
constexpr int64_t kMinChunksPerSplit = 8;       // covariance: >= 128 rows per slice
constexpr int64_t kMinRowsPerSplit = 128;       // ekfac_lambda: rows per slice, in whole data
// A feature past F gets this row offset: y = y0 + kOffGrid is negative for any |y0| < 2^29
// (the host checks the geometry), so the gather reads it as zero padding.
constexpr int kOffGrid = -(1 << 30);
static_assert((kTile / kMicro) * (kTile / kMicro) == kThreads, "one micro-tile per thread");
static_assert(kLoads == 4 && kThreads == 4 * kTile && kThreads == kKC * (kTile / 4),
              "the gather layouts below assume 4 loads per thread");

using Slice = float[kKC][kLd];  // one operand: kKC rows x kTile columns (+ padding)

// x[idx] as float (dtype: a DType code; bf16 / fp16 convert exactly).
__device__ __forceinline__ float load_float(const void* x, int64_t idx, int dtype) {
  if (dtype == kBFloat16) return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(x) + idx));
  if (dtype == kFloat16) return __half2float(__ldg(static_cast<const __half*>(x) + idx));
  return __ldg(static_cast<const float*>(x) + idx);
}

// Row-major gather: this thread's kLoads values of the slice rows [m0, m0 + kKC) x columns
// [col0, col0 + kTile) of the matrix src[offset + m * ld + col] (rows < m_end, cols < n_cols;
// zero outside). Two warps read one 64-column row segment: coalesced.
__device__ __forceinline__ void load_rows(const void* src, int dtype, int64_t offset, int64_t ld,
                                          int64_t m0, int64_t m_end, int64_t col0,
                                          int64_t n_cols, float (&v)[kLoads]) {
  const int64_t col = col0 + (threadIdx.x & (kTile - 1));
#pragma unroll
  for (int q = 0; q < kLoads; ++q) {
    const int64_t m = m0 + (threadIdx.x >> 6) + 4 * q;
    v[q] = m < m_end && col < n_cols ? load_float(src, offset + m * ld + col, dtype) : 0.0f;
  }
}

__device__ __forceinline__ void store_rows(Slice& t, const float (&v)[kLoads]) {
#pragma unroll
  for (int q = 0; q < kLoads; ++q) t[(threadIdx.x >> 6) + 4 * q][threadIdx.x & (kTile - 1)] = v[q];
}

// acc[i][j] += a_row[i] * b_row[j] for the thread's micro-tile at rows a_row, columns b_row.
__device__ __forceinline__ void fma_micro(float (&acc)[kMicro][kMicro], const float* a_row,
                                          const float* b_row) {
  const float4 a = *reinterpret_cast<const float4*>(a_row);
  const float4 b = *reinterpret_cast<const float4*>(b_row);
  const float av[kMicro] = {a.x, a.y, a.z, a.w};
  const float bv[kMicro] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
}

// Writes the thread's micro-tile `acc` to rows [r0, r0 + 4) x columns [c0, c0 + 4) of the
// row-major dst [n_rows, ld] (entries past n_rows or ld are skipped). kMirror: only entries with
// column >= row, each to both (row, col) and (col, row).
template <bool kMirror>
__device__ __forceinline__ void store_micro(float* dst, int64_t ld, int64_t n_rows, int64_t r0,
                                            int64_t c0, const float (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = r0 + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t c = c0 + j;
      if (r >= n_rows || c >= ld || (kMirror && c < r)) continue;
      dst[r * ld + c] = acc[i][j];
      if (kMirror) dst[c * ld + r] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// covariance

// Kernel size, stride, padding and dilation of a conv2d (conv[0..7] of the op's geometry).
struct ConvTaps {
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

struct CovParams {
  const void* x;  // rows source: the layer input, or the reduced-row buffer (float32)
  int dtype;
  int64_t rows;      // rows per group
  int64_t F;
  int64_t g_stride;  // row mode: elements from one group's rows to the next (0 when G = 1)
  // patch mode (conv, reduce=False) and the position sums (conv, reduce=True)
  int64_t batch;     // N
  int64_t c_in, c_in_g;
  int h, w, h_out, w_out;
  int positions;     // h_out * w_out
  ConvTaps cv;
  int64_t tokens;    // linear, reduce=True: T
  // tiling and splits
  int f_tiles;
  int64_t pairs;     // f_tiles * (f_tiles + 1) / 2 tile pairs per group
  int64_t groups;
  int64_t n_chunks, chunks_per_split;
  int splits;
  float* S;          // [G, F, F] (splits == 1)
  float* s;          // [G, F]
  float* ws_S;       // [splits, G, F, F] unreduced partials (splits > 1)
  float* ws_s;       // [splits, G, F]
};

// A patch-mode thread's output position: row m = n * positions + pos of its group's rows.
struct PatchRow {
  int64_t n;
  int pos;
};

// Patch gather: this thread's kLoads values of the slice at row `r` (one output position, lane
// order: consecutive positions) x the features of table `which` ((tid >> 4) + 16 q).
__device__ __forceinline__ void load_patches(const CovParams& P, const PatchRow& r, int64_t gi,
                                             const int64_t* tab_c, const int* tab_dy,
                                             const int* tab_dx, float (&v)[kLoads]) {
  if (r.n >= P.batch) {
#pragma unroll
    for (int q = 0; q < kLoads; ++q) v[q] = 0.0f;
    return;
  }
  const int oy = r.pos / P.w_out;
  const int ox = r.pos - oy * P.w_out;
  const int y0 = oy * P.cv.sh - P.cv.ph;
  const int x0 = ox * P.cv.sw - P.cv.pw;
  const int64_t base = (r.n * P.c_in + gi * P.c_in_g) * P.h * P.w;
#pragma unroll
  for (int q = 0; q < kLoads; ++q) {
    const int fl = (threadIdx.x >> 4) + 16 * q;
    const int y = y0 + tab_dy[fl];
    const int x = x0 + tab_dx[fl];
    v[q] = y >= 0 && y < P.h && x >= 0 && x < P.w
               ? load_float(P.x, base + tab_c[fl] + static_cast<int64_t>(y) * P.w + x, P.dtype)
               : 0.0f;
  }
}

__device__ __forceinline__ void store_patches(Slice& t, const float (&v)[kLoads]) {
#pragma unroll
  for (int q = 0; q < kLoads; ++q) t[threadIdx.x & 15][(threadIdx.x >> 4) + 16 * q] = v[q];
}

// One block: tile pair (i-tile, j-tile) of group gi (decoded from blockIdx.x) over the rows of
// split slice blockIdx.z. kPatches: rows are conv patches gathered from NCHW x; else rows of
// a row-major [rows, F] matrix per group.
template <bool kPatches>
__global__ void __launch_bounds__(kThreads, 2)
    covariance_kernel(const __grid_constant__ CovParams P) {
  __shared__ __align__(16) Slice a_s;  // rows x features of the i-tile
  __shared__ __align__(16) Slice b_s;  // rows x features of the j-tile (unused on the diagonal)
  // patch mode: per feature of the i-tile (table 0) and j-tile (table 1): c * H * W within the
  // group's channels, ky * dh, kx * dw
  __shared__ int64_t tab_c[2][kTile];
  __shared__ int tab_dy[2][kTile];
  __shared__ int tab_dx[2][kTile];

  const int tid = threadIdx.x;
  const int64_t gi = blockIdx.x / P.pairs;
  int64_t pair = blockIdx.x - gi * P.pairs;
  int ti = 0;
  while (pair >= P.f_tiles - ti) {
    pair -= P.f_tiles - ti;
    ++ti;
  }
  const int tj = ti + static_cast<int>(pair);
  const bool diag = ti == tj;  // block-uniform
  const int64_t i0 = static_cast<int64_t>(ti) * kTile;
  const int64_t j0 = static_cast<int64_t>(tj) * kTile;
  const int split = blockIdx.z;
  const int64_t c_begin = split * P.chunks_per_split;
  const int64_t c_end =
      c_begin + P.chunks_per_split < P.n_chunks ? c_begin + P.chunks_per_split : P.n_chunks;

  PatchRow row{0, 0};
  if constexpr (kPatches) {
    if (tid < 2 * kTile) {
      const int which = tid / kTile;
      const int fl = tid % kTile;
      const int64_t f = (which ? j0 : i0) + fl;
      int64_t c = 0;
      int dy = kOffGrid, dx = 0;
      if (f < P.F) {
        const int taps = P.cv.kh * P.cv.kw;
        c = f / taps;
        const int tap = static_cast<int>(f - c * taps);
        const int ky = tap / P.cv.kw;
        dy = ky * P.cv.dh;
        dx = (tap - ky * P.cv.kw) * P.cv.dw;
      }
      tab_c[which][fl] = c * P.h * P.w;
      tab_dy[which][fl] = dy;
      tab_dx[which][fl] = dx;
    }
    __syncthreads();  // tables complete before the first gather
    // this thread's first row: lane order follows positions
    const int64_t m = c_begin * kKC + (tid & 15);
    row.n = m / P.positions;
    row.pos = static_cast<int>(m - row.n * P.positions);
  }

  float va[kLoads], vb[kLoads];
  auto gather = [&](int64_t c) {
    if constexpr (kPatches) {
      load_patches(P, row, gi, tab_c[0], tab_dy[0], tab_dx[0], va);
      if (!diag) load_patches(P, row, gi, tab_c[1], tab_dy[1], tab_dx[1], vb);
    } else {
      const int64_t offset = gi * P.g_stride;
      load_rows(P.x, P.dtype, offset, P.F, c * kKC, P.rows, i0, P.F, va);
      if (!diag) load_rows(P.x, P.dtype, offset, P.F, c * kKC, P.rows, j0, P.F, vb);
    }
  };

  float acc[kMicro][kMicro] = {};
  float colsum = 0.0f;  // diagonal blocks, tid < kTile: s for feature i0 + tid
  const int ty = tid / (kTile / kMicro), tx = tid % (kTile / kMicro);
  const Slice& b_src = diag ? a_s : b_s;

  if (c_begin < c_end) gather(c_begin);
  for (int64_t c = c_begin; c < c_end; ++c) {
    if constexpr (kPatches) {
      store_patches(a_s, va);
      if (!diag) store_patches(b_s, vb);
    } else {
      store_rows(a_s, va);
      if (!diag) store_rows(b_s, vb);
    }
    __syncthreads();  // slices complete
    if (c + 1 < c_end) {
      if constexpr (kPatches) {
        // advance this thread's row by one chunk (positions may be < kKC: several data)
        row.pos += kKC;
        while (row.pos >= P.positions) {
          row.pos -= P.positions;
          ++row.n;
        }
      }
      gather(c + 1);  // in flight during the products below
    }
    if (diag && tid < kTile) {
#pragma unroll
      for (int k = 0; k < kKC; ++k) colsum += a_s[k][tid];
    }
#pragma unroll
    for (int k = 0; k < kKC; ++k) fma_micro(acc, &a_s[k][ty * kMicro], &b_src[k][tx * kMicro]);
    __syncthreads();  // products done before the slices are rewritten
  }

  const int64_t G = P.groups;
  float* const S = (P.splits == 1 ? P.S : P.ws_S + split * G * P.F * P.F) + gi * P.F * P.F;
  float* const s = (P.splits == 1 ? P.s : P.ws_s + split * G * P.F) + gi * P.F;
  // j < i happens on the diagonal only, where the thread holding (j, i) writes it
  store_micro<true>(S, P.F, P.F, i0 + ty * kMicro, j0 + tx * kMicro, acc);
  if (diag && tid < kTile && i0 + tid < P.F) s[i0 + tid] = colsum;
}

// reduce=True rows: out[(gi * N + n) * F + f] = the sum over n's positions (conv) or tokens
// (linear) of its row's feature f, one thread per entry, summed in a fixed order.
template <bool kConv>
__global__ void __launch_bounds__(kThreads) sum_positions_kernel(const __grid_constant__ CovParams P,
                                                                 float* __restrict__ out) {
  const int64_t total = P.groups * P.batch * P.F;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t f = e % P.F;
    const int64_t gn = e / P.F;
    float sum = 0.0f;
    if constexpr (kConv) {
      const int64_t n = gn % P.batch;
      const int64_t gi = gn / P.batch;
      const int taps = P.cv.kh * P.cv.kw;
      const int64_t c = f / taps;
      const int tap = static_cast<int>(f - c * taps);
      const int ky = tap / P.cv.kw;
      const int kx = tap - ky * P.cv.kw;
      const int64_t plane = ((n * P.c_in + gi * P.c_in_g + c) * P.h) * P.w;
      for (int oy = 0; oy < P.h_out; ++oy) {
        const int y = oy * P.cv.sh - P.cv.ph + ky * P.cv.dh;
        if (y < 0 || y >= P.h) continue;
        for (int ox = 0; ox < P.w_out; ++ox) {
          const int x = ox * P.cv.sw - P.cv.pw + kx * P.cv.dw;
          if (x >= 0 && x < P.w)
            sum += load_float(P.x, plane + static_cast<int64_t>(y) * P.w + x, P.dtype);
        }
      }
    } else {
      const int64_t base = gn * P.tokens * P.F + f;  // gn == n (G = 1)
      for (int64_t t = 0; t < P.tokens; ++t) sum += load_float(P.x, base + t * P.F, P.dtype);
    }
    out[e] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// ekfac_lambda

struct LambdaParams {
  const void* a;  // [n, p, f]
  const void* g;  // [n, p, o]
  int a_dtype, g_dtype;
  int64_t n, p, f, o;
  int64_t n_per_split;
  int splits;
  float* out;        // [o, f] (splits == 1)
  float* workspace;  // [splits, o, f] unreduced partials (splits > 1)
};

// One block: L tile [64 outputs at blockIdx.y, 64 features at blockIdx.x] over the data of
// split slice blockIdx.z.
__global__ void __launch_bounds__(kThreads, 2)
    ekfac_lambda_kernel(const __grid_constant__ LambdaParams P) {
  __shared__ __align__(16) Slice a_s;  // rows (n, p) x 64 features
  __shared__ __align__(16) Slice g_s;  // rows (n, p) x 64 outputs
  const int tid = threadIdx.x;
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int split = blockIdx.z;
  const int64_t n_begin = split * P.n_per_split;
  const int64_t n_end = n_begin + P.n_per_split < P.n ? n_begin + P.n_per_split : P.n;
  const int64_t m_begin = n_begin * P.p;
  const int64_t m_end = n_end * P.p;
  const int ty = tid / (kTile / kMicro), tx = tid % (kTile / kMicro);

  float va[kLoads], vg[kLoads];
  auto gather = [&](int64_t m0) {
    load_rows(P.a, P.a_dtype, 0, P.f, m0, m_end, f0, P.f, va);
    load_rows(P.g, P.g_dtype, 0, P.o, m0, m_end, o0, P.o, vg);
  };

  float datum[kMicro][kMicro] = {};  // sum_p g a of the current datum
  float lam[kMicro][kMicro] = {};    // sum of the squares of the finished data
  auto flush = [&]() {
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        lam[i][j] = fmaf(datum[i][j], datum[i][j], lam[i][j]);
        datum[i][j] = 0.0f;
      }
  };

  int64_t pos = 0;  // position within its datum of the chunk's first row (m_begin starts one)
  if (m_begin < m_end) gather(m_begin);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kKC) {
    store_rows(a_s, va);
    store_rows(g_s, vg);
    __syncthreads();  // slices complete
    if (m0 + kKC < m_end) gather(m0 + kKC);  // in flight during the products below
    // bit k: row m0 + k is position 0 of its datum (the same for every thread)
    unsigned starts = 0;
#pragma unroll
    for (int k = 0; k < kKC; ++k) {
      if (pos == 0) starts |= 1u << k;
      if (++pos == P.p) pos = 0;
    }
#pragma unroll
    for (int k = 0; k < kKC; ++k) {
      // a finished datum is squared into lam; rows past m_end are zero and change nothing
      if (starts & (1u << k)) flush();
      fma_micro(datum, &g_s[k][ty * kMicro], &a_s[k][tx * kMicro]);
    }
    __syncthreads();  // products done before the slices are rewritten
  }
  flush();

  float* const out = P.splits == 1 ? P.out : P.workspace + split * P.o * P.f;
  store_micro<false>(out, P.f, P.o, o0 + ty * kMicro, f0 + tx * kMicro, lam);
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int major = 0;
  // resident blocks per SM of covariance_kernel<false>, <true>, ekfac_lambda_kernel; the
  // defaults stand on devices older than sm_80, which `configure` does not query
  int cov_blocks[2] = {2, 2};
  int lambda_blocks = 2;
};

template <typename Kernel>
int resident_blocks(Kernel kernel, const char* what) {
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0), what);
  return n > 0 ? n : 1;
}

void configure_device(DeviceInfo& info) {
  const char* what = "cudaOccupancyMaxActiveBlocksPerMultiprocessor(curvature kernels)";
  info.cov_blocks[0] = resident_blocks(covariance_kernel<false>, what);
  info.cov_blocks[1] = resident_blocks(covariance_kernel<true>, what);
  info.lambda_blocks = resident_blocks(ekfac_lambda_kernel, what);
}

const DeviceInfo& device_info() {
  return cached_device_info<DeviceInfo>(current_device(), configure_device);
}

void check_dtype(int dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument(std::string(what) + " dtype code must be 0, 1 or 2");
}

// Grid of a grid-stride kernel over n entries (256-thread blocks, at most 8 per SM).
unsigned stride_grid(int64_t n, int sms) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<unsigned>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

// The layer geometry of covariance's x into P (validated): rows, F, groups, conv sizes.
void describe_covariance(const int64_t* x_shape, int is_conv, const int* conv, CovParams& P) {
  const int64_t n = x_shape[0];
  if (n < 1) throw std::invalid_argument("x must have at least one row (N >= 1)");
  P.batch = n;
  if (!is_conv) {
    const int64_t tokens = x_shape[1], d_in = x_shape[2];
    if (tokens < 1 || d_in < 1) throw std::invalid_argument("x [N, T, F] must not be empty");
    P.groups = 1;
    P.F = d_in;
    P.tokens = tokens;
    return;
  }
  if (conv == nullptr) throw std::invalid_argument("conv geometry missing");
  for (int i : {0, 1, 2, 3, 6, 7, 8})
    if (conv[i] < 1)
      throw std::invalid_argument("conv kernel size, stride, dilation and groups must be >= 1");
  if (conv[4] < 0 || conv[5] < 0) throw std::invalid_argument("conv padding must be >= 0");
  const int64_t c = x_shape[1], h = x_shape[2], w = x_shape[3];
  const int64_t groups = conv[8];
  if (c < 1 || h < 1 || w < 1) throw std::invalid_argument("x [N, C, H, W] must not be empty");
  if (c % groups) throw std::invalid_argument("conv channels must be divisible by groups");
  // int32 spatial arithmetic in the gathers (and kOffGrid) needs every coordinate < 2^29
  constexpr int64_t kMaxSpatial = int64_t{1} << 28;
  const int64_t reach_h = static_cast<int64_t>(conv[6]) * (conv[0] - 1);
  const int64_t reach_w = static_cast<int64_t>(conv[7]) * (conv[1] - 1);
  if (h + conv[4] + reach_h >= kMaxSpatial || w + conv[5] + reach_w >= kMaxSpatial ||
      conv[2] >= kMaxSpatial || conv[3] >= kMaxSpatial)
    throw std::invalid_argument("conv geometry too large (coordinates must stay below 2**28)");
  const int64_t span_h = h + 2 * conv[4] - reach_h - 1;
  const int64_t span_w = w + 2 * conv[5] - reach_w - 1;
  if (span_h < 0 || span_w < 0)
    throw std::invalid_argument("conv gives no output position for this input size");
  const int64_t h_out = span_h / conv[2] + 1, w_out = span_w / conv[3] + 1;
  if (h_out * w_out >= (int64_t{1} << 31) - kKC)
    throw std::invalid_argument("conv has too many output positions (>= 2**31)");
  P.groups = groups;
  P.c_in = c;
  P.c_in_g = c / groups;
  P.h = static_cast<int>(h);
  P.w = static_cast<int>(w);
  P.h_out = static_cast<int>(h_out);
  P.w_out = static_cast<int>(w_out);
  P.positions = static_cast<int>(h_out * w_out);
  P.cv = ConvTaps{conv[0], conv[1], conv[2], conv[3], conv[4], conv[5], conv[6], conv[7]};
  P.F = P.c_in_g * conv[0] * conv[1];
}

}  // namespace

void covariance(float* S, float* s, const void* x, int x_dtype, const int64_t* x_shape,
                int is_conv, const int* conv, bool reduce, CUstream_st* stream) {
  check_dtype(x_dtype, "x");
  if (S == nullptr || s == nullptr || x == nullptr || x_shape == nullptr)
    throw std::invalid_argument("S, s, x and x_shape must be given");
  CovParams P{};
  P.x = x;
  P.dtype = x_dtype;
  describe_covariance(x_shape, is_conv, conv, P);
  const int64_t F = P.F, G = P.groups;
  const int64_t f_tiles = (F + kTile - 1) / kTile;
  P.f_tiles = static_cast<int>(f_tiles);
  P.pairs = f_tiles * (f_tiles + 1) / 2;
  const int64_t tiles = G * P.pairs;
  if (f_tiles > (int64_t{1} << 20) || tiles > 0x7fffffff)
    throw std::invalid_argument("covariance output too large (G * tile pairs >= 2**31)");
  const DeviceInfo& info = device_info();

  // reduce=True: the reduced rows first, then the row kernel reads them
  StreamBuffer reduced(stream, "covariance reduced rows");
  bool patches = false;
  if (reduce) {
    const int64_t n_entries = G * P.batch * F;
    if (!reduced.allocate(static_cast<size_t>(n_entries) * sizeof(float)))
      throw std::runtime_error("fastattr._cuda: covariance(reduce=True) could not allocate its " +
                               std::to_string(n_entries) + "-float row buffer");
    const unsigned grid = stride_grid(n_entries, info.sms);
    if (is_conv)
      sum_positions_kernel<true><<<grid, kThreads, 0, stream>>>(P, reduced.get());
    else
      sum_positions_kernel<false><<<grid, kThreads, 0, stream>>>(P, reduced.get());
    check_launch("sum_positions_kernel launch (covariance reduce)");
    P.x = reduced.get();
    P.dtype = kFloat32;
    P.rows = P.batch;
    P.g_stride = P.batch * F;
  } else if (is_conv) {
    patches = true;
    P.rows = P.batch * P.positions;
  } else {
    P.rows = P.batch * P.tokens;
    P.g_stride = 0;
  }

  P.n_chunks = (P.rows + kKC - 1) / kKC;
  const int64_t resident = static_cast<int64_t>(info.sms) * info.cov_blocks[patches ? 1 : 0];
  int64_t splits = split_count(tiles, resident, P.n_chunks, kMinChunksPerSplit);
  StreamBuffer workspace(stream, "covariance split workspace");
  const int64_t n_S = G * F * F, n_s = G * F;
  if (splits > 1) {
    // bounded: splits * tiles < 2 * resident tile pairs of 64 x 64 floats (mirrored)
    const size_t bytes = static_cast<size_t>(splits) * (n_S + n_s) * sizeof(float);
    if (!workspace.allocate(bytes)) splits = 1;
  }
  // every slice non-empty: chunks_per_split = ceil(n / splits), then splits = ceil(n / that)
  P.chunks_per_split = (P.n_chunks + splits - 1) / splits;
  splits = (P.n_chunks + P.chunks_per_split - 1) / P.chunks_per_split;
  P.splits = static_cast<int>(splits);
  P.S = S;
  P.s = s;
  P.ws_S = workspace.get();
  P.ws_s = splits > 1 ? workspace.get() + splits * n_S : nullptr;
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
  if (patches)
    covariance_kernel<true><<<grid, kThreads, 0, stream>>>(P);
  else
    covariance_kernel<false><<<grid, kThreads, 0, stream>>>(P);
  check_launch("covariance_kernel launch");
  if (splits > 1) {
    reduce_splits(S, P.ws_S, P.splits, n_S, 1.0f, false, info.sms, stream,
                  "reduce_splits_kernel launch (covariance S)");
    reduce_splits(s, P.ws_s, P.splits, n_s, 1.0f, false, info.sms, stream,
                  "reduce_splits_kernel launch (covariance s)");
    workspace.release();
  }
  reduced.release();
}

void ekfac_lambda(float* out, const void* a, int a_dtype, const void* g, int g_dtype, int64_t n,
                  int64_t p, int64_t f, int64_t o, CUstream_st* stream) {
  check_dtype(a_dtype, "a");
  check_dtype(g_dtype, "g");
  if (out == nullptr || a == nullptr || g == nullptr)
    throw std::invalid_argument("out, a and g must be device pointers");
  if (n < 1 || p < 1 || f < 1 || o < 1)
    throw std::invalid_argument("a [N, P, F] and g [N, P, O] must not be empty");
  const int64_t f_tiles = (f + kTile - 1) / kTile, o_tiles = (o + kTile - 1) / kTile;
  if (f_tiles > 0x7fffffff || o_tiles > kMaxGridY)
    throw std::invalid_argument("ekfac_lambda output too large (O must be < 64 * 65535)");
  LambdaParams P{};
  P.a = a;
  P.g = g;
  P.a_dtype = a_dtype;
  P.g_dtype = g_dtype;
  P.n = n;
  P.p = p;
  P.f = f;
  P.o = o;
  const DeviceInfo& info = device_info();
  const int64_t resident = static_cast<int64_t>(info.sms) * info.lambda_blocks;
  int64_t splits = split_count(f_tiles * o_tiles, resident, n, (kMinRowsPerSplit + p - 1) / p);
  StreamBuffer workspace(stream, "ekfac_lambda split workspace");
  if (splits > 1 &&
      !workspace.allocate(static_cast<size_t>(splits) * o * f * sizeof(float)))
    splits = 1;
  P.n_per_split = (n + splits - 1) / splits;
  splits = (n + P.n_per_split - 1) / P.n_per_split;
  P.splits = static_cast<int>(splits);
  P.out = out;
  P.workspace = workspace.get();
  const dim3 grid(static_cast<unsigned>(f_tiles), static_cast<unsigned>(o_tiles),
                  static_cast<unsigned>(splits));
  ekfac_lambda_kernel<<<grid, kThreads, 0, stream>>>(P);
  check_launch("ekfac_lambda_kernel launch");
  if (splits > 1) {
    reduce_splits(out, P.workspace, P.splits, o * f, 1.0f, false, info.sms, stream,
                  "reduce_splits_kernel launch (ekfac_lambda)");
    workspace.release();
  }
}

}  // namespace cuda
}  // namespace fastattr
