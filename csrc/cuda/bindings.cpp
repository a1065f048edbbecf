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

#include "cuda/projection.h"
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
  m.doc() = "fastattr CUDA kernels (tensor-core projection with an on-the-fly Philox matrix)";
  m.def("project", &project, py::arg("out"), py::arg("batch"), py::arg("layers"), py::arg("k"),
        py::arg("kind"), py::arg("key0"), py::arg("key1"), py::arg("stream"), py::arg("scale"),
        py::arg("cuda_stream"),
        "out[B,k] = scale * sum_l x_l @ Z[off_l:off_l+p_l] on cuda_stream (raw device pointers; "
        "layers are (ptr, dtype code, p, stride_b, stride_p, offset))");
  m.def("materialize", &materialize, py::arg("out"), py::arg("rows"), py::arg("n"), py::arg("k"),
        py::arg("kind"), py::arg("key0"), py::arg("key1"), py::arg("stream"), py::arg("scale"),
        py::arg("cuda_stream"), "rows of R into a float32 [n, k] device buffer on cuda_stream");
  m.def("device_count", &fastattr::cuda::device_count,
        "visible CUDA devices as this module's runtime sees them (0 when none or no usable "
        "driver; version()['device_status'] says why)");
  m.def("version", &version,
        "dict: runtime and driver versions (1000*major + 10*minor), compiled archs, device status");
}
