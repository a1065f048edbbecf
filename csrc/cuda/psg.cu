// fastattr CUDA fused per-sample-gradient kernels (see psg.h for the contract).
//
// out[b, j] = scale * sum_i G_b[i] * M[i, j] over the flat index i of the layer's weight gradient
// (and its bias gradient), M = Z (the Philox matrix at the layer's offsets, psg_project) or
// M = Q^T (loaded query matrices, psg_matmul). G_b is never written to global memory: each
// block forms a small tile of it in shared memory from a and g, and immediately multiplies
// that tile into the matching rows of M on tensor cores.
//
// Work decomposition
//   grid (column blocks of kColTiles * kBN = 256 columns of out,
//         segment tiles of kBM = 32 segments,
//         split slices of the chunk list)
//   The flat index is cut into *chunks* of at most kKC = 128 entries. A weight chunk is a 2-D
//   tile [to, tf] of G: output channels [o0, o0 + to) of one conv group times features
//   [f0, f0 + tf) (to * tf <= 128, tf a power of two <= 16 that divides 32, to <= 32); a bias
//   chunk is [32, 1]: 32 output channels, the "feature" being the constant 1. Entry e of a
//   chunk is (o0 + (e >> log2 tf), f0 + (e & (tf - 1))); entries outside the layer (past
//   d_out, past the group's channels, past F, or e >= to * tf) are exactly zero.
//   Chunks are numbered group-major, then o-tile, then f-tile (weight chunks), then bias
//   chunks; split slice z takes a contiguous run of chunk numbers.
//
// Per chunk, in a block of 8 warps:
//   1. G tile (CUDA cores, fp32 FMA, exact fp32 accumulation): warp w computes the chunk's 128
//      entries for segments w, w + 8, w + 16, w + 24 of the block's 32. It walks the segment's
//      (row, position) pairs 32 at a time: lane l gathers, for pair p0 + l, the tile's `to`
//      values of g and `tf` values of A (for conv: the input patch, zero padding, in-kernel
//      from NCHW; never an unfold) into a warp-private staging area [to | tf][33] (padded:
//      conflict-free column reads), then every lane adds the 32 products for its 4 entries
//      e = l + 32 k. Since tf divides 32 the 4 entries share one feature, so one A value
//      and 4 g values are read per 4 FMAs. Each G entry is split into bf16 hi + lo operands
//      (hi = bf16(G), lo = bf16(G - hi): G is represented to ~2^-17 relative).
//   2. for each of the block's <= 2 column sub-tiles of kBN = 128 columns:
//      the RHS tile M[chunk entries, 128 columns] goes to shared memory as bf16 (hi, and lo
//      where M is not exactly bf16): Rademacher +-1 (exact; one Philox call per row for the
//      128 columns), Gaussian N(0,1) split hi + lo (one Philox call per 4 columns), or Q
//      loaded and split (bf16 Q has lo = 0, fp16 splits exactly);
//      acc[32 x 128] += G_lo M_hi + G_hi M_lo + G_hi M_hi on wmma m16n16k16 bf16 fragments with
//      fp32 accumulators (the small terms first; G_lo M_lo < 2^-16 relative is dropped; the
//      middle term only where M has a lo part). Warp w owns the 16 x 32 output tile at segment
//      fragment row w / 4 and column fragments 2 (w % 4), 2 (w % 4) + 1 of each sub-tile:
//      2 x 2 accumulator fragments (32 registers; 4 sub-tiles would spill at the 128-register
//      budget of two blocks per SM).
//   Epilogue: out = scale * acc, or the unscaled partial into a workspace slot when the chunk
//   list is split over blocks (split-K); a second kernel adds the slots in slot order.
//
// Cost: the G tile is recomputed by every column block (ceil(n_cols / 256) times); for
// n_cols <= 256 it is formed exactly once. Wide projections of long-sequence layers trade that
// recomputation for never storing G (B * d_out * F floats) -- the point of the op.
//
// Precision: G is accumulated in fp32 from fp32-converted inputs (bf16 / fp16 products are
// exact in fp32); the tensor-core product then costs <= ~3 * 2^-17 relative per term, as in
// projection.cu. Rademacher products of a G entry are exact up to that split.
//
// Determinism: no atomics anywhere; within a block the summation order is fixed, and split
// partials are reduced in slot order. The split count depends on the SM count and the shape,
// so results are bitwise reproducible for a given GPU model and shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/psg.h"
#include "philox.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// Pre-Ampere device passes compile the kernel body out (no bf16 tensor cores), leaving its
// helpers unreferenced; the host refuses such devices before launching.
#pragma nv_diag_suppress 177
#endif

namespace fastattr {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

enum Mode : int { kModeRademacher = 0, kModeGaussian = 1, kModeMatmul = 2 };

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;             // segments per block: 2 fragment rows
constexpr int kKC = 128;            // flat entries per chunk (MMA reduction depth per chunk)
constexpr int kBN = 128;            // columns per sub-tile: one Rademacher Philox call per row
constexpr int kColTiles = 2;        // sub-tiles per block: a block covers 256 columns
constexpr int kLdG = kKC + 8;       // G operand rows: 272 bytes, ldmatrix rows on distinct banks
constexpr int kLdM = kBN + 8;       // RHS rows (row-major [kKC][kLdM], or col-major [kBN][kLdM])
static_assert(kKC == kBN, "kLdM serves both RHS layouts only when kKC == kBN");
constexpr int kMaxTO = 32;          // output channels per chunk
constexpr int kMaxTF = 16;          // features per chunk (divides 32: see stage 1)
constexpr int kStageLd = 33;        // staging row stride in floats: conflict-free reads
constexpr int kStageWarpFloats = (kMaxTO + kMaxTF) * kStageLd;
constexpr int kBiasTO = 32;         // output channels per bias chunk
constexpr int64_t kMinChunksPerSplit = 2;

// Dynamic shared memory: [G hi | G lo] then one region that holds, at different times, the
// stage-1 staging areas, the RHS tile(s), and the epilogue's per-warp 16 x 16 stages.
constexpr int kGBytes = 2 * kBM * kLdG * 2;
constexpr int kMTileBytes = kKC * kLdM * 2;
constexpr int kStagingBytes = kWarps * kStageWarpFloats * 4;
constexpr int kEpilogueBytes = kWarps * 16 * 16 * 4;
constexpr int cmax(int x, int y) { return x > y ? x : y; }
constexpr bool rhs_split(int mode) { return mode != kModeRademacher; }
constexpr int smem_bytes(int mode) {
  return kGBytes +
         cmax(cmax((rhs_split(mode) ? 2 : 1) * kMTileBytes, kStagingBytes), kEpilogueBytes);
}
static_assert(kGBytes % 128 == 0 && kMTileBytes % 128 == 0, "regions stay 128-byte aligned");

struct PsgParams {
  // layer inputs
  const void* a;
  const void* g;
  int a_dtype, g_dtype;
  const int64_t* seg_ptr;  // [batch + 1] (offset to this launch's first segment)
  const int64_t* order;
  int64_t batch;
  int is_conv;
  int64_t s_row;  // positions per row: T (linear) or H_out * W_out (conv)
  int64_t d_out, F;
  int64_t g_row, g_so, g_ss;  // g element (r, o, s) at r * g_row + o * g_so + s * g_ss
  int64_t a_row, d_in;        // linear: a element (r, s, f) at r * a_row + s * d_in + f
  int64_t c_in, h, w, w_out;  // conv input geometry
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t c_in_g, c_out_g;  // channels per group
  // chunking (see the file comment)
  int to, tf, tf_log2;
  int64_t o_tiles, f_tiles, n_w_chunks, n_chunks, chunks_per_split;
  int splits;  // == gridDim.z; 1: write out directly, else partials to workspace
  // right-hand side
  int64_t n_cols;                // k or q
  uint64_t w_offset, b_offset;   // psg_project: rows of Z
  uint32_t key0, key1, stream;   // psg_project: the Philox matrix
  const void* q;                 // psg_matmul: [n_cols, d_out * F]
  const void* qb;                // psg_matmul: [n_cols, d_out] or null
  int q_dtype, qb_dtype;
  float scale;
  float* out;        // [batch, n_cols]
  float* workspace;  // [splits, batch, n_cols], unscaled partial sums
};

__device__ __forceinline__ float load_as_float(const void* base, int64_t idx, int dtype) {
  if (dtype == kFloat32) return __ldg(static_cast<const float*>(base) + idx);
  const unsigned short u = __ldg(static_cast<const unsigned short*>(base) + idx);
  return dtype == kBFloat16 ? __bfloat162float(__ushort_as_bfloat16(u))
                            : __half2float(__ushort_as_half(u));
}

// hi = bf16(x), lo = bf16(x - hi); a non-finite hi gets lo = 0 so that inf stays inf, not NaN.
__device__ __forceinline__ void split_bf16(float x, bf16& hi, bf16& lo) {
  hi = __float2bfloat16_rn(x);
  const float hf = __bfloat162float(hi);
  lo = __float2bfloat16_rn(isfinite(hf) ? x - hf : 0.0f);
}

// One chunk of the flat index (see the file comment).
struct Chunk {
  int64_t o0, o_end;  // output channels [o0, o_end), all in group gi
  int64_t f0, f_end;  // features [f0, f_end)
  int64_t gi;         // conv group
  int to, tf, tf_log2;
  bool bias;
};

__device__ __forceinline__ Chunk decode_chunk(const PsgParams& P, int64_t c) {
  Chunk t;
  if (c < P.n_w_chunks) {
    const int64_t per_group = P.o_tiles * P.f_tiles;
    t.gi = c / per_group;
    const int64_t rem = c - t.gi * per_group;
    const int64_t ot = rem / P.f_tiles;
    const int64_t ft = rem - ot * P.f_tiles;
    const int64_t group_end = (t.gi + 1) * P.c_out_g;
    t.o0 = t.gi * P.c_out_g + ot * P.to;
    t.o_end = t.o0 + P.to < group_end ? t.o0 + P.to : group_end;
    t.f0 = ft * P.tf;
    t.f_end = t.f0 + P.tf < P.F ? t.f0 + P.tf : P.F;
    t.to = P.to;
    t.tf = P.tf;
    t.tf_log2 = P.tf_log2;
    t.bias = false;
  } else {
    t.o0 = (c - P.n_w_chunks) * kBiasTO;
    t.o_end = t.o0 + kBiasTO < P.d_out ? t.o0 + kBiasTO : P.d_out;
    t.f0 = 0;
    t.f_end = 1;
    t.gi = 0;
    t.to = kBiasTO;
    t.tf = 1;
    t.tf_log2 = 0;
    t.bias = true;
  }
  return t;
}

// Entry e of chunk t: its output channel and feature, and whether it lies inside the layer.
__device__ __forceinline__ bool chunk_entry(const Chunk& t, int e, int64_t& o, int64_t& f) {
  const int o_l = e >> t.tf_log2;
  o = t.o0 + o_l;
  f = t.f0 + (e & (t.tf - 1));
  return o_l < t.to && o < t.o_end && f < t.f_end;
}

// Stage 1 gather: lane `lane` writes column `lane` of the warp's staging rows: g[r, o, s] for
// the chunk's `to` output channels (rows 0..to-1 of gs) and A[r, f, s] for its `tf` features
// (rows 0..tf-1 of as), where (r, s) is the segment's pair p; zeros past the segment, the
// layer, or (conv) the padded border.
__device__ __forceinline__ void gather_pair(const PsgParams& P, const Chunk& t, int64_t begin,
                                            int64_t p, int64_t n_pos, float* gs, float* as,
                                            int lane) {
  if (p >= n_pos) {
    for (int o_l = 0; o_l < t.to; ++o_l) gs[o_l * kStageLd + lane] = 0.0f;
    for (int f_l = 0; f_l < t.tf; ++f_l) as[f_l * kStageLd + lane] = 0.0f;
    return;
  }
  const int64_t i = p / P.s_row;
  const int64_t s = p - i * P.s_row;
  const int64_t r = __ldg(P.order + begin + i);
  const int64_t g_base = r * P.g_row + s * P.g_ss;
  for (int o_l = 0; o_l < t.to; ++o_l) {
    const int64_t o = t.o0 + o_l;
    gs[o_l * kStageLd + lane] = o < t.o_end ? load_as_float(P.g, g_base + o * P.g_so, P.g_dtype)
                                            : 0.0f;
  }
  if (t.bias) {
    as[lane] = 1.0f;  // the bias gradient is G's column for a constant-1 input
  } else if (!P.is_conv) {
    const int64_t a_base = r * P.a_row + s * P.d_in;
    for (int f_l = 0; f_l < t.tf; ++f_l) {
      const int64_t f = t.f0 + f_l;
      as[f_l * kStageLd + lane] = f < t.f_end ? load_as_float(P.a, a_base + f, P.a_dtype) : 0.0f;
    }
  } else {
    // output position s = (oy, ox) reads input (oy sh - ph + ky dh, ox sw - pw + kx dw) of
    // channel gi * c_in_g + c for feature f = (c, ky, kx)
    const int64_t oy = s / P.w_out;
    const int64_t ox = s - oy * P.w_out;
    const int64_t y0 = oy * P.sh - P.ph;
    const int64_t x0 = ox * P.sw - P.pw;
    const int64_t c_base = r * P.c_in + t.gi * P.c_in_g;
    const int taps = P.kh * P.kw;
    for (int f_l = 0; f_l < t.tf; ++f_l) {
      const int64_t f = t.f0 + f_l;
      float v = 0.0f;
      if (f < t.f_end) {
        const int64_t c = f / taps;
        const int tap = static_cast<int>(f - c * taps);
        const int ky = tap / P.kw;
        const int kx = tap - ky * P.kw;
        const int64_t y = y0 + static_cast<int64_t>(ky) * P.dh;
        const int64_t x = x0 + static_cast<int64_t>(kx) * P.dw;
        if (y >= 0 && y < P.h && x >= 0 && x < P.w)
          v = load_as_float(P.a, ((c_base + c) * P.h + y) * P.w + x, P.a_dtype);
      }
      as[f_l * kStageLd + lane] = v;
    }
  }
}

// Stage 1: the chunk's G entries for the block's segments, as bf16 hi/lo operand rows
// g_hi/g_lo [kBM][kLdG] (row m = segment b_tile0 + m; zero rows past the batch).
__device__ __forceinline__ void form_g_tile(const PsgParams& P, const Chunk& t, int64_t b_tile0,
                                            float* staging, bf16* g_hi, bf16* g_lo) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float* gs = staging + warp * kStageWarpFloats;  // [kMaxTO][kStageLd]
  float* as = gs + kMaxTO * kStageLd;             // [kMaxTF][kStageLd]
  // lane's entries e_k = lane + 32 k: tf divides 32, so all four have feature lane % tf
  const int f_l = lane & (t.tf - 1);
  int o_l[4];
  bool inside[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int e = lane + 32 * k;
    o_l[k] = e >> t.tf_log2;
    inside[k] = o_l[k] < t.to;  // e < to * tf
    if (!inside[k]) o_l[k] = 0;  // a readable row; the sum is discarded
  }
  for (int m = warp; m < kBM; m += kWarps) {
    const int64_t b = b_tile0 + m;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (b < P.batch) {
      const int64_t begin = __ldg(P.seg_ptr + b);
      const int64_t n_pos = (__ldg(P.seg_ptr + b + 1) - begin) * P.s_row;
      for (int64_t p0 = 0; p0 < n_pos; p0 += 32) {
        gather_pair(P, t, begin, p0 + lane, n_pos, gs, as, lane);
        __syncwarp();
        const int cnt = n_pos - p0 < 32 ? static_cast<int>(n_pos - p0) : 32;
        for (int s = 0; s < cnt; ++s) {
          const float av = as[f_l * kStageLd + s];
#pragma unroll
          for (int k = 0; k < 4; ++k) acc[k] = fmaf(gs[o_l[k] * kStageLd + s], av, acc[k]);
        }
        __syncwarp();  // the staging columns are rewritten by the next gather
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int e = lane + 32 * k;
      bf16 hi, lo;
      split_bf16(inside[k] ? acc[k] : 0.0f, hi, lo);
      g_hi[m * kLdG + e] = hi;
      g_lo[m * kLdG + e] = lo;
    }
  }
}

// Row index of R (psg_project) for entry e of chunk t; false outside the layer.
__device__ __forceinline__ bool r_row(const PsgParams& P, const Chunk& t, int e, uint64_t& row) {
  int64_t o, f;
  const bool ok = chunk_entry(t, e, o, f);
  row = t.bias ? P.b_offset + static_cast<uint64_t>(o)
               : P.w_offset + static_cast<uint64_t>(o * P.F + f);
  return ok;
}

// Rademacher RHS tile, row-major [kKC][kLdM] bf16 +-1 (zero rows outside the layer): thread t
// takes row t / 2 and words 2 (t % 2), 2 (t % 2) + 1 of the row's Philox call, i.e. 64
// columns (bit j % 32 of word (j % 128) / 32 is column j; bit 1 -> +1).
__device__ __forceinline__ void gen_rademacher_tile(const PsgParams& P, const Chunk& t,
                                                    int64_t col0, bf16* m_hi) {
  const int e = threadIdx.x >> 1;
  const int half = threadIdx.x & 1;
  uint64_t row;
  const bool ok = r_row(P, t, e, row);
  uint32_t w0 = 0, w1 = 0, w2 = 0, w3 = 0;
  if (ok)
    philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                  static_cast<uint32_t>(col0 / kBN), P.stream, P.key0, P.key1, w0, w1, w2, w3);
  uint4* dst = reinterpret_cast<uint4*>(m_hi + e * kLdM + half * 64);  // 16-byte aligned
#pragma unroll
  for (int word = 0; word < 2; ++word) {
    const uint32_t bits = half ? (word ? w3 : w2) : (word ? w1 : w0);
    // bf16 +1 = 0x3F80, -1 = 0xBF80: bit 1 clears the sign of -1; two columns per 32-bit
    // word, the lower column in the low half. Rows outside the layer are 0.
    const uint32_t neg = ok ? 0xBF80BF80u : 0u;
    uint32_t packed[16];
#pragma unroll
    for (int m = 0; m < 16; ++m) {
      const uint32_t lo_bit = ok ? (bits >> (2 * m)) & 1u : 0u;
      const uint32_t hi_bit = ok ? (bits >> (2 * m + 1)) & 1u : 0u;
      packed[m] = neg ^ (lo_bit << 15) ^ (hi_bit << 31);
    }
#pragma unroll
    for (int v = 0; v < 4; ++v)
      dst[word * 4 + v] =
          make_uint4(packed[4 * v], packed[4 * v + 1], packed[4 * v + 2], packed[4 * v + 3]);
  }
}

// Gaussian RHS tile, row-major hi + lo: 128 rows x 32 Philox calls (4 columns each), 16 calls
// per thread, consecutive threads on consecutive calls of a row. Calls for rows outside the
// layer or columns past n_cols are skipped (zeros): Box-Muller is the expensive part.
__device__ __forceinline__ void gen_gaussian_tile(const PsgParams& P, const Chunk& t,
                                                  int64_t col0, bf16* m_hi, bf16* m_lo) {
  const int64_t cols_valid = P.n_cols - col0;
#pragma unroll 2
  for (int it = 0; it < kKC * (kBN / 4) / kThreads; ++it) {
    const int call = threadIdx.x + it * kThreads;
    const int e = call >> 5;
    const int q = call & 31;  // columns [4q, 4q + 4)
    uint64_t row;
    const bool ok = r_row(P, t, e, row);
    float z0 = 0.0f, z1 = 0.0f, z2 = 0.0f, z3 = 0.0f;
    if (ok && 4 * q < cols_valid) {
      uint32_t w0, w1, w2, w3;
      philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                    static_cast<uint32_t>(col0 / 4) + q, P.stream, P.key0, P.key1, w0, w1, w2,
                    w3);
      fa_gaussian4(w0, w1, w2, w3, z0, z1, z2, z3);
    }
    store_split4_bf16(m_hi + e * kLdM + 4 * q, m_lo + e * kLdM + 4 * q, z0, z1, z2, z3);
  }
}

// Q^T tile, col-major [kBN][kLdM] hi + lo: element (entry e, column j) = Q[col0 + j, o F + f]
// (or Qb[col0 + j, o] for a bias chunk) at j * kLdM + e. Thread t takes entry t % 128 and
// every other column from t / 128: a warp reads 32 consecutive entries of one Q row (runs of
// tf contiguous features) and writes 32 consecutive bf16s.
__device__ __forceinline__ void load_q_tile(const PsgParams& P, const Chunk& t, int64_t col0,
                                            bf16* m_hi, bf16* m_lo) {
  const int e = threadIdx.x & (kKC - 1);
  int64_t o, f;
  const bool ok = chunk_entry(t, e, o, f);
  const int64_t flat = t.bias ? o : o * P.F + f;
  const int64_t ld = t.bias ? P.d_out : P.d_out * P.F;
  const void* src = t.bias ? P.qb : P.q;
  const int dtype = t.bias ? P.qb_dtype : P.q_dtype;
  for (int j = threadIdx.x / kKC; j < kBN; j += kThreads / kKC) {
    const int64_t col = col0 + j;
    const float v = ok && col < P.n_cols ? load_as_float(src, col * ld + flat, dtype) : 0.0f;
    bf16 hi, lo;
    split_bf16(v, hi, lo);
    m_hi[j * kLdM + e] = hi;
    m_lo[j * kLdM + e] = lo;
  }
}

namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
template <int kMode>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16,
                             typename std::conditional<kMode == kModeMatmul, wmma::col_major,
                                                       wmma::row_major>::type>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc[n] += G[fragment row fr, :] * M[:, column fragment fc0 + n] over the chunk's kKC entries.
template <int kMode>
__device__ __forceinline__ void mma_chunk(const bf16* g_hi, const bf16* g_lo, const bf16* m_hi,
                                          const bf16* m_lo, int fr, int fc0, FragC (&acc)[2]) {
  // partly unrolled: a full unroll hoists all 8 steps' fragment loads and spills
#pragma unroll 2
  for (int kk = 0; kk < kKC; kk += 16) {
    FragA a_hi, a_lo;
    wmma::load_matrix_sync(a_lo, g_lo + fr * 16 * kLdG + kk, kLdG);
    wmma::load_matrix_sync(a_hi, g_hi + fr * 16 * kLdG + kk, kLdG);
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int col = (fc0 + n) * 16;
      // row-major [kKC][kLdM]: (kk, col); col-major [kBN][kLdM]: column col starts at col*kLdM
      const int at = kMode == kModeMatmul ? col * kLdM + kk : kk * kLdM + col;
      FragB<kMode> b_hi;
      wmma::load_matrix_sync(b_hi, m_hi + at, kLdM);
      // correction terms first: the small products are added before the large one
      wmma::mma_sync(acc[n], a_lo, b_hi, acc[n]);
      if constexpr (rhs_split(kMode)) {
        FragB<kMode> b_lo;
        wmma::load_matrix_sync(b_lo, m_lo + at, kLdM);
        wmma::mma_sync(acc[n], a_hi, b_lo, acc[n]);
      }
      wmma::mma_sync(acc[n], a_hi, b_hi, acc[n]);
    }
  }
}

// One block: output tile [kBM segments, kColTiles * kBN columns] at (blockIdx.y, blockIdx.x),
// over split slice blockIdx.z of the chunk list. Two blocks per SM (<= 128 registers).
template <int kMode>
__global__ void __launch_bounds__(kThreads, 2)
    psg_tiles_kernel(const __grid_constant__ PsgParams P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 tensor cores need sm_80; the host refuses older devices before launching
#else
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const g_hi = reinterpret_cast<bf16*>(smem);
  bf16* const g_lo = g_hi + kBM * kLdG;
  unsigned char* const region = smem + kGBytes;
  bf16* const m_hi = reinterpret_cast<bf16*>(region);
  bf16* const m_lo = m_hi + kKC * kLdM;
  float* const staging = reinterpret_cast<float*>(region);

  const int warp = threadIdx.x >> 5;
  const int fr = warp >> 2;        // segment fragment row of this warp's output tiles
  const int fc0 = (warp & 3) * 2;  // first of its two column fragments in a sub-tile
  const int64_t b_tile0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t col_block0 = static_cast<int64_t>(blockIdx.x) * (kColTiles * kBN);
  const int64_t cols_left = P.n_cols - col_block0;
  const int n_ct = cols_left >= kColTiles * kBN ? kColTiles
                                                : static_cast<int>((cols_left + kBN - 1) / kBN);
  const int split = blockIdx.z;
  const int64_t c_begin = split * P.chunks_per_split;
  const int64_t c_end =
      c_begin + P.chunks_per_split < P.n_chunks ? c_begin + P.chunks_per_split : P.n_chunks;

  FragC acc[kColTiles][2];
#pragma unroll
  for (int t = 0; t < kColTiles; ++t) {
    wmma::fill_fragment(acc[t][0], 0.0f);
    wmma::fill_fragment(acc[t][1], 0.0f);
  }

  for (int64_t c = c_begin; c < c_end; ++c) {
    const Chunk chunk = decode_chunk(P, c);
    // the staging area aliases the RHS tiles: every warp is past the previous chunk's MMAs
    // (the barrier closing the sub-tile loop)
    form_g_tile(P, chunk, b_tile0, staging, g_hi, g_lo);
    __syncthreads();  // G operands complete; staging free for the RHS tiles
    for (int ct = 0; ct < n_ct; ++ct) {
      const int64_t col0 = col_block0 + static_cast<int64_t>(ct) * kBN;
      if constexpr (kMode == kModeRademacher) gen_rademacher_tile(P, chunk, col0, m_hi);
      else if constexpr (kMode == kModeGaussian) gen_gaussian_tile(P, chunk, col0, m_hi, m_lo);
      else load_q_tile(P, chunk, col0, m_hi, m_lo);
      __syncthreads();  // RHS tile complete
      // static accumulator indices keep acc in registers (a runtime index would put it in
      // local memory)
#pragma unroll
      for (int t = 0; t < kColTiles; ++t)
        if (t == ct) mma_chunk<kMode>(g_hi, g_lo, m_hi, m_lo, fr, fc0, acc[t]);
      __syncthreads();  // MMAs done before the RHS tile (or staging) is rewritten
    }
  }

  // Epilogue: each warp stages one 16 x 16 accumulator at a time in shared memory (the fragment
  // layout is opaque), then lane pairs write rows of 8 with bounds checks. The stages alias the
  // RHS region, free after the loop's last barrier.
  float* const stage = reinterpret_cast<float*>(region) + warp * 16 * 16;
  const int lane = threadIdx.x & 31;
  const int s_row = lane >> 1, s_col = (lane & 1) * 8;
  const int64_t b = b_tile0 + fr * 16 + s_row;
#pragma unroll
  for (int t = 0; t < kColTiles; ++t) {
    if (t >= n_ct) break;  // block-uniform
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      wmma::store_matrix_sync(stage, acc[t][n], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t col = col_block0 + t * kBN + (fc0 + n) * 16 + s_col;
      if (b < P.batch) {
        float* o = P.splits == 1 ? P.out + b * P.n_cols + col
                                 : P.workspace + (split * P.batch + b) * P.n_cols + col;
        const float scale = P.splits == 1 ? P.scale : 1.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (col + e < P.n_cols) o[e] = scale * stage[s_row * 16 + s_col + e];
      }
      __syncwarp();  // the stage is rewritten by the next fragment
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int major = 0;
  int blocks_per_sm[3] = {0, 0, 0};  // psg_tiles_kernel<mode>
};

// Opt the kernel in to its dynamic shared memory (> 48 KiB) on the current device and ask how
// many blocks fit on an SM.
template <int kMode>
int configure_kernel() {
  check(cudaFuncSetAttribute(psg_tiles_kernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem_bytes(kMode)),
        "cudaFuncSetAttribute(psg_tiles_kernel, MaxDynamicSharedMemorySize)");
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, psg_tiles_kernel<kMode>, kThreads,
                                                      smem_bytes(kMode)),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor(psg_tiles_kernel)");
  return n > 0 ? n : 1;
}

void configure_device(DeviceInfo& info) {
  info.blocks_per_sm[kModeRademacher] = configure_kernel<kModeRademacher>();
  info.blocks_per_sm[kModeGaussian] = configure_kernel<kModeGaussian>();
  info.blocks_per_sm[kModeMatmul] = configure_kernel<kModeMatmul>();
}

// SM count, compute capability, and the kernels configured, once per device.
const DeviceInfo& device_info() {
  return cached_device_info<DeviceInfo>(current_device(), configure_device);
}

void launch_tiles(int mode, const PsgParams& params, dim3 grid, cudaStream_t stream) {
  if (mode == kModeRademacher)
    psg_tiles_kernel<kModeRademacher>
        <<<grid, kThreads, smem_bytes(kModeRademacher), stream>>>(params);
  else if (mode == kModeGaussian)
    psg_tiles_kernel<kModeGaussian><<<grid, kThreads, smem_bytes(kModeGaussian), stream>>>(params);
  else
    psg_tiles_kernel<kModeMatmul><<<grid, kThreads, smem_bytes(kModeMatmul), stream>>>(params);
  check_launch("psg_tiles_kernel launch");
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

int log2_exact(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

void check_dtype(int dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument(std::string(what) + " dtype code must be 0, 1 or 2");
}

// Geometry, strides and chunking of `in` (validated) into `P`; everything but the RHS.
void describe_layer(const PsgInput& in, bool has_bias, PsgParams& P) {
  check_dtype(in.a_dtype, "a");
  check_dtype(in.g_dtype, "g");
  if (in.batch < 0) throw std::invalid_argument("batch must be >= 0");
  const int64_t n_rows = in.a_shape[0];
  if (n_rows < 0 || in.g_shape[0] != n_rows)
    throw std::invalid_argument("a and g must have the same number of rows");
  P.a = in.a;
  P.g = in.g;
  P.a_dtype = in.a_dtype;
  P.g_dtype = in.g_dtype;
  P.seg_ptr = in.seg_ptr;
  P.order = in.order;
  P.batch = in.batch;
  P.is_conv = in.is_conv ? 1 : 0;
  int64_t groups = 1;
  if (!in.is_conv) {
    const int64_t tokens = in.a_shape[1], d_in = in.a_shape[2], d_out = in.g_shape[2];
    if (tokens < 0 || in.g_shape[1] != tokens)
      throw std::invalid_argument("a and g must have the same number of tokens per row");
    if (d_in < 1 || d_out < 1) throw std::invalid_argument("d_in and d_out must be >= 1");
    P.s_row = tokens;
    P.d_out = d_out;
    P.F = d_in;
    P.g_row = tokens * d_out;
    P.g_so = 1;
    P.g_ss = d_out;
    P.a_row = tokens * d_in;
    P.d_in = d_in;
    P.c_in = d_in;
    P.h = P.w = P.w_out = 1;
    P.kh = P.kw = P.sh = P.sw = P.dh = P.dw = 1;
    P.ph = P.pw = 0;
    P.c_in_g = d_in;
    P.c_out_g = d_out;
  } else {
    const int* cv = in.conv;
    for (int i : {0, 1, 2, 3, 6, 7, 8})
      if (cv[i] < 1)
        throw std::invalid_argument("conv kernel size, stride, dilation and groups must be >= 1");
    if (cv[4] < 0 || cv[5] < 0) throw std::invalid_argument("conv padding must be >= 0");
    groups = cv[8];
    const int64_t c_in = in.a_shape[1], h = in.a_shape[2], w = in.a_shape[3];
    const int64_t c_out = in.g_shape[1], h_out = in.g_shape[2], w_out = in.g_shape[3];
    if (c_in < 1 || c_out < 1 || c_in % groups || c_out % groups)
      throw std::invalid_argument("conv channels must be >= 1 and divisible by groups");
    // spans of the dilated kernel over the padded input; negative: no output position
    const int64_t span_h = h + 2 * cv[4] - static_cast<int64_t>(cv[6]) * (cv[0] - 1) - 1;
    const int64_t span_w = w + 2 * cv[5] - static_cast<int64_t>(cv[7]) * (cv[1] - 1) - 1;
    if (span_h < 0 || span_w < 0 || h_out != span_h / cv[2] + 1 || w_out != span_w / cv[3] + 1)
      throw std::invalid_argument("conv output size does not match g's spatial shape");
    P.s_row = h_out * w_out;
    P.d_out = c_out;
    P.F = c_in / groups * cv[0] * cv[1];
    P.g_row = c_out * h_out * w_out;
    P.g_so = h_out * w_out;
    P.g_ss = 1;
    P.a_row = c_in * h * w;
    P.d_in = 0;
    P.c_in = c_in;
    P.h = h;
    P.w = w;
    P.w_out = w_out;
    P.kh = cv[0];
    P.kw = cv[1];
    P.sh = cv[2];
    P.sw = cv[3];
    P.ph = cv[4];
    P.pw = cv[5];
    P.dh = cv[6];
    P.dw = cv[7];
    P.c_in_g = c_in / groups;
    P.c_out_g = c_out / groups;
  }
  // Chunk shape: tf features (a power of two <= 16, so it divides the warp), then as many
  // output channels as fit in kKC entries (<= 32, and no more than the group has).
  const int64_t tf = P.F >= kMaxTF ? kMaxTF : next_pow2(P.F);
  int64_t to = kKC / tf;
  if (to > kMaxTO) to = kMaxTO;
  if (to > next_pow2(P.c_out_g)) to = next_pow2(P.c_out_g);
  P.tf = static_cast<int>(tf);
  P.tf_log2 = log2_exact(tf);
  P.to = static_cast<int>(to);
  P.o_tiles = (P.c_out_g + to - 1) / to;
  P.f_tiles = (P.F + tf - 1) / tf;
  P.n_w_chunks = groups * P.o_tiles * P.f_tiles;
  P.n_chunks = P.n_w_chunks + (has_bias ? (P.d_out + kBiasTO - 1) / kBiasTO : 0);
}

// Launches over the segments in groups of kMaxGridY tiles; `P` has the layer and RHS filled in.
void run(int mode, PsgParams P, cudaStream_t stream) {
  if (P.batch == 0 || P.n_cols == 0) return;
  if (P.seg_ptr == nullptr || P.order == nullptr || P.out == nullptr)
    throw std::invalid_argument("seg_ptr, order and out must be device pointers");
  const DeviceInfo& info = device_info();
  if (info.major < 8)
    throw std::runtime_error("fastattr._cuda: psg kernels need a GPU of compute capability >= "
                             "8.0 (bf16 tensor cores); use backend='triton' or 'reference'");
  const int64_t total = P.batch;
  const int64_t per_launch = static_cast<int64_t>(kMaxGridY) * kBM;
  const int64_t col_blocks = (P.n_cols + kColTiles * kBN - 1) / (kColTiles * kBN);
  if (col_blocks > 0x7fffffff) throw std::invalid_argument("too many output columns");
  float* const out = P.out;
  const int64_t* const seg_ptr = P.seg_ptr;
  for (int64_t b0 = 0; b0 < total; b0 += per_launch) {
    P.batch = total - b0 < per_launch ? total - b0 : per_launch;
    P.seg_ptr = seg_ptr + b0;
    P.out = out + b0 * P.n_cols;
    const int64_t b_tiles = (P.batch + kBM - 1) / kBM;
    const int64_t tiles = col_blocks * b_tiles;
    // Split the chunk list over blocks when the output tiles alone cannot fill the device.
    const int64_t resident = static_cast<int64_t>(info.sms) * info.blocks_per_sm[mode];
    int64_t splits = split_count(tiles, resident, P.n_chunks, kMinChunksPerSplit);
    StreamBuffer workspace(stream, "psg split workspace");
    if (splits > 1) {
      // bounded: splits * tiles < 2 * resident tiles of 32 x 256 floats
      const size_t bytes = static_cast<size_t>(splits) * P.batch * P.n_cols * sizeof(float);
      if (!workspace.allocate(bytes)) splits = 1;
    }
    // every slice non-empty: chunks_per_split = ceil(n / splits), then splits = ceil(n / that)
    P.chunks_per_split = (P.n_chunks + splits - 1) / splits;
    splits = (P.n_chunks + P.chunks_per_split - 1) / P.chunks_per_split;
    P.splits = static_cast<int>(splits);
    P.workspace = workspace.get();
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(b_tiles),
                    static_cast<unsigned>(splits));
    launch_tiles(mode, P, grid, stream);
    if (splits > 1) {
      reduce_splits(P.out, P.workspace, P.splits, P.batch * P.n_cols, P.scale, false, info.sms,
                    stream, "reduce_splits_kernel launch (psg)");
      workspace.release();
    }
  }
}

}  // namespace

void psg_project(float* out, const PsgInput& in, bool has_bias, int64_t w_offset,
                 int64_t b_offset, const MatrixSpec& spec, CUstream_st* stream) {
  if (spec.k <= 0) throw std::invalid_argument("k must be >= 1");
  if (spec.k > (int64_t{1} << 31) - 1) throw std::invalid_argument("k must be < 2**31");
  if (spec.kind != kRademacher && spec.kind != kGaussian)
    throw std::invalid_argument("kind must be 0 (rademacher) or 1 (gaussian)");
  if (w_offset < 0 || b_offset < 0) throw std::invalid_argument("offsets must be >= 0");
  PsgParams P{};
  describe_layer(in, has_bias, P);
  P.n_cols = spec.k;
  P.w_offset = static_cast<uint64_t>(w_offset);
  P.b_offset = static_cast<uint64_t>(b_offset);
  P.key0 = spec.key0;
  P.key1 = spec.key1;
  P.stream = spec.stream;
  P.scale = spec.scale;
  P.out = out;
  run(spec.kind == kGaussian ? kModeGaussian : kModeRademacher, P, stream);
}

void psg_matmul(float* out, const PsgInput& in, const void* q_weight, int q_dtype, int64_t q,
                const void* q_bias, int q_bias_dtype, CUstream_st* stream) {
  if (q < 0) throw std::invalid_argument("q must be >= 0");
  check_dtype(q_dtype, "q_weight");
  if (q_bias != nullptr) check_dtype(q_bias_dtype, "q_bias");
  PsgParams P{};
  describe_layer(in, q_bias != nullptr, P);
  if (q > 0 && q_weight == nullptr)
    throw std::invalid_argument("q_weight must be a device pointer");
  P.n_cols = q;
  P.q = q_weight;
  P.q_dtype = q_dtype;
  P.qb = q_bias;
  P.qb_dtype = q_bias != nullptr ? q_bias_dtype : kFloat32;
  P.scale = 1.0f;
  P.out = out;
  run(kModeMatmul, P, stream);
}

}  // namespace cuda
}  // namespace fastattr
