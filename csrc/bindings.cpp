// fastattr._C: pybind11 bindings of the CPU kernels. Tensors cross as raw pointers plus sizes
// and strides (the Python launchers in fastattr/kernels/cpu.py own validation), so this module
// does not link against torch and does not depend on its version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include "cpu/projection.h"
#include "philox.h"

namespace py = pybind11;
using fastattr::cpu::Layer;
using fastattr::cpu::MatrixSpec;

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
        "SIMD variant in use: avx512, avx2 or generic (FASTATTR_CPU_SIMD lowers it)");
  m.def("philox4x32_10", &philox, "Philox4x32-10 of one counter and key -> 4 words");
  m.def("gaussian4", &gaussian4, "the fp32 Box-Muller entries of four Philox words (unscaled)");
  m.def("philox_key", &fastattr::philox_key, "64-bit Philox key of (seed, ensemble_id)");
  m.def("project", &project, "y[B,k] = sum_l x_l @ R[off_l:off_l+p_l] (raw pointers)");
  m.def("materialize", &materialize, "rows of R into a float32 [n, k] buffer (raw pointers)");
}
