// fastattr._cuda: pybind11 bindings of the CUDA kernels. Mirrors fastattr._C (csrc/bindings.cpp):
// tensors cross as raw device pointers plus sizes and strides, and the CUDA stream as an
// integer handle (torch.cuda.current_stream().cuda_stream). No torch and no CUDA headers are
// included here, so this file compiles with the plain host compiler and the module does not
// depend on the torch version; cudart is linked statically (setup.py).
//
// Errors: invalid arguments raise ValueError; a failed CUDA call or launch raises RuntimeError
// with the CUDA error name and string.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include "cuda/curvature.h"
#include "cuda/projection.h"
#include "cuda/psg.h"
#include "philox.h"

namespace py = pybind11;
using fastattr::cuda::Layer;
using fastattr::cuda::MatrixSpec;

namespace {

CUstream_st* as_stream(uintptr_t handle) { return reinterpret_cast<CUstream_st*>(handle); }

void project(uintptr_t out, int64_t batch,
             const std::vector<std::tuple<uintptr_t, int, int64_t, int64_t, int64_t, int64_t>>& layers,
             int64_t k, int kind, uint32_t key0, uint32_t key1, uint32_t stream, float scale,
             uintptr_t cuda_stream) {
  const MatrixSpec spec{k, kind, key0, key1, stream, scale};
  std::vector<Layer> ls;
  ls.reserve(layers.size());
  for (const auto& t : layers) {
    ls.push_back(Layer{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t),
                       std::get<2>(t), std::get<3>(t), std::get<4>(t), std::get<5>(t)});
  }
  if (ls.size() > static_cast<size_t>(INT32_MAX)) throw std::invalid_argument("too many layers");
  py::gil_scoped_release release;  // argument checks inside raise std::invalid_argument
  fastattr::cuda::project(reinterpret_cast<float*>(out), batch, ls.data(),
                          static_cast<int>(ls.size()), spec, as_stream(cuda_stream));
}

void materialize(uintptr_t out, uintptr_t rows, int64_t n, int64_t k, int kind, uint32_t key0,
                 uint32_t key1, uint32_t stream, float scale, uintptr_t cuda_stream) {
  const MatrixSpec spec{k, kind, key0, key1, stream, scale};
  py::gil_scoped_release release;
  fastattr::cuda::materialize(reinterpret_cast<float*>(out), reinterpret_cast<const int64_t*>(rows),
                              n, spec, as_stream(cuda_stream));
}

// One layer call for the psg kernels: a/g pointers, dtype codes and shapes ([N, T, d] for a
// linear layer, NCHW for conv2d), conv geometry (empty for linear, else the 9 ints), segments.
fastattr::cuda::PsgInput psg_input(uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                                   uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape,
                                   const std::vector<int>& conv, uintptr_t seg_ptr,
                                   uintptr_t order, int64_t batch) {
  fastattr::cuda::PsgInput in{};
  const size_t ndim = conv.empty() ? 3 : 4;
  if (!conv.empty() && conv.size() != 9)
    throw std::invalid_argument("conv must be empty (linear) or 9 ints (kh, kw, stride_h, "
                                "stride_w, pad_h, pad_w, dil_h, dil_w, groups)");
  if (a_shape.size() != ndim || g_shape.size() != ndim)
    throw std::invalid_argument(conv.empty() ? "a linear layer takes 3-D a and g"
                                             : "a conv2d layer takes 4-D (NCHW) a and g");
  in.a = reinterpret_cast<const void*>(a);
  in.a_dtype = a_dtype;
  in.g = reinterpret_cast<const void*>(g);
  in.g_dtype = g_dtype;
  for (size_t i = 0; i < ndim; ++i) {
    in.a_shape[i] = a_shape[i];
    in.g_shape[i] = g_shape[i];
  }
  in.is_conv = conv.empty() ? 0 : 1;
  for (size_t i = 0; i < conv.size(); ++i) in.conv[i] = conv[i];
  in.seg_ptr = reinterpret_cast<const int64_t*>(seg_ptr);
  in.order = reinterpret_cast<const int64_t*>(order);
  in.batch = batch;
  return in;
}

void psg_project(uintptr_t out, uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                 uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape,
                 const std::vector<int>& conv, uintptr_t seg_ptr, uintptr_t order, int64_t batch,
                 bool has_bias, int64_t w_offset, int64_t b_offset, int64_t k, int kind,
                 uint32_t key0, uint32_t key1, uint32_t stream, float scale,
                 uintptr_t cuda_stream) {
  const auto in = psg_input(a, a_dtype, a_shape, g, g_dtype, g_shape, conv, seg_ptr, order, batch);
  const MatrixSpec spec{k, kind, key0, key1, stream, scale};
  py::gil_scoped_release release;
  fastattr::cuda::psg_project(reinterpret_cast<float*>(out), in, has_bias, w_offset, b_offset,
                              spec, as_stream(cuda_stream));
}

void psg_matmul(uintptr_t out, uintptr_t a, int a_dtype, const std::vector<int64_t>& a_shape,
                uintptr_t g, int g_dtype, const std::vector<int64_t>& g_shape,
                const std::vector<int>& conv, uintptr_t seg_ptr, uintptr_t order, int64_t batch,
                uintptr_t q_weight, int q_dtype, int64_t q, uintptr_t q_bias, int q_bias_dtype,
                uintptr_t cuda_stream) {
  const auto in = psg_input(a, a_dtype, a_shape, g, g_dtype, g_shape, conv, seg_ptr, order, batch);
  py::gil_scoped_release release;
  fastattr::cuda::psg_matmul(reinterpret_cast<float*>(out), in,
                             reinterpret_cast<const void*>(q_weight), q_dtype, q,
                             reinterpret_cast<const void*>(q_bias), q_bias_dtype,
                             as_stream(cuda_stream));
}

// x: dtype code and shape ([N, T, F] for linear, NCHW for conv); conv empty or the 9 ints.
void covariance(uintptr_t S, uintptr_t s, uintptr_t x, int x_dtype,
                const std::vector<int64_t>& x_shape, const std::vector<int>& conv, bool reduce,
                uintptr_t cuda_stream) {
  if (!conv.empty() && conv.size() != 9)
    throw std::invalid_argument("conv must be empty (linear) or 9 ints (kh, kw, stride_h, "
                                "stride_w, pad_h, pad_w, dil_h, dil_w, groups)");
  if (x_shape.size() != (conv.empty() ? 3u : 4u))
    throw std::invalid_argument(conv.empty() ? "a linear layer takes 3-D x [N, T, F]"
                                             : "a conv2d layer takes 4-D (NCHW) x");
  py::gil_scoped_release release;
  fastattr::cuda::covariance(reinterpret_cast<float*>(S), reinterpret_cast<float*>(s),
                             reinterpret_cast<const void*>(x), x_dtype, x_shape.data(),
                             conv.empty() ? 0 : 1, conv.empty() ? nullptr : conv.data(), reduce,
                             as_stream(cuda_stream));
}

void ekfac_lambda(uintptr_t out, uintptr_t a, int a_dtype, uintptr_t g, int g_dtype, int64_t n,
                  int64_t p, int64_t f, int64_t o, uintptr_t cuda_stream) {
  py::gil_scoped_release release;
  fastattr::cuda::ekfac_lambda(reinterpret_cast<float*>(out), reinterpret_cast<const void*>(a),
                               a_dtype, reinterpret_cast<const void*>(g), g_dtype, n, p, f, o,
                               as_stream(cuda_stream));
}

py::dict version() {
  py::dict d;
  d["runtime"] = fastattr::cuda::runtime_version();
  d["driver"] = fastattr::cuda::driver_version();
  d["archs"] = fastattr::cuda::compiled_archs();
  d["device_status"] = fastattr::cuda::device_status();
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastattr CUDA kernels (tensor-core projection with an on-the-fly Philox matrix, fused "
          "per-sample-gradient products, K-FAC / EK-FAC curvature accumulation)";
  m.def("project", &project, py::arg("out"), py::arg("batch"), py::arg("layers"), py::arg("k"),
        py::arg("kind"), py::arg("key0"), py::arg("key1"), py::arg("stream"), py::arg("scale"),
        py::arg("cuda_stream"),
        "out[B,k] = scale * sum_l x_l @ Z[off_l:off_l+p_l] on cuda_stream (raw device pointers; "
        "layers are (ptr, dtype code, p, stride_b, stride_p, offset))");
  m.def("materialize", &materialize, py::arg("out"), py::arg("rows"), py::arg("n"), py::arg("k"),
        py::arg("kind"), py::arg("key0"), py::arg("key1"), py::arg("stream"), py::arg("scale"),
        py::arg("cuda_stream"), "rows of R into a float32 [n, k] device buffer on cuda_stream");
  m.def("psg_project", &psg_project, py::arg("out"), py::arg("a"), py::arg("a_dtype"),
        py::arg("a_shape"), py::arg("g"), py::arg("g_dtype"), py::arg("g_shape"), py::arg("conv"),
        py::arg("seg_ptr"), py::arg("order"), py::arg("batch"), py::arg("has_bias"),
        py::arg("w_offset"), py::arg("b_offset"), py::arg("k"), py::arg("kind"), py::arg("key0"),
        py::arg("key1"), py::arg("stream"), py::arg("scale"), py::arg("cuda_stream"),
        "out[B,k] = per-sample gradients of one Linear/Conv2d call (G_b formed in shared memory, "
        "never stored) times rows of R at w_offset (and b_offset for the bias), on cuda_stream");
  m.def("psg_matmul", &psg_matmul, py::arg("out"), py::arg("a"), py::arg("a_dtype"),
        py::arg("a_shape"), py::arg("g"), py::arg("g_dtype"), py::arg("g_shape"), py::arg("conv"),
        py::arg("seg_ptr"), py::arg("order"), py::arg("batch"), py::arg("q_weight"),
        py::arg("q_dtype"), py::arg("q"), py::arg("q_bias"), py::arg("q_bias_dtype"),
        py::arg("cuda_stream"),
        "out[B,q] = <G_b, Q_j> (+ <bias_b, Qb_j> when q_bias != 0) on cuda_stream");
  m.def("covariance", &covariance, py::arg("S"), py::arg("s"), py::arg("x"), py::arg("x_dtype"),
        py::arg("x_shape"), py::arg("conv"), py::arg("reduce"), py::arg("cuda_stream"),
        "S[G,F,F] = sum_v v v^T, s[G,F] = sum_v v over the rows of x (conv: patch vectors "
        "gathered in-kernel per channel group; reduce: summed per (n, group)) on cuda_stream");
  m.def("ekfac_lambda", &ekfac_lambda, py::arg("out"), py::arg("a"), py::arg("a_dtype"),
        py::arg("g"), py::arg("g_dtype"), py::arg("n"), py::arg("p"), py::arg("f"), py::arg("o"),
        py::arg("cuda_stream"),
        "out[O,F] = sum_n (g_n^T a_n)^2 for a [n,p,f], g [n,p,o], never forming g_n^T a_n in "
        "memory, on cuda_stream");
  m.def("device_count", &fastattr::cuda::device_count,
        "visible CUDA devices as this module's runtime sees them (0 when none or no usable "
        "driver; version()['device_status'] says why)");
  m.def("version", &version,
        "dict: runtime and driver versions (1000*major + 10*minor), compiled archs, device status");
}
