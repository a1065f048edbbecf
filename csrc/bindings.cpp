// fastattr._C: pybind11 bindings of the CPU kernels. Tensors cross as raw pointers plus sizes
// and strides (the Python launchers in fastattr/kernels/cpu.py own validation), so this module
// does not link against torch and does not depend on its version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cpu/curvature.h"
#include "cpu/projection.h"
#include "cpu/psg.h"
#include "philox.h"

namespace py = pybind11;
using fastattr::cpu::CovInput;
using fastattr::cpu::Layer;
using fastattr::cpu::MatrixSpec;
using fastattr::cpu::PsgLayer;
using fastattr::cpu::PsgQuery;

namespace {

MatrixSpec make_spec(int64_t k, int kind, uint32_t key0, uint32_t key1, uint32_t stream,
                     float scale) {
  if (k <= 0) throw std::invalid_argument("k must be >= 1");
  if (kind != fastattr::kRademacher && kind != fastattr::kGaussian)
    throw std::invalid_argument("kind must be 0 (rademacher) or 1 (gaussian)");
  return MatrixSpec{k, kind, key0, key1, stream, scale};
}

void project(uintptr_t out, int64_t batch,
             const std::vector<std::tuple<uintptr_t, int, int64_t, int64_t, int64_t, int64_t>>& layers,
             int64_t k, int kind, uint32_t key0, uint32_t key1, uint32_t stream, float scale,
             int threads) {
  const MatrixSpec spec = make_spec(k, kind, key0, key1, stream, scale);
  std::vector<Layer> ls;
  ls.reserve(layers.size());
  for (const auto& t : layers) {
    Layer l{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t),
            std::get<3>(t), std::get<4>(t), std::get<5>(t)};
    if (l.dtype < 0 || l.dtype > 2) throw std::invalid_argument("layer dtype code must be 0, 1 or 2");
    if (l.p <= 0 || l.offset < 0) throw std::invalid_argument("layer p must be >= 1, offset >= 0");
    ls.push_back(l);
  }
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  py::gil_scoped_release release;
  fastattr::cpu::project(reinterpret_cast<float*>(out), batch, ls.data(), (int)ls.size(), spec,
                         threads);
}

void materialize(uintptr_t out, uintptr_t rows, int64_t n, int64_t k, int kind, uint32_t key0,
                 uint32_t key1, uint32_t stream, float scale, int threads) {
  const MatrixSpec spec = make_spec(k, kind, key0, key1, stream, scale);
  py::gil_scoped_release release;
  fastattr::cpu::materialize(reinterpret_cast<float*>(out), reinterpret_cast<const int64_t*>(rows),
                             n, spec, threads);
}

// A PsgLayer from the tensors' pointers and shapes (contiguous), checked so that no index the
// kernel forms can leave them: shapes agree, the convolution fits, segments are a CSR
// grouping of the rows (seg_ptr from 0 to n_rows, non-decreasing; order a permutation).
PsgLayer make_psg_layer(uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape, uintptr_t g,
                        int g_dtype, const std::vector<int64_t>& g_shape,
                        const std::vector<int64_t>& conv, uintptr_t seg_ptr, uintptr_t order,
                        int64_t batch) {
  if (a_dtype < 0 || a_dtype > 2 || g_dtype < 0 || g_dtype > 2)
    throw std::invalid_argument("a and g dtype codes must be 0, 1 or 2");
  PsgLayer l{};
  l.a = reinterpret_cast<const void*>(a);
  l.g = reinterpret_cast<const void*>(g);
  l.a_dtype = a_dtype;
  l.g_dtype = g_dtype;
  if (conv.empty()) {
    if (a_shape.size() != 3 || g_shape.size() != 3 || a_shape[0] != g_shape[0] ||
        a_shape[1] != g_shape[1])
      throw std::invalid_argument("a linear layer takes a [N, T, d_in] and g [N, T, d_out]");
    l.conv = 0;
    l.n_rows = a_shape[0];
    l.d_in = a_shape[2];
    l.d_out = g_shape[2];
    l.h = l.h_out = a_shape[1];  // tokens are the positions
    l.w = l.w_out = 1;
    l.kh = l.kw = l.sh = l.sw = l.dh = l.dw = l.groups = 1;
    l.ph = l.pw = 0;
  } else {
    if (conv.size() != 9)
      throw std::invalid_argument("conv must be 9 ints (kh, kw, sh, sw, ph, pw, dh, dw, groups)");
    if (a_shape.size() != 4 || g_shape.size() != 4 || a_shape[0] != g_shape[0])
      throw std::invalid_argument("a conv2d layer takes NCHW a and g with the same N");
    l.conv = 1;
    l.kh = conv[0], l.kw = conv[1], l.sh = conv[2], l.sw = conv[3], l.ph = conv[4], l.pw = conv[5];
    l.dh = conv[6], l.dw = conv[7], l.groups = conv[8];
    if (std::min({l.kh, l.kw, l.sh, l.sw, l.dh, l.dw, l.groups}) < 1 || std::min(l.ph, l.pw) < 0)
      throw std::invalid_argument(
          "conv sizes, strides, dilations and groups must be >= 1, padding >= 0");
    l.n_rows = a_shape[0];
    l.d_in = a_shape[1];
    l.h = a_shape[2];
    l.w = a_shape[3];
    l.d_out = g_shape[1];
    l.h_out = g_shape[2];
    l.w_out = g_shape[3];
    if (l.d_in % l.groups || l.d_out % l.groups)
      throw std::invalid_argument("conv channels are not divisible by groups");
    const int64_t h_out = (l.h + 2 * l.ph - l.dh * (l.kh - 1) - 1) / l.sh + 1;
    const int64_t w_out = (l.w + 2 * l.pw - l.dw * (l.kw - 1) - 1) / l.sw + 1;
    if (h_out != l.h_out || w_out != l.w_out)
      throw std::invalid_argument("g's output positions do not match the convolution of a");
  }
  if (l.d_in < 1 || l.d_out < 1) throw std::invalid_argument("a and g need >= 1 channel");
  if (batch < 0) throw std::invalid_argument("the number of segments must be >= 0");
  const int64_t* sp = reinterpret_cast<const int64_t*>(seg_ptr);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  if (sp[0] != 0 || sp[batch] != l.n_rows)
    throw std::invalid_argument("seg_ptr must start at 0 and end at the number of rows");
  for (int64_t b = 0; b < batch; ++b)
    if (sp[b + 1] < sp[b]) throw std::invalid_argument("seg_ptr must be non-decreasing");
  std::vector<char> seen((size_t)l.n_rows, 0);
  for (int64_t i = 0; i < l.n_rows; ++i) {
    if (ord[i] < 0 || ord[i] >= l.n_rows || seen[(size_t)ord[i]])
      throw std::invalid_argument("order must be a permutation of the rows");
    seen[(size_t)ord[i]] = 1;
  }
  l.seg_ptr = sp;
  l.order = ord;
  l.batch = batch;
  return l;
}

void psg_project(uintptr_t out, uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                 uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape,
                 const std::vector<int64_t>& conv, uintptr_t seg_ptr, uintptr_t order,
                 int64_t batch, bool has_bias, int64_t w_offset, int64_t b_offset, int64_t k,
                 int kind, uint32_t key0, uint32_t key1, uint32_t stream, float scale,
                 int threads) {
  const MatrixSpec spec = make_spec(k, kind, key0, key1, stream, scale);
  const PsgLayer l =
      make_psg_layer(a, a_dtype, a_shape, g, g_dtype, g_shape, conv, seg_ptr, order, batch);
  if (w_offset < 0 || b_offset < 0) throw std::invalid_argument("offsets must be >= 0");
  py::gil_scoped_release release;
  fastattr::cpu::psg_project(reinterpret_cast<float*>(out), l, has_bias, w_offset, b_offset, spec,
                             threads);
}

void psg_matmul(uintptr_t out, uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape,
                const std::vector<int64_t>& conv, uintptr_t seg_ptr, uintptr_t order,
                int64_t batch, uintptr_t q_weight, int q_weight_dtype, int64_t q,
                uintptr_t q_bias, int q_bias_dtype, int threads) {
  const PsgLayer l =
      make_psg_layer(a, a_dtype, a_shape, g, g_dtype, g_shape, conv, seg_ptr, order, batch);
  if (q < 1) throw std::invalid_argument("q must be >= 1");
  if (q_weight_dtype < 0 || q_weight_dtype > 2 ||
      (q_bias && (q_bias_dtype < 0 || q_bias_dtype > 2)))
    throw std::invalid_argument("q_weight / q_bias dtype codes must be 0, 1 or 2");
  const PsgQuery query{reinterpret_cast<const void*>(q_weight), q_weight_dtype,
                       reinterpret_cast<const void*>(q_bias), q_bias_dtype, q};
  py::gil_scoped_release release;
  fastattr::cpu::psg_matmul(reinterpret_cast<float*>(out), l, query, threads);
}

// S [G, F, F] and s [G, F] of the rows of x (linear [N, T, F], or NCHW with conv geometry),
// checked so that no index the kernel forms can leave x. With acc != 0, S and s are unused and
// the float64 packed upper triangles acc [G, F(F+1)/2] and sums acc_s [G, F] are added to.
void covariance(uintptr_t S, uintptr_t s, uintptr_t acc, uintptr_t acc_s, uintptr_t x, int dtype,
                const std::vector<int64_t>& shape, const std::vector<int64_t>& conv, bool reduce,
                int threads) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("x dtype code must be 0, 1 or 2");
  CovInput in{};
  in.x = reinterpret_cast<const void*>(x);
  in.dtype = dtype;
  in.reduce = reduce ? 1 : 0;
  if (conv.empty()) {
    if (shape.size() != 3) throw std::invalid_argument("a linear covariance takes x [N, T, F]");
    in.conv = 0;
    in.n = shape[0], in.h = in.h_out = shape[1], in.channels = shape[2];
    in.w = in.w_out = 1;
    in.kh = in.kw = in.sh = in.sw = in.dh = in.dw = in.groups = 1;
  } else {
    if (conv.size() != 9)
      throw std::invalid_argument("conv must be 9 ints (kh, kw, sh, sw, ph, pw, dh, dw, groups)");
    if (shape.size() != 4) throw std::invalid_argument("a conv covariance takes NCHW x");
    in.conv = 1;
    in.n = shape[0], in.channels = shape[1], in.h = shape[2], in.w = shape[3];
    in.kh = conv[0], in.kw = conv[1], in.sh = conv[2], in.sw = conv[3], in.ph = conv[4];
    in.pw = conv[5], in.dh = conv[6], in.dw = conv[7], in.groups = conv[8];
    if (std::min({in.kh, in.kw, in.sh, in.sw, in.dh, in.dw, in.groups}) < 1 ||
        std::min(in.ph, in.pw) < 0)
      throw std::invalid_argument(
          "conv sizes, strides, dilations and groups must be >= 1, padding >= 0");
    if (in.channels % in.groups) throw std::invalid_argument("channels not divisible by groups");
    in.h_out = (in.h + 2 * in.ph - in.dh * (in.kh - 1) - 1) / in.sh + 1;
    in.w_out = (in.w + 2 * in.pw - in.dw * (in.kw - 1) - 1) / in.sw + 1;
    if (in.h + 2 * in.ph < in.dh * (in.kh - 1) + 1 || in.w + 2 * in.pw < in.dw * (in.kw - 1) + 1)
      throw std::invalid_argument("the convolution has no output position");
  }
  if (std::min({in.n, in.channels, in.h, in.w}) < 1)
    throw std::invalid_argument("x must not be empty");
  py::gil_scoped_release release;
  if (acc != 0 && acc_s == 0) throw std::invalid_argument("acc needs acc_s");
  fastattr::cpu::covariance(reinterpret_cast<float*>(S), reinterpret_cast<float*>(s),
                            reinterpret_cast<double*>(acc), reinterpret_cast<double*>(acc_s), in,
                            threads);
}

// L [O, F] = sum_n (g_n^T a_n)^2 for a [N, P, F], g [N, P, O].
void ekfac_lambda(uintptr_t L, uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                  uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape, int threads) {
  if (a_dtype < 0 || a_dtype > 2 || g_dtype < 0 || g_dtype > 2)
    throw std::invalid_argument("a and g dtype codes must be 0, 1 or 2");
  if (a_shape.size() != 3 || g_shape.size() != 3 || a_shape[0] != g_shape[0] ||
      a_shape[1] != g_shape[1])
    throw std::invalid_argument("ekfac_lambda takes a [N, P, F] and g [N, P, O]");
  if (std::min({a_shape[0], a_shape[1], a_shape[2], g_shape[2]}) < 1)
    throw std::invalid_argument("a and g must not be empty");
  py::gil_scoped_release release;
  fastattr::cpu::ekfac_lambda(reinterpret_cast<float*>(L), reinterpret_cast<const void*>(a),
                              a_dtype, reinterpret_cast<const void*>(g), g_dtype, a_shape[0],
                              a_shape[1], a_shape[2], g_shape[2], threads);
}

py::tuple philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t w[4];
  fastattr::philox4x32_10(c0, c1, c2, c3, k0, k1, w);
  return py::make_tuple(w[0], w[1], w[2], w[3]);
}

py::tuple gaussian4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  float z0, z1, z2, z3;
  fastattr::fa_gaussian4(w0, w1, w2, w3, z0, z1, z2, z3);
  return py::make_tuple(z0, z1, z2, z3);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattr CPU kernels (C++17, OpenMP, run-time SIMD dispatch)";
  m.def("simd_level", &fastattr::cpu::simd_level,
        "SIMD variant in use: amx, avx512, avx2 or generic (FASTATTR_CPU_SIMD lowers it)");
  m.def("philox4x32_10", &philox, "Philox4x32-10 of one counter and key -> 4 words");
  m.def("gaussian4", &gaussian4, "the fp32 Box-Muller entries of four Philox words (unscaled)");
  m.def("philox_key", &fastattr::philox_key, "64-bit Philox key of (seed, ensemble_id)");
  m.def("project", &project, "y[B,k] = sum_l x_l @ R[off_l:off_l+p_l] (raw pointers)");
  m.def("materialize", &materialize, "rows of R into a float32 [n, k] buffer (raw pointers)");
  m.def("psg_project", &psg_project,
        "y[B,k] = per-sample weight (+ bias) gradients of one layer @ R at their offsets, fused "
        "(raw pointers; contiguous a, g, seg_ptr, order)");
  m.def("psg_matmul", &psg_matmul,
        "y[B,q] = <G_b, Q_j> (+ <bias_b, Qbias_j>) for one layer, fused (raw pointers; "
        "contiguous inputs; q_bias 0 when absent)");
  m.def("covariance", &covariance,
        "S[G,F,F] = sum v v^T, s[G,F] = sum v over the rows (conv: in-kernel patches) of x; "
        "acc != 0: acc[G,F(F+1)/2] += packed upper S and acc_s += s in float64 instead "
        "(raw pointers; contiguous x)");
  m.def("ekfac_lambda", &ekfac_lambda,
        "L[O,F] = sum_n (g_n^T a_n)^2 without forming the products (raw pointers; contiguous)");
}
