// fastattr CUDA projection kernels (see projection.h for the contract).
//
// project: y[B, k] = scale * sum_l x_l[B, p_l] @ Z[off_l + i, :], Z the unscaled matrix (+-1 or
// N(0, 1) entries of csrc/philox.h), as a tiled GEMM on tensor cores (nvcuda::wmma, bf16
// m16n16k16 fragments, fp32 accumulators):
//   grid (k tiles of kBN columns, batch tiles of kBM rows, split-K slices of the reduction)
//   per block, for each kBK-deep chunk of the reduction (chunks never straddle two layers):
//     x chunk  -> shared memory as bf16 (hi, and lo = x - hi when x is not bf16)
//     Z chunk  -> generated into shared memory as bf16 (hi, and lo = z - hi for Gaussian)
//     acc     += [x_lo Z_hi] + [x_hi Z_lo] + x_hi Z_hi     (bracketed terms only when needed)
//   then y = scale * acc (or the split-K partial acc into a workspace, reduced in fixed order).
//
// Precision: Rademacher entries are exactly +-1 in bf16 and bf16 inputs are exact, so bf16 x
// Rademacher needs one MMA and is exact up to fp32 accumulation. fp32 inputs are split into
// bf16 hi + lo (16 significand bits: representation error < 2^-16, typically ~2^-18,
// relative), fp16 inputs likewise (exact: 11 bits = 8 + 3). Gaussian entries are split the
// same way, and the lo * lo term (< 2^-16 relative) is dropped. Products of bf16 values are
// exact in fp32, so each product is off by at most 3 * 2^-16 = 4.6e-5 relative (typically
// ~4e-6, and these errors average out over the sum): fp32-accurate to ~1e-5, where a plain
// bf16 product would be ~2e-3. fp16 is not converted to bf16 alone for the same reason.
//
// Tiles: kBN = 128 columns (one Rademacher Philox call per row: counter (lo32(i), hi32(i),
// j_block, stream)), kBK = 32 reduction rows per chunk, kBM = 64 batch rows (8 warps) for
// batches <= 64, else 128 (16 warps); each warp owns a 32 x 32 output tile (2 x 2 fragments).
// The x chunk for step c + 1 is loaded into registers while step c's MMAs run.
//
// Determinism: no atomics. When the output tiles alone cannot fill the GPU (small B * k), the
// chunk list is cut into `splits` slices whose partial sums go to a workspace and are added
// in slice order by a second kernel. The number of slices depends on the SM count and the
// shape, so results are bitwise reproducible for a given GPU model and shape; across models
// or batch sizes they differ by fp32 rounding only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/projection.h"
#include "philox.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// Pre-Ampere device passes compile the projection kernel body out (no bf16 tensor cores),
// leaving its helpers unreferenced; the host refuses such devices before launching.
#pragma nv_diag_suppress 177
#endif

namespace fastattr {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kBN = 128;        // columns per block: one Rademacher Philox call per row
constexpr int kBK = 32;         // reduction depth of one chunk (two k16 MMA steps)
constexpr int kLdA = kBK + 8;   // 80-byte rows: the 8 rows of an ldmatrix hit distinct banks
constexpr int kLdB = kBN + 8;   // 272-byte rows: likewise
constexpr int kMaxLayers = 64;  // layers per launch: the table travels in the 4 KiB params
constexpr int64_t kMinChunksPerSplit = 8;  // a split-K slice covers >= 256 rows of R

// Warps tile the block's [kBM, kBN] output as (kBM / 32) x 4 tiles of 32 x 32 (2 x 2 fragments,
// 32 accumulator registers per thread), so a block has kBM / 8 warps: 8 for kBM = 64, 16 for
// kBM = 128. Either way 16 warps fit on an SM at <= 128 registers per thread without spills.
template <int kBM>
constexpr int threads_for() {
  return kBM * 4;
}

struct LayerDesc {
  const void* data;
  int64_t p, stride_b, stride_p, offset;
  int64_t chunk_begin;  // index of the layer's first kBK chunk in the launch's chunk list
  int dtype;
};

struct ProjectParams {
  LayerDesc layers[kMaxLayers];
  int n_layers;
  int splits;      // == gridDim.z; 1: write `out` directly, else partials to `workspace`
  int accumulate;  // out += result (later layer groups), instead of out = result
  int64_t n_chunks;
  int64_t batch;   // rows of this launch (pointers already offset to its first row)
  int64_t k;
  uint32_t key0, key1, stream;
  float scale;
  float* out;        // [batch, k]
  float* workspace;  // [splits, batch, k], unscaled partial sums
};
// Kernel parameters are limited to 4 KiB on older drivers; the layer table must fit.
static_assert(sizeof(ProjectParams) <= 4000, "ProjectParams exceeds the kernel parameter space");

__device__ __forceinline__ uint32_t select_word(uint32_t sel, uint32_t w0, uint32_t w1,
                                                uint32_t w2, uint32_t w3) {
  // selects instead of an indexed array, which would live in local memory
  return sel == 0 ? w0 : sel == 1 ? w1 : sel == 2 ? w2 : w3;
}

// Where a block is in its slice of the reduction: layer l, rows [i0, i0 + kBK) of that layer.
// The layer's fields are copied to registers when l changes.
struct Cursor {
  int l;
  int dtype;
  int64_t i0;
  const void* data;
  int64_t p, stride_b, stride_p, offset;
};

__device__ __forceinline__ void cursor_load(Cursor& c, const ProjectParams& P) {
  const LayerDesc& L = P.layers[c.l];
  c.dtype = L.dtype;
  c.data = L.data;
  c.p = L.p;
  c.stride_b = L.stride_b;
  c.stride_p = L.stride_p;
  c.offset = L.offset;
}

__device__ __forceinline__ void cursor_advance(Cursor& c, const ProjectParams& P) {
  c.i0 += kBK;
  if (c.i0 >= c.p && c.l + 1 < P.n_layers) {
    ++c.l;
    c.i0 = 0;
    cursor_load(c, P);
  }
}

// Raw bits of this thread's share of the x chunk at the cursor (zero outside [batch, p)):
// thread t reads column t % 32 of rows t / 32 + W r (W warps), so a warp reads 32 consecutive
// columns of one row (coalesced when stride_p == 1). Converted when stored, after the MMAs of
// the previous chunk, so the global loads overlap them.
template <int kThreads, int kRowsPerThread>
__device__ __forceinline__ void load_x_chunk(const Cursor& c, int64_t b_tile0, int64_t batch,
                                             uint32_t (&raw)[kRowsPerThread]) {
  const int64_t i = c.i0 + (threadIdx.x & 31);
  const bool col_ok = i < c.p;
  const int64_t col_off = i * c.stride_p;
  const int64_t b_first = b_tile0 + (threadIdx.x >> 5);
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t b = b_first + (kThreads / 32) * r;
    raw[r] = 0u;
    if (col_ok && b < batch) {
      const int64_t idx = b * c.stride_b + col_off;
      if (c.dtype == kFloat32)
        raw[r] = __float_as_uint(__ldg(static_cast<const float*>(c.data) + idx));
      else
        raw[r] = __ldg(static_cast<const unsigned short*>(c.data) + idx);
    }
  }
}

// x chunk -> shared bf16 tiles [kBM][kLdA]: bf16 as is; fp16 and fp32 through fp32 as
// hi = bf16(x), lo = bf16(x - hi). Non-finite hi gets lo = 0 so that inf stays inf, not NaN.
template <int kThreads, int kRowsPerThread>
__device__ __forceinline__ void store_x_chunk(int dtype, const uint32_t (&raw)[kRowsPerThread],
                                              bf16* a_hi, bf16* a_lo) {
  const int col = threadIdx.x & 31;
  const int row_first = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int at = (row_first + (kThreads / 32) * r) * kLdA + col;
    if (dtype == kBFloat16) {
      a_hi[at] = __ushort_as_bfloat16(static_cast<unsigned short>(raw[r]));
    } else {
      const float x = dtype == kFloat32
                          ? __uint_as_float(raw[r])
                          : __half2float(__ushort_as_half(static_cast<unsigned short>(raw[r])));
      const bf16 hi = __float2bfloat16_rn(x);
      const float hf = __bfloat162float(hi);
      a_hi[at] = hi;
      a_lo[at] = __float2bfloat16_rn(isfinite(hf) ? x - hf : 0.0f);
    }
  }
}

// Z[row0 + r, j_tile * 128 + c] for r < kBK, c < 128, as bf16 +-1 (exact). Each thread writes
// kCols (16 or 8) columns of one row; the threads of a row each run that row's Philox call
// (cheaper than a shared-memory broadcast and another barrier). Rows past the layer end are
// generated anyway: the x columns there are zero and the entries are finite.
template <int kThreads>
__device__ __forceinline__ void gen_rademacher_chunk(int64_t row0, uint32_t j_tile,
                                                     const ProjectParams& P, bf16* r_hi) {
  constexpr int kCols = kBK * kBN / kThreads;
  constexpr int kParts = kBN / kCols;
  static_assert(kCols % 8 == 0 && kCols <= 32, "a thread writes whole uint4s of one word");
  const int r = threadIdx.x / kParts;
  const int part = threadIdx.x % kParts;  // columns [kCols part, kCols (part + 1))
  const uint64_t row = static_cast<uint64_t>(row0 + r);
  uint32_t w0, w1, w2, w3;
  philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), j_tile, P.stream,
                P.key0, P.key1, w0, w1, w2, w3);
  const int first = part * kCols;  // bit j % 32 of word (j % 128) / 32 is column j
  const uint32_t bits = select_word(first >> 5, w0, w1, w2, w3) >> (first & 31);
  // bf16 +1 = 0x3F80, -1 = 0xBF80: bit 1 clears the sign of -1. Two columns per 32-bit word,
  // the lower column in the low half.
  uint32_t packed[kCols / 2];
#pragma unroll
  for (int m = 0; m < kCols / 2; ++m) {
    const uint32_t lo_bit = (bits >> (2 * m)) & 1u;
    const uint32_t hi_bit = (bits >> (2 * m + 1)) & 1u;
    packed[m] = 0xBF80BF80u ^ (lo_bit << 15) ^ (hi_bit << 31);
  }
  uint4* dst = reinterpret_cast<uint4*>(r_hi + r * kLdB + first);  // 16-byte aligned
#pragma unroll
  for (int v = 0; v < kCols / 8; ++v)
    dst[v] = make_uint4(packed[4 * v], packed[4 * v + 1], packed[4 * v + 2], packed[4 * v + 3]);
}

// Gaussian Z chunk as bf16 hi + lo: 32 rows x 32 Philox calls (4 columns each), 4 or 2 calls
// per thread; consecutive threads take consecutive calls of a row. Calls wholly past the
// layer's rows or past column k are skipped (zeros): Box-Muller is the expensive part.
template <int kThreads>
__device__ __forceinline__ void gen_gaussian_chunk(int64_t row0, int64_t rows_valid,
                                                   uint32_t j_tile, const ProjectParams& P,
                                                   bf16* r_hi, bf16* r_lo) {
  const int64_t cols_valid = P.k - static_cast<int64_t>(j_tile) * kBN;
#pragma unroll
  for (int it = 0; it < (kBK * kBN / 4) / kThreads; ++it) {
    const int call = threadIdx.x + it * kThreads;
    const int r = call >> 5;
    const int q = call & 31;  // columns [4q, 4q + 4)
    float z0 = 0.0f, z1 = 0.0f, z2 = 0.0f, z3 = 0.0f;
    if (r < rows_valid && 4 * q < cols_valid) {
      const uint64_t row = static_cast<uint64_t>(row0 + r);
      uint32_t w0, w1, w2, w3;
      philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                    j_tile * (kBN / 4) + q, P.stream, P.key0, P.key1, w0, w1, w2, w3);
      fa_gaussian4(w0, w1, w2, w3, z0, z1, z2, z3);
    }
    store_split4_bf16(r_hi + r * kLdB + 4 * q, r_lo + r * kLdB + 4 * q, z0, z1, z2, z3);
  }
}

// One block: output tile [kBM, kBN] at (blockIdx.y, blockIdx.x) over split-K slice blockIdx.z.
// 16 warps per SM (<= 128 registers per thread).
template <int kKind, int kBM>
__global__ void __launch_bounds__(threads_for<kBM>(), 512 / threads_for<kBM>())
    project_tiles_kernel(const __grid_constant__ ProjectParams P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 tensor cores need sm_80; the host refuses older devices before launching
#else
  namespace wmma = nvcuda::wmma;
  constexpr bool kGauss = kKind == kGaussian;
  constexpr int kThreads = threads_for<kBM>();
  constexpr int kWarpRows = 32;  // warp tile: 32 x 32
  constexpr int kFragM = kWarpRows / 16;
  constexpr int kFragN = 2;
  constexpr int kRowsPerThread = kBM / (kThreads / 32);
  constexpr int kAElems = kBM * kLdA;
  constexpr int kRElems = kBK * kLdB;
  constexpr int kSmemBytes = 2 * (2 * kAElems + (kGauss ? 2 : 1) * kRElems);
  constexpr int kStageFloats = 16 * 16;  // per warp, epilogue; aliases the x tiles
  static_assert(2 * 2 * kAElems >= (kThreads / 32) * kStageFloats * 4, "stage must fit");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  bf16* const a_hi = reinterpret_cast<bf16*>(smem);
  bf16* const a_lo = a_hi + kAElems;
  bf16* const r_hi = a_lo + kAElems;
  bf16* const r_lo = kGauss ? r_hi + kRElems : nullptr;

  const uint32_t j_tile = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(j_tile) * kBN;
  const int64_t b_tile0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t split = blockIdx.z;
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // This block's slice of the chunk list, and the layer its first chunk belongs to.
  const int64_t c_begin = P.n_chunks * split / P.splits;
  const int64_t c_end = P.n_chunks * (split + 1) / P.splits;
  Cursor cur;
  cur.l = 0;
  while (cur.l + 1 < P.n_layers && P.layers[cur.l + 1].chunk_begin <= c_begin) ++cur.l;
  cursor_load(cur, P);
  cur.i0 = (c_begin - P.layers[cur.l].chunk_begin) * kBK;

  uint32_t raw[kRowsPerThread];
  if (c_begin < c_end) load_x_chunk<kThreads>(cur, b_tile0, P.batch, raw);

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int dtype = cur.dtype;
    const bool split_x = dtype != kBFloat16;  // block-uniform: no divergence
    const int64_t row0 = cur.offset + cur.i0;
    const int64_t rows_valid = cur.p - cur.i0;

    __syncthreads();  // the previous chunk's MMAs are done reading shared memory
    store_x_chunk<kThreads>(dtype, raw, a_hi, a_lo);
    if constexpr (kGauss)
      gen_gaussian_chunk<kThreads>(row0, rows_valid, j_tile, P, r_hi, r_lo);
    else
      gen_rademacher_chunk<kThreads>(row0, j_tile, P, r_hi);
    if (c + 1 < c_end) {
      cursor_advance(cur, P);
      load_x_chunk<kThreads>(cur, b_tile0, P.batch, raw);  // in flight during the MMAs below
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b_hi[kFragN];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b_lo[kFragN];
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        wmma::load_matrix_sync(b_hi[j], r_hi + kk * kLdB + wn * 32 + j * 16, kLdB);
        if constexpr (kGauss)
          wmma::load_matrix_sync(b_lo[j], r_lo + kk * kLdB + wn * 32 + j * 16, kLdB);
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        const int a_at = (wm * kWarpRows + i * 16) * kLdA + kk;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        // correction terms first: the small products are added before the large one
        if (split_x) {
          wmma::load_matrix_sync(a, a_lo + a_at, kLdA);
#pragma unroll
          for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], a, b_hi[j], acc[i][j]);
        }
        wmma::load_matrix_sync(a, a_hi + a_at, kLdA);
        if constexpr (kGauss) {
#pragma unroll
          for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], a, b_lo[j], acc[i][j]);
        }
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], a, b_hi[j], acc[i][j]);
      }
    }
  }

  // Epilogue: each warp stages one 16x16 accumulator at a time in shared memory (the fragment
  // layout is opaque), then lane pairs write rows of 8 with bounds checks.
  __syncthreads();  // every warp is done with the x tiles the stages alias
  float* const stage = reinterpret_cast<float*>(smem) + warp * kStageFloats;
  const int lane = threadIdx.x & 31;
  const int s_row = lane >> 1, s_col = (lane & 1) * 8;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t b = b_tile0 + wm * kWarpRows + i * 16 + s_row;
      const int64_t col = j0 + wn * 32 + j * 16 + s_col;
      if (b < P.batch) {
        if (P.splits == 1) {
          float* o = P.out + b * P.k + col;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (col + e < P.k) {
              const float v = P.scale * stage[s_row * 16 + s_col + e];
              o[e] = P.accumulate ? o[e] + v : v;
            }
          }
        } else {
          float* o = P.workspace + (split * P.batch + b) * P.k + col;
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (col + e < P.k) o[e] = stage[s_row * 16 + s_col + e];
        }
      }
      __syncwarp();  // the stage is rewritten by the next fragment
    }
  }
#endif
}

// Rademacher rows: one warp per (row, 128-column block), i.e. one Philox call; lane l writes
// columns l, l + 32, l + 64, l + 96 (coalesced). Entries are +-scale with the sign taken from
// the bit, bit-identical to the CPU kernel and the torch reference.
__global__ void materialize_rademacher_kernel(float* __restrict__ out,
                                              const int64_t* __restrict__ rows, int64_t n,
                                              int64_t k, uint32_t key0, uint32_t key1,
                                              uint32_t stream, float scale) {
  const int64_t blocks_per_row = (k + kBN - 1) / kBN;
  const int64_t total = n * blocks_per_row;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const uint32_t scale_bits = __float_as_uint(scale);
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < total;
       w += warps) {
    const int64_t r = w / blocks_per_row;
    const int64_t jb = w % blocks_per_row;
    const uint64_t row = static_cast<uint64_t>(rows[r]);
    uint32_t o[4];
    philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                  static_cast<uint32_t>(jb), stream, key0, key1, o[0], o[1], o[2], o[3]);
    float* dst = out + r * k + jb * kBN;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = jb * kBN + q * 32 + lane;
      if (j < k) dst[q * 32 + lane] = __uint_as_float(scale_bits | (((~o[q] >> lane) & 1u) << 31));
    }
  }
}

// Gaussian rows: one thread per Philox call (4 consecutive columns), entries z * scale in fp32.
__global__ void materialize_gaussian_kernel(float* __restrict__ out,
                                            const int64_t* __restrict__ rows, int64_t n,
                                            int64_t k, uint32_t key0, uint32_t key1,
                                            uint32_t stream, float scale) {
  const int64_t calls_per_row = (k + 3) / 4;
  const int64_t total = n * calls_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t r = e / calls_per_row;
    const int64_t q = e % calls_per_row;
    const uint64_t row = static_cast<uint64_t>(rows[r]);
    uint32_t w0, w1, w2, w3;
    philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                  static_cast<uint32_t>(q), stream, key0, key1, w0, w1, w2, w3);
    float z[4];
    fa_gaussian4(w0, w1, w2, w3, z[0], z[1], z[2], z[3]);
    float* dst = out + r * k + 4 * q;
    const int m = static_cast<int>(k - 4 * q < 4 ? k - 4 * q : 4);
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (t < m) dst[t] = z[t] * scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int major = 0;
  int blocks_per_sm[4] = {0, 0, 0, 0};  // project_tiles_kernel variants, see variant_index
};

int variant_index(int kind, int bm) { return (kind == kGaussian ? 2 : 0) + (bm == 128 ? 1 : 0); }

template <int kKind, int kBM>
int occupancy() {
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, project_tiles_kernel<kKind, kBM>,
                                                      threads_for<kBM>(), 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return n > 0 ? n : 1;
}

void configure_device(DeviceInfo& info) {
  info.blocks_per_sm[variant_index(kRademacher, 64)] = occupancy<kRademacher, 64>();
  info.blocks_per_sm[variant_index(kRademacher, 128)] = occupancy<kRademacher, 128>();
  info.blocks_per_sm[variant_index(kGaussian, 64)] = occupancy<kGaussian, 64>();
  info.blocks_per_sm[variant_index(kGaussian, 128)] = occupancy<kGaussian, 128>();
}

// SM count, compute capability and occupancy of the current device, queried once per device.
const DeviceInfo& device_info(int device) {
  return cached_device_info<DeviceInfo>(device, configure_device);
}

template <int kKind, int kBM>
void launch_tiles(const ProjectParams& params, dim3 grid, cudaStream_t stream) {
  project_tiles_kernel<kKind, kBM><<<grid, threads_for<kBM>(), 0, stream>>>(params);
  check_launch("project_tiles_kernel launch");
}

void launch_tiles(int kind, int bm, const ProjectParams& params, dim3 grid, cudaStream_t stream) {
  if (kind == kGaussian) {
    if (bm == 128) launch_tiles<kGaussian, 128>(params, grid, stream);
    else launch_tiles<kGaussian, 64>(params, grid, stream);
  } else {
    if (bm == 128) launch_tiles<kRademacher, 128>(params, grid, stream);
    else launch_tiles<kRademacher, 64>(params, grid, stream);
  }
}

// One launch: rows [0, batch) of `out` (pointers already offset) over layers [0, n_layers),
// n_layers <= kMaxLayers. Splits the reduction over blocks when the output tiles alone
// cannot fill the device.
void project_group(float* out, int64_t batch, const Layer* layers, int n_layers,
                   const MatrixSpec& spec, bool accumulate, const DeviceInfo& info,
                   cudaStream_t stream) {
  ProjectParams params{};
  int64_t n_chunks = 0;
  for (int l = 0; l < n_layers; ++l) {
    const Layer& L = layers[l];
    params.layers[l] = LayerDesc{L.data, L.p, L.stride_b, L.stride_p, L.offset, n_chunks, L.dtype};
    n_chunks += (L.p + kBK - 1) / kBK;
  }
  params.n_layers = n_layers;
  params.accumulate = accumulate ? 1 : 0;
  params.n_chunks = n_chunks;
  params.batch = batch;
  params.k = spec.k;
  params.key0 = spec.key0;
  params.key1 = spec.key1;
  params.stream = spec.stream;
  params.scale = spec.scale;
  params.out = out;

  // A larger batch tile generates each R tile for more rows; a smaller one wastes less MMA
  // work on small batches (the common case: per-sample gradients of one batch).
  const int bm = batch > 64 ? 128 : 64;
  const int64_t k_tiles = (spec.k + kBN - 1) / kBN;
  const int64_t b_tiles = (batch + bm - 1) / bm;
  const int64_t tiles = k_tiles * b_tiles;
  const int64_t resident =
      static_cast<int64_t>(info.sms) * info.blocks_per_sm[variant_index(spec.kind, bm)];
  int64_t splits = split_count(tiles, resident, n_chunks, kMinChunksPerSplit);
  StreamBuffer workspace(stream, "split-K workspace");
  if (splits > 1) {
    // bounded: splits * tiles < 2 * resident tiles of kBM x kBN floats
    const size_t bytes = static_cast<size_t>(splits) * batch * spec.k * sizeof(float);
    if (!workspace.allocate(bytes)) splits = 1;
  }
  params.splits = static_cast<int>(splits);
  params.workspace = workspace.get();

  const dim3 grid(static_cast<unsigned>(k_tiles), static_cast<unsigned>(b_tiles),
                  static_cast<unsigned>(splits));
  launch_tiles(spec.kind, bm, params, grid, stream);
  if (splits > 1) {
    const int64_t n = batch * spec.k;
    reduce_splits(out, workspace.get(), static_cast<int>(splits), n, spec.scale, accumulate,
                  info.sms, stream, "reduce_splits_kernel launch");
    workspace.release();
  }
}

void check_spec(const MatrixSpec& spec) {
  if (spec.k <= 0) throw std::invalid_argument("k must be >= 1");
  if (spec.k > (int64_t{1} << 31) - 1) throw std::invalid_argument("k must be < 2**31");
  if (spec.kind != kRademacher && spec.kind != kGaussian)
    throw std::invalid_argument("kind must be 0 (rademacher) or 1 (gaussian)");
}

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace

void project(float* out, int64_t batch, const Layer* layers, int n_layers, const MatrixSpec& spec,
             CUstream_st* stream) {
  check_spec(spec);
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  for (int l = 0; l < n_layers; ++l) {
    if (layers[l].dtype < 0 || layers[l].dtype > 2)
      throw std::invalid_argument("layer dtype code must be 0, 1 or 2");
    if (layers[l].p <= 0 || layers[l].offset < 0)
      throw std::invalid_argument("layer p must be >= 1, offset >= 0");
  }
  if (batch == 0) return;
  if (n_layers <= 0) {  // the empty sum
    check(cudaMemsetAsync(out, 0, static_cast<size_t>(batch) * spec.k * sizeof(float), stream),
          "cudaMemsetAsync");
    return;
  }
  const DeviceInfo& info = device_info(current_device());
  if (info.major < 8)
    throw std::runtime_error("fastattr._cuda: project needs a GPU of compute capability >= 8.0 "
                             "(bf16 tensor cores); use backend='triton' or 'reference'");
  // Batch rows per launch: grid.y is limited to 65535 tiles (the larger tile is used here).
  const int64_t rows_per_launch = static_cast<int64_t>(kMaxGridY) * 128;
  Layer shifted[kMaxLayers];
  for (int64_t b0 = 0; b0 < batch; b0 += rows_per_launch) {
    const int64_t rows = batch - b0 < rows_per_launch ? batch - b0 : rows_per_launch;
    // Layer groups of kMaxLayers: the first writes the output, later ones add to it in order.
    for (int g0 = 0; g0 < n_layers; g0 += kMaxLayers) {
      const int n = n_layers - g0 < kMaxLayers ? n_layers - g0 : kMaxLayers;
      for (int l = 0; l < n; ++l) {
        shifted[l] = layers[g0 + l];
        shifted[l].data = static_cast<const char*>(shifted[l].data) +
                          b0 * shifted[l].stride_b * elem_size(shifted[l].dtype);
      }
      project_group(out + b0 * spec.k, rows, shifted, n, spec, g0 > 0, info, stream);
    }
  }
}

void materialize(float* out, const int64_t* rows, int64_t n, const MatrixSpec& spec,
                 CUstream_st* stream) {
  check_spec(spec);
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  if (n == 0) return;
  const DeviceInfo& info = device_info(current_device());
  const int64_t cap = static_cast<int64_t>(info.sms) * 16;
  if (spec.kind == kRademacher) {
    const int64_t warps = n * ((spec.k + kBN - 1) / kBN);
    const int64_t blocks = (warps + 7) / 8;
    materialize_rademacher_kernel<<<static_cast<unsigned>(blocks < cap ? blocks : cap), 256, 0,
                                    stream>>>(out, rows, n, spec.k, spec.key0, spec.key1,
                                              spec.stream, spec.scale);
  } else {
    const int64_t threads = n * ((spec.k + 3) / 4);
    const int64_t blocks = (threads + 255) / 256;
    materialize_gaussian_kernel<<<static_cast<unsigned>(blocks < cap ? blocks : cap), 256, 0,
                                  stream>>>(out, rows, n, spec.k, spec.key0, spec.key1,
                                            spec.stream, spec.scale);
  }
  check_launch("materialize kernel launch");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // a probe: leave no error behind for the next check
    return 0;
  }
  return n;
}

const char* device_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(err);
  }
  return n > 0 ? "ok" : "no CUDA device";
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return v;
}

const char* compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define FA_STR2(...) #__VA_ARGS__
#define FA_STR(...) FA_STR2(__VA_ARGS__)
  return FA_STR(__CUDA_ARCH_LIST__);
#undef FA_STR
#undef FA_STR2
#else
  return "";
#endif
}

}  // namespace cuda
}  // namespace fastattr
